"""`--dtype int8`: stage one's tower with its Linear layers quantised to int8 on the CPU, fidelity measured.

int8 GEMMs do about twice the work of float32 ones per cycle, so int8 is offered on request,
never by default: the float32 encoder's Linear layers quantised dynamically (int8 weights per
tensor, activations quantised per batch). Where the `cpu` extra is installed it is ONNX Runtime's
quantisation of the exported graph's MatMul and Gemm nodes (`fercache.onnxrt`, about 4x torch's
eager float32 in `bench/cpu.py`), else torch's own of every `nn.Linear`; both apply to any
loaded model (Hugging Face families, OpenCLIP, timm) and keep `--layers`, `--tokens` and
`--tta flip` working.

int8 features are not float32 features: how close they are is measured on the data at extract
time (`int8_fidelity`: the lowest cosine, over the first batch, between the int8 tower's pooled
features and the float32 tower's), stored in the cache's metadata, shown by `fercache info`, and
a cache below `INT8_MIN_COSINE` is refused for heads fitted on float features (`check_int8`).
Activations are quantised with one scale per call. ONNX Runtime's graph is run face by face, so
its features do not depend on the batch; torch's are quantised per batch, so they depend on the
batch they were encoded in: reproducible run to run with the same `--batch-size` and ranks.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

from fercache.errors import UserError
from fercache.names import INT8, PIXELS, feature_name
from fercache.onnxrt import ORT, onnx_graph

if TYPE_CHECKING:
    from fercache.encoder import Encoder

INT8_MIN_COSINE = 0.99  # an int8 cache whose features are less alike than this scores no float head
INT8_FIDELITY = "int8_fidelity"  # the cache attribute that records the measured cosine


def int8_encoder(enc: Encoder, device: torch.device, runtime: str) -> Encoder:
    """The float32 encoder `enc` with its tower's Linear layers int8 (on `runtime`: torch, or ONNX Runtime's
    graph of it, `fercache.onnxrt`); it keeps `enc` to measure itself against."""
    if enc.identity.model == PIXELS:
        raise UserError("--dtype int8 needs a neural encoder; the pixels baseline has none")
    if device.type != "cpu":
        raise UserError(f"--dtype int8 runs on the CPU (dynamic quantisation), not on {device}: pass --device cpu")
    identity = dataclasses.replace(enc.identity, dtype=INT8, runtime=runtime)
    if enc.model is None:  # configs only: the identity is all that is asked
        return dataclasses.replace(enc, identity=identity)
    if not any(isinstance(m, torch.nn.Linear) for m in enc.model.modules()):
        raise UserError(f"--dtype int8: model '{enc.identity.model}' has no Linear layers to quantise "
                        "(a convolutional net); use --dtype float32")
    if runtime == ORT:  # the float32 graph's MatMul and Gemm nodes quantised, the torch model kept as reference
        return dataclasses.replace(enc, identity=identity, graph=onnx_graph(enc, int8=True), reference=enc)
    tower = copy.deepcopy(enc.tower) if enc.tower is not None else None  # blocks and module stay one tree
    model = tower.module if tower is not None else copy.deepcopy(enc.model)
    with warnings.catch_warnings():  # torch marks its eager quantisation deprecated (torchao's successor has no
        warnings.simplefilter("ignore")  # fast int8 CPU kernels for this yet); it is what runs here, in 2.13
        torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, torch.qint8, inplace=True)
    return dataclasses.replace(enc, identity=identity, model=model, tower=tower, reference=enc)


def int8_fidelity(enc: Encoder, pixels: np.ndarray) -> float:
    """The lowest cosine, over `pixels`, between the int8 encoder's pooled features and float32's.

    Measured once; the float32 tower it compares with is then let go (its memory is the int8 one's four times).
    """
    if enc.reference is None:
        raise ValueError("int8_fidelity: this encoder has no float32 reference (measured already, or not int8)")
    got = enc.tensors(pixels)[feature_name()]
    ref = enc.reference.tensors(pixels)[feature_name()]
    enc.reference = None
    return float(torch.nn.functional.cosine_similarity(got, ref).min())


def check_int8(meta: dict, head_dtype: str | None, where: object) -> None:
    """Refuse an int8 cache less faithful than `INT8_MIN_COSINE` for a head fitted on float features."""
    if meta.get("dtype") != INT8 or head_dtype in (None, INT8):
        return
    fidelity = meta.get(INT8_FIDELITY)
    if fidelity is None or fidelity < INT8_MIN_COSINE:
        measured = "no measured fidelity" if fidelity is None else f"cosine {fidelity:.4f} to float32"
        raise UserError(f"{where}: int8 features with {measured} (below {INT8_MIN_COSINE}) for a head fitted on "
                        f"{head_dtype} features: extract with --dtype float32, or fit a head on this cache")
