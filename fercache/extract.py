"""Stage one: encode every face of a split once and keep the features in the cache.

The expensive step the design exists to do once. Per split: check whether the cache already holds
it (seconds), decode the images, encode them in batches on the device, append each batch to a
resumable part file, and commit the finished split into the cache atomically. Under `torchrun`
each rank encodes a contiguous shard into its own part file and rank 0 commits them all.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fercache.cache import PartFile, cache_meta, commit, part_path, read_identity, split_state
from fercache.data import open_source
from fercache.distributed import agree, rank_and_world, step
from fercache.encoder import load_encoder
from fercache.errors import FERCacheWarning, UserError, at_least_one
from fercache.names import DEFAULT_MODEL, TTA, choice, default_cache, stored_features


@dataclass
class Summary:
    """One split's outcome, for the closing line of `fercache extract`."""

    split: str
    count: int
    dim: int
    seconds: float
    cache: Path
    skipped: bool = False
    resumed: int = 0  # rows an interrupted run had already encoded (this rank's)

    def __str__(self) -> str:
        if self.skipped:
            return f"{self.split}: {self.count:,} x {self.dim} already complete in {self.cache} (skipped; --force redoes it)"
        rate = (self.count - self.resumed) / self.seconds if self.seconds else float("inf")
        resumed = f", {self.resumed:,} of them resumed from an interrupted run" if self.resumed else ""
        return (f"{self.split}: {self.count:,} images{resumed} -> {self.dim}-d in {self.seconds:.1f} s "
                f"({rate:.1f} img/s) -> {self.cache}")


def extract(data: str | os.PathLike | None = None, split: str = "train", model: str = DEFAULT_MODEL,
            preprocess: str = "clip", device: str = "auto", dtype: str = "auto", batch_size: int = 64,
            limit: int | None = None, cache: str | os.PathLike | None = None, force: bool = False,
            layers: str | None = None, tta: str = "none", strict: bool = False,
            progress: bool = True) -> list[Summary]:
    """Encode `split` (or `all`: train and test) into the cache; returns one summary per split.

    Under torchrun (see `fercache.distributed`) every rank runs this with the same arguments: each
    encodes its shard of every split, rank 0 commits them, and a failure on any rank stops all.
    """
    rank, world = rank_and_world()
    with step():  # every rank reads the cache here, before any rank commits to it
        at_least_one(batch_size=batch_size, limit=limit)
        choice(tta, TTA, "--tta")
        source = open_source(data)
        encoder = load_encoder(model, preprocess, device, dtype, layers, weights=False)
        fingerprint = source.fingerprint()
        identity = dataclasses.replace(encoder.identity, views=("plain", "flip") if tta == "flip" else ("plain",),
                                       source=fingerprint)
        path = Path(cache) if cache else default_cache(model, identity.preprocess, identity.layers, tta)

        replace = False  # True: the file holds something else and --force says to start it anew
        if path.exists():
            try:
                read_identity(path).check(identity, path, hint="use another --cache, or --force to replace it")
            except UserError:
                if not force:
                    raise
                replace = True

        summaries, todo = [], []
        for name in (["train", "test"] if split == "all" else [split]):
            count = len(source.select(name)[:limit])
            selection = {"split": name, "limit": limit, "count": count}
            if path.exists() and not (force or replace) and split_state(path, name)[1] == selection:
                summaries.append(Summary(name, count, encoder.dim, 0.0, path, skipped=True))
            else:
                todo.append((name, selection))
    agree(identity=identity, cache_state=(replace, todo))
    with step():
        if todo:
            encoder = load_encoder(model, preprocess, device, dtype, layers)
            # now with image_size, which needs the image processor
            identity = dataclasses.replace(identity, image_size=encoder.identity.image_size)
        meta = cache_meta(identity, encoder.dim, {"path": str(source.path), "format": source.format,
                                                  "fingerprint": fingerprint})
    for name, selection in todo:
        start = time.perf_counter()
        parts = [part_path(path, name, r, world) for r in range(world)]
        with step():
            with warnings.catch_warnings():
                if rank:  # every rank decodes the whole split; rank 0 tells of skipped images
                    warnings.simplefilter("ignore", FERCacheWarning)
                images = source.load(name, strict=strict, limit=limit)
            # Shards of whole batches: every rank encodes the very batches one process would, same arrays.
            batches = -(-len(images.ids) // batch_size)
            if batches < world:
                raise UserError(f"{world} ranks for {batches} batch(es) of '{name}': use fewer ranks "
                                "or a smaller --batch-size")
            bounds = np.minimum(np.linspace(0, batches, world + 1).astype(int) * batch_size, len(images.ids))
            lo, hi = bounds[rank], bounds[rank + 1]
            if force and parts[rank].exists():
                parts[rank].unlink()  # only its own part: the other ranks are writing theirs
            names = stored_features(identity.layers, identity.views)
            part = PartFile(parts[rank], meta, images.ids[lo:hi], images.labels[lo:hi], images.usage[lo:hi],
                            {n: encoder.dim for n in names}, batch_size)
            resumed = part.rows
            try:
                with tqdm(total=hi - lo, initial=part.rows, unit="img", desc=f"extract {name}",
                          disable=not progress or rank != 0, dynamic_ncols=True) as bar:
                    for i in range(lo + part.rows, hi, batch_size):
                        batch = images.pixels[i:min(i + batch_size, hi)]
                        part.append(encoder.encode(batch, identity.views))
                        bar.update(len(batch))
            finally:
                part.close()
        with step():
            if rank == 0:
                missing = [p for p in parts if not p.exists()]
                if missing:
                    raise UserError(f"{missing[0]}: a rank's part file is not here; with several machines "
                                    "the cache must be on a filesystem they all share")
                commit(path, name, parts, meta, selection, replace=replace)
        replace = False
        summaries.append(Summary(name, len(images.ids), encoder.dim, time.perf_counter() - start, path,
                                 resumed=resumed * world))  # ranks resume alike: whole batches of equal shards
    return summaries
