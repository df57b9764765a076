"""Stage one's cache safety: identity checked under the commit lock, no non-finite rows, honest
summaries, commits in bounded memory, shards that survive a --batch-size change, a --force run
that resumes, and a word when the filesystem has no locks."""

from __future__ import annotations

import errno
import json
import tracemalloc
import zipfile
from contextlib import nullcontext

import h5py
import numpy as np
import pytest

import fercache.cache
import fercache.extract
from conftest import make_fer_layout
from fercache.cache import PartFile, cache_meta, commit, load_embeddings, part_path, shard_digest, write_split
from fercache.data import Source
from fercache.encoder import Encoder
from fercache.errors import FERCacheWarning, UserError
from fercache.extract import extract, forcing_path, shard_bounds
from fercache.identity import Identity
from fercache.names import feature_name

ARGS = dict(device="cpu", dtype="float32", progress=False)


def other_zip(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name, (data, _, _) in make_fer_layout({"train": 5, "test": 6}, seed=5).items():
            z.writestr(name, data)
    return path


def failing_encoder(monkeypatch, on_call: int, error: BaseException = RuntimeError("encoder broke")) -> None:
    """`Encoder.tensors` raises `error` on its `on_call`-th call (an interrupted run)."""
    tensors, calls = Encoder.tensors, [0]

    def tensors_until(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == on_call:
            raise error
        return tensors(self, *args, **kwargs)

    monkeypatch.setattr(Encoder, "tensors", tensors_until)


def as_rank(monkeypatch, rank: int, world: int = 2) -> None:
    """Run `extract` as one rank of `world`, in this process (no process group)."""
    monkeypatch.setattr(fercache.extract, "step", nullcontext)
    monkeypatch.setattr(fercache.extract, "agree", lambda **values: None)
    monkeypatch.setattr(fercache.extract, "rank_and_world", lambda: (rank, world))


def decodes(monkeypatch) -> list[list[str]]:
    """The ids each `Source.stream` call was asked to decode, call by call."""
    decoded: list[list[str]] = []
    stream = Source.stream
    monkeypatch.setattr(Source, "stream", lambda self, entries, *a, **k: (
        decoded.append([e.id for e in entries]), stream(self, entries, *a, **k))[1])
    return decoded


def assert_same_rows(one, two, split: str = "train") -> None:
    """Two caches hold the same ids in the same order and (float rounding aside) the same features."""
    a, b = load_embeddings(one, split), load_embeddings(two, split)
    assert a.ids == b.ids
    np.testing.assert_allclose(b.X, a.X, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("differs", ["data", "preprocess"])
def test_a_job_whose_cache_another_job_made_meanwhile_is_refused_at_commit(fer_zip, tiny_model, tmp_path,
                                                                            monkeypatch, differs):
    """Job B starts on a cache that does not exist yet; job A, on other data (or preprocessing),
    makes it while B encodes. B's commit must refuse, not carry A's train over under B's name."""
    cache = tmp_path / "c.h5"
    real = fercache.extract.commit

    def a_commits_first(*args, **kwargs):
        monkeypatch.setattr(fercache.extract, "commit", real)
        extract(fer_zip, "train", str(tiny_model), cache=cache, **ARGS)  # job A, start to end
        return real(*args, **kwargs)

    monkeypatch.setattr(fercache.extract, "commit", a_commits_first)
    b = dict(data=other_zip(tmp_path)) if differs == "data" else dict(data=fer_zip, preprocess="seed")
    with pytest.raises(UserError, match=r"c.h5 differs from what is asked \((dataset|preprocess) .*another job "
                                        r"wrote it since this one started; .*: move or delete .*c.h5 and rerun the "
                                        r"same command, which reuses them \(not --force") as err:
        extract(split="test", model=str(tiny_model), cache=cache, **b, **ARGS)  # job B
    assert "\n" not in str(err.value)
    with h5py.File(cache) as f:  # A's cache, untouched
        assert list(f) == ["train"] and f.attrs["preprocess"] == "clip"
        assert json.loads(f.attrs["source"])["path"] == str(fer_zip)
    part, rows = part_path(cache, "test"), (6 if differs == "data" else 14)
    with h5py.File(part) as f:  # B's rows kept, finished, for a rerun elsewhere
        assert bool(f.attrs["done"]) and int(f.attrs["rows"]) == rows
    # B's command again before following the advice: refused up front, with the same advice
    with pytest.raises(UserError, match=r"finished rows of this command wait in .*: move or delete .*c.h5"):
        extract(split="test", model=str(tiny_model), cache=cache, **b, **ARGS)
    # the advice, followed: A's cache moved aside, B's same command again reuses its finished rows
    cache.rename(tmp_path / "a.h5")
    decoded = decodes(monkeypatch)
    summary = extract(split="test", model=str(tiny_model), cache=cache, **b, **ARGS)[0]
    assert decoded == [[]] and (summary.count, summary.resumed) == (rows, rows)
    assert load_embeddings(cache, "test").ids and not part.exists()
    with h5py.File(tmp_path / "a.h5") as f:  # A's split, moved, whole
        assert list(f) == ["train"]


@pytest.mark.parametrize("value, dtype, advice", [
    (np.inf, "bfloat16", r"bfloat16 overflowed\?\): extract with --dtype float32"),
    (np.nan, "float32", r"the model gives them even in float32\): check its weights"),
])
def test_non_finite_embeddings_are_refused_in_one_line(fer_zip, tiny_model, tmp_path, monkeypatch, value, dtype,
                                                       advice):
    tensors = Encoder.tensors

    def overflowing(self, *args, **kwargs):
        out = {k: v.clone() for k, v in tensors(self, *args, **kwargs).items()}
        out[feature_name()][1, 3] = value  # as a float16 encoder overflowing on one face
        return out

    monkeypatch.setattr(Encoder, "tensors", overflowing)
    cache = tmp_path / "c.h5"
    with pytest.raises(UserError, match=r"feature 'embeddings' of test/\w+/PublicTest_1001.png is NaN or infinite "
                                        rf"\({advice}$") as err:
        extract(fer_zip, "test", str(tiny_model), batch_size=8, cache=cache, **{**ARGS, "dtype": dtype})
    assert "\n" not in str(err.value) and not cache.exists()


def test_summary_counts_each_ranks_resumed_rows_once(fer_zip, tiny_model, tmp_path, monkeypatch):
    """Rank 0 is interrupted after one batch of 4; rank 1 then encodes all of its shard; rank 0's
    rerun resumes its 4 rows: 4 of the 21 were resumed, not 4 x 2 ranks."""
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    extract(fer_zip, "train", str(tiny_model), batch_size=4, cache=one, **ARGS)
    as_rank(monkeypatch, 0)
    with monkeypatch.context() as m:
        failing_encoder(m, on_call=2)
        with pytest.raises(RuntimeError, match="encoder broke"):
            extract(fer_zip, "train", str(tiny_model), batch_size=4, cache=two, **ARGS)
    as_rank(monkeypatch, 1)
    extract(fer_zip, "train", str(tiny_model), batch_size=4, cache=two, **ARGS)
    as_rank(monkeypatch, 0)
    summary = extract(fer_zip, "train", str(tiny_model), batch_size=4, cache=two, **ARGS)[0]
    assert (summary.count, summary.resumed) == (21, 4)
    assert_same_rows(one, two)


def test_the_loops_own_error_wins_over_the_writers_at_shutdown(fer_zip, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(fercache.extract, "FLUSH_SECONDS", 1e9)  # the writer flushes only when closed

    def disk_full(self, done=False):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PartFile, "flush", disk_full)
    failing_encoder(monkeypatch, on_call=2, error=ValueError("the encoder's own failure"))
    with pytest.warns(FERCacheWarning, match=r"writing the last rows also failed: OSError: .*No space left"):
        with pytest.raises(ValueError, match="the encoder's own failure"):
            extract(fer_zip, "test", str(tiny_model), batch_size=4, cache=tmp_path / "c.h5", **ARGS)


def test_commit_streams_parts_in_bounded_memory(tmp_path, monkeypatch):
    """Three parts (one empty) joined through slices and chunks much smaller than the split: the
    same rows as joined in memory, with a peak far below the split's size."""
    monkeypatch.setattr(fercache.cache, "SLICE_BYTES", 2**20, raising=False)
    monkeypatch.setattr(fercache.cache, "CHUNK_BYTES", 2**18, raising=False)
    cache, dim = tmp_path / "c.h5", 512
    meta = cache_meta(Identity(model="m", preprocess="clip", feature="pooler_output", dtype="float32",
                               image_size=224, tokens=1), dim)
    write_split(cache, "train", meta, ["train/0"], np.zeros(1, np.int64), ["train"], {
        feature_name(): np.ones((1, dim), np.float32), feature_name(tokens=True): np.ones((1, 4, 8), np.float16)})
    rng = np.random.default_rng(0)
    sizes, parts, rows = [5000, 0, 3333], [], []
    for rank, n in enumerate(sizes):
        ids = [f"test/{rank}-{i}" for i in range(n)]
        x, t = rng.standard_normal((n, dim), np.float32), rng.standard_normal((n, 4, 8)).astype(np.float16)
        part = PartFile(part_path(cache, "test", rank, 3), meta, shard_digest(ids), n,
                        {feature_name(): (dim,), feature_name(tokens=True): (4, 8)}, chunk=256)
        for lo in range(0, n, 256):
            hi = min(n, lo + 256)
            part.append(ids[lo:hi], np.arange(lo, hi) % 7, ["public_test"] * (hi - lo), hi,
                        {feature_name(): x[lo:hi], feature_name(tokens=True): t[lo:hi]})
        part.flush(done=True)
        part.close()
        parts.append(part.path)
        rows.append((ids, np.arange(n) % 7, x, t))
    split_bytes = sum(len(r[0]) for r in rows) * dim * 4
    tracemalloc.start()
    assert commit(cache, "test", parts, meta, {"split": "test", "limit": None, "count": 8333}) == 8333
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < split_bytes / 4, (peak, split_bytes)  # joined in memory, it was twice the split
    got = load_embeddings(cache, "test")
    assert got.ids == [i for r in rows for i in r[0]]
    np.testing.assert_array_equal(got.y, np.concatenate([r[1] for r in rows]))
    np.testing.assert_array_equal(got.X, np.concatenate([r[2] for r in rows]))
    np.testing.assert_array_equal(fercache.load_tokens(cache, "test").X, np.concatenate([r[3] for r in rows]))
    assert len(load_embeddings(cache, "train").ids) == 1  # the other split carried over
    with h5py.File(cache) as f:
        assert f["test/tokens"].dtype == np.float16 and f["test/embeddings"].chunks[0] == 2**18 // (dim * 4)


def test_shards_do_not_depend_on_the_batch_size(fer_zip, tiny_model, tmp_path, monkeypatch):
    """Rank 1 finished its shard in batches of 4, then ran out of memory elsewhere: rerun with
    --batch-size 3, it resumes its finished shard (decodes nothing) and the cache is one process's."""
    assert list(shard_bounds(21, 2)) == [0, 10, 21] and list(shard_bounds(1, 1)) == [0, 1]
    assert list(shard_bounds(1000, 2)) == [0, 512, 1000] and list(shard_bounds(767, 3)) == [0, 255, 511, 767]
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    extract(fer_zip, "train", str(tiny_model), batch_size=4, cache=one, **ARGS)
    decoded = decodes(monkeypatch)
    as_rank(monkeypatch, 1)
    extract(fer_zip, "train", str(tiny_model), batch_size=4, cache=two, **ARGS)
    assert len(decoded.pop()) == 11
    assert extract(fer_zip, "train", str(tiny_model), batch_size=3, cache=two, **ARGS)[0].resumed == 11
    assert decoded.pop() == []  # nothing left to decode
    as_rank(monkeypatch, 0)
    summary = extract(fer_zip, "train", str(tiny_model), batch_size=3, cache=two, **ARGS)[0]
    assert (summary.count, summary.resumed) == (21, 11)
    assert_same_rows(one, two)


def test_an_interrupted_force_run_resumes_when_run_again(fer_zip, tiny_model, tmp_path, monkeypatch):
    cache = tmp_path / "c.h5"
    args = dict(batch_size=4, cache=cache, **ARGS)
    extract(fer_zip, "test", str(tiny_model), **args)
    stale = part_path(cache, "test")  # a part an earlier, non-forced run left: --force redoes it
    with monkeypatch.context() as m:
        failing_encoder(m, on_call=3)
        with pytest.raises(RuntimeError):
            extract(fer_zip, "test", str(tiny_model), limit=12, **args)
    assert stale.exists()
    decoded = decodes(monkeypatch)
    with monkeypatch.context() as m:
        failing_encoder(m, on_call=2)
        with pytest.raises(RuntimeError):
            extract(fer_zip, "test", str(tiny_model), force=True, **args)
    assert len(decoded.pop()) == 14  # the stale part's 8 rows were not taken
    with h5py.File(stale) as f:
        assert int(f.attrs["rows"]) == 4
    summary = extract(fer_zip, "test", str(tiny_model), force=True, **args)[0]  # the same command again
    assert (summary.count, summary.resumed) == (14, 4) and len(decoded.pop()) == 10
    fresh = tmp_path / "fresh.h5"
    extract(fer_zip, "test", str(tiny_model), batch_size=4, cache=fresh, **ARGS)
    np.testing.assert_array_equal(load_embeddings(cache, "test").X, load_embeddings(fresh, "test").X)


def test_an_interrupted_force_run_keeps_the_splits_it_committed(fer_zip, tiny_model, tmp_path, monkeypatch):
    cache = tmp_path / "c.h5"
    args = dict(batch_size=7, cache=cache, **ARGS)
    extract(fer_zip, "all", str(tiny_model), **args)
    with monkeypatch.context() as m:  # --force: train (3 batches) redone and committed, then test breaks
        failing_encoder(m, on_call=5)
        with pytest.raises(RuntimeError):
            extract(fer_zip, "all", str(tiny_model), force=True, **args)
    assert json.loads(forcing_path(cache).read_text()) == {"train": {"split": "train", "limit": None, "count": 21}}
    decoded = decodes(monkeypatch)
    again = extract(fer_zip, "all", str(tiny_model), force=True, **args)  # the same command: train kept
    assert [(s.split, s.skipped, s.resumed) for s in again] == [("train", True, 0), ("test", False, 7)]
    assert sum(map(len, decoded)) == 7 and not forcing_path(cache).exists()
    later = extract(fer_zip, "all", str(tiny_model), force=True, **args)  # a new --force redoes everything
    assert [s.skipped for s in later] == [False, False] and sum(map(len, decoded)) == 7 + 35


def test_a_filesystem_without_locks_is_said_in_one_line(fer_zip, tiny_model, tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fercache.cache.fcntl, "flock", no_locks)
    cache = tmp_path / "c.h5"
    with pytest.warns(FERCacheWarning) as said:
        extract(fer_zip, "test", str(tiny_model), cache=cache, **ARGS)
    lines = [str(w.message) for w in said if "no file locks" in str(w.message)]
    assert lines == [f"{tmp_path}: no file locks on this filesystem ([Errno 37] No locks available): "
                     "run one job per cache at a time"]
    assert len(load_embeddings(cache, "test").ids) == 14
