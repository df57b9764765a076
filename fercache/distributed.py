"""Stage one on several processes and machines: join torchrun's group, fail together.

`torchrun` starts one process per GPU (or several on a CPU) and tells each its place through the
environment (RANK, LOCAL_RANK, WORLD_SIZE, ...). `torchrun_group` joins them into a process group;
`extract` then shards each split by rank. Collectives wait for every rank, so a rank that fails
alone would leave the others waiting: each stretch of work between two sync points runs inside
`step`, which shares a failure with all ranks so that every rank stops with that rank's message.

The collectives carry only small Python objects (errors, metadata), never tensors, so they run on
a CPU `gloo` group even when the ranks compute on GPUs. Its timeout is long (`CONTROL_TIMEOUT`):
between two sync points lie serial steps of minutes or hours (a model download, rank 0's commit,
a shard on a slow device) that a default 10-30 minute collective timeout, or NCCL's watchdog,
would end. A rank that dies is not waited for that long: torchrun stops the others.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fercache.data import rank_cores
from fercache.encoder import pick_device
from fercache.errors import UserError


class RankFailed(UserError):
    """A failure on one rank, raised on every rank at the sync point that shares it.

    `crashed`: the failing rank raised its own exception instead (a bug, not a user error).
    """

    def __init__(self, message: str, crashed: bool = False):
        super().__init__(message)
        self.crashed = crashed


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_and_world() -> tuple[int, int]:
    """This process's place under torch.distributed (0 of 1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# How long a collective waits for the slowest rank's serial step (a dead process is noticed at
# once; a machine that vanishes whole is waited for this long): FERCACHE_DIST_TIMEOUT seconds.
CONTROL_TIMEOUT = timedelta(seconds=float(os.environ.get("FERCACHE_DIST_TIMEOUT", 24 * 3600)))
_control: list[Any] = []  # [the default group, the gloo group fercache's collectives use with it]


@atexit.register
def _release_control() -> None:
    """Let go of a control group made inside a caller's group while the interpreter still runs.

    Held until the interpreter's own teardown, its gloo threads can still be joinable when their
    C++ objects go, which ends the process with `terminate called without an active exception`.
    """
    _control.clear()


def control_group() -> Any:
    """The group fercache's own collectives use: gloo, on the CPU, with `CONTROL_TIMEOUT`.

    The default group when `torchrun_group` made it; inside a group of the caller's own (NCCL,
    or a short timeout) a gloo group over the same ranks, made once, as the first `step` begins.
    """
    world = dist.group.WORLD
    if not _control or _control[0] is not world:  # a new default group: the old one's subgroup went with it
        _control[:] = [world, dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)]
    return _control[1]


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier(group=control_group())


def rank_device(device: str = "auto") -> str:
    """The device this rank computes on: `auto` and `cuda` become a GPU of its own.

    With one GPU visible (SLURM's `--gpus-per-task 1`, or CUDA_VISIBLE_DEVICES set per rank) that
    GPU, `cuda:0`; with several, the one at its local rank, `cuda:<LOCAL_RANK>`. An explicit
    `cuda:N` is used as given.
    """
    dev = pick_device(device)
    if dev.type == "cuda" and dev.index is None:
        visible, local = torch.cuda.device_count(), int(os.environ.get("LOCAL_RANK", "0"))
        if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > visible or (visible > 1 and local >= visible):
            raise UserError(f"local rank {local} has no GPU of its own ({visible} visible): start at most one "
                            "rank per GPU (--nproc-per-node), or show each rank only its own GPU")
        dev = torch.device("cuda", local if visible > 1 else 0)
    return str(dev)


def cpu_threads() -> int:
    """This machine's cores shared among its ranks.

    torchrun sets OMP_NUM_THREADS=1 for every rank unless the user set it, which leaves all but
    one core per rank idle; any other value is the user's and is kept.
    """
    if os.environ.get("OMP_NUM_THREADS", "1") != "1":
        return torch.get_num_threads()
    return rank_cores()


@contextmanager
def torchrun_group(device: str = "auto") -> Iterator[tuple[str, int]]:
    """Join torchrun's process group for the block (when launched by it); yields (device, rank).

    The group is gloo with `CONTROL_TIMEOUT` whatever the device (see the module's docstring);
    each rank computes on its own GPU (`rank_device`) or its share of the CPU's cores. Outside
    torchrun, or when the caller already set up a group, it changes nothing.
    """
    if not launched() or dist.is_initialized():
        yield device, rank_and_world()[0]
        return
    device = rank_device(device)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    elif device == "cpu":
        torch.set_num_threads(cpu_threads())
    dist.init_process_group("gloo", timeout=CONTROL_TIMEOUT)
    _control[:] = [dist.group.WORLD, dist.group.WORLD]
    try:
        yield device, dist.get_rank()
    finally:
        _control.clear()
        dist.destroy_process_group()


def _gather(value: Any) -> list[Any]:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=control_group())
    return values


@contextmanager
def step() -> Iterator[None]:
    """Work every rank does up to a sync point; if it failed on any rank, it fails on all.

    Every rank raises `RankFailed('rank N: <message>')` with the first failing rank's one-line
    message; a rank that failed with something other than a `UserError` (a bug) re-raises its
    own exception, traceback and all. Outside a process group it is transparent.
    """
    rank, world = rank_and_world()
    if world == 1:
        yield
        return
    control_group()  # made before the work: making it is itself a collective under the caller's timeout
    error: Exception | None = None
    try:
        yield
    except Exception as exc:  # shared below, then raised on every rank
        error = exc
    message = None
    if error is not None:
        text = (str(error).strip().splitlines() or [""])[0]
        message = text if isinstance(error, UserError) else f"{type(error).__name__}: {text}".rstrip(": ")
    shared = _gather((message, error is None or isinstance(error, UserError)))
    failed = next((r for r, (m, _) in enumerate(shared) if m is not None), None)
    if failed is None:
        return
    if error is not None and not isinstance(error, UserError):
        raise error
    crashed = not all(user_error for _, user_error in shared)
    raise RankFailed(f"rank {failed}: {shared[failed][0]}", crashed=crashed) from None


def agree(**values: Any) -> None:
    """Refuse to go on unless every rank holds the same values (a sync point itself).

    Ranks on other machines may see other files under the same paths: other data, another model
    revision, a cache folder that is not shared. Mixing their rows would make a wrong cache.
    """
    if rank_and_world()[1] == 1:
        return
    every = _gather(values)
    for r, theirs in enumerate(every):
        # an Identity names the fields that differ (rank 0's value first), other values their own name
        differ = [", ".join(mine.differences(theirs[name])) if hasattr(mine, "differences") else name.replace("_", " ")
                  for name, mine in every[0].items() if theirs[name] != mine]
        if differ:
            raise RankFailed(f"rank {r}: {'; '.join(differ)}: not the same as on rank 0; every machine must "
                             "see the same data and model, and the cache on a filesystem they all share")
