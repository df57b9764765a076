"""`fercache audit`'s speed on the whole of FER2013, without a cache, step by step.

    python bench/audit.py [--data ../shared/data/fer2013.zip]

Prints each step's wall time and the CPU time of the whole process (all threads: on a busy
machine it is the steadier figure), with the CPU, the cores this process may use and the load.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from fercache import audit as A
from fercache.data import rank_cores
from fercache.report import format_table


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013.zip"))
    args = parser.parse_args()
    rows, cpu0, wall0 = [], time.process_time(), time.perf_counter()

    def step(name: str, fn):
        start = time.perf_counter()
        result = fn()
        rows.append([name, time.perf_counter() - start])
        return result

    faces = step("read and decode (with file headers)", lambda: A.read_faces(args.data))
    stats = step("per-face statistics", lambda: A.face_stats(faces.pixels))
    step("per-split statistics and shift test", lambda: (A.split_stats(faces, stats), A.shift_test(faces, stats)))
    report, _ = step("exact and near duplicates", lambda: A.duplicate_groups(faces, stats))
    with tempfile.TemporaryDirectory() as tmp:
        whole = step("the whole `audit` (again, with audit.html)", lambda: A.audit(args.data, out=tmp))
    print(f"{len(faces.ids):,} faces from {args.data}; CPU: {cpu_name()}, {rank_cores()} cores usable, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(format_table(["step", "seconds"], rows))
    print(f"`fercache audit` without a cache: {whole['seconds']:.1f} s wall; this whole script: "
          f"{time.perf_counter() - wall0:.1f} s wall, {time.process_time() - cpu0:.1f} s CPU (all threads)")
    counts = report["exact"]["counts"]
    print(f"exact duplicates: {counts['groups']:,} groups, {counts['test_with_train_copy']:,} test faces with a "
          f"train copy; near: {report['near']['counts']['test_with_train_copy']:,}")


if __name__ == "__main__":
    main()
