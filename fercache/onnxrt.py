"""Stage one on ONNX Runtime: the encoder's forward exported once, kept on disk, run on the CPU.

On a CPU torch's eager float32 forward of a ViT reaches about half the float32 GEMM peak: its
GEMMs go through MKL, slow on AMD chips, and every norm, GELU and softmax is its own pass over
memory. ONNX Runtime runs the same graph with its own GEMM kernels (MLAS) and fused norms,
activations and attention: 1.6-2x eager in float32 on the CPUs measured (AVX-512 ones: an Intel
Sapphire Rapids, an AMD Zen 5), the same features to 1e-6, and with its dynamic int8 quantisation
about 4x (`bench/cpu.py`). So on the CPU, float32 and `--dtype int8`
run here when the `cpu` extra is installed (`--runtime auto`, the default), torch otherwise.

The graph is exported from the very encoder that loaded (`Encoder.forward`: the pooled feature,
every stored layer, the stored tokens), once per weights, feature set and input size, into
`$FERCACHE_GRAPHS` (default `~/.cache/fercache/graphs`) under a fingerprint of all of that, the
weights' bytes included: never reused for other weights, never rebuilt silently (a build says so
on stderr), and checked against torch's forward when built (`MIN_COSINE`). The batch size is free
(one graph serves every batch, the last short one included).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fercache.errors import UserError, first_line, warn
from fercache.names import INT8, PIXELS, choice

if TYPE_CHECKING:
    from fercache.encoder import Encoder

ORT, TORCH = "onnxruntime", "torch"
RUNTIMES = ("auto", TORCH, ORT)
RUNTIME_ENV = "FERCACHE_RUNTIME"  # the default of `--runtime` (auto)
GRAPHS_ENV = "FERCACHE_GRAPHS"  # where exported graphs are kept
OPSET = 17  # LayerNormalization as one op
FORMAT = 1  # of the exported graph (what `Encoder.forward` returns, in which order): part of the fingerprint
MIN_COSINE = 0.9999  # a float32 graph less alike than this to torch's forward is refused when built


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def applies(device: torch.device, dtype: str, model: str) -> bool:
    """Whether ONNX Runtime can run this encoder: float32 or int8 on the CPU, a neural model."""
    return device.type == "cpu" and dtype in ("float32", INT8) and model != PIXELS


def pick_runtime(runtime: str | None, device: torch.device, dtype: str, model: str) -> str:
    """`auto`: ONNX Runtime for float32 and int8 on the CPU where installed, else torch (said once)."""
    runtime = choice(runtime or os.environ.get(RUNTIME_ENV) or "auto", RUNTIMES, "--runtime")
    fits = applies(device, dtype, model)
    if runtime == TORCH or (runtime == "auto" and not fits):
        return TORCH
    if not fits:
        what = "the pixels baseline" if model == PIXELS else f"{dtype} on {device}"
        raise UserError(f"--runtime onnxruntime runs float32 or int8 encoders on the CPU, not {what}")
    if available():
        return ORT
    if runtime == ORT:
        raise UserError("ONNX Runtime is asked for (--runtime onnxruntime, or a cache made on it) but not installed: "
                        "pip install 'fercache[cpu]'")
    warn("float32 and int8 on the CPU run faster on ONNX Runtime (2x on the CPUs measured): pip install "
         "'fercache[cpu]' (now torch's eager forward)")
    return TORCH


def graph_home() -> Path:
    if os.environ.get(GRAPHS_ENV):
        return Path(os.environ[GRAPHS_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fercache" / "graphs"


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


LIBRARIES = ("torch", "transformers", "open_clip_torch", "timm", "onnxruntime", "onnx")  # whose code the graph holds


def fingerprint(enc: Encoder, keys: list, int8: bool) -> str:
    """What the graph computes: fercache's export format, the versions of the libraries whose code
    it was traced from or built with, the features and input size, int8 or not, and every
    parameter's and buffer's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    facts = {"format": FORMAT, "opset": OPSET, "libraries": {name: _version(name) for name in LIBRARIES},
             "model": enc.identity.model, "feature": enc.identity.feature, "layers": list(enc.layers),
             "tokens": enc.identity.tokens, "size": enc.identity.image_size, "keys": [str(k) for k in keys],
             "int8": int8}
    h.update(json.dumps(facts, sort_keys=True).encode())
    tensors = [*enc.model.named_parameters(), *enc.model.named_buffers()]
    for name, tensor in sorted(tensors, key=lambda kv: kv[0]):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _output_name(key) -> str:
    return "pooled" if key is None else "tokens" if isinstance(key, str) else f"layer_{key}"


class _Forward(torch.nn.Module):
    """`Encoder.forward` as one module with one tensor in and a tuple out: what the exporter traces."""

    def __init__(self, enc: Encoder, keys: list):
        super().__init__()
        self.net, self.enc, self.keys = enc.model, enc, keys

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.enc.forward(pixel_values, self.enc.identity.tokens)
        return tuple(feats[k].float() for k in self.keys)


@dataclass
class Graph:
    """An ONNX Runtime session of an encoder's forward: pixel values in, {feature key: tensor} out.

    An int8 graph quantises its activations with one scale per call: it runs face by face, so a
    face's features do not depend on the faces batched with it (any --batch-size, any number of
    ranks, `predict` of one face), at about 80% of its batched speed (ViT-B/32, batch 32 vs 1).
    """

    session: object
    keys: list
    folder: Path
    face_by_face: bool = False

    def __call__(self, pixel_values: torch.Tensor) -> dict:
        x = pixel_values.detach().cpu().float().numpy()
        runs = [self.session.run(None, {"pixel_values": x[i:i + 1]}) for i in range(len(x))] if self.face_by_face \
            else [self.session.run(None, {"pixel_values": x})]
        return {k: torch.from_numpy(np.concatenate([r[j] for r in runs])) for j, k in enumerate(self.keys)}


def _session(path: Path):
    import onnxruntime as rt

    opts = rt.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = torch.get_num_threads(), 1
    opts.log_severity_level = 3  # its warnings about unused initialisers are noise here
    return rt.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _build(enc: Encoder, keys: list, x: torch.Tensor, int8: bool, folder: Path, digest: str) -> None:
    """Export, check against torch (float32) or quantise (int8), and move into `folder` whole.

    Built in a hidden folder named by host and process, renamed into place when complete; one a
    killed build of this host left behind is removed first."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    mine = f".{folder.name}.{host}."
    for left in folder.parent.glob(f"{mine}*"):
        pid = left.name[len(mine):].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{host}.{os.getpid()}.", dir=folder.parent))
    try:
        names = [_output_name(k) for k in keys]
        path = tmp / "model.onnx"
        fastpath = torch.backends.mha.get_fastpath_enabled()
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values taken as constants
            torch.backends.mha.set_fastpath_enabled(False)  # nn.MultiheadAttention's fused kernel has no ONNX form
            try:
                torch.onnx.export(_Forward(enc, keys).eval(), (x,), str(path), dynamo=False, opset_version=OPSET,
                                  input_names=["pixel_values"], output_names=names,
                                  dynamic_axes={n: {0: "batch"} for n in ["pixel_values", *names]})
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)
        cosine = None
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            logging.disable(logging.WARNING)  # its advice to pre-process the graph first (for static quantisation)
            try:
                quantize_dynamic(str(path), str(tmp / "model.int8.onnx"), weight_type=QuantType.QInt8,
                                 op_types_to_quantize=["MatMul", "Gemm"])  # the Linear layers, as torch's int8
            finally:
                logging.disable(logging.NOTSET)
            os.replace(tmp / "model.int8.onnx", path)
        else:  # checked on other faces, in a batch of another size than the traced one: a shape baked in shows
            y = torch.rand(3, *x.shape[1:], generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                ref = enc.forward(y, enc.identity.tokens)
            got = Graph(_session(path), keys, tmp)(y)
            cosine = min(float(torch.nn.functional.cosine_similarity(got[k].flatten(1),
                                                                     ref[k].float().flatten(1)).min()) for k in keys)
            if not cosine >= MIN_COSINE:
                raise UserError(f"model '{enc.identity.model}' exported to ONNX gives other features than torch's "
                                f"forward (cosine {cosine:.6f} < {MIN_COSINE}): use --runtime torch")
        meta = {"fingerprint": digest, "model": enc.identity.model, "revision": enc.identity.revision,
                "keys": [str(k) for k in keys], "int8": int8,
                "libraries": {name: _version(name) for name in LIBRARIES if _version(name)},
                "cosine_to_torch": cosine, "sha256": _digest(path)}
        (tmp / "graph.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.replace(tmp, folder)  # whole or not at all; another process may have put it there first
        except OSError:
            if not (folder / "graph.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only whether the process is there (another user's: PermissionError)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return ""


def onnx_graph(enc: Encoder, int8: bool = False) -> Graph:
    """The ONNX Runtime graph of `enc`'s float32 forward (`int8`: quantised), built once and kept on disk."""
    x = torch.rand(2, 3, enc.identity.image_size, enc.identity.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        keys = list(enc.forward(x, enc.identity.tokens))
    digest = fingerprint(enc, keys, int8)
    folder = graph_home() / f"{enc.model.__class__.__name__.lower()}-{'int8' if int8 else 'float32'}-{digest[:20]}"
    meta_path = folder / "graph.json"
    if not meta_path.is_file():
        print(f"fercache: building the ONNX Runtime graph of model '{enc.identity.model}' "
              f"({'int8' if int8 else 'float32'}; once, kept in {folder})", file=sys.stderr, flush=True)
        try:
            _build(enc, keys, x, int8, folder, digest)
        except UserError:
            raise
        except Exception as exc:  # an exporter or runtime failure on this model: said in one line
            raise UserError(f"model '{enc.identity.model}' does not export to ONNX ({type(exc).__name__}: "
                            f"{first_line(exc)}): use --runtime torch") from None
    try:
        meta = json.loads(meta_path.read_text())
        intact = meta["fingerprint"] == digest and meta["sha256"] == _digest(folder / "model.onnx")
    except (OSError, ValueError, KeyError):
        intact = False
    if not intact:
        raise UserError(f"{folder}: a damaged or foreign ONNX graph (its fingerprint or file digest differs); "
                        "delete the folder and run again to rebuild it")
    return Graph(_session(folder / "model.onnx"), keys, folder, face_by_face=int8)

