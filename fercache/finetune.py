"""Stage three: tune the encoder's top blocks, its final norm and a linear head.

A ViT-like tower is stem -> blocks -> final norm -> pooling. Tuning only the top N blocks leaves
everything below them frozen, so the token sequence entering block K+1 (K = L - N) is the same
every epoch: computed once and cached (`extract --tokens K`), it is all training needs, and an
epoch costs the top N blocks only. `--from-images` feeds the same training from faces through the
frozen lower part each epoch instead, with augmentation done in batches on the device: the usual
fine-tuning recipe, `--blocks all` included (the stem, patch and position embeddings, stays frozen).

The recipe: AdamW with linear warm-up and cosine decay, weight decay on matrices only, optional
label smoothing, layer-wise learning-rate decay (block j below the top learns at lr x decay^j);
the model is chosen, and training stopped early, on a validation part of train (or on PublicTest
with `val="public_test"`, reporting on PrivateTest), never on test. The head starts from a linear
probe of the starting model's pooled feature (linear-probe-then-fine-tune, Kumar et al., ICLR
2022: logistic regression, its standardisation folded into the layer), and that start is epoch 0,
a candidate like every other epoch: a tuned run never ends below its probe on validation.
Validation and test are scored in float32 whatever the training autocast, as `evaluate` scores.

Every epoch ends with a checkpoint (one safetensors file: weights, best weights, AdamW's state and
the random generators' states as tensors, the rest as JSON in its header), written atomically, so
an interrupted run resumes at its last finished epoch and ends with the same weights as one that
was never interrupted. The result is `tuned.safetensors` (the tuned tensors under the names they
have in the base model, plus `classifier.weight`/`.bias`) and `tuned.json` (the base model and its
revision, which blocks, the classes, the recipe): `load_tuned` swaps them into the base model.
A dataset without a split (CK+, JAFFE) is cross-validated over subject-independent folds instead
(`tune_folds`): each fold is such a tuned run of its own, in `fold-<k>/`, and resumes as one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fercache.encoder import Encoder, load_encoder, pick_device
from fercache.errors import UserError, at_least_one
from fercache.identity import ENCODER, Identity
from fercache.logreg import stratified_split
from fercache.names import CLASSES, TUNED_CONFIG, VALS, choice

WEIGHTS, CONFIG, CHECKPOINT = "tuned.safetensors", TUNED_CONFIG, "checkpoint.safetensors"
FOLD = "fold.json"  # a finished fold of a cross-validated run: its held-out faces' logits and choices
VAL_FRACTION = 0.1  # of train, stratified, when choosing on train
TRAIN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # float16 would need loss scaling
SCORE_BATCH = 256  # faces per scoring step, in training and in `evaluate` alike (the same batches, the same sums)
# Where Hugging Face vision towers keep their parts (transformers 4 and 5 spellings).
BLOCK_LISTS = ("encoder.layers", "encoder.layer", "layers")
NORMS = ("post_layernorm", "layernorm")
POOLERS = ("head", "pooler")  # SigLIP's attention-pooling head, ViT's dense+tanh; CLIP, DINOv2: the CLS token


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _call_block(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    out = block(h, None)  # no attention mask: every image has all its tokens
    return out[0] if isinstance(out, tuple) else out


class _Stack:
    """What every tower shares: its blocks, found by name in the model, and their number."""

    module: nn.Module
    blocks_name: str

    @property
    def blocks(self) -> nn.Module:
        return _get(self.module, self.blocks_name)

    @property
    def depth(self) -> int:
        return len(self.blocks)


@dataclass
class Tower(_Stack):
    """A loaded vision tower seen as stem -> blocks -> final norm -> pooling, with the parts' names."""

    module: nn.Module
    blocks_name: str
    norm_name: str
    pooler_name: str | None  # None: the pooled feature is the normed CLS token

    @classmethod
    def of(cls, model: nn.Module, where: str = "this model") -> Tower | LibraryTower:
        """The tower of a transformers model, or an OpenCLIP/timm model's as its backend sees it."""
        from fercache.backends import tuning_of

        library = tuning_of(model, where)
        if library is not None:
            return library
        import transformers

        if int(transformers.__version__.split(".")[0]) < 5:  # its towers are built otherwise (not tested)
            raise UserError(f"stage three needs transformers 5 or newer (this is {transformers.__version__}): "
                            "pip install -U transformers")
        tower = getattr(model, "vision_model", model)  # a full CLIP checkpoint holds its tower there
        blocks = next((n for n in BLOCK_LISTS if isinstance(_get(tower, n), nn.ModuleList)), None)
        norm = next((n for n in NORMS if isinstance(_get(tower, n), nn.Module)), None)
        pooler = next((n for n in POOLERS if isinstance(_get(tower, n), nn.Module)), None)
        has_cls = any(hasattr(getattr(tower, "embeddings", None), a) for a in ("class_embedding", "cls_token"))
        if blocks is None or norm is None or (pooler is None and not has_cls):
            raise UserError(f"{where} ({type(tower).__name__}) is not a ViT-like tower fercache can tune "
                            "(CLIP, SigLIP, DINOv2 and ViT are; so are OpenCLIP ViTs and timm ViT and EVA)")
        return cls(tower, blocks, norm, pooler)

    def lower(self, pixel_values: torch.Tensor, first: int) -> torch.Tensor:
        """The tokens entering block `first + 1` (what `hidden_states[first]` holds): stem, then blocks 1..first."""
        h = self.module.embeddings(pixel_values)
        pre = getattr(self.module, "pre_layrnorm", None)  # CLIP norms its embeddings before block 1
        h = pre(h) if pre is not None else h
        for block in self.blocks[:first]:
            h = _call_block(block, h)
        return h

    @property
    def parts(self) -> dict[str, str | None]:
        """The base model's names of what `TopModel` copies (tuned.json's `parts`)."""
        return {"blocks": self.blocks_name, "norm": self.norm_name, "pooler": self.pooler_name}

    @property
    def width(self) -> int:
        return _get(self.module, self.norm_name).weight.shape[0]

    def head_copies(self) -> dict[str, nn.Module | None]:
        pooler = _get(self.module, self.pooler_name) if self.pooler_name else None
        return {"norm": copy.deepcopy(_get(self.module, self.norm_name)), "pooler": copy.deepcopy(pooler)}

    def top(self, model: TopModel, h: torch.Tensor) -> torch.Tensor:
        """`model`'s blocks, final norm and pooling on tokens `h`: its pooled feature."""
        for block in model.blocks:
            h = _call_block(block, h)
        h = model.norm(h)
        return model.pooler(h) if model.pooler is not None else h[:, 0]


class _Stop(Exception):
    """Ends a library's forward pass once a hook has caught the tokens wanted."""


@dataclass
class LibraryTower(_Stack):
    """An OpenCLIP or timm token tower, as its backend's `tuning` describes it.

    The lower part is the library's own forward, stopped once the tokens entering block `first + 1`
    are caught by the hook `extract --tokens` catches them with; the top is the blocks called as the
    library calls them (`call`), then the library's own head code (`read`) run on a copy of the
    tower that holds only `head_parts` (and parameter-free modules such as dropout): the stem and
    the blocks are left out of it, and its tensors keep the base model's names.
    """

    module: nn.Module
    blocks_name: str
    head_parts: tuple[str, ...]  # dotted names of what reads the last block: final norm, pooling, projection
    call: Callable[[nn.Module, int, torch.Tensor], torch.Tensor]  # (block, 0-based index, tokens) -> tokens
    read: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (tower or its head copy, last tokens) -> pooled
    dim: int  # the tokens' width

    @property
    def parts(self) -> dict[str, str]:
        return {"blocks": self.blocks_name, "head": ""}  # the head copy's names are the base model's

    @property
    def width(self) -> int:
        """The pooled feature's size: the head read on one blank token sequence."""
        p = next(self.module.parameters())
        with torch.no_grad():
            return int(self.read(self.module, torch.zeros(1, 8, self.dim, dtype=p.dtype, device=p.device)).shape[-1])

    def lower(self, pixels: torch.Tensor, first: int) -> torch.Tensor:
        caught = []

        def stop(h: torch.Tensor) -> None:
            caught.append(h)
            raise _Stop

        hook = (self.blocks[0].register_forward_pre_hook(lambda _m, args: stop(args[0])) if first == 0 else
                self.blocks[first - 1].register_forward_hook(lambda _m, _i, out: stop(out)))
        try:
            self.module(pixels)
        except _Stop:
            pass
        finally:
            hook.remove()
        return caught[0]

    def head_copies(self) -> dict[str, nn.Module]:
        keep, memo = set(self.head_parts), {}

        def leave_out(module: nn.Module, prefix: str) -> None:  # memo[id(x)] = None: deepcopy gives None for x
            for name, t in [*module._parameters.items(), *module._buffers.items()]:
                if t is not None and prefix + name not in keep:
                    memo[id(t)] = None
            for name, child in module._modules.items():
                path = prefix + name
                if child is None or path in keep:
                    continue
                if any(k.startswith(path + ".") for k in keep):
                    leave_out(child, path + ".")
                elif any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                    memo[id(child)] = None

        leave_out(self.module, "")
        return {"head": copy.deepcopy(self.module, memo)}

    def top(self, model: TopModel, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(model.blocks):
            h = self.call(block, model.first + i, h)
        return self.read(model.head, h)


class TopModel(nn.Module):
    """Blocks `first+1..L`, the final norm, the pooling and a linear head: tokens in, logits out.

    Initialised as copies of the tower's own modules, so before training its pooled feature is the
    base model's (`pooler_output`; OpenCLIP's `encode_image`, timm's pre-logits).
    """

    def __init__(self, tower: Tower | LibraryTower, first: int, classes: int = len(CLASSES), seed: int = 0):
        super().__init__()
        self.tower = tower  # how its blocks are called and its head reads them (not a submodule: not copied)
        self.names = tower.parts
        self.first = first
        self.blocks = copy.deepcopy(nn.ModuleList(list(tower.blocks)[first:]))  # numbered from 0, whatever the list
        for part, module in tower.head_copies().items():
            setattr(self, part, module)
        with torch.random.fork_rng(devices=[]):  # a seeded head, without touching the caller's RNG
            torch.manual_seed(seed)
            self.classifier = nn.Linear(tower.width, classes)
        self.float().requires_grad_(True)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tower.top(self, tokens)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooled(tokens))

    def base_name(self, name: str) -> str:
        """The name the base model gives one of this model's tensors (`classifier.*` is new)."""
        part, _, rest = name.partition(".")
        if part == "blocks":
            index, _, rest = rest.partition(".")
            return f"{self.names['blocks']}.{self.first + int(index)}.{rest}"
        return ".".join(filter(None, (self.names[part], rest))) if part in self.names else name

    def tuned_state(self) -> dict[str, torch.Tensor]:
        """The tuned tensors under the names the base model gives them."""
        return {self.base_name(n): t.detach().to("cpu", torch.float32).contiguous() for n, t in self.state_dict().items()}

    def load_tuned_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of `tuned_state` (in float32, whatever the dtype of the tower it was copied from)."""
        self.load_state_dict({n: tensors[self.base_name(n)] for n in self.state_dict()})

    @torch.no_grad()
    def start_from(self, head) -> None:
        """Set the classifier to a fitted `heads.Head`, its standardisation folded in:
        ((x - mean) / std) @ W.T + b = x @ (W / std).T + (b - (W / std) @ mean)."""
        w = torch.from_numpy(head.weight / head.std).float()
        b = torch.from_numpy(head.bias).float() - w @ torch.from_numpy(head.mean).float()
        self.classifier.weight.copy_(w)
        self.classifier.bias.copy_(b)

    def param_groups(self, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
        """AdamW groups: block j below the top at lr x layer_decay^j (norm, pooling, head: lr);
        weight decay on matrices only (not on biases and norms)."""
        n = len(self.blocks)
        groups = []
        heads = [self.classifier] + [getattr(self, part) for part in self.names if part != "blocks"]
        for depth, module in [(0, m) for m in heads if m is not None] + [(n - i, b) for i, b in enumerate(self.blocks)]:
            params = list(module.parameters())
            for decay, chosen in ((weight_decay, [p for p in params if p.ndim >= 2]),
                                  (0.0, [p for p in params if p.ndim < 2])):
                if chosen:
                    groups.append({"params": chosen, "lr": lr * layer_decay ** depth, "weight_decay": decay,
                                   "base_lr": lr * layer_decay ** depth})
        return groups


def augment(x: torch.Tensor, gen: torch.Generator, scale: tuple[float, float] = (0.8, 1.0),
            ratio: tuple[float, float] = (3 / 4, 4 / 3), degrees: float = 10.0) -> torch.Tensor:
    """Random resized crop (area share `scale`, aspect `ratio`), horizontal flip and rotation by up
    to `degrees`, for a whole batch of model inputs in one `grid_sample`, on their device.

    Drawn from a CPU generator, so the same seed gives the same views on any device (and a resumed
    run the same as an uninterrupted one). Faces fill FER2013's frames: crops stay large.
    """
    b = len(x)
    u = torch.rand(b, 6, generator=gen, dtype=torch.float64)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1])
    sx, sy = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)  # shares of width, height
    tx, ty = (1 - sx) * (2 * u[:, 2] - 1), (1 - sy) * (2 * u[:, 3] - 1)  # crop centre, within the frame
    angle = math.radians(degrees) * (2 * u[:, 4] - 1)
    flip = torch.where(u[:, 5] < 0.5, -1.0, 1.0)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([sx * flip * cos, -sy * sin, tx], 1),
                         torch.stack([sx * flip * sin, sy * cos, ty], 1)], 1)  # output -> input coordinates
    grid = F.affine_grid(theta.to(x.device, torch.float32), list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False).to(x.dtype)


@dataclass
class Split:
    """Labelled inputs of one split: tokens (N, T, D) from a cache, or faces (N, 48, 48) uint8."""

    x: np.ndarray
    y: np.ndarray
    ids: list[str]
    usage: list[str]
    computed_in: str = "float32"  # the dtype the encoder computed tokens in (a cache's `dtype`); faces: float32
    classes: tuple[str, ...] = CLASSES  # the dataset's classes, in label order
    targets: np.ndarray | None = None  # N x classes soft targets (FER+'s vote shares), else the labels

    def take(self, rows: np.ndarray) -> Split:
        """These rows only (a copy)."""
        return Split(self.x[rows], self.y[rows], [self.ids[i] for i in rows], [self.usage[i] for i in rows],
                     self.computed_in, self.classes, None if self.targets is None else self.targets[rows])


@dataclass(frozen=True)
class Settings:
    """The training recipe (what a checkpoint must share to be resumed)."""

    blocks: int
    epochs: int = 10
    lr: float = 1e-4
    batch_size: int = 64
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    layer_decay: float = 0.75
    warmup: float = 0.1  # share of all steps
    patience: int = 3  # epochs without a better validation score before stopping
    val: str = "train"
    seed: int = 0
    dtype: str = "float32"
    from_images: bool = False
    augment: bool = True  # from images only

    def lr_factor(self, step: int, total: int) -> float:
        """Linear warm-up to 1 over the first `warmup` share of steps, then cosine decay to 0."""
        warm = max(1, round(self.warmup * total))
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def choose_parts(train: Split, test: Split, val: str, seed: int) -> dict[str, tuple[Split, np.ndarray]]:
    """fit / val / test rows: val a stratified part of train, or PublicTest (test is then PrivateTest)."""
    choice(val, VALS, "--val")
    if val == "train":
        fit_rows, val_rows = stratified_split(train.y, VAL_FRACTION, seed)
        parts = {"fit": (train, fit_rows), "val": (train, val_rows), "test": (test, np.arange(len(test.y)))}
    else:
        usage = np.asarray(test.usage)
        parts = {"fit": (train, np.arange(len(train.y))), "val": (test, np.flatnonzero(usage == "public_test")),
                 "test": (test, np.flatnonzero(usage == "private_test"))}
    empty = [{"val": "validate"}.get(name, name) for name, (_, rows) in parts.items() if len(rows) == 0]
    if empty:
        raise UserError(f"--val {val} leaves no faces to {' or '.join(empty)} on ({len(train.y):,} train, "
                        f"{len(test.y):,} test faces); use more faces or the other --val")
    return parts


class Feed:
    """Turns rows of a split into the tokens that enter the tuned blocks, on the device."""

    def __init__(self, encoder: Encoder, tower: Tower, first: int, settings: Settings, device: torch.device):
        self.encoder, self.tower, self.first, self.settings, self.device = encoder, tower, first, settings, device

    def __call__(self, split: Split, rows: np.ndarray, gen: torch.Generator | None) -> torch.Tensor:
        """Tokens of `rows`; faces go through the frozen lower part: for training (`gen` given,
        augmented if asked) under the training autocast, for scoring (`gen` None) in float32."""
        if not self.settings.from_images:
            return torch.from_numpy(split.x[rows]).to(self.device, torch.float32)
        pixels = self.encoder.prep(split.x[rows])
        if gen is not None and self.settings.augment:
            pixels = augment(pixels, gen)
        with torch.no_grad(), _autocast(self.device, self.settings.dtype if gen is not None else "float32"):
            return self.tower.lower(pixels, self.first).float()


def _autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=TRAIN_DTYPES[dtype], enabled=dtype != "float32")


@torch.no_grad()
def pooled_rows(model: TopModel, feed: Feed, split: Split, rows: np.ndarray) -> torch.Tensor:
    """The pooled features of `rows` in float32 (no autocast, no augmentation), `SCORE_BATCH` at a time."""
    model.eval()
    return torch.cat([model.pooled(feed(split, rows[i:i + SCORE_BATCH], None))
                      for i in range(0, len(rows), SCORE_BATCH)])  # `choose_parts` leaves no part empty


def _scores(z: torch.Tensor, y: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of logits `z` for labels `y`."""
    y = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(z.device)
    return F.cross_entropy(z, y).item(), (z.argmax(1) == y).float().mean().item()


@torch.no_grad()
def score_rows(model: TopModel, feed: Feed, split: Split, rows: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Mean cross-entropy, accuracy and the logits of `rows`, in float32 as `evaluate` scores them
    (the training autocast would change the figures: bfloat16 keeps 8 bits of mantissa)."""
    z = model.classifier(pooled_rows(model, feed, split, rows))
    return *_scores(z, split.y[rows]), z.cpu().numpy()


@dataclass
class TuneResult:
    """What `tune` made: the chosen model, its history and where its files are."""

    model: TopModel
    history: list[dict]
    best_epoch: int
    epoch_seconds: list[float]
    out: Path
    resumed_from: int = 0  # the epoch a checkpoint resumed from (0: a fresh run)
    test_logits: np.ndarray | None = field(default=None, repr=False)  # the chosen model's, on the test rows
    test_rows: np.ndarray | None = field(default=None, repr=False)  # all of test, or PrivateTest's (--val public_test)
    val_count: int = 0
    probe: dict = field(default_factory=dict)  # the starting head's logistic regression: {"C", "val_acc"}


def _data_key(parts: dict[str, tuple[Split, np.ndarray]]) -> str:
    """A fingerprint of which rows, with which labels, each part holds (a checkpoint must match it)."""
    h = hashlib.sha256()
    for name, (split, rows) in parts.items():
        h.update(name.encode())
        h.update(np.asarray(split.y[rows], dtype=np.int64).tobytes())
        h.update("\n".join(split.ids[i] for i in rows).encode())
    return "sha256:" + h.hexdigest()


def save_checkpoint(path: Path, model: TopModel, opt: torch.optim.Optimizer, best: dict[str, torch.Tensor],
                    gen: torch.Generator, state: dict) -> None:
    """Everything needed to go on after `state['epoch']`, in one file, renamed into place."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in best.items()})
    opt_state = opt.state_dict()
    for index, entry in opt_state["state"].items():
        for key, value in entry.items():
            tensors[f"opt.{index}.{key}"] = value.detach().cpu().contiguous()
    tensors["rng.shuffle"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    device = next(model.parameters()).device
    if device.type == "cuda":  # the generator of the GPU it trains on (cuda:1 is not the current one)
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in opt_state["param_groups"]]
    meta = {**state, "param_groups": groups}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file(tensors, tmp, metadata={"fercache": json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["fercache"])
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise UserError(f"{path}: unreadable checkpoint ({type(exc).__name__}); delete it to start over") from None


@torch.no_grad()
def start_from_probe(model: TopModel, feed: Feed, parts: dict[str, tuple[Split, np.ndarray]], seed: int) -> dict:
    """Epoch 0: the head set to a logistic regression on the starting model's pooled feature of the
    fit rows (C chosen on the validation rows), and that start scored like any epoch."""
    from fercache.logreg import fit_logreg

    (split, fit_rows), (val_split, val_rows), (test_split, test_rows) = parts["fit"], parts["val"], parts["test"]
    X, X_val = pooled_rows(model, feed, split, fit_rows), pooled_rows(model, feed, val_split, val_rows)
    head, search = fit_logreg(X.cpu().numpy(), split.y[fit_rows], seed=seed,
                              val=(X_val.cpu().numpy(), val_split.y[val_rows]), device=str(X.device),
                              classes=len(split.classes))
    model.start_from(head)
    train_loss, train_acc = _scores(model.classifier(X), split.y[fit_rows])
    val_loss, val_acc = _scores(model.classifier(X_val), val_split.y[val_rows])
    test_loss, test_acc, _ = score_rows(model, feed, test_split, test_rows)
    return {"epoch": 0, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
            "test_loss": test_loss, "test_acc": test_acc, "probe_C": search["C"]}


def tune(encoder: Encoder, train: Split, test: Split, settings: Settings, out: str | os.PathLike,
         device: str = "auto", restart: bool = False, progress: bool = True) -> TuneResult:
    """Train the top `settings.blocks` blocks of `encoder` (with `blocks` = depth: all of them).

    `train.x`/`test.x` hold the tokens entering the first tuned block, or faces with
    `settings.from_images`. The head starts from a probe (`start_from_probe`), epoch 0 of the
    history. Writes `tuned.safetensors` and `tuned.json` (the epoch chosen on validation, 0
    included) into `out`, with a checkpoint there after every epoch that a rerun resumes from
    (`restart` discards it); the checkpoint goes once the run is done.
    """
    at_least_one(epochs=settings.epochs, batch_size=settings.batch_size, blocks=settings.blocks,
                 patience=settings.patience)
    if settings.dtype not in TRAIN_DTYPES:
        raise UserError(f"--dtype {settings.dtype}: training runs in {' or '.join(TRAIN_DTYPES)}")
    if settings.lr <= 0 or not 0 < settings.layer_decay <= 1 or not 0 <= settings.label_smoothing < 1:
        raise UserError(f"need --lr > 0, 0 < --layer-decay <= 1 and 0 <= --label-smoothing < 1 (got {settings.lr}, "
                        f"{settings.layer_decay}, {settings.label_smoothing})")
    if train.computed_in != test.computed_in:
        raise UserError(f"train tokens computed in {train.computed_in}, test tokens in {test.computed_in}: "
                        "extract both with one --dtype")
    dev = pick_device(device)
    tower = Tower.of(encoder.model, f"model '{encoder.identity.model}'")
    if settings.blocks > tower.depth:
        raise UserError(f"--blocks {settings.blocks}: model '{encoder.identity.model}' has {tower.depth} blocks")
    first = tower.depth - settings.blocks
    parts = choose_parts(train, test, settings.val, settings.seed)
    feed = Feed(encoder, tower, first, settings, dev)
    model = TopModel(tower, first, len(train.classes), settings.seed).to(dev)
    opt = torch.optim.AdamW(model.param_groups(settings.lr, settings.weight_decay, settings.layer_decay),
                            lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)  # dropout, where a model has any

    out = Path(out)
    ckpt = out / CHECKPOINT
    identity = encoder.identity.encoder().to_meta()
    state = {"format": "fercache-finetune-checkpoint", "settings": asdict(settings), "encoder": identity,
             "data": _data_key(parts), "tokens_dtype": train.computed_in, "epoch": 0, "history": [],
             "epoch_seconds": [], "best_epoch": 0, "best_score": None, "stale": 0, "probe": {},
             "classes": list(train.classes), "soft_targets": train.targets is not None}
    if restart:
        ckpt.unlink(missing_ok=True)
    resumed_from = 0
    if ckpt.exists():
        tensors, saved = load_checkpoint(ckpt)
        differ = [k for k in ("settings", "encoder", "data", "tokens_dtype") if saved.get(k) != state[k]]
        differ += [k for k in ("classes", "soft_targets") if saved.get(k, state[k]) != state[k]]  # (0.3.0's keys)
        if differ:
            raise UserError(f"{ckpt} is a checkpoint of another run ({', '.join(differ)} differ); "
                            "use another --out, or --restart to discard it")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        opt_state = {"state": {}, "param_groups": saved.pop("param_groups")}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, index, name = key.split(".", 2)
                opt_state["state"].setdefault(int(index), {})[name] = value
        opt.load_state_dict(opt_state)
        gen.set_state(tensors["rng.shuffle"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and dev.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], dev)
        state = saved
        resumed_from = state["epoch"]
    else:  # a fresh run: start from the probe, the first candidate
        start = start_from_probe(model, feed, parts, settings.seed)
        state["probe"] = {"C": start.pop("probe_C"), "val_acc": start["val_acc"]}
        state["history"].append(start)
        state["best_score"] = [start["val_acc"], -start["val_loss"]]
        best = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    (split, fit_rows), (val_split, val_rows), (test_split, test_rows) = parts["fit"], parts["val"], parts["test"]
    steps = -(-len(fit_rows) // settings.batch_size)
    total = steps * settings.epochs
    y_all = torch.from_numpy(np.asarray(split.y, dtype=np.int64))
    out.mkdir(parents=True, exist_ok=True)
    while state["epoch"] < settings.epochs and state["stale"] < settings.patience:
        epoch = state["epoch"] + 1
        start = time.perf_counter()
        model.train()
        order = fit_rows[torch.randperm(len(fit_rows), generator=gen).numpy()]
        loss_sum, correct = 0.0, 0
        with tqdm(total=len(order), unit="img", desc=f"finetune epoch {epoch}/{settings.epochs}",
                  disable=not progress, dynamic_ncols=True, leave=False) as bar:
            for i in range(steps):
                rows = order[i * settings.batch_size:(i + 1) * settings.batch_size]
                factor = settings.lr_factor((epoch - 1) * steps + i, total)
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * factor
                x, y = feed(split, rows, gen), y_all[rows].to(dev)
                with _autocast(dev, settings.dtype):
                    logits = model(x).float()
                target = y if split.targets is None else torch.from_numpy(split.targets[rows]).to(dev, torch.float32)
                loss = F.cross_entropy(logits, target, label_smoothing=settings.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():  # reported as fit reports it: plain cross-entropy, averaged over the epoch
                    loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
                    correct += int((logits.argmax(1) == y).sum())
                bar.update(len(rows))
        val_loss, val_acc, _ = score_rows(model, feed, val_split, val_rows)
        test_loss, test_acc, _ = score_rows(model, feed, test_split, test_rows)
        state["history"].append({"epoch": epoch, "train_loss": loss_sum / len(order), "train_acc": correct / len(order),
                                 "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc})
        state["epoch_seconds"].append(round(time.perf_counter() - start, 3))
        if (val_acc, -val_loss) > tuple(state["best_score"]):  # strictly better than every epoch before, 0 included
            state["best_score"], state["best_epoch"], state["stale"] = [val_acc, -val_loss], epoch, 0
            best = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            state["stale"] += 1
        state["epoch"] = epoch
        save_checkpoint(ckpt, model, opt, best, gen, state)

    model.load_state_dict(best)
    save_tuned(out, model, encoder, settings, state)
    _, _, test_logits = score_rows(model, feed, test_split, test_rows)
    ckpt.unlink(missing_ok=True)
    return TuneResult(model, state["history"], state["best_epoch"], state["epoch_seconds"], out, resumed_from,
                      test_logits, test_rows, len(val_rows), state["probe"])


def save_tuned(out: Path, model: TopModel, encoder: Encoder, settings: Settings, state: dict) -> None:
    """`tuned.safetensors` + `tuned.json`: never a pickle. The old JSON goes first and the new one is
    written last, so a folder with a `tuned.json` holds the weights it describes."""
    from safetensors.torch import save_file

    tower_depth = model.first + len(model.blocks)
    config = {"format": "fercache-tuned", "classes": state.get("classes", list(CLASSES)),
              "encoder": encoder.identity.encoder().to_meta(),
              "first_block": model.first, "blocks": list(range(model.first + 1, tower_depth + 1)),
              "depth": tower_depth, "parts": model.names, "best_epoch": state["best_epoch"],
              "tokens_dtype": state["tokens_dtype"], "probe": state["probe"], "settings": asdict(settings)}
    (out / CONFIG).unlink(missing_ok=True)
    tmp = out / f"{WEIGHTS}.tmp-{os.getpid()}"
    save_file(model.tuned_state(), tmp)
    os.replace(tmp, out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


@dataclass
class Tuned:
    """A tuned model loaded for use: the base encoder with the tuned tensors swapped in."""

    encoder: Encoder
    top: TopModel  # the same tuned weights, fed from tokens (for caches with `tokens`)
    config: dict

    @property
    def identity(self) -> Identity:
        return Identity.from_meta(self.config["encoder"])

    @torch.no_grad()
    def logits_from_tokens(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray:
        """The tuned top in float32, `SCORE_BATCH` at a time: the very sums `finetune` scored test with."""
        self.top.eval()
        dev = next(self.top.parameters()).device
        t = torch.as_tensor(tokens)
        pooled = torch.cat([self.top.pooled(t[i:i + SCORE_BATCH].to(dev, torch.float32))
                            for i in range(0, len(t), SCORE_BATCH)])
        return self.top.classifier(pooled).cpu().numpy()

    def logits_from_pixels(self, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """On 48x48 uint8 faces: the frozen lower blocks in the dtype the run's tokens were computed
        in (the encoder is loaded in it), then the tuned top in float32."""
        return self.logits_from_tokens(tokens_of(self.encoder, pixels, int(self.config["first_block"]), batch_size))


def load_tuned(folder: str | os.PathLike, device: str = "auto") -> Tuned:
    """Read `tuned.json` + `tuned.safetensors`, load the base model they name and swap the tensors in.

    The base model must be the one tuned (same revision, or same weight files for a local folder):
    otherwise a one-line error, since the untuned blocks below would differ. It is loaded in the
    dtype the run's tokens were computed in, so its lower blocks compute them as they were.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise UserError(f"{folder}: not a tuned run (expected {CONFIG} and {WEIGHTS}, made by `fercache finetune`)")
    try:
        config = json.loads((folder / CONFIG).read_text())
        tensors = load_file(folder / WEIGHTS)
        wanted = Identity.from_meta(config["encoder"])
        first = int(config["first_block"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise UserError(f"{folder}: broken tuned run ({type(exc).__name__}: {exc})") from None
    encoder = load_encoder(wanted.model, wanted.preprocess, device,  # the very weights it was tuned from
                           config.get("tokens_dtype", "float32"), revision=wanted.revision or None,  # 0.2.0: float32
                           fingerprint=wanted.weights)
    encoder.identity.check(wanted, f"model '{wanted.model}'", ENCODER,
                           hint=f"{folder} was tuned from another version of it")
    tower = Tower.of(encoder.model, f"model '{wanted.model}'")
    top = TopModel(tower, first, len(config["classes"]))
    expected = set(top.tuned_state())
    if set(tensors) != expected:  # a tensor missing would leave the base weights in silently
        odd = sorted(set(tensors) ^ expected)
        raise UserError(f"{folder}: broken tuned run ({len(odd)} tensor(s) missing or unknown to model "
                        f"'{wanted.model}', e.g. {odd[0]})")
    top.load_tuned_state(tensors)  # float32, as tuned
    # the base model gets them too (the tuned part only: the rest is the base model's), in its own dtype
    tower.module.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("classifier.")}, strict=False)
    device = next(encoder.model.parameters()).device  # OpenCLIP and timm models have no `.device`
    return Tuned(encoder, top.to(device).eval().requires_grad_(False), config)


def tokens_of(encoder: Encoder, pixels: np.ndarray, first: int, batch_size: int = 64) -> np.ndarray:
    """The tokens entering block `first + 1` for 48x48 uint8 faces (the frozen lower part, in the
    encoder's dtype), as float32."""
    tower = Tower.of(encoder.model)
    with torch.no_grad():
        return torch.cat([tower.lower(encoder.prep(pixels[i:i + batch_size]), first).float().cpu()
                          for i in range(0, len(pixels), batch_size)]).numpy()


@dataclass
class FinetuneResult:
    """What `finetune` made: the run folder, the training's result (None over folds: each fold's
    model is in its own folder) and everything in `metrics.json`."""

    out: Path
    tuned: TuneResult | None
    metrics: dict


def parse_blocks(blocks: int | str, depth: int, model: str) -> int:
    """`--blocks N` or `all` -> how many top blocks to tune (1..depth)."""
    if blocks == "all":
        return depth
    try:
        n = int(blocks)
    except ValueError:
        raise UserError(f"--blocks '{blocks}': expected a number of blocks or 'all'") from None
    if not 1 <= n <= depth:
        raise UserError(f"--blocks {n}: model '{model}' has {depth} blocks")
    return n


def finetune(cache: str | os.PathLike | None = None, blocks: int | str | None = None, *, from_images: bool = False,
             data: str | os.PathLike | None = None, model: str | None = None, preprocess: str = "clip",
             revision: str | None = None, limit: int | None = None, epochs: int = 10, lr: float = 1e-4,
             batch_size: int = 64, weight_decay: float = 0.05, label_smoothing: float = 0.0,
             layer_decay: float = 0.75, warmup: float = 0.1, patience: int = 3, val: str = "train", seed: int = 0,
             device: str = "auto", dtype: str = "auto", augment: bool = True, out: str | os.PathLike | None = None,
             restart: bool = False, plots: bool = True, progress: bool = True,
             exclude_duplicates: bool = False, labels: str | None = None,
             folds: int | str | None = None) -> FinetuneResult:
    """Tune the top `blocks` blocks from a cache's tokens (`extract --tokens K`), or `from_images`
    of a FER2013 source; report on test and write the run folder (like `fit`'s, plus the tuned weights).

    `blocks` (a number or `all`) defaults to every block above a cache's tokens, or 2 from images.
    `exclude_duplicates` drops the train faces that copy a test face, as `fit` does. From a cache,
    the head has a row per class of its dataset; `labels` (FER+ caches) as `fit --labels`:
    `ferplus-votes` trains on the vote shares as soft targets, accuracy is against the majority.
    A cache of a dataset without a split (CK+, JAFFE) takes `folds` (K or `subjects`) instead:
    subject-independent cross-validation (`tune_folds`), reported as `fit --folds` reports it.
    """
    from fercache.data import open_source
    from fercache.encoder import pick_dtype
    from fercache.folds import pooled_figures
    from fercache.names import DEFAULT_MODEL, default_cache, default_run
    from fercache.runs import duplicate_counts, resolve_cache, train_rows, write_run
    from fercache.stats import calibration, score_predictions, test_figures, unseen_figures

    choice(val, VALS, "--val")
    if folds is not None and (val != "train" or exclude_duplicates or from_images):
        raise UserError("--folds chooses inside each fold's training part, from a cache's tokens: it takes no "
                        "--val public_test, --exclude-duplicates or --from-images")
    dev = pick_device(device)
    train_dtype = str(pick_dtype(dtype, dev)).removeprefix("torch.")
    train_dtype = train_dtype if train_dtype in TRAIN_DTYPES or dtype != "auto" else "float32"
    if from_images:
        if labels is not None:
            raise UserError(f"--labels {labels}: FER+ labels come from a FER+ cache (extract --dataset ferplus --tokens K)")
        source = open_source(data)
        encoder = load_encoder(model or DEFAULT_MODEL, preprocess, device, "float32", revision=revision)
        images = [source.load(name, limit=limit) for name in ("train", "test")]
        train, test = (Split(f.pixels, f.labels, f.ids, f.usage) for f in images)
        where = {"data": {"path": str(source.path), "format": source.format}}
        source_path, dataset = str(source.path), "fer2013"
        stem = default_cache(encoder.identity.model, encoder.identity.preprocess)
    else:
        from fercache.cache import load_subjects, load_tokens, load_votes, read_identity, read_meta, usage_of

        from fercache.datasets import check_labels, ferplus_targets
        from fercache.folds import check_folds
        from fercache.identity import dataset_of

        path = resolve_cache(cache)
        held = read_identity(path)
        dataset, classes = dataset_of(read_meta(path))[:2]
        labels = check_labels(labels, dataset)
        check_folds(path, dataset, folds)
        given = [f"--{k}" for k, v in (("data", data), ("limit", limit), ("revision", revision)) if v is not None]
        if given:
            raise UserError(f"{' and '.join(given)}: for --from-images; a cache fixes its data and model ({path})")
        if model is not None and model != held.model:
            raise UserError(f"{path} holds the features of model '{held.model}', not '{model}' as asked")
        if held.tokens is None:
            raise UserError(f"{path}: no tokens stored; extract them with `fercache extract --tokens K` "
                            "(K = the blocks below the tuned ones), or tune --from-images")
        encoder = load_encoder(held.model, held.preprocess, device, "float32", revision=held.revision or None,
                               fingerprint=held.weights)
    depth = Tower.of(encoder.model, f"model '{encoder.identity.model}'").depth
    default = 2 if from_images else depth - held.tokens  # from a cache: every block above its tokens
    n = parse_blocks(default if blocks is None else blocks, depth, encoder.identity.model)
    if not from_images:
        if depth - n != held.tokens:
            raise UserError(f"{path} stores the tokens entering block {held.tokens + 1} (--tokens {held.tokens}): "
                            f"tune --blocks {depth - held.tokens} from it, or extract --tokens {depth - n} "
                            f"for --blocks {n}")
        splits = []
        for name in ("train", "test") if folds is None else ("all",):
            t = load_tokens(path, name)
            soft = ferplus_targets(load_votes(path, name)) if labels == "ferplus-votes" and name == "train" else None
            splits.append(Split(t.X, t.y, t.ids, usage_of(path, name), held.dtype, tuple(classes), soft))
        train, test = splits if folds is None else (splits[0], None)  # over folds: `train` holds every face
        where = {"cache": {"path": str(path), "meta": held.to_meta()}}
        source_path = t.meta.get("source", {}).get("path")
        stem = path
    settings = Settings(blocks=n, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                        label_smoothing=label_smoothing, layer_decay=layer_decay, warmup=warmup, patience=patience,
                        val=val, seed=seed, dtype=train_dtype, from_images=from_images, augment=augment)
    method = f"finetune-top{n}" + ("-images" if from_images else "")
    folder = Path(out) if out is not None else default_run(Path(stem), method)
    identity = encoder.identity
    title = f"{identity.model} · {method}"
    run = {"method": method, "model": identity.model, "preprocess": identity.preprocess, "layer": None,
           "views": "plain", "val": val, "dataset": dataset}
    about = {"blocks": list(range(depth - n + 1, depth + 1)), "from_images": from_images,
             "tokens_dtype": train.computed_in,
             "settings": {**asdict(settings), **({"folds": folds} if folds is not None else {})},
             **where, **({"labels": labels} if labels else {})}

    if folds is not None:
        start = time.perf_counter()
        proba, fold_of, summary, history = tune_folds(encoder, train, load_subjects(path, "all"), folds, settings,
                                                      folder, device, restart, progress)
        metrics = {**run, "test_split": "all", "fit_seconds": round(time.perf_counter() - start, 3),
                   **pooled_figures(train.y, proba, list(train.classes)), "train_count": len(train.y),
                   "val_count": None, "test_count": len(train.y), "folds": summary, "history": history, **about}
        curves = (epoch_means(history), "epoch", f"{title} · {summary['count']} folds: each epoch's mean over the "
                                                 "folds that reached it (each fold chose its own)")
        write_run(folder, metrics, list(train.classes), title, curves if plots else None,
                  {"id": train.ids, "usage": train.usage, "label": train.y, "proba": proba, "fold": fold_of},
                  source_path)
        return FinetuneResult(folder, None, metrics)

    copied, seen, keep = train_rows(source_path, exclude_duplicates, None if from_images else path, train.ids,
                                    test.ids)
    if exclude_duplicates:
        train = train.take(keep)
    start = time.perf_counter()
    result = tune(encoder, train, test, settings, folder, device, restart, progress)
    seconds = time.perf_counter() - start

    rows = result.test_rows
    y, usage = test.y[rows], [test.usage[i] for i in rows]
    z = torch.from_numpy(result.test_logits)
    proba = torch.softmax(z, 1).numpy()
    loss, _ = _scores(z, y)
    test_split = "test" if val == "train" else "private_test"
    report = score_predictions(y, proba.argmax(1), loss, list(train.classes), test_split, usage)
    metrics = {
        **run, "test_split": test_split, "fit_seconds": round(seconds, 3),
        **test_figures(report), "calibration": calibration(y, proba),
        "train_count": len(train.y) - (result.val_count if val == "train" else 0), "val_count": result.val_count,
        "test_count": len(y), **unseen_figures(y, proba.argmax(1), None if seen is None else seen[rows]),
        **duplicate_counts(copied, exclude_duplicates), "history": result.history,
        "best_epoch": result.best_epoch, "epoch_seconds": result.epoch_seconds,
        "resumed_from_epoch": result.resumed_from, "probe": result.probe, **about,
    }
    write_run(folder, metrics, list(train.classes), title,
              (result.history, "epoch", f"{title}: chosen at epoch {result.best_epoch} on validation")
              if plots else None,
              {"id": [test.ids[i] for i in rows], "usage": usage, "label": y, "proba": proba}, source_path)
    return FinetuneResult(folder, result, metrics)


def tune_folds(encoder: Encoder, every: Split, subjects: list[str], folds: int | str, settings: Settings,
               folder: Path, device: str = "auto", restart: bool = False,
               progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict, list[dict]]:
    """`tune` in each subject-independent fold of a dataset without a split (`folds.cross_validate`):
    (pooled class probabilities, each face's fold, the fold summary, every fold's history rows with
    their `fold`).

    Fold k tunes on its training part alone (validation, where the epoch and the probe's C are
    chosen, a stratified part of it) into `folder/fold-<k>/`, a tuned run (`tuned.json`,
    `tuned.safetensors`) plus `fold.json`: its held-out faces' logits, history and choices. A fold
    whose `fold.json` matches (settings, model, rows) is read back, not tuned again; an unfinished
    fold resumes from its checkpoint; `restart` tunes every fold anew. The summary's per-fold rows
    add `best_epoch`, `val_count`, `resumed_from_epoch` and `read_back`.
    """
    from fercache.cache import write_json
    from fercache.folds import cross_validate

    done: list[dict] = []

    def one_fold(train_rows: np.ndarray, test_rows: np.ndarray) -> np.ndarray:
        k = len(done) + 1
        sub = folder / f"fold-{k:02d}"
        key = {"format": "fercache-finetune-fold", "fold": k, "settings": asdict(settings),
               "encoder": encoder.identity.encoder().to_meta(),
               "data": _data_key({"train": (every, train_rows), "test": (every, test_rows)})}
        record = None if restart else read_fold(sub / FOLD, key)
        read_back = record is not None
        if not read_back:
            result = tune(encoder, every.take(train_rows), every.take(test_rows), settings, sub, device, restart,
                          progress)
            record = {**key, "best_epoch": result.best_epoch, "val_count": result.val_count,
                      "resumed_from_epoch": result.resumed_from, "probe": result.probe, "history": result.history,
                      "epoch_seconds": result.epoch_seconds, "test_ids": [every.ids[i] for i in test_rows],
                      "test_logits": result.test_logits.tolist()}  # float32 -> float64: exact, read back bit for bit
            write_json(sub / FOLD, record)
        done.append({**record, "read_back": read_back})
        logits = torch.from_numpy(np.asarray(record["test_logits"], dtype=np.float32))
        return torch.softmax(logits, 1).numpy()

    proba, fold_of, summary = cross_validate(every.y, subjects, folds, list(every.classes), one_fold, settings.seed)
    for row, record in zip(summary["per_fold"], done):
        row.update({k: record[k] for k in ("best_epoch", "val_count", "resumed_from_epoch", "read_back")})
    history = [{"fold": r["fold"], **h} for r in done for h in r["history"]]
    return proba, fold_of, summary, history


def read_fold(path: Path, key: dict) -> dict | None:
    """A finished fold's `fold.json`, None if there is none; one of another run is refused."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        differ = [k for k in key if record[k] != key[k]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: unreadable fold ({type(exc).__name__}); delete it to tune that fold again") from None
    if differ:
        raise UserError(f"{path} is a fold of another run ({', '.join(differ)} differ); use another --out, "
                        "or --restart to tune every fold anew")
    return record


def epoch_means(history: list[dict]) -> list[dict]:
    """Each epoch's figures averaged over the folds that reached it (early stopping ends folds
    apart): the curves of a cross-validated run."""
    keys = [k for k in history[0] if k not in ("fold", "epoch")]
    return [{"epoch": e, **{k: float(np.mean([r[k] for r in history if r["epoch"] == e])) for k in keys}}
            for e in sorted({r["epoch"] for r in history})]


def evaluate_tuned(cache: str | os.PathLike | None, run: str | os.PathLike, split: str = "test",
                   out: str | os.PathLike | None = None, device: str = "auto", plots: bool = True,
                   exclude_duplicates: bool = False) -> dict:
    """Score a tuned run on one split of a cache that stores the tokens it was tuned from (with
    `exclude_duplicates`, only the faces without a copy across train and test, as `fit.evaluate`)."""
    from fercache.cache import load_tokens, read_identity, usage_of
    from fercache.runs import resolve_cache, scored_rows, train_copies, write_evaluation
    from fercache.stats import score_predictions, unseen_figures

    path = resolve_cache(cache)
    held = read_identity(path)
    tuned = load_tuned(run, device)
    held.check(tuned.identity, path, ENCODER, hint=f"{run} was tuned from another encoder")
    first = int(tuned.config["first_block"])
    if held.tokens != first:
        stored = "no tokens" if held.tokens is None else f"the tokens entering block {held.tokens + 1}"
        raise UserError(f"{path} stores {stored}; {run} needs those entering block {first + 1} "
                        f"(extract --tokens {first})")
    wanted = tuned.config.get("tokens_dtype", held.dtype)  # fercache 0.2.0's runs did not record it
    if held.dtype != wanted:
        raise UserError(f"{path} holds tokens computed in {held.dtype}; {run} was tuned on tokens computed in "
                        f"{wanted} (extract --dtype {wanted})")
    t = load_tokens(path, split)
    rows, seen = scored_rows(train_copies(t.meta.get("source", {}).get("path"), exclude_duplicates, path), t.ids,
                             split, exclude_duplicates)
    usage, y = usage_of(path, split), t.y[rows]
    logits = tuned.logits_from_tokens(t.X[rows] if exclude_duplicates else t.X)  # (no copy of every token)
    loss, _ = _scores(torch.from_numpy(logits), y)
    report = {**score_predictions(y, logits.argmax(1), loss, tuned.config["classes"], split, [usage[i] for i in rows]),
              **unseen_figures(y, logits.argmax(1), seen), "exclude_duplicates": exclude_duplicates,
              "excluded": len(usage) - len(rows), "head": str(run), "cache": str(path)}
    title = f"{tuned.identity.model} · tuned top {len(tuned.config['blocks'])} on {split}"
    return write_evaluation(report, Path(out) if out is not None else Path(run), tuned.config["classes"], title, plots)
