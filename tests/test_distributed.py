"""Stage one under torchrun: two CPU ranks (gloo) make the cache one process makes, on one "machine"
or two, fail together, wait for each other's slow steps, and find their own GPU (simulated)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import json
import socket
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import fercache.extract
from fercache.cache import describe_cache, load_embeddings, usage_of
from fercache.data import Source
import fercache.distributed
from fercache.distributed import RankFailed, _join, _PeerFailed, rank_device, refuse_shared_gpus, step
from fercache.errors import UserError
from fercache.extract import extract
from fercache.pipeline import run as run_all


def torchrun(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Two ranks on this machine, one thread each, as a user would start them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*args: str, cwd: Path, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Two "machines" of one rank each, as on a cluster: one torchrun per node, a c10d rendezvous."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rdzv = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{free_port()}", "--rdzv-id", "fer-test", "--local-addr", "127.0.0.1"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rdzv, *args], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = []
    for node in nodes:
        out, err = node.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    return done


def assert_same_cache(one: Path, two: Path) -> None:
    """The same splits, ids, labels, usage and (float rounding aside) features; no part left over."""
    splits = describe_cache(two)["splits"]
    assert splits.keys() == describe_cache(one)["splits"].keys() and all(s["complete"] for s in splits.values())
    assert not two.with_name(two.name + ".partial").exists()
    for split in splits:
        a, b = load_embeddings(one, split), load_embeddings(two, split)
        assert b.ids == a.ids and len(set(b.ids)) == len(b.ids)
        np.testing.assert_array_equal(b.y, a.y)
        np.testing.assert_allclose(b.X, a.X, rtol=1e-5, atol=1e-6)
        assert usage_of(two, split) == usage_of(one, split)


def test_two_ranks_make_the_cache_one_process_makes(tmp_path, fer_zip, tiny_model):
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    extract(fer_zip, "all", str(tiny_model), dtype="float32", batch_size=4, cache=one, progress=False)
    run = torchrun("-m", "fercache", "extract", "--data", str(fer_zip), "--split", "all", "--model", str(tiny_model),
                   "--dtype", "float32", "--batch-size", "4", "--cache", str(two), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    # train: 21 images -> shards of 10 and 11 (by count, not batch size), each ending in a short batch
    assert [line.split(":")[0] for line in run.stdout.splitlines()] == ["train", "test"]  # rank 0 only
    assert_same_cache(one, two)


def test_each_rank_decodes_only_its_own_shard(tmp_path, fer_zip, tiny_model, monkeypatch):
    """Two ranks simulated in one process, one after the other: rank 1 writes its part, rank 0 its
    own and commits both. Each decodes only its own images, and the cache is one process's."""
    decoded: list[list[str]] = []
    stream = Source.stream
    monkeypatch.setattr(Source, "stream", lambda self, entries, *a, **k: (
        decoded.append([e.id for e in entries]), stream(self, entries, *a, **k))[1])
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    extract(fer_zip, "train", str(tiny_model), dtype="float32", batch_size=4, cache=one, progress=False)
    everything = decoded.pop()
    monkeypatch.setattr(fercache.extract, "step", nullcontext)
    monkeypatch.setattr(fercache.extract, "agree", lambda **values: None)
    for rank in (1, 0):
        monkeypatch.setattr(fercache.extract, "rank_and_world", lambda: (rank, 2))
        extract(fer_zip, "train", str(tiny_model), dtype="float32", batch_size=4, cache=two, progress=False)
    # 21 images (fewer than 2 x 256): rank 0 takes the first 10, rank 1 the other 11, whatever the batch size
    assert decoded == [everything[10:], everything[:10]]
    assert_same_cache(one, two)


def test_fercache_run_under_torchrun_equals_one_process(tmp_path, fer_zip, tiny_model):
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    _, alone = run_all(fer_zip, str(tiny_model), dtype="float32", batch_size=4, epochs=3, cache=one,
                       out=tmp_path / "alone", progress=False)
    run = torchrun("-m", "fercache", "run", "--data", str(fer_zip), "--model", str(tiny_model), "--dtype", "float32",
                   "--batch-size", "4", "--epochs", "3", "--cache", str(two), "--out", str(tmp_path / "ranks"),
                   cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("test accuracy") == 1 and run.stdout.count("train: 21 images") == 1  # rank 0 alone
    assert_same_cache(one, two)
    metrics = json.loads((tmp_path / "ranks" / "metrics.json").read_text())
    assert metrics["test_accuracy"] == alone.metrics["test_accuracy"]
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3]
    np.testing.assert_allclose([r["train_loss"] for r in metrics["history"]],
                               [r["train_loss"] for r in alone.metrics["history"]], rtol=1e-4)


def test_two_machines_make_the_cache_one_process_makes(tmp_path, fer_zip, tiny_model):
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    extract(fer_zip, "test", str(tiny_model), dtype="float32", batch_size=4, cache=one, progress=False)
    nodes = two_nodes("-m", "fercache", "extract", "--data", str(fer_zip), "--split", "test", "--model",
                      str(tiny_model), "--dtype", "float32", "--batch-size", "4", "--cache", str(two), cwd=tmp_path)
    assert [n.returncode for n in nodes] == [0, 0], [n.stderr[-2000:] for n in nodes]
    # the rendezvous decides which node holds rank 0; that one alone prints the summary
    assert sorted(n.stdout.count("test: 14 images") for n in nodes) == [0, 1]
    assert_same_cache(one, two)


def test_a_slow_step_outlasts_a_short_collective_timeout(tmp_path):
    """fercache's sync points wait on their own gloo group: a caller's group with a 3 s timeout does
    not end them when one rank spends 6 s before the sync point (a download, a commit); and that
    group, released at exit, does not end the process with `terminate called` (a return code
    other than 0)."""
    script = tmp_path / "slow.py"
    script.write_text(textwrap.dedent("""
        import time
        from datetime import timedelta
        import torch.distributed as dist
        from fercache.distributed import agree, step

        dist.init_process_group("gloo", timeout=timedelta(seconds=3))
        rank = dist.get_rank()
        with step():
            if rank == 1:
                time.sleep(6)
        agree(value=1)
        with open(f"rank{rank}.txt", "w") as f:
            f.write("through")
        dist.destroy_process_group()
    """))
    run = torchrun(str(script), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["through", "through"]


def simulate_gpus(monkeypatch, visible: int, local_rank: str | None, local_world: str | None = None,
                  cuda_visible: str | None = None) -> None:
    """`visible` GPUs for this process, and the environment torchrun (or SLURM) gives a rank."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    for name, value in (("LOCAL_RANK", local_rank), ("LOCAL_WORLD_SIZE", local_world),
                        ("CUDA_VISIBLE_DEVICES", cuda_visible)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.mark.parametrize("visible, local_rank, local_world, cuda_visible, expected", [
    # SLURM --gpus-per-task 1 (or CUDA_VISIBLE_DEVICES set per rank) under a torchrun of 4 ranks:
    # each rank sees only its own GPU, as device 0
    (1, "3", "4", "3", "cuda:0"),
    (1, "3", "4", "0", "cuda:0"),  # SLURM with device cgroups: every task's own GPU is its "0" (or, exported
    # to all ranks, the machine's one GPU shared: only its UUID tells, once joined, `refuse_shared_gpus`)
    (8, "3", "8", None, "cuda:3"),  # one torchrun per machine, every GPU visible: the one at the local rank
    (1, "0", "1", None, "cuda:0"),
    (1, None, None, None, "cuda:0"),
])
def test_each_rank_finds_its_own_gpu(monkeypatch, visible, local_rank, local_world, cuda_visible, expected):
    simulate_gpus(monkeypatch, visible, local_rank, local_world, cuda_visible)
    assert rank_device("cuda") == expected and rank_device("auto") == expected
    assert rank_device("cuda:5") == "cuda:5"  # as given


@pytest.mark.parametrize("visible, local_rank, local_world, cuda_visible", [
    (2, "2", "4", None),
    (2, "0", "4", None),  # every rank of the machine refuses, not only those left without a GPU
    (2, "0", "4", "0,1"),
    (1, "1", "2", None),  # two ranks on a machine's only GPU
])
def test_more_ranks_than_visible_gpus_is_refused(monkeypatch, visible, local_rank, local_world, cuda_visible):
    simulate_gpus(monkeypatch, visible, local_rank, local_world, cuda_visible)
    with pytest.raises(UserError, match=f"local rank {local_rank} has no GPU of its own"):
        rank_device("cuda")


def ranks_on_gpus(monkeypatch, uuids: list[str]) -> None:
    """This process as rank 0 of len(uuids), on one machine, each rank's GPU of the given UUID (CUDA simulated)."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(uuid=uuids[0]))
    monkeypatch.setattr(fercache.distributed, "_gather", lambda mine: [(mine[0], mine[1] and u) for u in uuids])


def test_ranks_sharing_one_gpu_are_refused_once_joined(monkeypatch):
    """`export CUDA_VISIBLE_DEVICES=0; torchrun --nproc-per-node 4`: every rank sees one GPU, its "0", which
    `rank_device` cannot tell from SLURM's one GPU per task; the GPUs' UUIDs, gathered, can."""
    simulate_gpus(monkeypatch, 1, "0", "4", "0")
    device = rank_device("cuda")
    ranks_on_gpus(monkeypatch, ["aaaa-1"] * 4)
    with pytest.raises(UserError, match=r"^ranks 0 and 1 share one GPU on .* \(GPU-aaaa-1\): start at most one "
                                        r"rank per GPU"):
        refuse_shared_gpus(device)
    ranks_on_gpus(monkeypatch, ["aaaa-1", "bbbb-2", "cccc-3", "dddd-4"])  # SLURM: each task's own "0"
    refuse_shared_gpus(device)
    ranks_on_gpus(monkeypatch, ["aaaa-1"] * 4)
    refuse_shared_gpus("cpu")  # CPU ranks share the machine's cores by design


@pytest.mark.parametrize("drop, set_to, said", [
    ("MASTER_ADDR", {}, "environment variable MASTER_ADDR expected, but not set"),
    (None, {"MASTER_PORT": "notaport"}, "invalid literal for int()"),
])
def test_a_missing_or_malformed_master_address_is_one_line(monkeypatch, drop, set_to, said):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511",
                        **set_to}.items():
        monkeypatch.setenv(name, value)
    if drop:
        monkeypatch.delenv(drop)
    with pytest.raises(UserError, match="^rank 0 of 2 could not join the others at MASTER_ADDR") as err:
        _join()
    assert said in str(err.value) and "\n" not in str(err.value)


def test_a_rank_stopped_by_another_ranks_flag_never_returns_normally(monkeypatch):
    """Its shard is half done: even if no rank's gathered result says why, it must not go on as if finished."""
    monkeypatch.setattr(fercache.distributed, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(fercache.distributed, "control_group", lambda: None)
    monkeypatch.setattr(fercache.distributed, "_gather", lambda mine: [mine, (None, True)])
    with pytest.raises(RankFailed, match="^rank 0: stopped because another rank flagged a failure"):
        with step():
            raise _PeerFailed()  # as `check_peers` raises it
    with step():  # a step nobody stopped returns
        pass


def test_a_rank_that_cannot_join_says_so_within_the_join_timeout(tmp_path, fer_zip, tiny_model):
    """World size 2 with one rank started: it gives up after FERCACHE_JOIN_TIMEOUT, not the 24 hours
    the collectives wait, with one line that names what to check."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "FERCACHE_JOIN_TIMEOUT": "3",
           "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "fercache", "extract", "--data", str(fer_zip), "--model",
                          str(tiny_model), "--device", "cpu", "--cache", str(tmp_path / "c.h5")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=90)
    assert time.monotonic() - start < 45
    assert run.returncode == 2, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("fercache: error:")]
    assert len(errors) == 1 and "Traceback" not in run.stderr
    assert errors[0].startswith("fercache: error: rank 0 of 2 could not join the others at MASTER_ADDR 127.0.0.1:")
    assert "within 3 s (FERCACHE_JOIN_TIMEOUT" in errors[0]
    assert "GLOO_SOCKET_IFNAME" in errors[0] and "NCCL_SOCKET_IFNAME" in errors[0]
    assert not (tmp_path / "c.h5").exists()


def test_a_user_error_ends_every_rank_with_one_line(tmp_path, fer_zip, tiny_model):
    start = time.monotonic()
    run = torchrun("-m", "fercache", "extract", "--data", str(fer_zip), "--model", str(tiny_model),
                   "--layers", "7", "--cache", str(tmp_path / "c.h5"), cwd=tmp_path)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("fercache: error:")]
    assert errors == ["fercache: error: rank 0: --layers '7': this model has blocks 1 to 2"]
    assert "exitcode  : 2" in run.stderr and "fercache/" not in run.stderr  # exit 2, no traceback of ours
    assert time.monotonic() - start < 120
    assert not (tmp_path / "c.h5").exists()


def test_a_rank_stops_within_seconds_when_another_fails(tmp_path, fer_zip, tiny_model):
    """Rank 1 cannot read its images; rank 0's shard would take over 5 s (10 batches of 0.5 s). Rank 0
    learns of it from `check_peers` (polling every 0.2 s here) in its encode loop and stops after a
    batch or two, not at the end of its shard; both say rank 1's message, and rank 0's part stays."""
    script = tmp_path / "fail_early.py"
    script.write_text(textwrap.dedent("""
        import json, sys, time
        import fercache.distributed
        from fercache.data import Source
        from fercache.distributed import RankFailed, torchrun_group
        from fercache.encoder import Encoder
        from fercache.errors import UserError
        from fercache.extract import extract

        data, model = sys.argv[1:3]
        batches = []
        fercache.distributed.PEER_POLL_SECONDS = 0.2
        with torchrun_group("cpu") as (device, rank):
            if rank == 0:
                tensors = Encoder.tensors
                Encoder.tensors = lambda self, *a, **k: (batches.append(1), time.sleep(0.5), tensors(self, *a, **k))[2]
            else:
                def unreadable(self, entries, *args, **kwargs):
                    with open("failed_at", "w") as f:
                        f.write(str(time.time()))
                    raise UserError("rank 1's disk is gone")
                    yield
                Source.stream = unreadable
            start = time.monotonic()
            try:
                extract(data, "train", model, device="cpu", dtype="float32", batch_size=1, cache="c.h5",
                        progress=False)
                said = "finished"
            except RankFailed as exc:
                said = str(exc)
            seconds = time.monotonic() - start
        with open(f"rank{rank}.json", "w") as f:
            json.dump({"said": said, "seconds": seconds, "ended": time.time(), "batches": len(batches)}, f)
    """))
    run = torchrun(str(script), str(fer_zip), str(tiny_model), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["said"] for r in ranks] == ["rank 1: rank 1's disk is gone"] * 2
    # 21 train images in batches of 1: rank 0's shard is 10 batches, over 5 s; it stops after 1-3
    after = ranks[0]["ended"] - float((tmp_path / "failed_at").read_text())
    assert 1 <= ranks[0]["batches"] <= 3 and after < 4, (after, ranks)
    assert (tmp_path / "c.h5.partial").is_dir() and not (tmp_path / "c.h5").exists()


def test_a_failure_on_one_rank_is_raised_on_every_rank(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent("""
        from fercache.distributed import RankFailed, agree, step, torchrun_group
        from fercache.errors import UserError

        said = []
        with torchrun_group("cpu") as (device, rank):
            try:
                with step():
                    if rank == 1:
                        raise UserError("bad input seen by rank 1 only")
            except RankFailed as exc:
                said.append(f"user error: {exc}")
            try:
                with step():
                    if rank == 0:
                        raise ZeroDivisionError("a bug\\nsecond line")
            except RankFailed as exc:
                said.append(f"bug: {exc}")
            except ZeroDivisionError:
                said.append("bug: its own ZeroDivisionError")
            try:
                agree(data=f"rank {rank}'s data")
            except RankFailed as exc:
                said.append(f"agree: {exc}")
        with open(f"rank{rank}.txt", "w") as f:  # each its own file: two ranks' prints may interleave
            f.write("\\n".join(said))
    """))
    run = torchrun(str(script), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    different = ("agree: rank 1: data: not the same as on rank 0; every machine must see the same data and "
                 "model, and the cache on a filesystem they all share")
    assert (tmp_path / "rank0.txt").read_text().splitlines() == [
        "user error: rank 1: bad input seen by rank 1 only", "bug: its own ZeroDivisionError", different]
    assert (tmp_path / "rank1.txt").read_text().splitlines() == [
        "user error: rank 1: bad input seen by rank 1 only", "bug: rank 0: ZeroDivisionError: a bug", different]
