"""moe-tune's builtin MXFP4/NVFP4 fused-MoE kernel next to triton_kernels' matmul_ogs, on one GPU.

    PYTHONPATH=.:.server-kernels timeout 240 python3 benchmarks/fp4_kernel_bench.py --out $OUT
    timeout 600 python3 benchmarks/fp4_kernel_bench.py --interpret --out /tmp/fp4   # CPU, tiny shape

Shape: gpt-oss-120b TP1 (E=128, N=2880, K=2880, top-4), M = 1, 16, 64, 256, 1024, 4096.
Kernels, each named in the output with its entry point and source hash:
- ``builtin`` (``workers.moe.MoERunner``, this checkout) in four variants, so the old and the new
  kernel are measured in one process: ``main`` = the kernel as on main before the decode change
  (unswapped, its E2M1 decode ``MAIN_DECODE_PTX`` patched into a copy of the kernel module, block
  scales read row-major as stored), ``rows`` = row-major packed weights with this checkout's decode
  and K-group-major scales (``fp4_atoms=False``; ``workers.fused_moe_kernel.launch_layout``),
  ``swap`` = ``rows`` with swapped operands (``fp4_swap=True``), ``atoms`` = this checkout's
  default: weights prepared once in the atom layout (``workers.fp4_layout``; swapped operands;
  only the candidates whose tiles cover whole atoms);
- ``matmul_ogs`` (``workers.backends.triton_kernels``: routing + gate/up with gpt-oss's SwiGLU
  fused + down with the scatter-sum, weights in vLLM's Hopper layouts), the kernel vLLM and SGLang
  run for MXFP4 on Hopper; needs ``triton_kernels`` importable (``.server-kernels`` on PYTHONPATH).
  Its ratio column is matmul_ogs µs / builtin µs (> 1: builtin faster); nvfp4 rows are compared
  with matmul_ogs's mxfp4 time too (no server runs NVFP4 through matmul_ogs; the fp4 alternative).

Per dtype, variant and M the config is the best of a small candidate set (``CANDIDATES``, by M)
under a screen (``workers.timing.time_screen``: CUDA graph of 5 calls, 2 replays); every
candidate's output is first checked against the fp32 reference (``workers.problem``), and a wrong
one is dropped. The winners and matmul_ogs are then timed interleaved (``time_interleaved``: one
CUDA graph of 10 calls each, 20 rounds, order rotated; median µs per call). HBM floor: bytes of the
weights and scales of the experts the routing touches ÷ device-to-device copy bandwidth measured
in the same run; "% floor" = floor / time. Kernels are compiled first by parallel processes on
small-E problems (same specializations) so the timed process reads Triton's cache.

Every step runs under the deadline ``--max-seconds`` (default 210): compiling stops waiting at
40% of it, screening and timing stop starting new M values when it has passed; what was measured
is written. Output under --out: ``fp4_kernel_bench.json`` (kernels, rows) and
``fp4_kernel_bench.md`` (the table, also printed last).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from multiprocessing import TimeoutError as CompileTimeout, get_context
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPU_SHAPE = dict(E=128, N=2880, K=2880, topk=4)  # gpt-oss-120b TP1
TINY_SHAPE = dict(E=4, N=64, K=96, topk=2)  # --interpret
GPU_BATCH_SIZES = (1, 16, 64, 256, 1024, 4096)
TINY_BATCH_SIZES = (1, 3, 8)
DTYPES = ("mxfp4", "nvfp4")
VARIANTS = ("main", "rows", "swap", "atoms")
COMPILE_SHARE = 0.4
COMPILE_E = 4
"""Experts of the compile processes' problems: the kernels' specializations do not depend on E."""

# (BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, GROUP_SIZE_M, num_warps, num_stages) per batch size.
# (16, 128, 128, 1, 4, 3): the fewest SASS instructions per weight byte in the atom layout
# (benchmarks/fp4_sass_count.py: 6.56 mxfp4, 7.56 nvfp4); missing from the first GPU run.
_DECODE = ((16, 32, 128, 1, 4, 4), (16, 64, 64, 1, 4, 3), (16, 64, 128, 1, 4, 3), (16, 128, 64, 1, 4, 4),
           (16, 128, 128, 1, 4, 3), (16, 128, 128, 1, 8, 3))
CANDIDATES = {
    1: _DECODE, 16: _DECODE, 64: _DECODE,
    256: ((16, 64, 128, 1, 4, 3), (16, 128, 64, 1, 4, 4), (16, 128, 128, 1, 4, 3), (32, 64, 128, 1, 4, 3),
          (32, 128, 64, 1, 4, 3)),
    1024: ((32, 128, 64, 1, 4, 3), (64, 64, 128, 1, 4, 3), (64, 128, 64, 1, 4, 3), (64, 128, 128, 1, 8, 3)),
    4096: ((64, 128, 64, 16, 4, 3), (128, 128, 64, 16, 8, 3), (128, 64, 128, 16, 4, 3), (64, 256, 64, 16, 8, 3)),
}
TINY_CANDIDATES = ((16, 32, 32, 1, 4, 2), (16, 64, 64, 1, 4, 2))


def main_decode_ptx() -> str:
    """The E2M1 decode of main before this change (the ``main`` variant): two bytes spread to the
    low bytes of a register's halves, two shifts per value, × 2^126, × scale."""
    lines = ["{", ".reg .b32 bytes, mag, sign, two126, negzero;",
             "mov.b32 two126, 0x7E807E80;", "mov.b32 negzero, 0x80008000;"]
    for pair, selector in enumerate(("0x4140", "0x4342")):
        lines.append(f"prmt.b32 bytes, $4, 0, {selector};")
        for out, (mag_shift, sign_shift) in ((pair, (6, 12)), (pair + 2, (2, 8))):
            lines += [f"shl.b32 mag, bytes, {mag_shift};", "and.b32 mag, mag, 0x01C001C0;",
                      f"shl.b32 sign, bytes, {sign_shift};", "and.b32 sign, sign, 0x80008000;",
                      "or.b32 mag, mag, sign;", "fma.rn.bf16x2 mag, mag, two126, negzero;",
                      f"fma.rn.bf16x2 ${out}, mag, ${5 + pair}, negzero;"]
    return "\n".join(lines + ["}"])


MAIN_DECODE_PTX = main_decode_ptx()
_PTX_LINE = "_E2M1_PTX = tl.constexpr(_e2m1_ptx())"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main_variant_moe(folder: Path) -> ModuleType:
    """A copy of ``workers.moe`` whose GEMMs launch a copy of the kernel module with main's decode.

    The copy is written to ``folder/fp4_bench_main_kernel.py`` (Triton needs a source file); the
    same folder in every process gives every process the same kernel source, hence cache key."""
    source = (ROOT / "workers" / "fused_moe_kernel.py").read_text(encoding="utf-8")
    if source.count(_PTX_LINE) != 1:
        raise RuntimeError(f"workers/fused_moe_kernel.py no longer has {_PTX_LINE!r}: update this benchmark")
    path = folder / "fp4_bench_main_kernel.py"
    patched = source.replace(_PTX_LINE, f"_E2M1_PTX = tl.constexpr({MAIN_DECODE_PTX!r})")
    if not path.exists() or path.read_text(encoding="utf-8") != patched:
        path.write_text(patched, encoding="utf-8")
    kernel = sys.modules.get("fp4_bench_main_kernel") or _load("fp4_bench_main_kernel", path)
    moe = sys.modules.get("fp4_bench_main_moe") or _load("fp4_bench_main_moe", ROOT / "workers" / "moe.py")
    moe.launch_moe_gemm, moe.check_config = kernel.launch_moe_gemm, kernel.check_config
    moe.launch_layout = _as_stored  # main read the scales row-major, as workers.quant stores them
    return moe


def _as_stored(weight):
    return weight


def builtin_runner(variant: str, problem, config, folder: Path):
    """The builtin kernel's runner of ``variant`` (module docstring) on ``problem``."""
    from workers.moe import MoERunner

    cls = main_variant_moe(folder).MoERunner if variant == "main" else MoERunner
    return cls(problem.x, problem.w13, problem.w2, problem.topk_weights, problem.topk_ids, config,
               fp4_swap=variant == "swap", fp4_atoms=variant == "atoms")


def runs_config(variant: str, config) -> bool:
    """Whether ``variant`` runs ``config`` (the atom variant: only tiles that cover whole atoms, so
    no row of its table is a row-major fallback)."""
    from workers.fp4_layout import fits_atoms

    return variant != "atoms" or fits_atoms(config.BLOCK_SIZE_N, config.BLOCK_SIZE_K)


def configs_for(M: int, interpret: bool, variant: str = "rows"):
    """The candidate configs at ``M`` that ``variant`` runs (``runs_config``)."""
    from workers.records import Config

    configs = [Config(*c) for c in (TINY_CANDIDATES if interpret else CANDIDATES[M])]
    return [c for c in configs if runs_config(variant, c)]


# ------------------------------------------------------------------ compile ahead (GPU)

def _compile_job(dtype: str, variant: str, configs: list[tuple], folder: str) -> float:
    """In a child process: each config once on a small-E problem (fills Triton's disk cache)."""
    from workers.problem import build_problem
    from workers.records import Config, DType, MoEShape

    start = time.perf_counter()
    shape = MoEShape(**{**GPU_SHAPE, "E": COMPILE_E}, dtype=DType(dtype))
    problem = build_problem(shape, 16, device="cuda")
    for config in (Config(*c) for c in configs):
        if runs_config(variant, config):
            builtin_runner(variant, problem, config, Path(folder)).run()
    import torch

    torch.cuda.synchronize()
    return time.perf_counter() - start


def compile_ahead(batch_sizes: list[int], folder: Path, limit_s: float) -> str:
    configs = sorted({c for M in batch_sizes for c in CANDIDATES[M]})
    jobs = [(d, v, configs[i::2]) for d in DTYPES for v in VARIANTS for i in range(2)]
    start = time.perf_counter()
    # multiprocessing's Pool, not concurrent.futures: at the time limit terminate() stops the jobs
    # still compiling, so none of them runs kernels on the GPU while it is timed.
    pool = get_context("spawn").Pool(processes=min(len(jobs), max(1, (os.cpu_count() or 2) - 2)))
    results = [pool.apply_async(_compile_job, (d, v, c, str(folder))) for d, v, c in jobs]
    done = failed = 0
    try:
        for result in results:
            try:
                result.get(timeout=max(0.1, limit_s - (time.perf_counter() - start)))
                done += 1
            except CompileTimeout:
                break
            except Exception as exc:  # noqa: BLE001 - the timed process compiles (and reports) it again
                failed += 1
                print(f"compile job failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
    finally:
        pool.terminate()
        pool.join()
    return f"{done}/{len(jobs)} compile jobs in {time.perf_counter() - start:.0f} s ({failed} failed)"


# ------------------------------------------------------------------ measurement

@dataclass
class Row:
    dtype: str
    M: int
    kernel: str
    variant: str
    config: str
    us: float | None
    spread_us: float | None
    rel_err: float | None
    hbm_floor_us: float | None
    note: str = ""


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (bytes read + written), median of 10."""
    import torch

    src = torch.empty(2**28, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    samples = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e-3)
    return 2 * src.numel() * src.element_size() / statistics.median(samples)


def expert_bytes(weight) -> int:
    """Bytes of one expert's slice of a weight (data plus per-row scales)."""
    return sum(t[0].numel() * t.element_size() for t in (weight.data, weight.scale) if t is not None and t.dim() > 1)


def hbm_floor_us(problem, bandwidth: float | None) -> float | None:
    if bandwidth is None:
        return None
    import torch

    touched = int(torch.unique(problem.topk_ids[problem.topk_ids >= 0]).numel())
    return touched * (expert_bytes(problem.w13) + expert_bytes(problem.w2)) / bandwidth * 1e6


def screen_variant(variant: str, problem, M: int, args, folder: Path, deadline: float, log) -> tuple:
    """(best config, its runner, its rel. error) of ``variant`` at ``M`` by screening, or a reason."""
    from workers.problem import ERROR_BOUNDS, rel_error
    from workers.timing import time_screen

    best = None
    for config in configs_for(M, args.interpret, variant):
        if time.monotonic() > deadline:
            break
        try:
            runner = builtin_runner(variant, problem, config, folder)
            runner.poison_buffers()
            error = rel_error(runner.run(), problem.reference)
            if not error <= ERROR_BOUNDS[problem.shape.dtype]:
                log(f"  {variant} {config.label}: wrong result (rel. error {error:.2e}), dropped")
                continue
            us = time_screen(runner.run, args.device).median_us
        except Exception as exc:  # noqa: BLE001 - a config that fails is reported, the others go on
            log(f"  {variant} {config.label}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        log(f"  {variant} {config.label}: screen {us:.1f} µs, rel. error {error:.2e}")
        if best is None or us < best[0]:
            best = (us, config, runner, error)
    return best


def measure(args, folder: Path, ogs_backend, bandwidth: float | None, deadline: float, log) -> list[Row]:
    from workers.problem import ERROR_BOUNDS, build_problem, rel_error
    from workers.records import DType, MoEShape
    from workers.timing import time_interleaved

    rows: list[Row] = []
    shape_args = TINY_SHAPE if args.interpret else GPU_SHAPE
    for M in args.batch_sizes:
        if time.monotonic() > deadline:
            log(f"time limit: M={M} and above not measured")
            break
        for dtype in DTYPES:
            shape = MoEShape(**shape_args, dtype=DType(dtype))
            problem = build_problem(shape, M, device=args.device)
            floor = hbm_floor_us(problem, bandwidth)
            log(f"{dtype} M={M}: screening")
            finalists = []
            for variant in VARIANTS:
                best = screen_variant(variant, problem, M, args, folder, deadline, log)
                if best is None:
                    rows.append(Row(dtype, M, "builtin", variant, "", None, None, None, floor, "no config ran"))
                else:
                    finalists.append((variant, best))
            ogs = None
            if ogs_backend is not None and dtype == "mxfp4":
                try:
                    ogs_problem = build_problem(shape, M, device=args.device, activation=ogs_backend.activation)
                    ogs_runner = ogs_backend.runner(ogs_problem, None)
                    ogs_error = rel_error(ogs_runner.run(), ogs_problem.reference)
                    if ogs_error <= ERROR_BOUNDS[shape.dtype]:
                        ogs = (ogs_runner, ogs_error)
                    else:
                        rows.append(Row(dtype, M, "matmul_ogs", "heuristic", "", None, None, ogs_error, floor,
                                        "wrong result"))
                except Exception as exc:  # noqa: BLE001 - reported in its row, the builtin rows stand
                    rows.append(Row(dtype, M, "matmul_ogs", "heuristic", "", None, None, None, floor,
                                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
            fns = [best[2].run for _, best in finalists] + ([ogs[0].run] if ogs else [])
            if not fns or time.monotonic() > deadline:
                continue
            timings = time_interleaved(fns, args.device)
            for (variant, (_, config, _, error)), timing in zip(finalists, timings):
                rows.append(Row(dtype, M, "builtin", variant, config.label, timing.median_us, timing.spread_us,
                                error, floor))
            if ogs:
                rows.append(Row(dtype, M, "matmul_ogs", "heuristic", "", timings[-1].median_us,
                                timings[-1].spread_us, ogs[1], floor))
            log(f"{dtype} M={M}: " + ", ".join(f"{r.kernel}/{r.variant} {r.us:.1f} µs" for r in rows
                                                if r.M == M and r.dtype == dtype and r.us is not None))
    return rows


def table(rows: list[Row], batch_sizes: list[int]) -> str:
    """Markdown: per dtype and M, each kernel/variant's µs, matmul_ogs µs / its µs, % of HBM floor."""
    ogs = {r.M: r.us for r in rows if r.kernel == "matmul_ogs" and r.us is not None}
    lines = ["| dtype | M | kernel | variant | config | µs | matmul_ogs / this | % HBM floor | rel. err |",
             "|---|---:|---|---|---|---:|---:|---:|---:|"]
    for dtype in DTYPES:
        for M in batch_sizes:
            for r in (r for r in rows if r.dtype == dtype and r.M == M):
                us = f"{r.us:.1f}" if r.us is not None else f"— ({r.note})"
                ratio = f"{ogs[M] / r.us:.2f}x" if r.us and M in ogs else "—"
                floor = f"{100 * r.hbm_floor_us / r.us:.0f}%" if r.us and r.hbm_floor_us else "—"
                err = f"{r.rel_err:.1e}" if r.rel_err is not None else "—"
                lines.append(f"| {dtype} | {M} | {r.kernel} | {r.variant} | {r.config} | {us} | {ratio} | {floor} | {err} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for fp4_kernel_bench.json / .md")
    parser.add_argument("--batch-sizes", default=None, metavar="M,M,...",
                        help=f"default {','.join(map(str, GPU_BATCH_SIZES))} (--interpret: "
                             f"{','.join(map(str, TINY_BATCH_SIZES))})")
    parser.add_argument("--max-seconds", type=float, default=210.0,
                        help="deadline for the whole run; measured rows are written when it passes (default 210)")
    parser.add_argument("--interpret", action="store_true",
                        help="CPU, Triton interpreter, tiny shape (E=4, N=64, K=96, top-2): checks the path end to end")
    args = parser.parse_args(argv)
    default = TINY_BATCH_SIZES if args.interpret else GPU_BATCH_SIZES
    try:
        args.batch_sizes = [int(v) for v in args.batch_sizes.split(",")] if args.batch_sizes else list(default)
    except ValueError:
        parser.exit(2, f"fp4_kernel_bench: bad --batch-sizes {args.batch_sizes!r}\n")
    if any(M < 1 for M in args.batch_sizes) or (not args.interpret and set(args.batch_sizes) - set(CANDIDATES)):
        parser.exit(2, f"fp4_kernel_bench: batch sizes must be among {sorted(CANDIDATES)} (any >= 1 with --interpret)\n")
    if args.max_seconds <= 0:
        parser.exit(2, "fp4_kernel_bench: --max-seconds must be > 0\n")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch

    args.device = "cpu" if args.interpret else "cuda"
    if not args.interpret and not torch.cuda.is_available():
        print("fp4_kernel_bench: needs a CUDA GPU (or --interpret)", file=sys.stderr)
        return 2
    start = time.monotonic()
    deadline = start + args.max_seconds
    args.out.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []

    def log(line: str) -> None:
        stamped = f"[{time.monotonic() - start:6.1f} s] {line}"
        log_lines.append(stamped)
        print(stamped, flush=True)

    from workers.backends.base import BackendUnavailable
    from workers.backends.builtin import BuiltinBackend

    kernels = {"builtin": BuiltinBackend().describe(),
               "builtin/main": {"kernel_entry": "workers.moe.MoERunner with main's E2M1 decode (MAIN_DECODE_PTX)"}}
    ogs_backend = None
    if args.interpret:
        kernels["matmul_ogs"] = {"skipped": "not run under --interpret (triton_kernels needs a GPU)"}
    else:
        try:
            from workers.backends.triton_kernels import TritonKernelsBackend

            ogs_backend = TritonKernelsBackend()
            kernels["matmul_ogs"] = ogs_backend.describe()
        except BackendUnavailable as exc:
            kernels["matmul_ogs"] = {"unavailable": str(exc)}
    kernels["triton"] = {"version": __import__("triton").__version__, "torch": torch.__version__}
    for name, facts in kernels.items():
        log(f"kernel {name}: {facts}")

    folder = Path(tempfile.mkdtemp(prefix="fp4_bench_"))
    main_variant_moe(folder)  # writes the patched kernel file once, before any compile process reads it
    bandwidth = None
    if not args.interpret:
        log(compile_ahead(args.batch_sizes, folder, COMPILE_SHARE * args.max_seconds))
        bandwidth = copy_bandwidth(args.device)
        log(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    try:
        rows = measure(args, folder, ogs_backend, bandwidth, deadline, log)
    except Exception as exc:  # noqa: BLE001 - a run failure: say so, exit 1 after writing the log
        log(f"run failed: {type(exc).__name__}: {exc}")
        (args.out / "fp4_kernel_bench.log").write_text("\n".join(log_lines) + "\n", encoding="utf-8")
        return 1
    shape_args = TINY_SHAPE if args.interpret else GPU_SHAPE
    text = table(rows, args.batch_sizes)
    header = (f"builtin fp4 kernel vs matmul_ogs, shape {shape_args}, device "
              f"{torch.cuda.get_device_name() if not args.interpret else 'cpu (interpreter: timings meaningless)'}")
    (args.out / "fp4_kernel_bench.json").write_text(json.dumps(
        {"shape": shape_args, "kernels": kernels, "copy_bandwidth_Bps": bandwidth, "rows": [asdict(r) for r in rows]},
        indent=1), encoding="utf-8")
    (args.out / "fp4_kernel_bench.md").write_text(header + "\n\n" + text + "\n", encoding="utf-8")
    (args.out / "fp4_kernel_bench.log").write_text("\n".join(log_lines) + "\n", encoding="utf-8")
    print("\n" + header + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
