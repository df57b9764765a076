"""The whole job in one call: stage one over train and test (a complete cache is reused), then stage two."""

from __future__ import annotations

import os

from fercache.datasets import open_dataset
from fercache.distributed import rank_and_world
from fercache.errors import UserError
from fercache.extract import Summary, extract
from fercache.fit import FitResult, fit
from fercache.names import DEFAULT_MODEL

DEFAULT_FOLDS = 10  # `run` on a dataset without a split: 10 subject-independent folds, as CK+ and JAFFE papers


def run(data: str | os.PathLike | None = None, model: str = DEFAULT_MODEL, preprocess: str = "clip",
        device: str = "auto", dtype: str = "auto", batch_size: int | None = None, method: str = "linear",
        epochs: int = 20, limit: int | None = None, cache: str | os.PathLike | None = None,
        out: str | os.PathLike | None = None, progress: bool = True,
        revision: str | None = None, dataset: str | None = None, classes: str | None = None,
        votes: str | os.PathLike | None = None, images: str = "gray48", folds: int | str | None = None,
        labels: str | None = None, runtime: str | None = None) -> tuple[list[Summary], FitResult | None]:
    """Extract train and test, fit a head on train, report on test; returns both stages' results.

    A dataset without a split (CK+, JAFFE) is extracted whole and cross-validated over `folds`
    subject-independent folds (`DEFAULT_FOLDS` unless given). Under torchrun every rank extracts
    its shards (see `extract`); rank 0 alone then fits and reports, the other ranks get None.
    """
    if folds is not None:  # refused before the encoder runs, not after minutes of it
        source = open_dataset(data, dataset, classes, votes)
        if "all" not in source.splits:
            raise UserError(f"--folds {folds}: {source.path} is {source.dataset}, which has its own train/test "
                            "split; folds are for datasets without one (CK+, JAFFE)")
    summaries = extract(data, "all", model, preprocess, device, dtype, batch_size, limit, cache, progress=progress,
                        revision=revision, dataset=dataset, classes=classes, votes=votes, images=images,
                        runtime=runtime)
    if rank_and_world()[0] != 0:
        return summaries, None
    if folds is None and summaries[0].split == "all":
        folds = DEFAULT_FOLDS
    return summaries, fit(summaries[0].cache, method=method, epochs=epochs, out=out, folds=folds, labels=labels)
