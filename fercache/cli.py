"""The `fercache` command: a thin Typer layer over the library.

Each command parses its options, calls one library function and prints the result. Every
`UserError` ends as one line on stderr and exit code 2; the library never calls `sys.exit`.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from fercache.errors import FERCacheWarning, UserError
from fercache.names import DEFAULT_MODEL, METHODS, PREPROCESS, SPLIT_CHOICES, TTA, VIEWS, default_cache

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="FER2013 emotion recognition on cached frozen CLIP embeddings: "
                       "stage one `extract`s once, stage two `fit`s in seconds.")

# Options several commands share, defined once.
DataOpt = typer.Option(None, "--data", help="FER2013 zip, folder or CSV [default: ./data or $FERCACHE_DATA]")
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of a table.")
ModelOpt = typer.Option(DEFAULT_MODEL, help="Hub id or local folder of a CLIP-family model, or `pixels` for the "
                        "raw-pixel baseline.")
PreprocessOpt = typer.Option(PREPROCESS[0], help="clip: the model's own image processor; seed: the reference "
                             "project's recipe (bilinear, mean/std 0.5).")
DeviceOpt = typer.Option("auto", help="auto, cpu, cuda or mps.")
DtypeOpt = typer.Option("auto", help="auto (bfloat16 where native, else float32), float32, bfloat16, float16.")
EncodeBatchOpt = typer.Option(64, "--batch-size", help="Images per forward pass of the encoder.")
LimitOpt = typer.Option(None, help="Only the first N images of each split, for quick trials.")
SplitOpt = typer.Option("test", help=f"{', '.join(SPLIT_CHOICES[:-1])} or all.")
CacheOpt = typer.Option(None, help="Cache file [default: data/cache/<model>__<preprocess>.h5].")
DefaultCacheOpt = typer.Option(None, "--cache", help=f"Cache to read [default: the default model's, {default_cache()}].")
ViewsOpt = typer.Option(VIEWS[0], "--views", help="plain, flip or mean (plain and mirrored averaged; needs --tta flip).")


def _emit(obj: dict) -> None:
    typer.echo(json.dumps(obj, indent=2))

MethodOpt = typer.Option(METHODS[0], help="linear: nn.Linear + Adam (the reference recipe); logreg: scikit-learn "
                         "logistic regression, C chosen on a validation part of train.")
EpochsOpt = typer.Option(20, help="Epochs of the linear head.")


@contextmanager
def _resumable() -> Iterator[None]:
    """Ctrl-C during extraction: finished batches are on disk, so say how to go on (exit 130)."""
    try:
        yield
    except KeyboardInterrupt:
        typer.echo("\nfercache: interrupted; the batches done are kept: the same command again goes on from them",
                   err=True)
        raise typer.Exit(130) from None


def _echo_fit(result) -> None:
    """The epoch table (or logreg's C search), the test figures and where the files are."""
    from fercache.report import format_table

    m = result.metrics
    if m["method"] == "linear":
        keys = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc"]
        typer.echo(format_table(keys, [[r[k] for k in keys] for r in m["history"]]))
    else:
        keys = ["C", "val_loss", "val_acc", "n_iter"]
        typer.echo(format_table(keys, [[f"{r['C']:g}", *(r[k] for k in keys[1:])] for r in m["logreg"]["validation"]]))
        typer.echo(f"chosen C = {m['logreg']['C']:g} (on a {m['logreg']['val_fraction']:.0%} validation part of train)")
    halves = [f"{half} {m[f'{half}_test_accuracy']:.4f}" for half in ("public", "private")
              if m[f"{half}_test_accuracy"] is not None]  # a --limit may hold one half only
    typer.echo(f"test accuracy {m['test_accuracy']:.4f}" + (f" ({', '.join(halves)})" if halves else "")
               + f", macro-F1 {m['macro_f1']:.4f} on {m['test_count']:,} faces; fitted in {m['fit_seconds']:.2f} s")
    typer.echo(f"wrote {result.out}/: metrics.json, history.csv, confusion.png, curves.png, head.safetensors, head.json")


@app.command()
def run(
    data: Optional[Path] = DataOpt,
    model: str = ModelOpt,
    preprocess: str = PreprocessOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    batch_size: int = EncodeBatchOpt,
    method: str = MethodOpt,
    epochs: int = EpochsOpt,
    limit: Optional[int] = LimitOpt,
    cache: Optional[Path] = CacheOpt,
    out: Optional[Path] = typer.Option(None, help="Run folder [default: runs/<cache-stem>-<method>]."),
) -> None:
    """The whole job: extract train and test (reusing the cache), fit the head, report on test."""
    from fercache.pipeline import run as run_all

    with _resumable():
        summaries, result = run_all(data, model, preprocess, device, dtype, batch_size, method, epochs, limit,
                                    cache, out)
    for summary in summaries:
        typer.echo(str(summary))
    _echo_fit(result)


@app.command()
def info(path: Path = typer.Argument(..., help="A FER2013 source (zip, folder, CSV) or a cache (.h5)."),
         as_json: bool = JsonOpt) -> None:
    """Show a FER2013 source's format and per-split, per-class counts, or what a cache holds."""
    from fercache.cache import describe_cache
    from fercache.data import open_source
    from fercache.report import format_table

    is_cache = path.suffix in (".h5", ".hdf5")
    desc = describe_cache(path) if is_cache else open_source(path).describe()
    if as_json:
        return _emit(desc)
    if is_cache:
        typer.echo(f"{path}: cache of {desc['model']} ({desc['preprocess']} preprocessing, {desc['dtype']}, "
                   f"{desc['feature']}); made by fercache {desc['fercache_version']} from {desc['source']['path']}")
        typer.echo(f"layers: {desc.get('layers') or 'none'}; views: {', '.join(desc.get('views', ['plain']))}")
    else:
        typer.echo(f"{path}: FER2013 as {desc['format']}")
    classes = desc["classes"]
    rows = [[name, s["count"], *s["per_class"].values()] + ([s["dim"], "yes" if s["complete"] else "NO"] if is_cache else [])
            for name, s in desc["splits"].items()]
    typer.echo(format_table(["split", "count", *classes] + (["dim", "complete"] if is_cache else []), rows))


@app.command()
def extract(
    data: Optional[Path] = DataOpt,
    split: str = typer.Option("train", help="train, test, public_test, private_test or all (train and test)."),
    model: str = ModelOpt,
    preprocess: str = PreprocessOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    batch_size: int = EncodeBatchOpt,
    limit: Optional[int] = LimitOpt,
    cache: Optional[Path] = CacheOpt,
    force: bool = typer.Option(False, "--force", help="Redo complete splits; replace a cache made otherwise."),
    layers: Optional[str] = typer.Option(None, help="Also store the CLS token after these blocks: 1,6,12 or all."),
    tta: str = typer.Option(TTA[0], help="none, or flip: also embed the mirrored faces."),
    strict: bool = typer.Option(False, "--strict", help="An unreadable image is an error, not a warning."),
) -> None:
    """Stage one: encode FER2013 with a frozen vision model, once, into an HDF5 cache.

    Under `torchrun --nproc-per-node N -m fercache extract ...` each rank encodes a shard.
    """
    from fercache.distributed import RankFailed, barrier, torchrun_group
    from fercache.extract import extract as run_extract

    with torchrun_group(device) as (device, rank), _resumable():
        try:
            summaries = run_extract(data, split, model, preprocess, device, dtype, batch_size, limit, cache,
                                    force, layers, tta, strict)
        except RankFailed as exc:  # raised on every rank: rank 0 says it once, the others wait till it has
            if rank == 0:
                typer.echo(f"fercache: error: {exc}", err=True)
            if not exc.crashed:  # (a crashed rank is gone already, its traceback said it)
                barrier()  # torchrun stops all ranks when the first one exits
            raise typer.Exit(2) from None
    if rank == 0:
        for summary in summaries:
            typer.echo(str(summary))


@app.command()
def fit(
    cache: Optional[Path] = DefaultCacheOpt,
    method: str = MethodOpt,
    epochs: int = EpochsOpt,
    lr: float = typer.Option(1e-3, help="Adam's learning rate (linear)."),
    batch_size: int = typer.Option(256, help="Minibatch size (linear)."),
    weight_decay: float = typer.Option(0.0, help="Adam's weight decay (linear)."),
    seed: int = typer.Option(0, help="Seeds initialisation, shuffling and logreg's validation split."),
    standardize: bool = typer.Option(True, "--standardize/--no-standardize",
                                     help="Scale features to zero mean, unit variance on train (kept in the head)."),
    layer: Optional[int] = typer.Option(None, help="Train on the CLS after block K (needs extract --layers)."),
    views: str = ViewsOpt,
    out: Optional[Path] = typer.Option(None, help="Run folder [default: runs/<cache-stem>-<method>]."),
) -> None:
    """Stage two: fit a linear head on the cached train features, report on test, save the head."""
    from fercache.fit import fit as run_fit

    _echo_fit(run_fit(cache, method, epochs, lr, batch_size, weight_decay, seed, standardize, layer, views, out))


@app.command()
def evaluate(
    head: Path = typer.Option(..., help="A head folder (a `fercache fit` run folder)."),
    cache: Optional[Path] = DefaultCacheOpt,
    split: str = SplitOpt,
    out: Optional[Path] = typer.Option(None, help="Folder for evaluate-<split>.json and its plot [default: the head's]."),
    as_json: bool = JsonOpt,
) -> None:
    """Score a saved head on a split of a cache made with the same model and preprocessing."""
    from fercache.fit import evaluate as run_evaluate
    from fercache.report import format_table

    report = run_evaluate(cache, head, split, out)
    if as_json:
        return _emit(report)
    parts = "".join(f", {k.removesuffix('_accuracy')} {v:.4f}" for k, v in report.items()
                    if k.endswith("_accuracy"))
    typer.echo(f"{split}: accuracy {report['accuracy']:.4f}{parts}, macro-F1 {report['macro_f1']:.4f} "
               f"on {report['count']:,} faces")
    keys = ["precision", "recall", "f1", "support"]
    typer.echo(format_table(["class", *keys], [[c, *(r[k] for k in keys)] for c, r in report["per_class"].items()]))


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="Image files of any size, gray or colour."),
    head: Path = typer.Option(..., help="A head folder (a `fercache fit` run folder)."),
    device: str = DeviceOpt,
    detect_face: bool = typer.Option(False, "--detect-face", help="Crop the largest face (OpenCV Haar cascade) first."),
    as_json: bool = JsonOpt,
) -> None:
    """Label new images: made 48x48 gray like FER2013, encoded like stage one, scored by the head."""
    from fercache.predict import predict as run_predict
    from fercache.report import format_table

    results = run_predict(head, images, device, detect_face)
    if as_json:
        return typer.echo(json.dumps(results, indent=2))
    classes = list(results[0]["probs"])
    typer.echo(format_table(["image", "label", *classes], [[r["image"], r["label"], *r["probs"].values()]
                                                          for r in results]))


@app.command()
def probe(
    cache: Path = typer.Option(..., help="A cache extracted with --layers (train and test)."),
    out: Optional[Path] = typer.Option(None, help="Folder for probe.json and probe.png [default: runs/<cache-stem>-probe]."),
    method: str = MethodOpt,
    views: str = ViewsOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Fit a head per stored layer (and the pooled feature): which block knows most about expression."""
    from fercache.probe import probe as run_probe
    from fercache.probe import probe_table
    from fercache.report import format_table

    result = run_probe(cache, out, method, views)
    if as_json:
        return _emit(result)
    typer.echo(f"{result['model']}: {method} probe on {result['train_count']:,} train, "
               f"{result['test_count']:,} test faces ({views} view)")
    typer.echo(format_table(*probe_table(result)))
    typer.echo(f"best: layer {result['best_layer']}; wrote {result['files']['json']} and {result['files']['plot']}")


@app.command()
def zeroshot(
    data: Optional[Path] = DataOpt,
    split: str = SplitOpt,
    limit: Optional[int] = LimitOpt,
    model: str = typer.Option(DEFAULT_MODEL, help="Hub id or local folder of a full CLIP model (vision and text towers)."),
    device: str = DeviceOpt,
    batch_size: int = EncodeBatchOpt,
    as_json: bool = JsonOpt,
) -> None:
    """CLIP's zero-shot guess from text prompts alone: the baseline a linear probe must beat."""
    from fercache.report import format_table
    from fercache.zeroshot import zeroshot as run_zeroshot

    summary = run_zeroshot(data, split, limit, model, device, batch_size).summary()
    if as_json:
        return _emit(summary)
    typer.echo(f"{model} zero-shot on {summary['count']:,} {split} faces ({len(summary['templates'])} prompts "
               f"per class): accuracy {summary['accuracy']:.4f}")
    typer.echo(format_table(["class", "recall"], list(summary["per_class_recall"].items())))


@app.command()
def compare(runs: list[Path] = typer.Argument(..., help="Run folders (e.g. runs/*) holding metrics.json."),
            as_json: bool = JsonOpt) -> None:
    """One table across runs: model, preprocessing, method, views, layer, test accuracy, macro-F1."""
    from fercache.probe import compare as run_compare
    from fercache.probe import compare_table
    from fercache.report import format_table

    rows = run_compare(runs)
    if as_json:
        return _emit({"runs": rows})
    typer.echo(format_table(*compare_table(rows)))


def _format_warning(message, category, filename, lineno, file=None, line=None) -> str:
    if issubclass(category, FERCacheWarning):
        return f"fercache: warning: {message}\n"
    return f"{filename}:{lineno}: {category.__name__}: {message}\n"


def main() -> None:
    """Console entry point: run the app, turning user errors into one line and exit code 2."""
    warnings.formatwarning = _format_warning
    # transformers' own notices (a torchvision fallback, unused text-tower weights) are noise here
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app()
    except UserError as exc:
        typer.echo(f"fercache: error: {exc}", err=True)
        sys.exit(2)

