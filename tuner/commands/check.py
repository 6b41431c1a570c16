"""``moe-tune check``: run the fused-MoE kernel for each dtype and batch size and compare its output
with the fp32 reference (``workers.reference``); exit 1 when any error exceeds its dtype's bound
(``workers.problem.ERROR_BOUNDS``).

On a CUDA GPU by default; ``--interpret`` runs the Triton interpreter on the CPU instead (slow:
use a tiny ``--shape``). Without ``--config`` each M runs vLLM's fallback config for the shape.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tuner.commands.arguments import (add_batch_sizes_argument, add_dtype_argument, block_shape_arg,
                                      check_interpret_limits, group_size_arg, int_list, nonblank)
from tuner.errors import RunFailed, UsageError
from tuner.validation import parse_json
from workers.formats import block_shape_dtypes, format_of, shape_rule_broken
from workers.records import INT4_DEFAULT_GROUP, Config, DType, MoEShape

def configure(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=nonblank, metavar="NAME|PATH", help="preset name, config.json, model folder or cached HF repo id")
    source.add_argument("--shape", type=int_list, metavar="E,N,K,TOPK",
                        help="experts, intermediate size per GPU, hidden size, top-k")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (with --model)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size, dividing --tp (with --model)")
    add_dtype_argument(parser, "kernel dtype; default: the model's own, or bf16 with --shape")
    parser.add_argument("--block-shape", type=block_shape_arg, metavar="BN,BK", help="fp8 weight block shape, e.g. 128,128")
    parser.add_argument("--group-size", type=group_size_arg, metavar="G",
                        help=f"int4_w4a16 scale group along K with --shape (default {INT4_DEFAULT_GROUP}; -1: per row)")
    add_batch_sizes_argument(parser, default=(1, 7, 33))
    parser.add_argument("--config", metavar="JSON|PATH",
                        help="one kernel config for every M: a JSON object with the six keys, inline or in a file")
    parser.add_argument("--interpret", action="store_true", help="run the Triton interpreter on the CPU (no GPU needed)")


def run(args: argparse.Namespace) -> int:
    dtypes = args.dtype
    shapes = _shapes(args, dtypes)
    config = _parse_config(args.config) if args.config else None
    if args.interpret and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError("--interpret needs TRITON_INTERPRET=1 before Triton is imported (moe-tune sets it)")
    if args.interpret:
        check_interpret_limits(shapes, args.batch_sizes)
    for shape in shapes:
        if config is not None:
            _validate(config, shape, "--config")
        else:
            from workers.default_config import default_config

            for M in args.batch_sizes:
                _validate(default_config(shape, M), shape, "the default config (vLLM's, as no --config was given)")
    if not args.interpret:
        import torch

        if not torch.cuda.is_available():
            raise RunFailed("no CUDA GPU visible; pass --interpret to run the Triton interpreter on the CPU")
    return run_checks(shapes, args.batch_sizes, config, "cpu" if args.interpret else "cuda")


def run_checks(shapes: list[MoEShape], batch_sizes: list[int], config: Config | None, device: str) -> int:
    """Print error vs bound per shape and M; 1 when any exceeds its bound, else 0."""
    from workers.default_config import default_config
    from workers.moe import fused_moe
    from workers.problem import ERROR_BOUNDS, build_problem, release_weights, rel_error

    print(f"device: {device_label(device)}", flush=True)
    failures = 0
    for shape in shapes:
        print(f"\n{shape.label}")
        print(f"  {'M':>6}  {'rel. error':>10}  {'bound':>7}  result  config", flush=True)
        for M in batch_sizes:
            used = config or default_config(shape, M)
            problem = build_problem(shape, M, device=device)
            out = fused_moe(problem.x, problem.w13, problem.w2, problem.topk_weights, problem.topk_ids, used)
            error, bound = rel_error(out, problem.reference), ERROR_BOUNDS[shape.dtype]
            passed = error <= bound
            failures += not passed
            print(f"  {M:>6}  {error:>10.3e}  {bound:>7.1e}  {'ok' if passed else 'FAIL':<6}  {used.label}", flush=True)
        release_weights()
    print(f"\n{'all within bounds' if not failures else f'{failures} check(s) exceed their bound'}")
    return 1 if failures else 0


def device_label(device: str) -> str:
    import torch
    import triton

    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (Triton interpreter)"
    return f"{name} · torch {torch.__version__} · triton {triton.__version__}"


def _shapes(args: argparse.Namespace, dtypes: list[DType] | None) -> list[MoEShape]:
    if args.model:
        from tuner.models import derive_shape, load_model

        spec = load_model(args.model)
        return [derive_shape(spec, args.tp, args.ep, dtype, args.block_shape) for dtype in (dtypes or [None])]
    if len(args.shape) != 4 or min(args.shape) < 1:
        raise UsageError(f"--shape needs four positive integers E,N,K,TOPK, got {args.shape}")
    if args.tp != 1 or args.ep != 1:
        raise UsageError("--tp/--ep apply to --model; --shape is already one GPU's shape")
    E, N, K, topk = args.shape
    if topk > E:
        raise UsageError(f"--shape: top-k {topk} exceeds the {E} experts")
    shapes = []
    if args.group_size is not None and DType.INT4_W4A16 not in (dtypes or []):
        raise UsageError("--group-size applies to int4_w4a16; add --dtype int4_w4a16")
    for dtype in dtypes or [DType.BF16]:
        if args.block_shape is not None and not format_of(dtype).block_shapes:
            raise UsageError(f"--block-shape applies to {', '.join(block_shape_dtypes())} only, not {dtype.value}")
        block = args.block_shape
        if dtype is DType.INT4_W4A16:
            int4_group = args.group_size if args.group_size is not None else INT4_DEFAULT_GROUP
            if int4_group != -1 and (int4_group < 2 or K % int4_group or N % int4_group):
                raise UsageError(f"int4_w4a16 needs K and N multiples of the group size {int4_group} (K={K}, N={N}); "
                                 f"pass --group-size")
            block = (0, int4_group)
        problem = shape_rule_broken(dtype, N, K)
        if problem:
            raise UsageError(problem)
        shapes.append(MoEShape(E=E, N=N, K=K, topk=topk, dtype=dtype, block_shape=block))
    return shapes


def _parse_config(text: str) -> Config:
    path = Path(text)
    try:
        raw = parse_json(path.read_text(encoding="utf-8") if not text.lstrip().startswith("{") and path.is_file()
                         else text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"--config: not a JSON object or a readable JSON file ({exc})") from None
    if not isinstance(raw, dict):
        raise UsageError("--config: expected a JSON object with the six config keys")
    try:
        return Config.from_dict(raw)
    except ValueError as exc:
        raise UsageError(f"--config: {exc}") from None


def _validate(config: Config, shape: MoEShape, what: str) -> None:
    from workers.fused_moe_kernel import validate_config

    try:
        validate_config(config, shape.dtype, shape.block_shape)
    except ValueError as exc:
        block = f" with block shape {list(shape.block_shape)}" if shape.block_shape else ""
        raise UsageError(f"{what} cannot run {shape.dtype.value}{block}: {exc}") from None
