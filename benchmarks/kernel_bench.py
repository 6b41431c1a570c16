"""GPU evidence for the fused-MoE kernel: latency, error and roofline fractions per model, dtype and M.

    python benchmarks/kernel_bench.py --out bench.json [--models mixtral,gpt-oss] [--dtypes bf16,mxfp4]
                                                       [--batch-sizes 1,16,64,256,1024,4096]

Needs a CUDA GPU. Shapes: Mixtral-8x7B at TP2 (E=8, N=7168, K=4096, top-2) and gpt-oss-120b at
TP1 (E=128, N=2880, K=2880, top-4). For every dtype and M it builds the problem (random weights,
uniform routing, fp32 reference: ``workers.problem``), runs the whole MoE call once on
NaN-poisoned buffers and reports the relative error against the reference and its bound.

Configs (one per model and M, no tuning): the values of vLLM's shipped config files, as the
issue's reference timings used them: Mixtral bf16 from ``E=8,N=7168,device_name=NVIDIA_H200``,
Mixtral fp8_w8a8 from ``...,dtype=fp8_w8a8``, gpt-oss from ``E=128,N=2880,device_name=
NVIDIA_H100_80GB_HBM3`` (the only shipped file for that shape); the other dtypes take their
model's bf16 row. Block fp8 [128,128] needs BLOCK_SIZE_N and BLOCK_SIZE_K dividing 128: it takes
BLOCK_SIZE_N = BLOCK_SIZE_K = 128 and BLOCK_SIZE_M 16 up to M=64, 64 above (vLLM's block default
otherwise: GROUP_SIZE_M 32, 4 warps, 3 stages). It runs on Mixtral only (gpt-oss's N=2880 is no
multiple of 128, which vLLM's block-fp8 loader refuses).

Timing: one CUDA graph replays the MoE call of ``ROUTINGS`` runners that share the weights but
each route the tokens differently, so consecutive calls read other experts, as consecutive layers
do in a server, instead of finding the last call's weights in L2; µs per call = median over
``workers.timing`` replays / ``ROUTINGS``. Floors, from ceilings measured in the same run:
- HBM: bytes of the weights (and scales) of the experts a call's routing touches, averaged over
  the runners, ÷ device-to-device copy bandwidth (bytes read + written);
- compute: 2·M·topk·(2N·K + N·K) FLOPs ÷ the rate of an 8192³ bf16 torch.matmul.
Kernels are compiled first, in parallel processes that run each config once on zero weights, so
the timed process loads them from Triton's cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.moe import MoERunner  # noqa: E402
from workers.problem import ERROR_BOUNDS, build_problem, rel_error, release_weights  # noqa: E402
from workers.quant import QuantizedWeight, activation_dtype, quantize_weight  # noqa: E402
from workers.records import Config, DType, MoEShape  # noqa: E402
from workers.routing import make_routing  # noqa: E402
from workers.timing import GraphTimer, summarize  # noqa: E402

BATCH_SIZES = (1, 16, 64, 256, 1024, 4096)
ROUTINGS = 8
TIMED_REPLAYS = 25
BLOCK_FP8 = (128, 128)
DEVICE = "cuda"

MODELS = {
    "mixtral": ("Mixtral-8x7B TP2", dict(E=8, N=7168, K=4096, topk=2)),
    "gpt-oss": ("gpt-oss-120b TP1", dict(E=128, N=2880, K=2880, topk=4)),
}
# (BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, GROUP_SIZE_M, num_warps, num_stages) per M.
VLLM_CONFIGS = {
    ("mixtral", "bf16"): {1: (16, 128, 128, 64, 4, 5), 16: (16, 128, 128, 16, 4, 5), 64: (32, 128, 128, 1, 4, 4),
                          256: (128, 256, 64, 1, 8, 4), 1024: (128, 256, 64, 64, 8, 4), 4096: (128, 256, 64, 16, 8, 3)},
    ("mixtral", "fp8"): {1: (64, 128, 256, 32, 4, 4), 16: (64, 64, 128, 16, 4, 5), 64: (64, 128, 128, 32, 4, 4),
                         256: (64, 128, 128, 16, 4, 3), 1024: (128, 256, 128, 32, 8, 4), 4096: (128, 256, 128, 16, 8, 3)},
    ("gpt-oss", "bf16"): {1: (16, 32, 64, 1, 4, 4), 16: (16, 32, 256, 16, 4, 5), 64: (16, 64, 256, 1, 4, 4),
                          256: (32, 64, 256, 1, 4, 5), 1024: (64, 128, 128, 1, 8, 4), 4096: (128, 256, 64, 1, 8, 3)},
}
VARIANTS = {  # name -> (dtype, block_shape)
    "bf16": (DType.BF16, None), "fp16": (DType.FP16, None), "fp8_w8a8": (DType.FP8_W8A8, None),
    "fp8_w8a8_block": (DType.FP8_W8A8, BLOCK_FP8), "int8_w8a16": (DType.INT8_W8A16, None),
    "mxfp4": (DType.MXFP4, None), "nvfp4": (DType.NVFP4, None),
}


def bench_config(model: str, variant: str, M: int) -> Config:
    dtype, block = VARIANTS[variant]
    if block is not None:
        return Config(16 if M <= 64 else 64, block[0], block[1], 32, 4, 3)
    table = VLLM_CONFIGS.get((model, "fp8" if dtype is DType.FP8_W8A8 else "bf16"), VLLM_CONFIGS[(model, "bf16")])
    return Config(*table[M])


def shape_of(model: str, variant: str) -> MoEShape:
    dtype, block = VARIANTS[variant]
    return MoEShape(**MODELS[model][1], dtype=dtype, block_shape=block)


def runs(models: list[str], variants: list[str]) -> list[tuple[str, str]]:
    return [(m, v) for m in models for v in variants if not (m == "gpt-oss" and VARIANTS[v][1] is not None)]


# ------------------------------------------------------------------ compile ahead

def _compile_job(model: str, variant: str, batch_sizes: list[int]) -> float:
    """In a child process: run each M's config once on zero weights (fills Triton's disk cache)."""
    start = time.perf_counter()
    shape = shape_of(model, variant)
    w13 = quantize_weight(torch.zeros((shape.E, 2 * shape.N, shape.K), dtype=torch.bfloat16, device=DEVICE),
                          shape.dtype, shape.block_shape)
    w2 = quantize_weight(torch.zeros((shape.E, shape.K, shape.N), dtype=torch.bfloat16, device=DEVICE),
                         shape.dtype, shape.block_shape)
    generator = torch.Generator().manual_seed(0)
    for M in batch_sizes:
        x = torch.zeros((M, shape.K), dtype=activation_dtype(shape.dtype), device=DEVICE)
        weights, ids = make_routing("uniform", M, shape.E, shape.topk, generator, DEVICE)
        MoERunner(x, w13, w2, weights, ids, bench_config(model, variant, M)).run()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def compile_ahead(jobs: list[tuple[str, str]], batch_sizes: list[int]) -> float:
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1), mp_context=get_context("spawn")) as pool:
        for future in [pool.submit(_compile_job, m, v, batch_sizes) for m, v in jobs]:
            future.result()
    return time.perf_counter() - start


# ------------------------------------------------------------------ ceilings

def _median_ms(fn, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 2 GiB, counting the bytes read and written."""
    src = torch.randn(2**29, device=DEVICE)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def matmul_rate() -> float:
    """FLOP/s of an 8192³ bf16 matmul on random data."""
    a = torch.randn((8192, 8192), device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn((8192, 8192), device=DEVICE, dtype=torch.bfloat16)
    ms = _median_ms(lambda: a @ b)
    return 2 * 8192**3 / (ms * 1e-3)


# ------------------------------------------------------------------ measurement

@dataclass
class Row:
    model: str
    variant: str
    M: int
    config: str
    latency_us: float
    spread_us: float
    rel_err: float
    bound: float
    hbm_floor_us: float
    compute_floor_us: float

    @property
    def hbm_pct(self) -> float:
        return 100 * self.hbm_floor_us / self.latency_us

    @property
    def compute_pct(self) -> float:
        return 100 * self.compute_floor_us / self.latency_us


def expert_bytes(weight: QuantizedWeight) -> int:
    """Bytes one expert's slice of a weight occupies (data plus scales)."""
    tensors = [t for t in (weight.data, weight.scale) if t is not None and t.dim() > 1]
    return sum(t[0].numel() * t.element_size() for t in tensors)


def measure(model: str, variant: str, M: int, bandwidth: float, flops: float) -> Row:
    shape = shape_of(model, variant)
    config = bench_config(model, variant, M)
    problem = build_problem(shape, M, device=DEVICE)
    runners = [MoERunner(problem.x, problem.w13, problem.w2, problem.topk_weights, problem.topk_ids, config)]
    generator = torch.Generator().manual_seed(M)
    for _ in range(ROUTINGS - 1):
        weights, ids = make_routing("uniform", M, shape.E, shape.topk, generator, DEVICE)
        runners.append(MoERunner(problem.x, problem.w13, problem.w2, weights, ids, config))
    runners[0].poison_buffers()
    error = rel_error(runners[0].run(), problem.reference)
    for runner in runners[1:]:
        runner.run()

    timer = GraphTimer(lambda: [runner.run() for runner in runners], invocations=1)
    try:
        timer.warm_up()
        timing = summarize([timer.replay_us() / ROUTINGS for _ in range(TIMED_REPLAYS)])
    finally:
        timer.release()

    per_expert = expert_bytes(problem.w13) + expert_bytes(problem.w2)
    touched = statistics.mean(int(torch.unique(r.topk_ids).numel()) for r in runners)
    flop = 2 * M * shape.topk * 3 * shape.N * shape.K
    return Row(model, variant, M, config.label, timing.median_us, timing.spread_us, error,
               ERROR_BOUNDS[shape.dtype], touched * per_expert / bandwidth * 1e6, flop / flops * 1e6)


def markdown(rows: list[Row]) -> str:
    lines = ["| model | dtype | M | config | µs | rel. error (bound) | % HBM floor | % compute floor |",
             "|---|---|---:|---|---:|---|---:|---:|"]
    for r in rows:
        mark = "" if r.rel_err <= r.bound else " **FAIL**"
        lines.append(f"| {MODELS[r.model][0]} | {r.variant} | {r.M} | {r.config} | {r.latency_us:.1f} | "
                     f"{r.rel_err:.2e} ({r.bound:.0e}){mark} | {r.hbm_pct:.0f} | {r.compute_pct:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="JSON results file")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--dtypes", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    args = parser.parse_args()
    models, variants = args.models.split(","), args.dtypes.split(",")
    batch_sizes = [int(m) for m in args.batch_sizes.split(",")]
    unknown = [m for m in models if m not in MODELS] + [v for v in variants if v not in VARIANTS]
    unknown += [str(m) for m in batch_sizes if m not in BATCH_SIZES]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")

    started = time.perf_counter()
    jobs = runs(models, variants)
    compile_s = compile_ahead(jobs, batch_sizes)
    bandwidth, flops = copy_bandwidth(), matmul_rate()
    import triton

    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
            "copy_bandwidth_GBps": bandwidth / 1e9, "bf16_matmul_TFLOPs": flops / 1e12,
            "compile_ahead_s": compile_s, "routings_per_graph": ROUTINGS}
    print(json.dumps(meta), flush=True)
    rows: list[Row] = []
    for model, variant in jobs:
        for M in batch_sizes:
            row = measure(model, variant, M, bandwidth, flops)
            rows.append(row)
            print(f"{model:8} {variant:15} M={M:5} {row.latency_us:9.1f} us  err {row.rel_err:.2e}  "
                  f"HBM {row.hbm_pct:5.1f}%  compute {row.compute_pct:5.1f}%  {row.config}", flush=True)
            args.out.write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=1))
        release_weights()
    meta["total_s"] = time.perf_counter() - started
    args.out.write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=1))
    print(f"\n{meta['device']} · torch {meta['torch']} · triton {meta['triton']} · copy {bandwidth / 1e12:.2f} TB/s · "
          f"bf16 matmul {flops / 1e12:.0f} TFLOP/s · {meta['total_s']:.0f} s\n")
    print(markdown(rows))
    return int(any(r.rel_err > r.bound for r in rows))


if __name__ == "__main__":
    sys.exit(main())
