"""Vision encoders from libraries beside transformers (OpenCLIP, timm): one registered entry each.

Each `Backend` says which `--model` values are its own (a hub id's prefix, a local folder's
config file), which optional extra installs it, and which fercache module reads its models. That
module's `open(folder, dtype, weights)` returns a `Tower`: the library's own model plus the few
facts fercache needs (its exact preprocessing, its pooled feature, its block list). Features are
read from one forward pass of the library's own model: the pooled feature is what it returns,
block k's output is caught by a forward hook and read through the model's own head.

A hub model is pinned as the Hugging Face families are (`fercache.checkpoint`): its config
resolves the revision to a commit, the weights are fetched at that commit, and the library loads
the snapshot folder, so what is recorded is what ran. Weights are read from safetensors only.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fercache.checkpoint import Checkpoint, is_local
from fercache.errors import UserError, first_line
from fercache.preprocess import Recipe

TOKENS = "tokens"  # the key of the token sequence entering block `keep` + 1 (as the encoder stores it)


class Tower:
    """A library's loaded vision model seen as fercache reads it (subclassed per library)."""

    feature: str  # what caches and heads record as the pooled feature
    module: nn.Module  # the model that runs (moved to the device, cast to the compute dtype)
    blocks: nn.Module | None  # the blocks (or stages) `--layers` counts; None: pooled feature only
    token_tower: bool  # blocks pass (B, T, D) token sequences: `--tokens` works
    image_size: int  # the model input's side

    def recipe(self) -> Recipe:
        """The library's own eval preprocessing, as a `Recipe` the batched `Preprocessor` runs."""
        raise NotImplementedError

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature of a batch of model inputs: the library's own forward."""
        raise NotImplementedError

    def read(self, h: torch.Tensor) -> torch.Tensor:
        """Block k's output `h` as a feature vector, read as the pooled feature reads the last block's."""
        raise NotImplementedError

    @property
    def depth(self) -> int | None:
        return len(self.blocks) if self.blocks is not None else None

    def features(self, x: torch.Tensor, layers: tuple[int, ...] = (), keep: int | None = None
                 ) -> dict[int | str | None, torch.Tensor]:
        """{None: pooled, k: feature after block k, `TOKENS`: the tokens entering block keep + 1}: one pass."""
        caught: dict[int, torch.Tensor] = {}
        wanted = set(layers) | ({keep} if keep else set())
        hooks = [self.blocks[k - 1].register_forward_hook(lambda _m, _i, out, k=k: caught.__setitem__(k, out))
                 for k in sorted(wanted)]
        if keep == 0:  # what enters block 1: the stem's output
            hooks.append(self.blocks[0].register_forward_pre_hook(lambda _m, args: caught.__setitem__(0, args[0])))
        try:
            feats: dict[int | str | None, torch.Tensor] = {None: self.pooled(x).flatten(1)}
        finally:
            for hook in hooks:
                hook.remove()
        feats.update({k: self.read(caught[k]) for k in layers})
        if keep is not None:
            feats[TOKENS] = caught[keep]
        return feats

    def dims(self, layers: tuple[int, ...]) -> dict[int | None, int]:
        """The size of every feature, from one forward pass of the empty model (opened without weights, on `meta`)."""
        x = torch.empty(1, 3, self.image_size, self.image_size, device="meta")
        return {k: int(f.shape[-1]) for k, f in self.features(x, layers).items()}


@dataclass(frozen=True)
class Backend:
    """One library of vision models: what names its models, what installs it, what reads them."""

    name: str  # as errors and the README say it
    extra: str  # pip install 'fercache[<extra>]'
    package: str  # the library's import name
    module: str  # the fercache module whose `open(folder, dtype, weights)` returns a `Tower`
    config: str  # the config file its hub repos and folders hold
    weights: str  # its weights file in a hub repo (safetensors)
    prefix: str  # the hub ids it claims
    marks: Callable[[dict], bool]  # does a local folder's `config` (parsed) mark one of its models?

    def claims(self, model: str) -> bool:
        if is_local(model):
            path = Path(model) / self.config
            return path.is_file() and self.marks(_json(path))
        return model.startswith(self.prefix)

    def repo(self, model: str) -> str:
        """The hub repo of a hub id (OpenCLIP's `hf-hub:` prefix is no part of it)."""
        return model.removeprefix("hf-hub:")

    def library(self, model: str):
        """The library, imported; a one-line error naming the extra (or a torch mismatch) if it cannot be."""
        try:
            importlib.import_module("torchvision")  # both libraries import it: a mismatch is the usual failure
        except ModuleNotFoundError:
            pass  # reported below, as the library's own import fails
        except (ImportError, RuntimeError, AttributeError) as exc:
            from importlib.metadata import version

            raise UserError(f"torchvision {version('torchvision')} does not match torch {torch.__version__} "
                            f"({first_line(exc)}): install the torchvision built for this torch") from None
        try:
            return importlib.import_module(self.package)
        except ModuleNotFoundError as exc:
            raise UserError(f"model '{model}' needs {self.name}: pip install 'fercache[{self.extra}]' "
                            f"({first_line(exc)})") from None

    def folder(self, model: str, checkpoint: Checkpoint) -> Path:
        """The folder the library loads: the local one, or the hub snapshot at the recorded commit."""
        if checkpoint.weights:
            if not any(Path(model).glob("*.safetensors")):
                raise UserError(f"model folder '{model}' holds no *.safetensors weights (fercache never "
                                "unpickles .bin files)")
            return Path(model)
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return Path(hf_hub_download(self.repo(model), self.weights, revision=checkpoint.revision)).parent
        except (OSError, ValueError, EntryNotFoundError) as exc:
            raise UserError(f"cannot fetch {self.weights} of model '{model}' at {checkpoint.revision[:12]}: "
                            f"{first_line(exc)}") from None

    def config_folder(self, model: str, checkpoint: Checkpoint) -> Path:
        """Where the config is: the local folder, or the snapshot `resolve` fetched it into."""
        if checkpoint.weights:
            return Path(model)
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.repo(model), self.config, revision=checkpoint.revision)).parent

    def open(self, model: str, checkpoint: Checkpoint, dtype: torch.dtype, weights: bool) -> Tower:
        """The model's `Tower`: empty (`meta`) without weights, loaded and cast with them."""
        folder = self.folder(model, checkpoint) if weights else self.config_folder(model, checkpoint)
        reader = importlib.import_module(self.module)
        try:
            return reader.open(folder, dtype, weights)
        except (OSError, ValueError, RuntimeError, KeyError, AssertionError) as exc:
            raise UserError(f"cannot load {self.name} model '{model}': {first_line(exc)}") from None


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable config ({first_line(exc)})") from None
    return data if isinstance(data, dict) else {}


BACKENDS: tuple[Backend, ...] = (
    Backend("OpenCLIP", "openclip", "open_clip", "fercache.openclip", "open_clip_config.json",
            "open_clip_model.safetensors", "hf-hub:", lambda cfg: "model_cfg" in cfg),
    # timm's own hub org; a folder of timm's `config.json` names an `architecture`, transformers' a model_type
    Backend("timm", "timm", "timm", "fercache.timm_models", "config.json", "model.safetensors", "timm/",
            lambda cfg: "architecture" in cfg and "model_type" not in cfg),
)


def backend_of(model: str) -> Backend | None:
    """The library that reads `model`; None: a Hugging Face transformers model."""
    return next((b for b in BACKENDS if b.claims(model)), None)


def tuning_of(module: nn.Module, where: str):
    """Stage three's view of a library's model (`finetune.LibraryTower`, from its reader's `tuning`),
    found by the package the model's class comes from; None: a transformers model."""
    package = type(module).__module__.partition(".")[0]
    backend = next((b for b in BACKENDS if b.package == package), None)
    return importlib.import_module(backend.module).tuning(module, where) if backend is not None else None
