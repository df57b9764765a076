"""Stage one under torchrun: two CPU ranks (gloo) make the cache one process makes, and fail together."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from fercache.cache import describe_cache, load_embeddings, usage_of
from fercache.extract import extract


def torchrun(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Two ranks on this machine, one thread each, as a user would start them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_ranks_make_the_cache_one_process_makes(tmp_path, fer_zip, tiny_model):
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    extract(fer_zip, "all", str(tiny_model), dtype="float32", batch_size=4, cache=one, progress=False)
    run = torchrun("-m", "fercache", "extract", "--data", str(fer_zip), "--split", "all", "--model", str(tiny_model),
                   "--dtype", "float32", "--batch-size", "4", "--cache", str(two), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    # train: 21 images in batches of 4 -> shards of 12 and 9, the last batch of rank 1 a short one
    assert [line.split(":")[0] for line in run.stdout.splitlines()] == ["train", "test"]  # rank 0 only
    splits = describe_cache(two)["splits"]
    assert {name: s["complete"] for name, s in splits.items()} == {"train": True, "test": True}
    assert not (tmp_path / "two.h5.partial").exists()
    for split in ("train", "test"):
        a, b = load_embeddings(one, split), load_embeddings(two, split)
        assert b.ids == a.ids and len(set(b.ids)) == len(b.ids)
        np.testing.assert_array_equal(b.y, a.y)
        np.testing.assert_allclose(b.X, a.X, rtol=1e-5, atol=1e-6)
        assert usage_of(two, split) == usage_of(one, split)


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
