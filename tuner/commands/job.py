"""``moe-tune job validate|run JOB.yaml``: the nightly entry point (``ray job submit -- moe-tune job run``).

``validate`` checks everything that can be checked without a GPU (the spec's fields, every
model × layout × dtype shape, the search space, routing, the strategy) and
exits 0 or 2. ``run`` validates the same way and each tune run as ``moe-tune tune`` would (its
``TuneOptions``, built from the spec), then, in one Ray session, runs the tunes in order and, when
the spec has a gate, benches the fresh configs against the reference folder on one GPU worker, each
routing's configs (its own subfolder when the spec has several routings) under that routing. Exit 1
when a tune failed (the gate is then skipped: half a run proves nothing) or the gate failed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tuner import bench
from tuner.commands import tune
from tuner.commands.arguments import check_interpret_limits
from tuner.errors import RunFailed, UsageError
from tuner.jobspec import JobSpec, Layout, TuneRun, gate_checks, load_job_spec, routing_folder, tune_runs
from tuner.models import derive_shape, load_model
from tuner.plan import nothing_to_tune, plan, resolve_batch_sizes
from tuner.ray_session import RaySession, ray_session
from tuner.spaces import load_space
from workers.formats import format_of
from workers.records import DType, MoEShape
from workers.routing import parse_routing


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    for name, text in (("validate", "check a job spec (no GPU); exit 0 or 2"),
                       ("run", "run every tune of a job spec, then its bench gate")):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("spec", type=Path, metavar="JOB.yaml")


def _shapes(spec: JobSpec) -> dict[tuple[str, Layout, DType], MoEShape]:
    """Every (model, layout, dtype) shape; a model or layout that does not fit fails here."""
    shapes = {}
    for model in spec.models:
        model_spec = load_model(model)
        for layout in spec.layouts:
            for dtype in spec.dtypes:
                block = spec.block_shape if format_of(dtype).block_shapes else None
                shapes[(model, layout, dtype)] = derive_shape(model_spec, tp=layout.tp, ep=layout.ep, dtype=dtype,
                                                              block_shape=block)
    return shapes


def validate(spec: JobSpec) -> tuple[list[TuneRun], dict]:
    shapes = _shapes(spec)
    folders: dict[str, str] = {}
    for routing in spec.routing:
        try:
            parse_routing(routing)
        except ValueError as exc:
            raise UsageError(f"routing: {exc}") from None
        if routing_folder(routing) in folders:
            raise UsageError(f"routing: {folders[routing_folder(routing)]!r} and {routing!r} are the same routing")
        folders[routing_folder(routing)] = routing
    if spec.search_space:
        load_space(str(spec.search_space))
    if spec.interpret:
        check_interpret_limits(list(shapes.values()), resolve_batch_sizes(spec.batch_sizes))
    if spec.output.dir.exists() and not spec.output.dir.is_dir():
        raise UsageError(f"output.dir {spec.output.dir}: exists and is not a folder")
    runs = tune_runs(spec)
    for tune_run in runs:
        options = tune_run.options
        planned = plan(options.model, options.tp, options.ep, options.dtype, options.block_shape,
                       options.batch_sizes, options.search_space, builtin_fp4=options.builtin_fp4)
        preflight = planned.for_device(tune.PREFLIGHT_DEVICE)
        if not preflight.jobs:  # e.g. mxfp4 alone: no server reads a fused-MoE file for it
            raise UsageError(f"{tune_run.label}: {nothing_to_tune(preflight)}")
    return runs, shapes


def _gate(spec: JobSpec, shapes: dict, session: RaySession) -> list[str]:
    gate = spec.gate
    batch_sizes = resolve_batch_sizes(gate.batch_sizes or spec.batch_sizes)
    regressions: list[str] = []
    with bench.bench_pool() as pool:
        for check in gate_checks(spec):
            shape = shapes[(check.model, check.layout, check.dtype)]
            variants, reference = bench.variants_for([check.fresh], gate.reference)
            result = bench.bench_on(pool, shape, variants, reference, batch_sizes, check.routing, gate.rounds)
            print(f"gate {check.label}", file=session.stdout)
            print(bench.format_table(result, gate.fail_if_slower), file=session.stdout, flush=True)
            regressions += [f"{check.label}: {line}" for line in result.regressions(gate.fail_if_slower)]
    return regressions


def run(args: argparse.Namespace) -> int:
    spec = load_job_spec(args.spec)
    runs, shapes = validate(spec)
    if args.action == "validate":
        gate = f"; gate vs {spec.gate.reference} at {spec.gate.fail_if_slower}" if spec.gate else ""
        print(f"{args.spec}: valid: {len(runs)} tune run(s), {len(shapes)} shape(s){gate}")
        return 0
    if spec.gate is not None and not spec.gate.reference.is_dir():
        raise UsageError(f"gate.reference {spec.gate.reference}: not a folder (an empty folder gates against "
                         "vLLM's default heuristic)")

    tunes = [(tune_run, tune.validate(tune_run.options)) for tune_run in runs]
    with ray_session(spec.address, spec.interpret, spec.workers) as session:
        failed = []
        for index, (tune_run, valid) in enumerate(tunes, 1):
            print(f"job {spec.name}: tune {index}/{len(runs)}: {tune_run.label}", file=session.stdout, flush=True)
            try:
                tune.tune_in_session(tune_run.options, valid, session)
            except RunFailed as exc:
                print(f"job {spec.name}: tune {tune_run.label} failed: {exc}", file=session.stdout, flush=True)
                failed.append(tune_run.label)
        if failed:
            raise RunFailed(f"{len(failed)} of {len(runs)} tune runs failed ({failed[0]}, ...); gate skipped")
        if spec.gate is None:
            print(f"job {spec.name}: {len(runs)} tune run(s) done; no gate", file=session.stdout)
            return 0
        regressions = _gate(spec, shapes, session)
    if regressions:
        raise RunFailed(f"gate failed at {len(regressions)} point(s): {regressions[0]}")
    print(f"job {spec.name}: {len(runs)} tune run(s) done; gate passed")
    return 0
