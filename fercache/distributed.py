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
would end. A rank that dies is not waited for that long: torchrun stops the others. Joining the
group is not a serial step, so it has a short timeout of its own (`JOIN_TIMEOUT`), and a rank that
fails inside a long stretch of work flags it in the group's store, where the others' loops look
every few seconds (`check_peers`) instead of finishing their own stretch first.
"""

from __future__ import annotations

import atexit
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fercache.data import rank_cores
from fercache.encoder import pick_device
from fercache.errors import UserError, first_line


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
# How long `torchrun_group` waits for every rank to join (all are started together; one that cannot
# reach the others, say a host name resolving to 127.0.1.1, never will): FERCACHE_JOIN_TIMEOUT seconds.
JOIN_TIMEOUT = timedelta(seconds=float(os.environ.get("FERCACHE_JOIN_TIMEOUT", 600)))
PEER_POLL_SECONDS = 2.0  # how often `check_peers` asks the store whether another rank failed
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

    A gloo group over the default group's ranks, made once: as `torchrun_group` joins (its default
    group has the short `JOIN_TIMEOUT`), or inside a group of the caller's own (NCCL, or a short
    timeout) as the first `step` begins.
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

    With one GPU visible, that GPU, `cuda:0`: the rank's own where CUDA_VISIBLE_DEVICES picked it
    (SLURM's `--gpus-per-task 1` sets it per task), refused when several ranks share a machine's
    only GPU without it. With several, the one at its local rank, `cuda:<LOCAL_RANK>`, refused when
    the machine has more ranks than GPUs. Every rank of a machine decides alike (same environment
    but LOCAL_RANK), so none is left waiting to join. An explicit `cuda:N` is used as given. Ranks
    that still share a GPU (`CUDA_VISIBLE_DEVICES=0` exported to all of them) are refused once
    joined (`refuse_shared_gpus`): only the GPUs' identities tell.
    """
    dev = pick_device(device)
    if dev.type == "cuda" and dev.index is None:
        visible, local = torch.cuda.device_count(), int(os.environ.get("LOCAL_RANK", "0"))
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        chosen_per_rank = visible == 1 and "CUDA_VISIBLE_DEVICES" in os.environ
        if ranks > visible and not chosen_per_rank:
            raise UserError(f"local rank {local} has no GPU of its own ({ranks} ranks on this machine, {visible} "
                            "GPU(s) visible): start at most one rank per GPU (--nproc-per-node), or show each "
                            "rank only its own GPU (CUDA_VISIBLE_DEVICES, srun --gpus-per-task 1)")
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
    _join()
    try:
        refuse_shared_gpus(device)
        yield device, dist.get_rank()
    finally:
        _control.clear()
        dist.destroy_process_group()


def _join() -> None:
    """Join torchrun's group within `JOIN_TIMEOUT`, then make the gloo group with `CONTROL_TIMEOUT`
    that fercache's collectives use; a rank that cannot join says so in one line."""
    try:
        dist.init_process_group("gloo", timeout=JOIN_TIMEOUT)
        control_group()
    except (RuntimeError, ValueError) as exc:  # DistError, gloo's connection errors; MASTER_ADDR/PORT unset or bad
        if dist.is_initialized():
            dist.destroy_process_group()
        env = os.environ.get
        raise UserError(f"rank {env('RANK', '?')} of {env('WORLD_SIZE', '?')} could not join the others at "
                        f"MASTER_ADDR {env('MASTER_ADDR', '?')}:{env('MASTER_PORT', '?')} within "
                        f"{JOIN_TIMEOUT.total_seconds():g} s (FERCACHE_JOIN_TIMEOUT; {first_line(exc)}): start "
                        "every rank, make MASTER_ADDR an address all machines reach (a host name must not resolve "
                        "to 127.0.1.1) and name the network interface in GLOO_SOCKET_IFNAME (and "
                        "NCCL_SOCKET_IFNAME), e.g. eth0") from None


def refuse_shared_gpus(device: str) -> None:
    """Refuse, on every rank alike, ranks computing on the same GPU of one machine (told apart by its
    UUID, which CUDA_VISIBLE_DEVICES renumbering does not change): they would share its memory and
    time, and run out of one or both."""
    gpu = str(torch.cuda.get_device_properties(torch.device(device)).uuid) if device.startswith("cuda") else None
    every = _gather((socket.gethostname(), gpu))
    for r, (host, uuid) in enumerate(every):
        first = every.index((host, uuid))
        if uuid is not None and first < r:
            raise UserError(f"ranks {first} and {r} share one GPU on {host} (GPU-{uuid}): start at most one rank "
                            "per GPU, and show each rank its own (CUDA_VISIBLE_DEVICES per rank, or unset)")


def _gather(value: Any) -> list[Any]:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=control_group())
    return values


class _PeerFailed(Exception):
    """Raised by `check_peers` on a rank whose work another rank's failure made pointless."""


_steps: list[int] = [0]  # `step`s begun, the same count on every rank: names each step's failure flag
_flag: list[str] = []  # the running step's flag key, while a step runs under a process group
_looked: list[float] = [0.0]  # when `check_peers` last asked the store


def check_peers() -> None:
    """Stop this rank's part of a `step` if another rank's has failed; call it often in long loops.

    The failing rank sets a flag in the group's key-value store; this looks (one small request) at
    most every `PEER_POLL_SECONDS`, so a rank learns of a failure within seconds instead of after
    its whole shard. Free outside a process group.
    """
    if not _flag or time.monotonic() - _looked[0] < PEER_POLL_SECONDS:
        return
    _looked[0] = time.monotonic()
    if dist.distributed_c10d._get_default_store().check([_flag[0]]):
        raise _PeerFailed()


@contextmanager
def step() -> Iterator[None]:
    """Work every rank does up to a sync point; if it failed on any rank, it fails on all.

    Every rank raises `RankFailed('rank N: <message>')` with the first failing rank's one-line
    message; a rank that failed with something other than a `UserError` (a bug) re-raises its
    own exception, traceback and all. Loops inside call `check_peers` to stop early when another
    rank failed. Outside a process group it is transparent.
    """
    rank, world = rank_and_world()
    if world == 1:
        yield
        return
    control_group()  # made before the work: making it is itself a collective under the caller's timeout
    _steps[0] += 1
    _flag[:], _looked[0] = [f"fercache/failed/{_steps[0]}"], time.monotonic()
    error: Exception | None = None
    stopped = False  # by another rank's flag: this rank's work is unfinished, whatever the others report
    try:
        yield
    except _PeerFailed:  # another rank's failure, shared below
        stopped = True
    except Exception as exc:  # flagged for the others' `check_peers`, shared below, then raised on every rank
        error = exc
        with suppress(RuntimeError):  # a store already gone (the job is ending) must not hide the error
            dist.distributed_c10d._get_default_store().set(_flag[0], str(rank))
    finally:
        _flag.clear()
    message = None
    if error is not None:
        text = (str(error).strip().splitlines() or [""])[0]
        message = text if isinstance(error, UserError) else f"{type(error).__name__}: {text}".rstrip(": ")
    shared = _gather((message, error is None or isinstance(error, UserError)))
    failed = next((r for r, (m, _) in enumerate(shared) if m is not None), None)
    if failed is None and stopped:
        raise RankFailed(f"rank {rank}: stopped because another rank flagged a failure that no rank reported; "
                         "run the same command again")
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
