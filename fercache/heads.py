"""Stage two's model: a linear softmax head on cached features, fitted two ways, stored safely.

Both recipes end in the same form, softmax(((X - mean) / std) @ W.T + b): `fit_linear` is the
reference recipe (nn.Linear, Adam, cross-entropy, shuffled minibatches), `logreg.fit_logreg` is
L2-regularised logistic regression with C chosen on validation rows. So one `Head` serves both, and it is saved as safetensors + JSON: loading a head never runs code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fercache.errors import UserError
from fercache.identity import HEAD, Identity, dataset_of
from fercache.names import CLASS_WEIGHTS, CLASSES, choice

WEIGHTS, CONFIG = "head.safetensors", "head.json"
ABSENT = -1e4  # the bias of a class without training rows: its probability underflows to 0, its loss stays finite
FORMAT_VERSION = 2  # 1: fercache 0.1.0, the same keys without `model_weights`, `image_size`, `format_version`


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
    canonical: list[str] | None = None  # per class its canonical expression (None: FER2013's, or the names)
    dataset: str = "fer2013"  # what it was fitted on

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def without_absent(self, y: np.ndarray) -> Head:
        """Classes with no training row are never predicted: their row is zero, their bias `ABSENT`.

        Training only pushes such a class's logit down, not out of reach (with --limit or few-shot
        data a far-off face could still land on it); the head keeps a row per class either way.
        """
        absent = np.bincount(np.asarray(y, dtype=np.int64), minlength=len(self.bias)) == 0
        self.weight[absent], self.bias[absent] = 0.0, ABSENT
        return self

    def logits(self, X: np.ndarray) -> np.ndarray:
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise UserError(f"features of shape {X.shape} do not fit this {self.dim}-d head")
        return ((X - self.mean) / self.std).astype(np.float32, copy=False) @ self.weight.T + self.bias

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self.logits(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.logits(X).argmax(axis=1)

    def losses(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's cross-entropy and whether it is predicted right (logreg needs the spread, not just the mean)."""
        z = self.logits(X).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -logp[np.arange(len(y)), y], z.argmax(axis=1) == y

    def score(self, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Mean cross-entropy and accuracy on labelled features."""
        loss, right = self.losses(X, y)
        return float(loss.mean()), float(right.mean())

    def save(self, folder: str | os.PathLike) -> Path:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, folder / WEIGHTS)
        config = {"format": "fercache-head", "format_version": FORMAT_VERSION, "classes": self.classes,
                  "method": self.method, "dim": self.dim, "standardize": self.standardize, "layer": self.layer,
                  "views": self.views, "dataset": self.dataset,
                  "canonical": dataset_of({"classes": self.classes, "canonical": self.canonical})[2],
                  **(self.identity.to_meta(HEAD) if self.identity else {})}
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
            dataset, _, canonical = dataset_of(config)
            head = cls(t["weight"], t["bias"], t["mean"], t["std"], config["method"], bool(config["standardize"]),
                       list(config["classes"]), identity, config.get("layer"), config.get("views") or "plain",
                       canonical, dataset)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError, UserError) as exc:
            raise UserError(f"{folder}: broken head ({type(exc).__name__}: {exc})") from None
        k, d = head.weight.shape if head.weight.ndim == 2 else (0, 0)
        if (k, d) != (len(head.classes), config.get("dim")) or head.bias.shape != (k,) \
                or head.mean.shape != (d,) or head.std.shape != (d,):
            raise UserError(f"{folder}: broken head (weights of shape {head.weight.shape} do not match "
                            f"{CONFIG}: {len(head.classes)} classes, dim {config.get('dim')})")
        return head


def softmax(z: np.ndarray) -> np.ndarray:
    """Rows of logits -> rows of probabilities (shifted by each row's maximum, so nothing overflows)."""
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def moments(X: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of the features a head is fitted on (0 and 1 when not standardising).

    Pass the fit rows only: rows held out to validate (logreg's C, probe's layer) must not shape
    the standardisation they are then scored under.
    """
    if not standardize:
        return np.zeros(X.shape[1], np.float32), np.ones(X.shape[1], np.float32)
    mean, std = X.mean(axis=0, dtype=np.float32), X.std(axis=0, dtype=np.float32)  # float64 is slower and agrees to 1e-5
    std[std < 1e-6] = 1.0  # a constant feature carries nothing; do not divide by ~0
    return mean, std


def class_weights(y: np.ndarray, class_weight: str = "none", classes: int = len(CLASSES)) -> np.ndarray:
    """One weight per class (`classes` of them, FER2013's 7 by default): ones, or scikit-learn's "balanced",
    n / (classes present x rows of the class), so that every class present weighs the same in the loss
    (absent classes get 0)."""
    choice(class_weight, CLASS_WEIGHTS, "class weight")
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=classes).astype(np.float64)
    if class_weight == "none":
        return np.ones(classes)
    return np.divide(len(y), (counts > 0).sum() * counts, out=np.zeros_like(counts), where=counts > 0)


def fit_linear(X: np.ndarray, y: np.ndarray, X_test: np.ndarray | None = None, y_test: np.ndarray | None = None,
               *, epochs: int = 20, lr: float = 1e-3, batch_size: int = 256, weight_decay: float = 0.0,
               seed: int = 0, standardize: bool = True, class_weight: str = "none", classes: int = len(CLASSES),
               targets: np.ndarray | None = None) -> tuple[Head, list[dict]]:
    """The reference recipe: `nn.Linear`, `torch.optim.Adam`, cross-entropy on shuffled minibatches.

    Returns the head and one history row per epoch: train loss and accuracy averaged over the
    epoch's minibatches (as the reference recipe reports them) and, when a test set is given, test
    loss and accuracy of the whole set after the epoch. Any float arrays; same seed, same numbers.
    `class_weight="balanced"` weighs the cross-entropy by `class_weights` (the reported losses too).
    The head has `classes` rows (at least every label in `y`). `targets` (N x classes, rows summing to
    1: FER+'s vote shares) are soft targets for the training loss (cross-entropy against the
    distribution); `y` (their majority) still scores accuracy and the test loss.
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
    classes = max(classes, int(labels.max()) + 1 if len(labels) else 0)
    soft = None if targets is None else torch.from_numpy(np.asarray(targets, dtype=np.float32))
    if soft is not None and tuple(soft.shape) != (len(labels), classes):
        raise UserError(f"soft targets of shape {tuple(soft.shape)} for {len(labels)} rows of {classes} classes")
    weight = None if class_weight == "none" else torch.from_numpy(class_weights(y, class_weight, classes)).float()
    if X_test is not None:
        X_test = torch.from_numpy((np.asarray(X_test, dtype=np.float32) - mean) / std)
        y_test = torch.from_numpy(np.asarray(y_test, dtype=np.int64))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            model = torch.nn.Linear(X.shape[1], classes)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        history = []
        for epoch in range(1, epochs + 1):
            loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.int64)
            for batch in torch.randperm(len(labels), generator=gen).split(batch_size):
                logits = model(features[batch])
                loss = F.cross_entropy(logits, labels[batch] if soft is None else soft[batch], weight=weight)
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
                row.update(test_loss=F.cross_entropy(z, y_test, weight=weight).item(), test_acc=(z.argmax(1) == y_test).float().mean().item())
            history.append(row)
    finally:
        torch.set_num_threads(threads)
    head = Head(model.weight.detach().numpy().copy(), model.bias.detach().numpy().copy(), mean, std, "linear",
                standardize)
    return head.without_absent(labels.numpy()), history
