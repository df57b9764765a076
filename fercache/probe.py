"""Probing experiments: which layer knows most about expression, and one table across runs.

`probe` fits one linear head per stored layer (`extract --layers`) plus the pooled feature on
train, chooses the best on validation and scores each on test: the curve says where in the
network expression is most linearly readable. `compare` reads the `metrics.json` of finished runs
(`fercache fit`) into one table, so encoders, preprocessing, heads, views and layers can be set
side by side, ranked within each test set only, and tests each run against the best one on the
same test faces (McNemar, adjusted for having picked the best on them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fercache.cache import load_embeddings, read_meta
from fercache.errors import UserError, warn
from fercache.names import CLASS_WEIGHTS, METHODS, POOLED, VALS, choice
from fercache.report import interval

COMPARE_COLUMNS = ("model", "preprocess", "method", "views", "layer", "test_accuracy", "macro_f1",
                   "test_accuracy_low", "test_accuracy_high", "balanced_accuracy", "test_split")


def default_out(cache: str | os.PathLike) -> Path:
    """`runs/<cache-stem>-probe`."""
    return Path("runs") / f"{Path(cache).stem}-probe"


def probe(cache: str | os.PathLike, out: str | os.PathLike | None = None, method: str = "linear",
          views: str = "plain", seed: int = 0, val: str = "train", class_weight: str = "none",
          exclude_duplicates: bool = False, folds: int | str | None = None) -> dict:
    """Fit a head per stored layer (and the pooled feature); choose the best layer on validation.

    `val="train"`: heads are fitted on a stratified 80% of train (`logreg.stratified_split`, the
    same rows for every layer), the other 20% is validation, test is test. `val="public_test"`:
    heads are fitted on all of train, PublicTest is validation, PrivateTest is test. Validation
    also chooses logreg's C. Writes `probe.json` and `probe.png` (validation and test accuracy
    against block number) into `out`; returns what `probe.json` holds: `{"best_layer", "layers":
    [{"layer": k, "val_accuracy": a, "test_accuracy": b, ...}, ...], ...}`, the pooled feature
    last with `"layer": "pooled"`. `exclude_duplicates` drops the train faces that copy a test face
    (as `fit`); each layer's `test_unseen_accuracy` is its accuracy on the test faces with no copy in train.
    A dataset without a split takes `folds` (`probe_folds`).
    """
    from fercache.logreg import VAL_FRACTION, stratified_split
    from fercache.runs import duplicate_counts, train_rows
    from fercache.stats import intervals, unseen_figures

    choice(method, METHODS, "method")
    choice(val, VALS, "--val")
    choice(class_weight, CLASS_WEIGHTS, "--class-weight")
    meta = read_meta(Path(cache))
    if not meta.get("layers"):
        raise UserError(f"{cache}: stores no per-layer features; extract with --layers (e.g. "
                        f"`fercache extract --model {meta.get('model', '...')} --layers all --split all`)")
    if folds is not None:
        if val != "train" or exclude_duplicates:
            raise UserError("--folds validates inside each fold's training part: no --val public_test or "
                            "--exclude-duplicates")
        return probe_folds(cache, meta, folds, out, method, views, seed, class_weight)
    test_split = "test" if val == "train" else "private_test"
    rows, fit_rows, val_rows = [], None, None
    for layer in [*meta["layers"], None]:
        train = load_embeddings(cache, "train", layer=layer, view=views)
        test = load_embeddings(cache, test_split, layer=layer, view=views)
        if fit_rows is None:  # the same rows for every layer
            copied, seen, fit_rows = train_rows(meta.get("source", {}).get("path"), exclude_duplicates, Path(cache),
                                                train.ids, test.ids)
            if val == "train":
                fit_rows, val_rows = (fit_rows[r] for r in stratified_split(train.y[fit_rows], VAL_FRACTION, seed))
        if val == "train":
            X, y, X_val, y_val = train.X[fit_rows], train.y[fit_rows], train.X[val_rows], train.y[val_rows]
        else:
            X, y = train.X[fit_rows], train.y[fit_rows]
            X_val, y_val = load_embeddings(cache, "public_test", layer=layer, view=views)[:2]
        head = _fit_head(method, X, y, (X_val, y_val), seed, class_weight, len(train.classes))
        pred = head.predict(test.X)
        figures = intervals(test.y, pred, k=len(train.classes))  # the bootstrap seed `fit` uses too
        rows.append({"layer": POOLED if layer is None else layer, "dim": int(X.shape[1]),
                     "train_accuracy": head.score(X, y)[1], "val_accuracy": head.score(X_val, y_val)[1],
                     "test_accuracy": figures["accuracy"], "test_accuracy_low": figures["accuracy_low"],
                     "test_accuracy_high": figures["accuracy_high"], **unseen_figures(test.y, pred, seen)})
    folder = Path(out) if out else default_out(cache)
    folder.mkdir(parents=True, exist_ok=True)
    best = max(rows, key=lambda r: r["val_accuracy"])  # chosen on validation, never on test
    result = {"cache": str(cache), "model": meta.get("model"), "preprocess": meta.get("preprocess"),
              "method": method, "views": views, "val": val, "class_weight": class_weight,
              "val_split": "train" if val == "train" else "public_test", "test_split": test_split,
              "train_count": len(y), "val_count": len(y_val), "test_count": len(test.y),
              **duplicate_counts(copied, exclude_duplicates),
              "best_layer": best["layer"], "layers": rows,
              "files": {"json": str(folder / "probe.json"), "plot": str(folder / "probe.png")}}
    (folder / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_probe(result, folder / "probe.png")
    return result


def _fit_head(method: str, X: np.ndarray, y: np.ndarray, val: tuple[np.ndarray, np.ndarray], seed: int,
              class_weight: str, classes: int):
    """One layer's head: the linear one, or logreg with C chosen on `val` (never on test)."""
    from fercache.heads import fit_linear
    from fercache.logreg import fit_logreg

    if method == "linear":
        return fit_linear(X, y, seed=seed, class_weight=class_weight, classes=classes)[0]
    return fit_logreg(X, y, seed=seed, class_weight=class_weight, val=val, classes=classes)[0]


def probe_folds(cache: str | os.PathLike, meta: dict, folds: int | str, out: str | os.PathLike | None,
                method: str, views: str, seed: int, class_weight: str) -> dict:
    """`probe` over subject-independent folds (`folds.cross_validate`): in each fold, a head per layer
    fitted on a stratified 80% of the fold's training part, the layer chosen on the other 20%, the
    fold's held-out subjects predicted. Each layer's row has its pooled test accuracy (every face
    predicted once) and its mean train and validation accuracy; `chosen` (the layer-chosen-per-fold
    predictions, pooled, and each fold's layer) is what a paper would report."""
    from fercache.cache import load_subjects
    from fercache.folds import cross_validate
    from fercache.identity import dataset_of
    from fercache.logreg import VAL_FRACTION, stratified_split
    from fercache.stats import intervals

    layers = [*meta["layers"], None]
    feats = {layer: load_embeddings(cache, "all", layer=layer, view=views) for layer in layers}
    y, classes = feats[None].y, dataset_of(meta)[1]
    proba = {layer: np.zeros((len(y), len(classes))) for layer in layers}
    val_acc: dict = {layer: [] for layer in layers}
    train_acc: dict = {layer: [] for layer in layers}
    chosen: list = []

    def one_fold(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        fit_rows, val_rows = (train[r] for r in stratified_split(y[train], VAL_FRACTION, seed))
        for layer in layers:
            X = feats[layer].X
            head = _fit_head(method, X[fit_rows], y[fit_rows], (X[val_rows], y[val_rows]), seed, class_weight,
                             len(classes))
            val_acc[layer].append(head.score(X[val_rows], y[val_rows])[1])
            train_acc[layer].append(head.score(X[fit_rows], y[fit_rows])[1])
            proba[layer][test] = head.predict_proba(X[test])
        chosen.append(max(layers, key=lambda layer: val_acc[layer][-1]))  # on validation, never on test
        return proba[chosen[-1]][test]

    pooled, _, summary = cross_validate(y, load_subjects(cache, "all"), folds, classes, one_fold, seed)
    rows = []
    for layer in layers:
        figures = intervals(y, proba[layer].argmax(1), k=len(classes))
        rows.append({"layer": POOLED if layer is None else layer, "dim": int(feats[layer].X.shape[1]),
                     "train_accuracy": float(np.mean(train_acc[layer])),
                     "val_accuracy": float(np.mean(val_acc[layer])), "test_accuracy": figures["accuracy"],
                     "test_accuracy_low": figures["accuracy_low"], "test_accuracy_high": figures["accuracy_high"]})
    figures = intervals(y, pooled.argmax(1), k=len(classes))
    folder = Path(out) if out else default_out(cache)
    folder.mkdir(parents=True, exist_ok=True)
    result = {"cache": str(cache), "model": meta.get("model"), "preprocess": meta.get("preprocess"),
              "method": method, "views": views, "val": "train", "class_weight": class_weight,
              "val_split": "train", "test_split": "all", "train_count": len(y), "val_count": len(y),
              "test_count": len(y), "best_layer": max(rows, key=lambda r: r["val_accuracy"])["layer"], "layers": rows,
              "chosen": {"layers": [POOLED if c is None else c for c in chosen],
                         **{k: figures[k] for k in ("accuracy", "accuracy_low", "accuracy_high")}},
              "folds": summary, "files": {"json": str(folder / "probe.json"), "plot": str(folder / "probe.png")}}
    (folder / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_probe(result, folder / "probe.png")
    return result


def plot_probe(result: dict, path: Path) -> None:
    """Validation and test accuracy (with its 95% interval) against block number; the pooled
    feature as dashed lines."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend (as in report.py)

    blocks = [r for r in result["layers"] if r["layer"] != POOLED]
    pooled = [r for r in result["layers"] if r["layer"] == POOLED]
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    x = [r["layer"] for r in blocks]
    ax.plot(x, [r["val_accuracy"] for r in blocks], "s-", color="tab:orange", label="validation")
    ax.errorbar(x, [r["test_accuracy"] for r in blocks], capsize=3, color="tab:blue", marker="o", label="test (95% CI)",
                yerr=[[r["test_accuracy"] - r["test_accuracy_low"] for r in blocks],
                      [r["test_accuracy_high"] - r["test_accuracy"] for r in blocks]])
    for r in pooled:
        ax.axhline(r["val_accuracy"], ls=":", color="tab:orange", label=f"pooled, validation ({r['val_accuracy']:.3f})")
        ax.axhline(r["test_accuracy"], ls="--", color="gray", label=f"pooled, test ({r['test_accuracy']:.3f})")
    if result["best_layer"] != POOLED:
        ax.axvline(result["best_layer"], color="tab:green", alpha=0.4, label="chosen on validation")
    ax.set(xlabel="block", ylabel="accuracy",
           title=f"{result['model']}: {result['method']} probe per layer ({result['views']})")
    ax.set_xticks([r["layer"] for r in blocks])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)


def compare(runs: list[str | os.PathLike]) -> list[dict]:
    """One row per run folder (or its `metrics.json`), ranked by test accuracy within each test set.

    A test set is the faces a run was scored on: its split, the dataset (the source's
    fingerprint) and the very faces (`predictions.csv`: ids and labels; the face count where a
    run has none). Runs are ranked, and paired, only within their own set (`test_set` names it),
    never across: a PrivateTest figure and a whole-test figure are not one column. Within a set,
    every run but the best gets `p_value`, its exact McNemar test against the best
    (`stats.versus_best`: Holm over all pairs of the set's runs, since the best was itself picked
    on these faces; `p_raw` keeps the unadjusted value). More than one set is said in one line.
    A path without a readable `metrics.json` is skipped with a warning; none at all is an error.
    """
    from fercache.runs import PREDICTIONS, read_predictions
    from fercache.stats import versus_best

    rows, skipped, predictions, keys = [], [], {}, {}
    for run in map(Path, runs):
        path = run if run.name == "metrics.json" else run / "metrics.json"
        if not path.is_file():
            skipped.append(f"{run}: no metrics.json (not a finished `fercache fit` run); skipped")
            continue
        try:
            metrics = json.loads(path.read_text())
            row = {"run": str(path.parent), **{k: metrics.get(k) for k in COMPARE_COLUMNS}}
            row["test_accuracy"] = float(row["test_accuracy"])
            source = metrics.get("cache")
            for key in ("meta", "source"):  # where the dataset is named; absent from older or hand-made runs
                source = source.get(key) if isinstance(source, dict) else None
            source = source if isinstance(source, dict) else {}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            skipped.append(f"{path}: unreadable metrics ({type(exc).__name__}: {exc}); skipped")
            continue
        if (path.parent / PREDICTIONS).is_file():
            predictions[row["run"]] = read_predictions(path.parent / PREDICTIONS)
        mine = predictions.get(row["run"])
        count = len(mine["id"]) if mine else metrics.get("test_count")
        dataset = Path(source["path"]).name if source.get("path") else None
        if metrics.get("dataset", "fer2013") != "fer2013" or metrics.get("folds"):  # which dataset, how split
            folds = f", {metrics['folds']['count']} folds" if metrics.get("folds") else ""
            dataset = f"{metrics.get('dataset', 'fer2013')} ({dataset or 'cache'}{folds})"
        row["test_set"] = " ".join(filter(None, [row["test_split"] or "test", f"of {dataset}" if dataset else "",
                                                  f"({count:,} faces)" if isinstance(count, int) else ""]))
        keys[row["run"]] = (row["test_split"], source.get("fingerprint") or source.get("path"),
                            (tuple(mine["id"]), mine["label"].tobytes()) if mine else count)
        rows.append(row)
    if not rows:
        raise UserError(f"none of the {len(runs)} path(s) given holds a run's metrics.json (made by `fercache fit`)")
    for message in skipped:
        warn(message)
    sets: dict[tuple, list[dict]] = {}
    for row in sorted(rows, key=lambda r: -r["test_accuracy"]):  # sets in the order of their best runs
        sets.setdefault(keys[row["run"]], []).append(row)
        row["p_value"] = row["p_raw"] = row["vs"] = None
        if row["run"] not in predictions:
            warn(f"{row['run']}: no {PREDICTIONS} (made by fercache before 0.2); no p-value")
    if len(sets) > 1:
        names = "; ".join(members[0]["test_set"] for members in sets.values())
        warn(f"these runs were scored on {len(sets)} different test sets ({names}): "
             "each is ranked and paired within its own set only, not paired with the others")
    for members in sets.values():
        paired = [r for r in members if r["run"] in predictions]
        if len(paired) < 2:
            continue
        label = predictions[paired[0]["run"]]["label"]
        best, raw, adjusted = versus_best([predictions[r["run"]]["predicted"] == label for r in paired])
        for r, p_raw, p in zip(paired, raw, adjusted):
            if r is not paired[best]:
                r.update(vs=paired[best]["run"], p_raw=float(p_raw), p_value=float(p))
    return [row for members in sets.values() for row in members]


def compare_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Headers and cells of `fercache compare`'s table."""
    def text(v: object) -> object:
        return "+".join(map(str, v)) if isinstance(v, list) else v

    headers = ["run", "model", "preprocessing", "method", "views", "layer", "test accuracy", "95% interval",
               "macro-F1", "p vs best (Holm, all pairs)", "test set"]
    cells = [[r["run"], *(text(r[k]) for k in COMPARE_COLUMNS[:4]), POOLED if r["layer"] is None else r["layer"],
              r["test_accuracy"], interval(r, "test_accuracy") or "-", r["macro_f1"],
              "-" if r["p_value"] is None else f"{r['p_value']:.3g}", r["test_set"]] for r in rows]
    return headers, cells


def probe_table(result: dict) -> tuple[list[str], list[list]]:
    """Headers and cells of `fercache probe`'s table."""
    headers = ["layer", "dim", "train accuracy", "val accuracy", "test accuracy", "95% interval"]
    cells = [[str(r["layer"]), r["dim"], r["train_accuracy"], r["val_accuracy"], r["test_accuracy"],
              interval(r, "test_accuracy")] for r in result["layers"]]
    if any(r.get("test_unseen_count") for r in result["layers"]):  # known, and some test face has no copy in train
        headers += ["no copy in train", "95% interval"]
        for row, r in zip(cells, result["layers"]):
            row += [r["test_unseen_accuracy"], interval(r, "test_unseen_accuracy")]
    return headers, cells
