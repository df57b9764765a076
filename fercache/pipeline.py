"""The whole job in one call: stage one over train and test (a complete cache is reused), then stage two."""

from __future__ import annotations

import os

from fercache.distributed import rank_and_world
from fercache.extract import Summary, extract
from fercache.fit import FitResult, fit
from fercache.names import DEFAULT_MODEL


def run(data: str | os.PathLike | None = None, model: str = DEFAULT_MODEL, preprocess: str = "clip",
        device: str = "auto", dtype: str = "auto", batch_size: int | None = None, method: str = "linear",
        epochs: int = 20, limit: int | None = None, cache: str | os.PathLike | None = None,
        out: str | os.PathLike | None = None, progress: bool = True,
        revision: str | None = None) -> tuple[list[Summary], FitResult | None]:
    """Extract train and test, fit a head on train, report on test; returns both stages' results.

    Under torchrun every rank extracts its shards (see `extract`); rank 0 alone then fits and
    reports, the other ranks get None for the fit.
    """
    summaries = extract(data, "all", model, preprocess, device, dtype, batch_size, limit, cache, progress=progress,
                        revision=revision)
    if rank_and_world()[0] != 0:
        return summaries, None
    return summaries, fit(summaries[0].cache, method=method, epochs=epochs, out=out)
