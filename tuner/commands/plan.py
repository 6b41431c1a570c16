"""``moe-tune plan``: list the tuning jobs a model, layout and dtypes need (no GPU needed)."""

from __future__ import annotations

import argparse
import json

from tuner.commands.arguments import (add_batch_sizes_argument, add_dtype_argument, add_layout_arguments,
                                      block_shape_arg, nonblank, positive_int)
from tuner.errors import OptionError, UsageError
from tuner.estimate import Estimate, default_compile_processes, estimate, format_estimate
from tuner.models import load_model
from tuner.naming import device_name_problem
from tuner.plan import BUILTIN_FP4_HELP, DevicePlan, build_plan
from tuner.search import STRATEGIES, SearchJob
from tuner.spaces import REASONS
from tuner.writers import FORMATS


def detect_device_name() -> str | None:
    """The local CUDA GPU's name as torch reports it, or None without one."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def resolve_device_name(given: str | None) -> str:
    """``--device-name`` when given (checked: ``tuner.naming.device_name_problem``), else this
    host's GPU; UsageError without either."""
    name = given if given is not None else detect_device_name()
    if name is None:
        raise UsageError('no CUDA GPU here: pass --device-name for the target GPU, e.g. --device-name "NVIDIA H200"')
    problem = device_name_problem(name)
    if problem:
        raise OptionError("device_name", problem, flagged=False)
    return name


def configure(parser: argparse.ArgumentParser) -> None:
    add_layout_arguments(parser, repeatable_model=True)
    add_dtype_argument(parser, "kernel dtype; default: each model's own")
    parser.add_argument("--block-shape", type=block_shape_arg, metavar="BN,BK",
                        help="fp8 weight block shape, e.g. 128,128")
    add_batch_sizes_argument(parser)
    parser.add_argument("--search-space", default="default", type=nonblank, metavar="NAME|PATH",
                        help="search space name (search_spaces/<name>.yaml) or YAML file")
    parser.add_argument("--device-name", help='target GPU as torch names it, e.g. "NVIDIA H200" (default: this GPU)')
    add_estimate_arguments(parser)
    parser.add_argument("--format", default="both", choices=FORMATS,
                        help="whose file names to show: vllm, sglang or both (default)")
    parser.add_argument("--disable-shared-experts-fusion", action="store_true",
                        help="SGLang runs with this flag: shared experts stay out of E")
    parser.add_argument("--builtin-fp4", action="store_true", help=BUILTIN_FP4_HELP)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def add_estimate_arguments(parser: argparse.ArgumentParser) -> None:
    """What the estimate needs to know about the tune to come."""
    parser.add_argument("--strategy", default="fast", choices=sorted(STRATEGIES),
                        help="search strategy to estimate (default: fast, as tune)")
    parser.add_argument("--workers", type=positive_int, default=1, metavar="N",
                        help="GPU workers the tune will have, for the time estimate (default 1)")
    parser.add_argument("--compile-processes", type=positive_int, metavar="N",
                        help="CPU compile processes on the GPU host, for the time estimate "
                             "(default: this host's CPUs less one per GPU worker)")


def plan_estimate(plan: DevicePlan, strategy: str, workers: int, compile_processes: int | None, routing: str = "uniform",
                  split_gemms: bool = False) -> Estimate:
    """The estimate of tuning ``plan`` with ``strategy`` (``tuner.estimate``)."""
    jobs = [SearchJob(job, routing) for job in plan.jobs]
    processes = compile_processes or default_compile_processes(workers)
    return estimate(jobs, strategy, workers, processes, split_gemms)


def _padding_text(padding) -> str:
    sizes = (("N", padding.N, padding.padded_N), ("K", padding.K, padding.padded_K))
    changed = [f"{name} {a} -> {b}" for name, a, b in sizes if a != b]
    return f"padded as the servers pad it: {', '.join(changed)} ({padding.rule})"


def format_plan(plan: DevicePlan, expected: Estimate | None = None) -> str:
    """A readable plan: per job its shape and file, then kept/dropped counts per batch size, the
    dtypes served by kernels without a config file, then what the strategy will measure and
    roughly how long it takes."""
    space = plan.space
    lines = [f"device {plan.device_name} · search space {space.name} ({space.size} configs)"]
    if plan.limits.note:
        lines.append(plan.limits.note)
    for job in plan.jobs:
        s = job.shape
        block = (f" group_size={s.group_size}" if s.group_size else
                 f" block_shape=[{s.block_shape[0]},{s.block_shape[1]}]" if s.block_shape else "")
        lines += [
            "",
            f"{job.model}: {s.dtype.value} E={s.E} N={s.N} K={s.K} topk={s.topk}{block} (tp={job.tp} ep={job.ep})",
        ]
        if job.sources:
            lines.append("  from: " + ", ".join(f"{q} {field}" for q, field in job.sources))
        if job.padding is not None and job.padding.padded:
            lines.append(f"  {_padding_text(job.padding)}")
        lines += [f"  {note}" for note in job.notes]
        if job.file_name:
            lines.append(f"  vLLM file:    {job.file_name}")
        if job.sglang_file_name:
            lines.append(f"  SGLang file:  triton_<X_Y_Z>/{job.sglang_file_name}")
        if job.builtin_file_name:
            lines.append(f"  builtin file: {job.builtin_file_name}")
        reasons = [r for r in REASONS if any(r in d for d in job.dropped_by_reason.values())]
        header = ["M", "kept"] + [f"-{r}" for r in reasons]
        rows = [[str(M), str(len(kept))] + [str(job.dropped_by_reason[M].get(r, 0)) for r in reasons]
                for M, kept in job.candidates.items()]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append("  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    for entry in plan.served_elsewhere:
        s = entry.shape
        lines += ["", f"{entry.model}: {s.dtype.value} E={s.E} N={s.N} K={s.K} topk={s.topk} "
                      f"(tp={entry.tp} ep={entry.ep}): no fused-MoE config file to tune for"]
        if entry.padding is not None and entry.padding.padded:
            lines.append(f"  {_padding_text(entry.padding)}")
        lines += [f"  {k.server} runs {k.why}" for k in entry.servers]
    total_before = space.size * sum(len(job.candidates) for job in plan.jobs)
    lines += ["", f"{len(plan.jobs)} job(s): {plan.total_candidates} configs left after pruning "
                  f"({total_before} before)"]
    if expected is not None and plan.jobs:  # nothing to measure: no estimate of it
        lines.append(format_estimate(expected))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    models = [load_model(m) for m in args.model]  # a bad model is named before the GPU is asked for
    plan = build_plan(
        models=models, tp=args.tp, ep=args.ep, dtypes=args.dtype, block_shape=args.block_shape,
        batch_sizes=args.batch_sizes, space=args.search_space, device_name=resolve_device_name(args.device_name),
        formats=args.format, fuse_shared_experts=not args.disable_shared_experts_fusion,
        builtin_fp4=args.builtin_fp4,
    )
    expected = plan_estimate(plan, args.strategy, args.workers, args.compile_processes)
    print(json.dumps({**plan.to_json(), "estimate": expected.to_json()}, indent=2) if args.json
          else format_plan(plan, expected))
    return 0
