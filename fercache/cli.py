"""The `fercache` command: a thin Typer layer over the library.

Each command parses its options, calls one library function and prints the result. Every
`UserError` ends as one line on stderr and exit code 2; the library never calls `sys.exit`.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from fercache.errors import FERCacheWarning, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="FER2013 emotion recognition on cached frozen CLIP embeddings: "
                       "stage one `extract`s once, stage two `fit`s in seconds.")

DataOpt = typer.Option(None, "--data", help="FER2013 zip, folder or CSV [default: ./data or $FERCACHE_DATA]")
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of a table.")


def _emit(obj: dict) -> None:
    typer.echo(json.dumps(obj, indent=2))


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
    model: str = typer.Option("openai/clip-vit-base-patch32", help="Hub id or local folder of a CLIP-family "
                              "model, or `pixels` for the raw-pixel baseline."),
    preprocess: str = typer.Option("clip", help="clip: the model's own image processor; seed: the reference "
                                   "project's recipe (bilinear, mean/std 0.5)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 where native, else float32), float32, bfloat16, float16."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    limit: Optional[int] = typer.Option(None, help="Only the first N images of the split, for quick trials."),
    cache: Optional[Path] = typer.Option(None, help="Cache file [default: data/cache/<model>__<preprocess>.h5]."),
    force: bool = typer.Option(False, "--force", help="Redo complete splits; replace a cache made otherwise."),
    layers: Optional[str] = typer.Option(None, help="Also store the CLS token after these blocks: 1,6,12 or all."),
    tta: str = typer.Option("none", help="none, or flip: also embed the mirrored faces."),
    strict: bool = typer.Option(False, "--strict", help="An unreadable image is an error, not a warning."),
) -> None:
    """Stage one: encode FER2013 with a frozen vision model, once, into an HDF5 cache."""
    from fercache.extract import extract as run_extract

    for summary in run_extract(data, split, model, preprocess, device, dtype, batch_size, limit, cache,
                               force, layers, tta, strict):
        typer.echo(str(summary))


def _format_warning(message, category, filename, lineno, file=None, line=None) -> str:
    if issubclass(category, FERCacheWarning):
        return f"fercache: warning: {message}\n"
    return f"{filename}:{lineno}: {category.__name__}: {message}\n"


def main() -> None:
    """Console entry point: run the app, turning user errors into one line and exit code 2."""
    warnings.formatwarning = _format_warning
    try:
        app()
    except UserError as exc:
        typer.echo(f"fercache: error: {exc}", err=True)
        sys.exit(2)
