"""Crash safety and concurrency of stage one: a kill at any point of a flush loses only the rows
since the last one, a live run's part file is never taken for a torn one, and file locks can be
turned off for filesystems without them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import cli, make_fer_layout
from fercache.cache import load_embeddings, part_path
from fercache.extract import extract

# Runs `fercache extract ARGS` with a flush after every batch, and stops itself at one point of the
# N-th flush: `rows-fsync` (rows flushed, not yet fsynced, their count not yet written), `count-fsync`
# (the count written and flushed, not yet fsynced) or `flushed` (the flush complete), by SIGNAL.
DRIVER = textwrap.dedent("""
    import os, signal, stat, sys
    import fercache.cache as cache, fercache.extract as extract
    from fercache.cli import main

    point, nth, sig = sys.argv[1], int(sys.argv[2]), getattr(signal, sys.argv[3])
    extract.FLUSH_SECONDS = 0
    fsync, flush, calls = os.fsync, cache.PartFile.flush, {"fsync": 0, "flush": 0}

    def counted_fsync(fd):
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a folder's, after a new part file: not a flush's
            return fsync(fd)
        calls["fsync"] += 1  # two per flush: the rows', then the count's
        if point.endswith("fsync") and calls["fsync"] == 2 * nth - (point == "rows-fsync"):
            os.kill(os.getpid(), sig)
        fsync(fd)

    def counted_flush(self, done=False):
        flush(self, done)
        calls["flush"] += 1
        if point == "flushed" and calls["flush"] == nth:
            os.kill(os.getpid(), sig)

    os.fsync, cache.PartFile.flush = counted_fsync, counted_flush
    sys.argv = ["fercache", "extract", *sys.argv[4:]]
    main()
""")


@pytest.fixture
def faces_200(tmp_path) -> Path:
    path = tmp_path / "fer2013.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name, (data, _, _) in make_fer_layout({"test": 200}).items():
            z.writestr(name, data)
    return path


def extract_args(data: Path, model: Path, cache: Path) -> list[str]:
    return ["--data", str(data), "--split", "test", "--model", str(model), "--device", "cpu", "--dtype", "float32",
            "--batch-size", "8", "--cache", str(cache)]


def driven(point: str, nth: int, sig: str, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, point, str(nth), sig, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_same_as_fresh(cache: Path, data: Path, model: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.h5"
    extract(data, "test", str(model), "clip", "cpu", "float32", batch_size=8, cache=fresh, progress=False)
    a, b = load_embeddings(cache, "test"), load_embeddings(fresh, "test")
    assert a.ids == b.ids and np.array_equal(a.y, b.y)
    np.testing.assert_array_equal(a.X, b.X)


@pytest.mark.parametrize("point, sig, kept", [
    ("rows-fsync", "SIGKILL", 16),  # the third batch's rows are in the file, their count is not: 2 batches
    ("count-fsync", "SIGKILL", 24),  # its count was written too: 3 batches
    ("flushed", "SIGINT", None),  # Ctrl-C: what was encoded is written and flushed on the way out
], ids=["kill-before-rows-fsync", "kill-before-count-fsync", "ctrl-c"])
def test_killed_during_a_flush_then_resume_gives_the_same_arrays(tmp_path, faces_200, tiny_model, point, sig, kept):
    cache = tmp_path / "killed.h5"
    args = extract_args(faces_200, tiny_model, cache)
    proc = driven(point, 3, sig, args)
    _, err = proc.communicate(timeout=120)
    part = part_path(cache, "test")
    assert not cache.exists() and part.exists(), err
    with h5py.File(part, "r") as f:
        rows, done = int(f.attrs["rows"]), bool(f.attrs["done"])
    assert not done
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL and rows == kept
    else:  # a one-line word on how to go on, no traceback
        assert proc.returncode == 130 and "Traceback" not in err
        assert err.rstrip().splitlines()[-1].startswith("fercache: interrupted; the batches done are kept")
        assert 24 <= rows < 200 and rows % 8 == 0
    resumed = cli("extract", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{rows}/200" in resumed.stderr  # the progress bar starts where the kill left off
    assert not part.exists()
    assert_same_as_fresh(cache, faces_200, tiny_model, tmp_path)


def stopped(proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Wait until `proc` has stopped itself (SIGSTOP); False if it ended or took too long."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_second_run_on_a_cache_a_live_run_writes_is_refused(tmp_path, faces_200, tiny_model):
    cache = tmp_path / "busy.h5"
    args = extract_args(faces_200, tiny_model, cache)
    live = driven("flushed", 2, "SIGSTOP", args)  # a live run, paused in the middle of its part file
    try:
        assert stopped(live), live.stderr.read() if live.poll() is not None else "did not stop"
        part = part_path(cache, "test")
        before = part.stat().st_size
        for extra in ([], ["--force"]):
            second = cli("extract", *args, *extra)
            assert second.returncode == 2, second.stderr
            errors = [line for line in second.stderr.splitlines() if line.startswith("fercache: error:")]
            assert len(errors) == 1 and "another process holds this file" in errors[0], second.stderr
            assert "Traceback" not in second.stderr
            assert part.exists() and part.stat().st_size >= before  # never deleted, never truncated
    finally:
        live.send_signal(signal.SIGCONT)
    _, err = live.communicate(timeout=120)
    assert live.returncode == 0, err
    assert_same_as_fresh(cache, faces_200, tiny_model, tmp_path)


def test_a_part_file_torn_by_a_crash_is_started_anew(tmp_path, fer_zip, tiny_model):
    cache = tmp_path / "c.h5"
    part = part_path(cache, "test")
    part.parent.mkdir()
    part.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # a superblock cut short
    extract(fer_zip, "test", str(tiny_model), device="cpu", dtype="float32", batch_size=4, cache=cache,
            progress=False)
    assert len(load_embeddings(cache, "test").ids) == 14 and not part.exists()


def test_no_file_locking_for_filesystems_without_locks(tmp_path, fer_zip, tiny_model):
    """Another process holding the cache's lock stands in for a filesystem whose locks fail."""
    cache = tmp_path / "c.h5"
    base = ["--data", fer_zip, "--model", tiny_model, "--device", "cpu", "--dtype", "float32", "--cache", cache]
    extract(fer_zip, "train", str(tiny_model), device="cpu", dtype="float32", cache=cache, progress=False)
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys; f = h5py.File(sys.argv[1], 'r+'); "
                               "print('held', flush=True); sys.stdin.read()", str(cache)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = cli("extract", *base, "--split", "test")
        assert refused.returncode == 2 and "another process holds this file" in refused.stderr
        unlocked = cli("extract", *base, "--split", "test", "--no-file-locking")
        assert unlocked.returncode == 0, unlocked.stderr
    finally:
        holder.communicate("")
    assert len(load_embeddings(cache, "test").ids) == 14 and len(load_embeddings(cache, "train").ids) == 21
