"""Stage one: encode every face of a split once and keep the features in the cache.

The expensive step the design exists to do once. Per split: check whether the cache already holds
it (seconds), decode the images, encode them in batches on the device, append each batch to a
resumable part file, and commit the finished split into the cache atomically. Under `torchrun`
each rank encodes a contiguous shard into its own part file and rank 0 commits them all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fercache.accelerate import INT8_FIDELITY, int8_fidelity
from fercache.cache import (PartFile, cache_meta, commit, part_path, read_identity, resumed_rows, shard_digest,
                            split_state, write_json)
from fercache.data import Entry, Source
from fercache.datasets import open_dataset
from fercache.distributed import agree, check_peers, rank_and_world, step
from fercache.encoder import Encoder, load_encoder, pick_device
from fercache.errors import UserError, at_least_one, first_line, warn
from fercache.identity import GRAY48, NATIVE
from fercache.names import DEFAULT_MODEL, IMAGES, INT8, PIXELS, TTA, choice, default_cache, feature_name
from fercache.onnxrt import RUNTIME_ENV, TORCH, applies

VOTES = "votes"  # FER+'s 10 vote counts per row (float32), stored beside the features where the source has them


@dataclass
class Summary:
    """One split's outcome, for the closing line of `fercache extract`."""

    split: str
    count: int
    dim: int
    seconds: float
    cache: Path
    skipped: bool = False
    resumed: int = 0  # rows an interrupted run had already encoded (all ranks' on rank 0, else this rank's)

    def __str__(self) -> str:
        if self.skipped:
            return f"{self.split}: {self.count:,} x {self.dim} already complete in {self.cache} (skipped; --force redoes it)"
        rate = (self.count - self.resumed) / self.seconds if self.seconds else float("inf")
        resumed = f", {self.resumed:,} of them resumed from an interrupted run" if self.resumed else ""
        return (f"{self.split}: {self.count:,} images{resumed} -> {self.dim}-d in {self.seconds:.1f} s "
                f"({rate:.1f} img/s) -> {self.cache}")


BATCH_SIZE = {"cuda": 256}  # images per forward pass by device type, unless given; 64 elsewhere
FLUSH_SECONDS = 2.0  # how often the writer makes the rows so far durable (and at the end)
SHARD_UNIT = 256  # ranks' shards are whole units of this many images where the split has enough


def shard_bounds(count: int, world: int) -> np.ndarray:
    """Where each rank's contiguous shard of `count` images starts and ends (`world + 1` bounds).

    By the count alone, never the batch size, so a rerun with another `--batch-size` (after running
    out of memory) resumes every shard. In whole units of `SHARD_UNIT` where every rank gets one:
    any batch size that divides 256 (the defaults 64 and 256 among them) then makes each rank
    encode exactly the batches one process would, and so the same arrays.
    """
    unit = SHARD_UNIT if count >= world * SHARD_UNIT else 1
    return np.minimum(np.linspace(0, -(-count // unit), world + 1).astype(int) * unit, count)


def default_batch_size(device: torch.device) -> int:
    """64 on CPU and MPS (where bigger batches gain nothing); 256 on CUDA.

    On a GPU one ViT-B/32 batch of 64 takes 1.5-2 ms, about what the host needs to launch its
    kernels one by one, so the device would wait on the host; 256 gives it four times the work
    per launch, and even ViT-L/14 at 336 px with every layer kept fits in 16 GB at 256.
    """
    return BATCH_SIZE.get(device.type, 64)


def extract(data: str | os.PathLike | None = None, split: str = "train", model: str = DEFAULT_MODEL,
            preprocess: str = "clip", device: str = "auto", dtype: str = "auto", batch_size: int | None = None,
            limit: int | None = None, cache: str | os.PathLike | None = None, force: bool = False,
            layers: str | None = None, tta: str = "none", strict: bool = False,
            progress: bool = True, revision: str | None = None, tokens: int | None = None,
            dataset: str | None = None, classes: str | None = None, votes: str | os.PathLike | None = None,
            images: str = "gray48", runtime: str | None = None) -> list[Summary]:
    """Encode `split` (or `all`: train and test) into the cache; returns one summary per split.

    Under torchrun (see `fercache.distributed`) every rank runs this with the same arguments: each
    decodes and encodes its shard of every split, rank 0 commits them, and a failure on any rank
    stops all. `batch_size` defaults per device (`default_batch_size`). `revision` (hub models;
    default `main`) is resolved to a commit; without it, a cache that already records a commit of
    this model goes on with that commit, wherever `main` is now. `tokens` K also stores the token
    sequence entering block K+1 (float16), which stage three tunes from. `dataset`, `classes` and
    `votes` say what the data is where its layout does not (`datasets.open_dataset`); `images` is
    `gray48` (every face 48x48 gray, as FER2013's) or `native` (each image's own colour and size, the
    model's own processor rule applied); a dataset without a split is extracted whole, as `all`.
    `runtime` (`fercache.onnxrt`; default $FERCACHE_RUNTIME, else auto: ONNX Runtime for float32 and
    int8 on the CPU where installed); without one asked, a cache goes on with the runtime it records.
    """
    rank, world = rank_and_world()
    with step():  # every rank reads the cache here, before any rank commits to it
        at_least_one(batch_size=batch_size, limit=limit)
        batch_size = batch_size or default_batch_size(pick_device(device))
        choice(tta, TTA, "--tta")
        if choice(images, IMAGES, "--images") == "native" and model == PIXELS:
            raise UserError("--images native needs a neural encoder: the pixels baseline is 48x48 gray by definition")
        source = open_dataset(data, dataset, classes, votes)
        encoder = load_encoder(model, preprocess, device, dtype, layers, weights=False, revision=revision,
                               tokens=tokens, runtime=runtime)
        fingerprint = source.fingerprint()
        identity = dataclasses.replace(encoder.identity, views=("plain", "flip") if tta == "flip" else ("plain",),
                                       source=fingerprint, images=NATIVE if images == "native" else GRAY48,
                                       classes=tuple(source.classes))
        path = Path(cache) if cache else default_cache(model, identity.preprocess, identity.layers, tta, tokens,
                                                       source.dataset, images, identity.dtype)
        if path.exists() and not force:
            held = read_identity(path)
            # ONNX Runtime where it can run (float32 and int8 on the CPU): else the check below says what differs
            followed = held.runtime == TORCH or applies(pick_device(device), identity.dtype, model)
            follow = {"revision": held.revision if held.model == model and not revision else "",
                      "runtime": held.runtime if followed and not (runtime or os.environ.get(RUNTIME_ENV)) else ""}
            if any(v and v != getattr(identity, k) for k, v in follow.items()):
                encoder = load_encoder(model, preprocess, device, dtype, layers, weights=False, tokens=tokens,
                                       revision=follow["revision"] or revision, runtime=follow["runtime"] or runtime)
                identity = dataclasses.replace(identity, revision=encoder.identity.revision,
                                               runtime=encoder.identity.runtime)

        replace = False  # True: the file holds something else and --force says to start it anew
        if path.exists():
            try:
                waiting = part_path(path, "any").parent
                read_identity(path).check(identity, path, hint=(
                    f"finished rows of this command wait in {waiting}: move or delete {path} and run it again "
                    "to use them (--force or another --cache would encode them anew)" if waiting.is_dir() else
                    "use another --cache, or --force to replace it"))
            except UserError:
                if not force:
                    raise
                replace = True

        summaries, todo = [], []
        redone = forced_splits(path) if force else {}  # what this --force command, interrupted, redid already
        for name in (_all_splits(source) if split == "all" else [split]):
            count = len(source.select(name)[:limit])
            selection = {"split": name, "limit": limit, "count": count}
            if (path.exists() and not replace and (not force or redone.get(name) == selection)
                    and split_state(path, name)[1] == selection):
                summaries.append(Summary(name, count, encoder.dim, 0.0, path, skipped=True))
            else:
                todo.append((name, selection))
    agree(identity=identity, cache_state=(replace, todo))
    with step():
        if todo:
            encoder = load_encoder(model, preprocess, device, dtype, layers, revision=identity.revision or None,
                                   fingerprint=identity.weights, tokens=tokens, runtime=identity.runtime or runtime)
            # now with image_size, which needs the image processor
            identity = dataclasses.replace(identity, image_size=encoder.identity.image_size)
            shapes = {feature_name(k, v): (encoder.dims[k],) for v in identity.views for k in (None, *identity.layers)}
            if identity.tokens is not None:
                shapes[feature_name(tokens=True)] = encoder.token_shape()  # a forward pass: once, not per split
            if source.entries[0].votes is not None:
                shapes[VOTES] = (len(source.entries[0].votes),)
        meta = cache_meta(identity, encoder.dim, {"path": str(source.path), "format": source.format,
                                                  "fingerprint": fingerprint}, source.dataset, tuple(source.canonical))
        if identity.dtype == INT8 and todo:  # measured on the data: the first batch of the first split to encode
            first = source.select(todo[0][0])[:limit][:batch_size]
            sample = next(_batches(source.stream(first, strict, native=images == "native"), batch_size), None)
            if sample is not None:  # none readable: the split's own encode says so
                meta[INT8_FIDELITY] = int8_fidelity(encoder, sample[1])
    for name, selection in todo:
        start = time.perf_counter()
        parts = [part_path(path, name, r, world) for r in range(world)]
        with step():
            # each rank decodes only its own shard's images (see `shard_bounds`)
            entries = source.select(name)[:limit]
            if len(entries) < world:
                raise UserError(f"{world} ranks for {len(entries)} image(s) of '{name}': use fewer ranks")
            bounds = shard_bounds(len(entries), world)
            mine = entries[bounds[rank]:bounds[rank + 1]]
            # --force starts only its own part anew (the other ranks are writing theirs), and not
            # one the same --force command made before it was interrupted
            part = PartFile(parts[rank], meta, shard_digest([e.id for e in mine]), len(mine), shapes, batch_size,
                            forced=force, subjects=source.entries[0].subject is not None)
            resumed = part.resumed
            try:
                with tqdm(total=len(mine), initial=part.consumed, unit="img", desc=f"extract {name}",
                          disable=not progress or rank != 0, dynamic_ncols=True) as bar:
                    _encode(source, mine, part, encoder, identity.views, batch_size, strict, bar, images == "native")
            finally:
                part.close()
        with step():
            count = part.rows
            if rank == 0:
                missing = [p for p in parts if not p.exists()]
                if missing:
                    raise UserError(f"{missing[0]}: a rank's part file is not here; with several machines "
                                    "the cache must be on a filesystem they all share")
                resumed = resumed_rows(parts)  # every rank's, as `count` is every rank's
                count = commit(path, name, parts, meta, selection, replace=replace)
                if force:
                    write_json(forcing_path(path), {**forced_splits(path), name: selection})
        replace = False
        summaries.append(Summary(name, count, encoder.dim, time.perf_counter() - start, path, resumed=resumed))
    if rank == 0:
        forcing_path(path).unlink(missing_ok=True)  # the command is done: a later --force redoes everything
    return summaries


def forcing_path(cache: Path) -> Path:
    """Beside the cache, while a `--force` command runs: the splits it has committed, so that the same
    command run again after an interruption keeps them (its parts it resumes anyway) instead of
    encoding them a second time."""
    return cache.with_name(cache.name + ".forcing")


def forced_splits(cache: Path) -> dict:
    """{split: selection} of what an unfinished `--force` command committed to `cache` ({} if none)."""
    try:
        return json.loads(forcing_path(cache).read_text())
    except (OSError, ValueError):
        return {}



def _encode(source: Source, entries: list[Entry], part: PartFile, encoder: Encoder, views: tuple[str, ...],
            batch_size: int, strict: bool, bar: tqdm, native: bool = False) -> None:
    """Encode `entries` into `part` from where it stopped, keeping the device busy.

    Decoding runs ahead in a thread pool (`Source.stream`); on a GPU each batch goes to the device
    from pinned memory and its features come back the same way, both without waiting; a writer
    thread takes each batch once its copy is done, writes it and flushes the part on a timer. The
    loop itself waits only when the writer is `_Writer.DEPTH` batches behind. On the CPU the
    batches, and so the arrays, are exactly those of a plain loop. `native` batches are lists of
    images as stored (any sizes), which the encoder's preprocessor moves to the device itself.
    """
    device = encoder.prep.device if encoder.prep else torch.device("cpu")
    cuda = device.type == "cuda"
    writer = _Writer(part)
    first, looked = part.consumed, part.consumed
    try:
        for positions, pixels in _batches(source.stream(entries[first:], strict, native=native), batch_size):
            check_peers()  # another rank failed: stop now, not after this shard
            faces = pixels  # (native: a list, which the preprocessor moves to the device itself)
            if cuda and not native:
                faces = torch.from_numpy(pixels).pin_memory().to(device, non_blocking=True)
            try:
                feats = encoder.tensors(faces, views)
            except torch.cuda.OutOfMemoryError:
                raise UserError(f"out of memory on {device} with batches of {batch_size}: pass a smaller "
                                "--batch-size") from None
            event = None
            if cuda:  # to pinned host memory, asynchronously; the writer waits for the event, not this loop
                feats = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                         for k, v in feats.items()}
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
            else:  # the CPU's own tensors as they are; MPS's copied to the host (it has no events)
                feats = {k: v.cpu() for k, v in feats.items()}
            rows = [entries[first + i] for i in positions]
            if rows[0].votes is not None:
                feats[VOTES] = torch.tensor([e.votes for e in rows], dtype=torch.float32)
            consumed = first + positions[-1] + 1
            writer.put(([e.id for e in rows], np.array([e.label for e in rows], dtype=np.int64),
                        [e.usage for e in rows], consumed, feats, event,
                        [e.subject for e in rows] if rows[0].subject is not None else None))
            bar.update(consumed - looked)
            looked = consumed
        bar.update(len(entries) - looked)
    except BaseException as exc:  # the loop's own error is the one raised; the writer's is said beside it
        try:
            writer.close(False, len(entries))
        except BaseException as late:
            if late is not exc:
                warn(f"{part.path}: writing the last rows also failed: {type(late).__name__}: {first_line(late)}")
        raise
    writer.close(True, len(entries))


def _batches(chunks: Iterator[tuple[list[int], np.ndarray | list[np.ndarray]]],
             size: int) -> Iterator[tuple[list[int], np.ndarray | list[np.ndarray]]]:
    """Decoded chunks (positions, pixels) regrouped into batches of `size` images (the last one shorter);
    native chunks are lists of images and stay lists."""
    positions: list[int] = []
    pixels: np.ndarray | list[np.ndarray] = np.empty((0, 0, 0), np.uint8)
    for more, chunk in chunks:
        positions += more
        if not len(pixels):
            pixels = chunk
        else:
            pixels = pixels + chunk if isinstance(chunk, list) else np.concatenate([pixels, chunk])
        while len(positions) >= size:
            yield positions[:size], pixels[:size]
            positions, pixels = positions[size:], pixels[size:]
    if positions:
        yield positions, pixels


class _Writer:
    """Writes batches of rows into a part file from a thread of its own, off the encoder's path.

    Each batch first waits there for its copy to the host (a CUDA event), then is written; the
    part is flushed (rows, then their count, each fsynced) every `FLUSH_SECONDS` and at the end,
    not per batch: a flush per batch would cost hundreds of fsyncs a second on a GPU. At most
    `DEPTH` batches wait, so memory stays bounded when the device outruns the disk.
    """

    DEPTH = 4

    def __init__(self, part: PartFile):
        self.part = part
        self.error: BaseException | None = None
        self.queue: queue.Queue = queue.Queue(self.DEPTH)
        self.thread = threading.Thread(target=self._run, name="fercache-writer", daemon=True)
        self.thread.start()

    def put(self, batch: tuple) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(batch)

    def _run(self) -> None:
        last = time.monotonic()
        while (batch := self.queue.get()) is not None:
            if self.error is not None:
                continue  # failed: drain the queue, so the loop never waits on a full one
            try:
                ids, labels, usage, consumed, feats, event, subjects = batch
                if event is not None:
                    event.synchronize()
                self.part.append(ids, labels, usage, consumed, {k: v.numpy() for k, v in feats.items()}, subjects)
                if time.monotonic() - last >= FLUSH_SECONDS:
                    self.part.flush()
                    last = time.monotonic()
            except BaseException as exc:  # raised in the loop's thread at its next put, or at close
                self.error = exc

    def close(self, done: bool, entries: int) -> None:
        """Write what is queued and flush it; `done`: every one of the shard's `entries` was looked at."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        if done:
            self.part.consumed = entries
        self.part.flush(done=done)


def _all_splits(source: Source) -> list[str]:
    """What `--split all` extracts: train and test (and a val split where the dataset has one), or the
    whole of a dataset without a split."""
    return ["all"] if "all" in source.splits else [s for s in ("train", "val", "test") if s in source.splits]
