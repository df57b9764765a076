"""Which exact weights a `--model` names: a hub commit, or the fingerprint of a local folder's files.

A hub id names whatever its branch points to today; caches and heads must outlive that. So a
hub model's revision (`main` unless `--revision` says otherwise) is resolved to the commit hash
huggingface_hub has or fetches (online, or offline from the HF cache's `refs/` and `snapshots/`),
recorded, and every later load asks for that hash. A local folder has no commits: its weight files'
sha256 is recorded instead, so the same weights match under any path and changed weights under
the same path are refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fercache.errors import UserError, first_line

WEIGHT_SUFFIXES = (".safetensors", ".bin")  # what transformers loads weights from (sharded or not)
# the architecture and the preprocessing recipe (OpenCLIP keeps both in open_clip_config.json)
CONFIGS = ("config.json", "preprocessor_config.json", "open_clip_config.json")


@dataclass(frozen=True)
class Checkpoint:
    """A model as it is loaded: `revision` (hub commit hash) or `weights` (local fingerprint) is set."""

    model: str  # hub id or local folder, as the user gave it
    revision: str = ""
    weights: str = ""

    @property
    def load_kwargs(self) -> dict:
        """What `from_pretrained` needs to load exactly these weights."""
        return {"revision": self.revision} if self.revision else {}


def is_local(model: str) -> bool:
    return Path(model).is_dir()


def resolve(model: str, revision: str | None = None, fingerprint_was: str = "", repo: str | None = None,
            config: str = "config.json") -> Checkpoint:
    """The checkpoint `model` names: the commit hash `revision` (default `main`) resolves to for a hub
    id, the weights' fingerprint for a folder (a one-line error if it is no longer `fingerprint_was`).
    `repo` and `config`: the hub repo and the config file it holds, where they are not `model` and
    transformers' config.json (OpenCLIP's `hf-hub:org/name` holds open_clip_config.json)."""
    if is_local(model):
        if revision:
            raise UserError(f"--revision {revision}: '{model}' is a local folder, which has no revisions")
        now = fingerprint(model)
        if fingerprint_was and now != fingerprint_was:
            raise UserError(f"model folder '{model}': its weight files changed since this was made "
                            f"({fingerprint_was[:19]}… then, {now[:19]}… now)")
        return Checkpoint(model, weights=now)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:  # the file lands in (or is found in) snapshots/<commit hash>/
        path = hf_hub_download(repo or model, config, revision=revision or None)
    except (OSError, ValueError, EntryNotFoundError) as exc:
        at = f" at revision '{revision}'" if revision else ""
        raise UserError(f"cannot load model '{model}'{at}: {first_line(exc)}") from None
    return Checkpoint(model, revision=Path(path).parent.name)


def fingerprint(folder: str) -> str:
    """`sha256:<hex>` over a local model's weight files and the configs that shape its features
    (`CONFIGS`: an edited image_mean changes them as surely as new weights); the same files
    anywhere give the same value, each file under its name in the folder (a Hugging Face
    `snapshots/<commit>/` folder links to `../../blobs/<sha>`: its content counts, not the blob's
    name). Memoised per file state: extract checks it twice."""
    weights = [p for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    if not weights:
        raise UserError(f"model folder '{folder}' holds no weight files (*.safetensors or *.bin)")
    files = sorted(weights + [Path(folder) / name for name in CONFIGS if (Path(folder) / name).is_file()])
    return _digest(tuple((p.name, str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@lru_cache(maxsize=8)
def _digest(files: tuple[tuple[str, str, int, int], ...]) -> str:
    """sha256 over (name, content) of each file; `files` holds the name in the folder, the file read
    (a link's target) and its size and mtime, which key the memo."""
    h = hashlib.sha256()
    for name, path, _, _ in files:
        h.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return "sha256:" + h.hexdigest()
