"""What people read: plain-text tables and PNG plots (the figures they show are computed in `stats`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fercache.stats import classification_metrics  # noqa: F401  (moved to stats; the old name still works)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A right-aligned text table; floats get 4 decimals, ints thousands separators."""

    def cell(v: object) -> str:
        if isinstance(v, bool) or v is None:
            return str(v if v is not None else "-")
        if isinstance(v, int):
            return f"{v:,}"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(lines)


def interval(figures: dict, key: str) -> str:
    """`[low, high]` of a figure's 95% interval as `figures` stores it (`<key>_low`, `<key>_high`); "" if none."""
    low, high = figures.get(f"{key}_low"), figures.get(f"{key}_high")
    return f"[{low:.4f}, {high:.4f}]" if low is not None and high is not None else ""


def with_interval(figures: dict, key: str) -> str:
    """A figure and its 95% interval, as the CLI prints it: `0.6523 [0.6412, 0.6634]`."""
    return f"{figures[key]:.4f} {interval(figures, key)}".rstrip()


def unseen_line(figures: dict) -> str:
    """The CLI's line on the test faces that have no copy in train (`stats.unseen_figures`)."""
    count = figures.get("test_unseen_count")
    if count is None:
        return ("test faces with no copy in train: unknown (the source the cache names is not at hand, or cannot be "
                "audited: the warning above says which)")
    line = (f"test faces with no copy in train: accuracy {with_interval(figures, 'test_unseen_accuracy')} on {count:,}"
            if count else "every test face has a copy in train: no test_unseen_accuracy")
    left_out = figures.get("train_with_test_copy", figures.get("excluded"))
    if figures.get("exclude_duplicates"):
        line += f" (--exclude-duplicates: {left_out:,} faces with a copy across train and test left out)"
    elif left_out:
        line += f" ({left_out:,} train faces copy a test face; --exclude-duplicates leaves them out)"
    return line


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike,
                   title: str = "") -> Path:
    """The confusion matrix as a PNG: colour is the share of each true class, cells give counts."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    counts = np.asarray(confusion)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(6.4, 5.6), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of true class")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, f"{n:,}", ha="center", va="center", fontsize=8,
                color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_curves(rows: Sequence[dict], path: str | os.PathLike, x: str = "epoch", title: str = "") -> Path:
    """Loss and accuracy against `x` as a PNG.

    Epoch rows give training curves (every `*_loss` and `*_acc` column). `x="C"` rows (logreg's
    search) give a log-scale validation curve of what chose C, each point with its standard
    error: validation loss, and validation accuracy or, where the rows have it (`--class-weight
    balanced`), balanced accuracy, the criterion then.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), layout="constrained")
    xs = [r[x] for r in rows]
    for ax, suffix, label in zip(fig.subplots(1, 2), ("_loss", "_acc"), ("cross-entropy", "accuracy")):
        for key, se_key, name in _curve_series(rows[0], x, suffix):
            se = [r[se_key] for r in rows] if se_key else None
            ax.errorbar(xs, [r[key] for r in rows], yerr=se, marker="o", markersize=3, capsize=3,
                        label=name + (" ± 1 SE" if se else ""))
        if x == "C":
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(x)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    return Path(path)


def _curve_series(row: dict, x: str, suffix: str) -> list[tuple[str, str | None, str]]:
    """(key, its standard error's key or None, label) of each line `plot_curves` draws in one panel."""
    if x != "C":
        return [(k, None, k.removesuffix(suffix)) for k in row if k.endswith(suffix)]
    if suffix == "_loss":
        return [("val_loss", "val_loss_se" if "val_loss_se" in row else None, "validation loss")]
    if "val_bacc" in row:  # balanced class weights: C was chosen on balanced accuracy
        return [("val_bacc", "val_bacc_se", "validation balanced accuracy")]
    return [("val_acc", "val_se", "validation accuracy")]


def plot_reliability(calibration: dict, path: str | os.PathLike, title: str = "") -> Path:
    """The reliability diagram as a PNG: accuracy against confidence per bin (`stats.calibration`),
    the diagonal being perfect calibration, with the rows per bin below and the ECE in the title."""
    from matplotlib.figure import Figure

    bins = [b for b in calibration["bins"] if b["count"]]
    centres = [(b["low"] + b["high"]) / 2 for b in calibration["bins"]]
    width = calibration["bins"][0]["high"] - calibration["bins"][0]["low"]
    fig = Figure(figsize=(5, 5.6), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["accuracy"] for b in bins], width=width * 0.9,
            color="tab:blue", alpha=0.8, label="accuracy")
    top.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["confidence"] - b["accuracy"] for b in bins],
            bottom=[b["accuracy"] for b in bins], width=width * 0.9, color="tab:red", alpha=0.25,
            label="gap to mean confidence")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
            title=f"{title}{': ' if title else ''}ECE {calibration['ece']:.4f}")
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    bottom.bar(centres, [b["count"] for b in calibration["bins"]], width=width * 0.9, color="gray")
    bottom.set(xlabel="confidence (top class probability)", ylabel="rows")
    fig.savefig(path, dpi=110)
    return Path(path)
