"""ENVIRONMENT WORKAROUND for this test machine only, never part of fercache.

Here torchvision comes from PyPI as a CUDA build (0.28.0+cu130) beside a CPU torch (2.13.0+cpu):
its compiled ops cannot load, and `import torchvision` (which open_clip and timm need) then fails
with "operator torchvision::nms does not exist". Defining the two op schemas its Python code
registers meta kernels for lets its pure-Python parts (transforms, which both libraries use) import
and run unchanged. A user's matching torchvision loads its ops and needs none of this.

Applied in the test process by tests/conftest.py, and in the CLI's subprocesses through this
folder on PYTHONPATH (Python imports `sitecustomize` at start-up), only where the ops fail to load:
the schemas are defined when torchvision is first imported, so processes that never import it
pay nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_LIBRARIES = []  # the torch.library handles must live as long as the process


def ops_missing() -> bool:
    """True where torchvision is installed but its compiled ops do not load beside this torch."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    compiled = next(iter(sorted(Path(spec.origin).parent.glob("_C*"))), None)
    try:
        if compiled is not None:
            torch.ops.load_library(str(compiled))
    except (OSError, RuntimeError):
        pass
    return not hasattr(torch.ops.torchvision, "nms")


def define_ops() -> None:
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARIES.append(lib)


def apply() -> None:
    """Define the missing schemas once, if torchvision's ops do not load."""
    if not _LIBRARIES and ops_missing():
        define_ops()


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs `apply` the first time anything imports torchvision, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            apply()
        return None


sys.meta_path.insert(0, _BeforeTorchvision())
