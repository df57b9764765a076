"""Probing experiments: which layer knows most about expression, and one table across runs.

`probe` fits one linear head per stored layer (`extract --layers`) plus the pooled feature on
train, and scores each on test: the curve says where in the network expression is most linearly
readable. `compare` reads the `metrics.json` of finished runs (`fercache fit`) into one table, so
encoders, preprocessing, heads, views and layers can be set side by side.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fercache.cache import load_embeddings, read_meta
from fercache.errors import UserError, warn
from fercache.names import METHODS, POOLED, choice

COMPARE_COLUMNS = ("model", "preprocess", "method", "views", "layer", "test_accuracy", "macro_f1")


def default_out(cache: str | os.PathLike) -> Path:
    """`runs/<cache-stem>-probe`."""
    return Path("runs") / f"{Path(cache).stem}-probe"


def probe(cache: str | os.PathLike, out: str | os.PathLike | None = None, method: str = "linear",
          views: str = "plain", seed: int = 0) -> dict:
    """Fit a head per stored layer (and the pooled feature) on train; test accuracy of each.

    Writes `probe.json` and `probe.png` (test accuracy against block number) into `out`; returns
    what `probe.json` holds: `{"layers": [{"layer": k, "test_accuracy": a, ...}, ...], ...}`, the
    pooled feature last with `"layer": "pooled"`.
    """
    from fercache.heads import fit_linear, fit_logreg

    choice(method, METHODS, "method")
    meta = read_meta(Path(cache))
    if not meta.get("layers"):
        raise UserError(f"{cache}: stores no per-layer features; extract with --layers (e.g. "
                        f"`fercache extract --model {meta.get('model', '...')} --layers all --split all`)")
    rows = []
    for layer in [*meta["layers"], None]:
        X, y, *_ = load_embeddings(cache, "train", layer=layer, view=views)
        X_test, y_test, *_ = load_embeddings(cache, "test", layer=layer, view=views)
        if method == "linear":
            head, _ = fit_linear(X, y, seed=seed)
        else:
            head, _ = fit_logreg(X, y, seed=seed)
        rows.append({"layer": POOLED if layer is None else layer, "dim": int(X.shape[1]),
                     "train_accuracy": head.score(X, y)[1], "test_accuracy": head.score(X_test, y_test)[1]})
    folder = Path(out) if out else default_out(cache)
    folder.mkdir(parents=True, exist_ok=True)
    best = max(rows, key=lambda r: r["test_accuracy"])
    result = {"cache": str(cache), "model": meta.get("model"), "preprocess": meta.get("preprocess"),
              "method": method, "views": views, "train_count": len(y), "test_count": len(y_test),
              "best_layer": best["layer"], "layers": rows,
              "files": {"json": str(folder / "probe.json"), "plot": str(folder / "probe.png")}}
    (folder / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_probe(result, folder / "probe.png")
    return result


def plot_probe(result: dict, path: Path) -> None:
    """Test accuracy against block number; the pooled feature as a dashed line."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend (as in report.py)

    blocks = [r for r in result["layers"] if r["layer"] != POOLED]
    pooled = [r for r in result["layers"] if r["layer"] == POOLED]
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([r["layer"] for r in blocks], [r["test_accuracy"] for r in blocks], "o-", label="CLS after block")
    for r in pooled:
        ax.axhline(r["test_accuracy"], ls="--", color="gray", label=f"pooled ({r['test_accuracy']:.3f})")
    ax.set(xlabel="block", ylabel="test accuracy",
           title=f"{result['model']}: {result['method']} probe per layer ({result['views']})")
    ax.set_xticks([r["layer"] for r in blocks])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)


def compare(runs: list[str | os.PathLike]) -> list[dict]:
    """One row per run folder (or its `metrics.json`), best test accuracy first.

    A path without a readable `metrics.json` is skipped with a one-line warning; none at all is an error.
    """
    rows, skipped = [], []
    for run in map(Path, runs):
        path = run if run.name == "metrics.json" else run / "metrics.json"
        if not path.is_file():
            skipped.append(f"{run}: no metrics.json (not a finished `fercache fit` run); skipped")
            continue
        try:
            metrics = json.loads(path.read_text())
            row = {"run": str(path.parent), **{k: metrics.get(k) for k in COMPARE_COLUMNS}}
            row["test_accuracy"] = float(row["test_accuracy"])
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            skipped.append(f"{path}: unreadable metrics ({type(exc).__name__}: {exc}); skipped")
            continue
        rows.append(row)
    if not rows:
        raise UserError(f"none of the {len(runs)} path(s) given holds a run's metrics.json (made by `fercache fit`)")
    for message in skipped:
        warn(message)
    return sorted(rows, key=lambda r: -r["test_accuracy"])


def compare_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Headers and cells of `fercache compare`'s table."""
    def text(v: object) -> object:
        return "+".join(map(str, v)) if isinstance(v, list) else v

    headers = ["run", "model", "preprocessing", "method", "views", "layer", "test accuracy", "macro-F1"]
    cells = [[r["run"], *(text(r[k]) for k in COMPARE_COLUMNS[:4]), POOLED if r["layer"] is None else r["layer"],
              r["test_accuracy"], r["macro_f1"]] for r in rows]
    return headers, cells


def probe_table(result: dict) -> tuple[list[str], list[list]]:
    """Headers and cells of `fercache probe`'s table."""
    headers = ["layer", "dim", "train accuracy", "test accuracy"]
    return headers, [[str(r["layer"]), r["dim"], r["train_accuracy"], r["test_accuracy"]] for r in result["layers"]]
