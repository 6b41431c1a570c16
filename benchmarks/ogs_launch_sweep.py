"""Which of triton_kernels' matmul_ogs launch choices matter for an MoE shape, measured on one GPU.

matmul_ogs derives its launch flags per call (``matmul_ogs_details/opt_flags``); on NVIDIA GPUs a
caller can pin block_m, block_k, split_k, num_stages, is_persistent, fused_scatter,
epilogue_subtile and idle_sms, process-wide. vLLM and SGLang pin only split_k=1 on Hopper, in
code: no file, flag or variable lets a user hand them other values. This script measures, one
factor at a time on top of the servers' setting, how far each pinned value moves the whole MoE call
(routing + both GEMMs, ``workers.backends.triton_kernels``) away from the heuristic, so the answer
to "is tuning them worth anything" has numbers behind it. Every variant's output is checked
against the fp32 reference (gpt-oss's SwiGLU) before it is timed; a variant that fails or is
refused is reported as such.

    PYTHONPATH=.:.server-kernels python3 benchmarks/ogs_launch_sweep.py --out $OUT      # gpt-oss-120b TP1 mxfp4
    python3 benchmarks/ogs_launch_sweep.py --dry        # list the variants (no GPU needed)

Writes ``ogs_sweep.csv`` (M, variant, µs, spread, rel. error or the failure) under --out and prints
per M the heuristic's time, the best variant and its ratio, last. Each variant compiles its own
kernels (block_m also follows M), so a cold run takes minutes: ``--max-seconds`` (default 480)
stops starting new variants in time to write what was measured.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

SERVER_CONSTRAINTS = {"split_k": 1}  # vLLM's and SGLang's on Hopper
FACTORS = {
    "block_m": (16, 32, 64, 128),
    "block_k": (64, 128, 256),
    "num_stages": (1, 2, 3, 4),
    "split_k": (2, 4),
}


def variants() -> list[tuple[str, dict]]:
    """("heuristic", servers' constraints) first, then one factor changed at a time."""
    out = [("heuristic", dict(SERVER_CONSTRAINTS))]
    for name, values in FACTORS.items():
        out += [(f"{name}={v}", {**SERVER_CONSTRAINTS, name: v}) for v in values]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="128,2880,2880,4", metavar="E,N,K,TOPK",
                        help="per-GPU MoE shape (default gpt-oss-120b TP1)")
    parser.add_argument("--dtype", default="mxfp4", choices=("mxfp4", "bf16"))
    parser.add_argument("--batch-sizes", default="1,16,64,256,1024,4096", metavar="M,M,...")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for ogs_sweep.csv")
    parser.add_argument("--max-seconds", type=float, default=480.0,
                        help="stop starting variants after this long and report what was measured (default 480)")
    parser.add_argument("--dry", action="store_true", help="list the variants and exit (no GPU)")
    args = parser.parse_args(argv)
    try:
        E, N, K, topk = (int(v) for v in args.shape.split(","))
        batch_sizes = [int(v) for v in args.batch_sizes.split(",")]
    except ValueError:
        print(f"ogs_launch_sweep: bad --shape or --batch-sizes: {args.shape!r} {args.batch_sizes!r}", file=sys.stderr)
        return 2
    if args.dry:
        for name, constraints in variants():
            print(f"{name}: {constraints}")
        return 0

    import time

    import torch

    from workers.backends.triton_kernels import TritonKernelsBackend, _module
    from workers.problem import ERROR_BOUNDS, build_problem, rel_error
    from workers.records import DType, MoEShape
    from workers.timing import time_call

    if not torch.cuda.is_available():
        print("ogs_launch_sweep: needs a CUDA GPU (use --dry to list the variants)", file=sys.stderr)
        return 2
    backend = TritonKernelsBackend()
    opt_flags = _module(backend.package, "matmul_ogs_details.opt_flags")
    shape = MoEShape(E=E, N=N, K=K, topk=topk, dtype=DType(args.dtype))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"kernel: {backend.describe()}", flush=True)
    deadline = time.monotonic() + args.max_seconds
    for M in batch_sizes:
        if time.monotonic() > deadline:
            print(f"time limit: M={M} and above not measured", flush=True)
            break
        problem = build_problem(shape, M, seed=M, device="cuda", activation=backend.activation)
        runner = backend.runner(problem, None)
        for name, constraints in variants():
            if time.monotonic() > deadline:
                break
            opt_flags.reset_opt_flags_constraints()
            opt_flags.update_opt_flags_constraints(constraints)
            try:
                error = rel_error(runner.run(), problem.reference)
                if not error <= ERROR_BOUNDS[shape.dtype]:
                    rows.append((M, name, None, None, f"wrong result {error:.2e}"))
                    continue
                timing = time_call(runner.run, "cuda")
                rows.append((M, name, timing.median_us, timing.spread_us, f"{error:.2e}"))
            except Exception as exc:  # noqa: BLE001 - a refused or failing variant is a result here
                rows.append((M, name, None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
            print(rows[-1], flush=True)
        del problem, runner
    opt_flags.reset_opt_flags_constraints()
    opt_flags.update_opt_flags_constraints(SERVER_CONSTRAINTS)
    with open(args.out / "ogs_sweep.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["M", "variant", "us", "spread_us", "rel_err_or_failure"])
        writer.writerows(rows)
    print(f"\n{shape.label}: µs per MoE call, heuristic (servers' split_k=1) vs the best single change")
    print(f"{'M':>5} {'heuristic':>10} {'best variant':>16} {'best µs':>9} {'ratio':>6}")
    for M in batch_sizes:
        timed = [(us, name) for m, name, us, _, _ in rows if m == M and us is not None]
        base = next((us for us, name in timed if name == "heuristic"), None)
        if base is None or not timed:
            print(f"{M:>5} {'—':>10}")
            continue
        best_us, best = min(timed)
        print(f"{M:>5} {base:>10.1f} {best:>16} {best_us:>9.1f} {base / best_us:>5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
