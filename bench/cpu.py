"""Stage one's vision tower on a CPU: float32 and int8 back ends side by side, in one run.

    python bench/cpu.py [--towers b32,b16] [--reps 7] [--threads 2] [--candidates eager,compile,...]
                        [--modes native,avx2]

Each tower is a real CLIP architecture with random weights (cost does not depend on the weight
values): ViT-B/32 (`CLIPVisionConfig()` defaults) on a batch of 32 224x224 images, and ViT-B/16
on a batch of 8. Every candidate runs the same batch; timings are interleaved (one forward of
each candidate per round, `--reps` rounds, median), so load from other processes on a shared
machine hits all of them alike and the ratios to the reference hold when the absolute rates do
not. Per candidate: faces/s, ratio to torch eager float32 (the reference), GFLOP/s (FLOPs counted
by torch's FlopCounterMode on the eager model) against the float32 GEMM peak measured in the
same process (the better of torch's matmul and ONNX Runtime's MatMul: MKL, behind torch's, is
well below the machine's peak on AMD chips), and fidelity of the pooled features against the
reference (lowest cosine over the batch, largest relative L2 error |a - r| / |r|), plus the
one-off build time.

`--modes avx2` runs the same child process under a *simulated* AVX2-only CPU (what laptops, AMD
Zen 2/3 and older Xeons have): ATEN_CPU_CAPABILITY=avx2 (ATen's kernels and inductor's code
generation), ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA=AVX2 (oneDNN in torch and OpenVINO's fork),
MKL_ENABLE_INSTRUCTIONS=AVX2 (MKL's sgemm) and FBGEMM_ENABLE_INSTRUCTIONS=AVX2 (torch's int8
GEMM). ONNX Runtime's MLAS kernels dispatch on cpuid and honour no such variable, and OpenVINO's
own JIT kernels (outside oneDNN) neither: their simulated figures are optimistic. Bfloat16 and
AMX are out of the picture in both modes (everything here is float32 or int8).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIMULATED_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2",
                  "MKL_ENABLE_INSTRUCTIONS": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
TOWERS = {"b32": ({}, 32), "b16": ({"patch_size": 16}, 8), "l14": (
    {"patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
     "num_attention_heads": 16}, 4)}  # name -> (CLIPVisionConfig overrides, batch)
CANDIDATES = ("eager", "compile", "compile-max-autotune", "onednn-graph", "openvino", "onnxruntime",
              "int8-torch", "int8-onnxruntime", "int8-openvino")
DEFAULT = "eager,compile,onednn-graph,openvino,onnxruntime,int8-torch,int8-onnxruntime,int8-openvino"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def build(name: str, model, x, tmp: Path):
    """`name`'s forward: a callable from pixel values to pooled features (float32 tensor)."""
    import torch

    def pooled(m):
        class Pooled(torch.nn.Module):  # one tensor in, one out: what tracers and exporters want
            def __init__(self):
                super().__init__()
                self.m = m

            def forward(self, pixel_values):
                return self.m(pixel_values=pixel_values).pooler_output
        return Pooled().eval()

    def onnx_file() -> Path:
        path = tmp / "tower.onnx"
        if not path.exists():
            torch.onnx.export(pooled(model), (x,), str(path), dynamo=False, opset_version=17,
                              input_names=["pixel_values"], output_names=["pooled"])
        return path

    def ort(path: Path):
        import onnxruntime as rt

        opts = rt.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = torch.get_num_threads(), 1
        sess = rt.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda t: torch.from_numpy(sess.run(None, {"pixel_values": t.numpy()})[0])

    def openvino(ov_model):
        import openvino as ov

        compiled = ov.Core().compile_model(ov_model, "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": torch.get_num_threads()})
        return lambda t: torch.from_numpy(compiled(t.numpy())[0].copy())

    if name == "eager":
        return lambda t: model(pixel_values=t).pooler_output
    if name.startswith("compile"):
        torch._dynamo.reset()
        torch._inductor.config.freezing = True
        mode = "max-autotune-no-cudagraphs" if name.endswith("max-autotune") else None
        return torch.compile(pooled(model), mode=mode)
    if name == "onednn-graph":
        torch.jit.enable_onednn_fusion(True)
        frozen = torch.jit.freeze(torch.jit.trace(pooled(model), x, check_trace=False))
        frozen(x), frozen(x)  # the profiling executor fuses on the second call
        return frozen
    if name == "onnxruntime":
        return ort(onnx_file())
    if name == "int8-onnxruntime":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        out = tmp / "tower-int8.onnx"
        quantize_dynamic(str(onnx_file()), str(out), weight_type=QuantType.QInt8)
        return ort(out)
    if name == "openvino":
        import openvino as ov

        return openvino(ov.convert_model(pooled(model), example_input=x))
    if name == "int8-openvino":
        import nncf
        import openvino as ov

        return openvino(nncf.compress_weights(ov.convert_model(pooled(model), example_input=x),
                                              mode=nncf.CompressWeightsMode.INT8_ASYM))
    if name == "int8-torch":
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, torch.qint8)
        return lambda t: quantized(pixel_values=t).pooler_output
    raise SystemExit(f"unknown candidate {name}")


def mlas_peak(n: int = 2048) -> float:
    """GFLOP/s of a 2048^2 float32 MatMul in ONNX Runtime (its own GEMM kernels, MLAS), best of a few;
    0 without it. torch's matmul goes through MKL, which on AMD chips is not the machine's peak."""
    try:
        import onnx
        import onnxruntime as rt
        from onnx import TensorProto, helper
    except ImportError:
        return 0.0
    import numpy as np
    import torch

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    opts = rt.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = rt.InferenceSession(onnx.helper.make_model(graph).SerializeToString(), opts,
                               providers=["CPUExecutionProvider"])
    a = b = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    sess.run(None, {"a": a, "b": b})  # its thread pool and packing buffers, set up on the first run
    best = 0.0
    for _ in range(8):
        start = time.perf_counter()
        sess.run(None, {"a": a, "b": b})
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def child(towers: list[str], candidates: list[str], reps: int, threads: int) -> None:
    """Measure every candidate on every tower in this process; one JSON line per tower."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from extract import matmul_peak  # bench/extract.py's: best of a few timed 2048^2 matmuls

    torch.set_num_threads(threads)
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "peak": matmul_peak(torch.float32),
                      "mlas_peak": mlas_peak()}),
          flush=True)  # at the start; each tower's rounds measure torch's again beside the candidates
    for tower in towers:
        overrides, batch = TOWERS[tower]
        torch.manual_seed(0)
        model = CLIPVisionModel(CLIPVisionConfig(**overrides, attn_implementation="sdpa")).eval()
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            with FlopCounterMode(display=False) as counter:
                ref = model(pixel_values=x).pooler_output
        flops = counter.get_total_flops() / batch
        runs, skipped = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for name in candidates:
                start = time.perf_counter()
                try:
                    with torch.inference_mode():
                        fn = build(name, model, x, Path(tmp))
                        out = fn(x).float()
                except Exception as exc:  # a back end that does not install or convert: said, not fatal
                    skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                    continue
                finally:
                    torch.jit.enable_onednn_fusion(False)
                cos = torch.nn.functional.cosine_similarity(out, ref).min().item()
                rel = ((out - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
                runs[name] = {"fn": fn, "build": time.perf_counter() - start, "cos": cos, "rel": rel, "times": []}
            a, b, peaks = torch.randn(2048, 2048), torch.randn(2048, 2048), []
            for _ in range(reps):  # interleaved: a burst of load hits every candidate (and the GEMM peak) alike
                start = time.perf_counter()
                torch.mm(a, b)
                peaks.append(2 * 2048 ** 3 / (time.perf_counter() - start) / 1e9)
                for run in runs.values():
                    start = time.perf_counter()
                    with torch.inference_mode():
                        run["fn"](x)
                    run["times"].append(time.perf_counter() - start)
        result = {name: {"rate": batch / statistics.median(r["times"]), "build": r["build"], "cos": r["cos"],
                         "rel": r["rel"]} for name, r in runs.items()}
        print(json.dumps({"tower": tower, "batch": batch, "flops": flops, "runs": result, "skipped": skipped,
                          "load": os.getloadavg(), "peak": max(peaks + [0.0])}), flush=True)


def table(mode: str, lines: list[dict], threads: int) -> None:
    head = lines[0]
    simulated = mode == "avx2"
    print(f"\n== {'SIMULATED AVX2-only CPU (' + ' '.join(f'{k}={v}' for k, v in SIMULATED_AVX2.items()) + ')' if simulated else 'native ISA'}"
          f" on {cpu_name()}, {threads} threads; ATen capability {head['capability']}; "
          f"float32 GEMM peak at the start: torch (MKL) {head['peak']:.0f} GFLOP/s, ONNX Runtime (MLAS) "
          f"{head['mlas_peak']:.0f} GFLOP/s (not capped by the simulation)")
    for res in lines[1:]:
        peak = max(res["peak"], head["peak"], head["mlas_peak"])  # the best 2048^2 float32 matmul of either library
        print(f"-- {res['tower']}: batch {res['batch']} of 224x224, {res['flops'] / 1e9:.2f} GFLOP/face; float32 GEMM "
              f"peak {peak:.0f} GFLOP/s; load average {' '.join(f'{v:.1f}' for v in res['load'])}")
        print(f"{'candidate':<22}{'faces/s':>9}{'x ref':>7}{'GFLOP/s':>9}{'% peak':>8}{'min cos':>11}"
              f"{'max rel err':>13}{'build s':>9}")
        ref = res["runs"].get("eager", {}).get("rate")
        for name, r in res["runs"].items():
            gflops = r["rate"] * res["flops"] / 1e9
            print(f"{name:<22}{r['rate']:>9.2f}{r['rate'] / ref if ref else float('nan'):>7.2f}{gflops:>9.1f}"
                  f"{gflops / peak:>8.0%}{r['cos']:>11.6f}{r['rel']:>13.2e}{r['build']:>9.1f}")
        for name, why in res["skipped"].items():
            print(f"{name:<22}skipped: {why}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--towers", default="b32,b16", help=f"of {', '.join(TOWERS)}")
    parser.add_argument("--candidates", default=DEFAULT, help=f"of {', '.join(CANDIDATES)}")
    parser.add_argument("--modes", default="native,avx2", help="native, avx2 (simulated AVX2-only CPU)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    towers, candidates = args.towers.split(","), args.candidates.split(",")
    if args.child:
        return child(towers, candidates, args.reps, args.threads)
    print(f"CPU: {cpu_name()}; load average at start {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    for mode in args.modes.split(","):
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), **(SIMULATED_AVX2 if mode == "avx2" else {})}
        proc = subprocess.run([sys.executable, __file__, "--child", "--towers", args.towers, "--candidates",
                               args.candidates, "--reps", str(args.reps), "--threads", str(args.threads)],
                              env=env, capture_output=True, text=True)
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            sys.exit(f"{mode} child failed:\n{proc.stderr[-3000:]}")
        table(mode, lines, args.threads)


if __name__ == "__main__":
    main()
