"""Stage two's model: a linear softmax head on cached features, fitted two ways, stored safely.

Both recipes end in the same form, softmax(((X - mean) / std) @ W.T + b): `fit_linear` is the
reference recipe (nn.Linear, Adam, cross-entropy, shuffled minibatches), `fit_logreg` is
scikit-learn's L2-regularised logistic regression with C chosen on a held-out part of train. So one
`Head` serves both, and it is saved as safetensors + JSON: loading a head never runs code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fercache.errors import UserError
from fercache.identity import HEAD, Identity
from fercache.names import CLASSES

WEIGHTS, CONFIG = "head.safetensors", "head.json"
FORMAT_VERSION = 2  # 1: fercache 0.1.0, the same keys without `model_weights`, `image_size`, `format_version`
C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 13))  # half-decade steps
VAL_FRACTION = 0.2


@dataclass
class Head:
    """A fitted linear head and the features it expects: which encoder made them, which layer and view."""

    weight: np.ndarray  # (classes, D)
    bias: np.ndarray  # (classes,)
    mean: np.ndarray  # (D,): zeros without standardisation
    std: np.ndarray  # (D,): ones without standardisation
    method: str
    standardize: bool
    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    identity: Identity | None = None  # None: fitted on arrays of unknown origin (`fit_linear` on your own)
    layer: int | None = None
    views: str = "plain"

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, X: np.ndarray) -> np.ndarray:
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise UserError(f"features of shape {X.shape} do not fit this {self.dim}-d head")
        return ((X - self.mean) / self.std).astype(np.float32, copy=False) @ self.weight.T + self.bias

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        z = self.logits(X)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.logits(X).argmax(axis=1)

    def score(self, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Mean cross-entropy and accuracy on labelled features."""
        z = self.logits(X).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(y)), y].mean()), float((z.argmax(axis=1) == y).mean())

    def save(self, folder: str | os.PathLike) -> Path:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, folder / WEIGHTS)
        config = {"format": "fercache-head", "format_version": FORMAT_VERSION, "classes": self.classes,
                  "method": self.method, "dim": self.dim, "standardize": self.standardize, "layer": self.layer,
                  "views": self.views, **(self.identity.to_meta(HEAD) if self.identity else {})}
        (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Head:
        """Read a head written by `save`; anything missing or malformed is a `UserError`."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
            raise UserError(f"{folder}: not a head folder (expected {CONFIG} and {WEIGHTS}, made by `fercache fit`)")
        try:
            config = json.loads((folder / CONFIG).read_text())
            t = load_file(folder / WEIGHTS)
            identity = Identity.from_meta(config).encoder() if "model" in config else None
            head = cls(t["weight"], t["bias"], t["mean"], t["std"], config["method"], bool(config["standardize"]),
                       list(config["classes"]), identity, config.get("layer"), config.get("views") or "plain")
        except (OSError, ValueError, KeyError, TypeError, SafetensorError, UserError) as exc:
            raise UserError(f"{folder}: broken head ({type(exc).__name__}: {exc})") from None
        k, d = head.weight.shape if head.weight.ndim == 2 else (0, 0)
        if (k, d) != (len(head.classes), config.get("dim")) or head.bias.shape != (k,) \
                or head.mean.shape != (d,) or head.std.shape != (d,):
            raise UserError(f"{folder}: broken head (weights of shape {head.weight.shape} do not match "
                            f"{CONFIG}: {len(head.classes)} classes, dim {config.get('dim')})")
        return head


def moments(X: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of the training features (0 and 1 when not standardising)."""
    if not standardize:
        return np.zeros(X.shape[1], np.float32), np.ones(X.shape[1], np.float32)
    mean, std = X.mean(axis=0, dtype=np.float32), X.std(axis=0, dtype=np.float32)  # float64 is slower and agrees to 1e-5
    std[std < 1e-6] = 1.0  # a constant feature carries nothing; do not divide by ~0
    return mean, std


def fit_linear(X: np.ndarray, y: np.ndarray, X_test: np.ndarray | None = None, y_test: np.ndarray | None = None,
               *, epochs: int = 20, lr: float = 1e-3, batch_size: int = 256, weight_decay: float = 0.0,
               seed: int = 0, standardize: bool = True) -> tuple[Head, list[dict]]:
    """The reference recipe: `nn.Linear`, `torch.optim.Adam`, cross-entropy on shuffled minibatches.

    Returns the head and one history row per epoch: train loss and accuracy averaged over the
    epoch's minibatches (as the reference recipe reports them) and, when a test set is given, test
    loss and accuracy of the whole set after the epoch. Any float arrays; same seed, same numbers.
    The loop indexes tensors already in memory (no DataLoader) on one thread: for a D x 7 layer,
    thread hand-offs cost more than they save.
    """
    import torch
    import torch.nn.functional as F

    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise UserError(f"need epochs >= 1, batch size >= 1 and lr > 0 (got {epochs}, {batch_size}, {lr})")
    X = np.asarray(X, dtype=np.float32)
    mean, std = moments(X, standardize)
    features = torch.from_numpy((X - mean) / std)
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    if X_test is not None:
        X_test = torch.from_numpy((np.asarray(X_test, dtype=np.float32) - mean) / std)
        y_test = torch.from_numpy(np.asarray(y_test, dtype=np.int64))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            model = torch.nn.Linear(X.shape[1], len(CLASSES))
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        history = []
        for epoch in range(1, epochs + 1):
            loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.int64)
            for batch in torch.randperm(len(labels), generator=gen).split(batch_size):
                logits = model(features[batch])
                loss = F.cross_entropy(logits, labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():  # summed as tensors: no per-step conversion to Python numbers
                    loss_sum += loss * len(batch)
                    correct += (logits.argmax(1) == labels[batch]).sum()
            row = {"epoch": epoch, "train_loss": loss_sum.item() / len(labels), "train_acc": correct.item() / len(labels)}
            if X_test is not None:
                with torch.no_grad():
                    z = model(X_test)
                row.update(test_loss=F.cross_entropy(z, y_test).item(), test_acc=(z.argmax(1) == y_test).float().mean().item())
            history.append(row)
    finally:
        torch.set_num_threads(threads)
    head = Head(model.weight.detach().numpy().copy(), model.bias.detach().numpy().copy(), mean, std, "linear",
                standardize)
    return head, history


def fit_logreg(X: np.ndarray, y: np.ndarray, *, seed: int = 0, standardize: bool = True) -> tuple[Head, dict]:
    """scikit-learn's logistic regression (lbfgs), C chosen on a held-out part of train, never on test.

    A stratified 20% of train (fixed by `seed`) scores a half-decade grid of C, walked upwards with
    warm starts: each fit starts from the previous solution, and the walk stops once validation
    accuracy has not improved for three steps (weaker regularisation only costs more iterations
    from there). On a few cores this is several times faster than independent fits in parallel.
    The best C (by accuracy, then loss) is refitted on all of train from its solution. Returns the
    head and the search: `{"C", "val_fraction", "validation": [{"C", "val_loss", "val_acc",
    "n_iter"}], "n_iter"}`.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    mean, std = moments(X, standardize)
    Xs = ((X - mean) / std).astype(np.float64)  # lbfgs works in float64: convert once, not per fit
    X_fit, X_val, y_fit, y_val = train_test_split(Xs, y, test_size=VAL_FRACTION, stratify=y, random_state=seed)
    unit = moments(X_val, False)  # X_val is standardised already
    model = LogisticRegression(solver="lbfgs", max_iter=500, tol=1e-4, warm_start=True, random_state=seed)
    curve, best, stale = [], None, 0
    for C in C_GRID:
        model.set_params(C=C).fit(X_fit, y_fit)
        loss, acc = _as_head(model, *unit, standardize).score(X_val, y_val)
        curve.append({"C": C, "val_loss": loss, "val_acc": acc, "n_iter": int(model.n_iter_.max())})
        if best is None or (acc, -loss) > (best[0]["val_acc"], -best[0]["val_loss"]):
            best, stale = (curve[-1], model.coef_.copy(), model.intercept_.copy()), 0
        elif (stale := stale + 1) == 3:
            break
    model.set_params(C=best[0]["C"])
    model.coef_, model.intercept_ = best[1], best[2]
    model.fit(Xs, y)
    search = {"C": best[0]["C"], "val_fraction": VAL_FRACTION, "validation": curve, "n_iter": int(model.n_iter_.max())}
    return _as_head(model, mean, std, standardize), search


def _as_head(model, mean: np.ndarray, std: np.ndarray, standardize: bool) -> Head:
    return Head(model.coef_.astype(np.float32), model.intercept_.astype(np.float32), mean, std, "logreg", standardize)
