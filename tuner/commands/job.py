"""``moe-tune job validate|run JOB.yaml`` and ``moe-tune job keys``: the nightly entry point
(``ray job submit -- moe-tune job run``).

``validate`` makes every check ``run`` makes before it starts (the spec's fields, every
model × layout × dtype shape, the routings, the search space, then each tune run exactly as
``moe-tune tune`` checks its input — its ``TuneOptions`` built from the spec: models, search
space, routing files, output and journal locations, baseline folders — and the gate's reference
folder) and exits 0 or 2. ``run`` validates the same way, then, in one Ray session, runs the tunes
in order and, when the spec has a gate, benches the fresh configs against the reference folder on
one GPU worker per kernel, each routing's configs (its own subfolder when the spec has several
routings) under that routing, on the kernel the tune run that wrote them tuned on (the job's
``kernel``, resolved per run as tune resolves it), at the shape of the server whose file the gate
reads (vLLM's for ``format: vllm`` or ``both``, SGLang's for ``sglang``). Exit 1 when a tune failed (the gate is then skipped: half a run proves
nothing) or the gate failed. ``keys`` prints the reference of every spec key.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tuner import bench, kernel_choice
from tuner.commands import tune
from tuner.commands.arguments import interpret_batch_problem, interpret_shape_problem
from tuner.errors import OptionError, RunFailed, UsageError
from tuner.jobspec import (GateCheck, JobSpec, Layout, TuneRun, gate_checks, load_job_spec, output_dir,
                           reference_markdown, routing_folder, tune_runs)
from tuner.models import derive_shape, dtype_block_shape, load_model
from tuner.plan import resolve_batch_sizes
from tuner.ray_session import RaySession, cluster_address, ray_session
from tuner.spaces import load_space
from workers.records import DType, MoEShape
from workers.routing import pin_file


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    for name, text in (("validate", "check a job spec (no GPU); exit 0 or 2"),
                       ("run", "run every tune of a job spec, then its bench gate")):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("spec", type=Path, metavar="JOB.yaml",
                            help="the job spec (YAML; every key: moe-tune job keys)")
    actions.add_parser("keys", help="print every job spec key (Markdown)",
                       description="print every job spec key, its type, default and meaning (Markdown)")


def gate_server(spec: JobSpec) -> str:
    """The server whose file the gate reads in the fresh folder (``tuner.writers.server_file``
    looks for vLLM's first): SGLang only for ``format: sglang``."""
    return "sglang" if spec.output.format == "sglang" else "vllm"


TUNE_OPTION_KEYS = {"model": "models", "out": "output.dir", "format": "output.format", "journal": "journal",
                    "baseline": "baseline", "routing": "routing", "search_space": "search_space",
                    "server_version": "server_version", "kernel": "kernel", "block_shape": "block_shape",
                    "dtype": "dtypes", "batch_sizes": "batch_sizes", "interpret": "interpret", "tp": "layouts",
                    "ep": "layouts", "workers": "workers", "budget_minutes": "budget_minutes", "strategy": "strategy",
                    "address": "address", "connect_timeout": "connect_timeout"}
"""The spec key of each ``tuner.options.TuneOptions`` field a job sets: a refusal of a job's tune
run (an ``OptionError``, ``tune.validate``) names the key of the option it is about."""


class SpecError(UsageError):
    """Bad input in a job spec, naming the key (pydantic's location form, ``layouts.1``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def _keyed(exc: UsageError, key: str, indices: dict[str, int] | None = None) -> SpecError:
    """``exc`` as a SpecError: an OptionError about a tune option the spec sets names that option's
    spec key (``TUNE_OPTION_KEYS``; a list key with the index the error gives, else the one in
    ``indices``: a tune run's ``layouts`` and ``routing`` entries), any other error ``key``."""
    if isinstance(exc, SpecError):
        return exc
    if isinstance(exc, OptionError) and exc.option in TUNE_OPTION_KEYS:
        spec_key = TUNE_OPTION_KEYS[exc.option]
        index = exc.index if exc.index is not None else (indices or {}).get(spec_key)
        return SpecError(spec_key if index is None else f"{spec_key}.{index}", exc.reason)
    return SpecError(key, str(exc))


def _shapes(spec: JobSpec) -> dict[tuple[str, Layout, DType], MoEShape]:
    """Every (model, layout, dtype) shape as ``gate_server``'s kernel runs it, with each model's own
    dtype where the spec names none (as ``tune`` without ``--dtype``). A model that does not load
    is refused naming ``models.<i>``, a layout it does not split over ``layouts.<j>``, a dtype that
    does not fit ``dtypes.<k>`` (``block_shape`` where the block is what does not fit)."""
    shapes = {}
    server = gate_server(spec)
    for i, model in enumerate(spec.models):
        try:
            model_spec = load_model(model)
        except UsageError as exc:
            raise _keyed(exc, f"models.{i}") from None
        for j, layout in enumerate(spec.layouts):
            derive = partial(derive_shape, model_spec, tp=layout.tp, ep=layout.ep, server=server)
            try:  # the layout alone, in the one dtype every model runs
                derive(dtype=DType.BF16)
            except UsageError as exc:
                raise SpecError(f"layouts.{j}", f"{exc} (tp: {layout.tp}, ep: {layout.ep})") from None
            for k, dtype in enumerate(spec.dtypes or [None]):
                block = dtype_block_shape(dtype, spec.block_shape)
                try:
                    shape = derive(dtype=dtype, block_shape=block)
                except UsageError as exc:
                    if dtype is None:
                        raise SpecError(f"models.{i}", f"{exc} (no dtypes in the spec: the model's own)") from None
                    if block is not None:
                        try:
                            derive(dtype=dtype)
                        except UsageError:
                            pass
                        else:
                            raise SpecError("block_shape", f"{exc} (layouts.{j}, dtypes.{k})") from None
                    raise SpecError(f"dtypes.{k}", f"{exc} (layouts.{j})") from None
                shapes[(model, layout, shape.dtype)] = shape
    return shapes


def _dtypes_by_model(shapes: dict[tuple[str, Layout, DType], MoEShape]) -> dict[str, list[DType]]:
    out: dict[str, list[DType]] = {}
    for model, _layout, dtype in shapes:
        if dtype not in out.setdefault(model, []):
            out[model].append(dtype)
    return out


@dataclass(frozen=True)
class GateBench:
    """One gate check as it is benched: ``shape`` timed on ``kernel`` (a ``workers.backends``
    name), folders without a file falling back to the default ``rule``
    (``workers.default_config``)."""

    check: GateCheck
    shape: MoEShape
    kernel: str
    rule: str


def gate_benches(spec: JobSpec, tunes: list[tuple[TuneRun, "tune.Validated"]],
                 shapes: dict[tuple[str, Layout, DType], MoEShape]) -> list[GateBench]:
    """The gate's benches (none without a gate): each check on the kernel the tune run of its
    layout and routing tuned ``gate_server``'s files on (that run's resolved ``--kernel``), with
    the default rule ``moe-tune bench --server`` would take for that server and kernel (the spec's
    ``server_version``, else that server's rule; ``kernel_choice.default_rule``). UsageError when that rule
    cannot be placed."""
    if spec.gate is None:
        return []
    server = gate_server(spec)
    kernels = {(run.layout, run.routing): next(k.kernel for k in valid.runs
                                                if k.server_files and k.format in (server, "both"))
               for run, valid in tunes}
    try:
        rules = {kernel: kernel_choice.default_rule(kernel, spec.server_version, server)
                 for kernel in set(kernels.values())}
    except UsageError as exc:
        raise _keyed(exc, "server_version") from None
    benches = []
    for check in gate_checks(spec, _dtypes_by_model(shapes)):
        kernel = kernels[check.layout, check.routing]
        benches.append(GateBench(check, shapes[(check.model, check.layout, check.dtype)], kernel, rules[kernel]))
    return benches


def validate(spec: JobSpec, source: str | None = None
             ) -> tuple[list[tuple[TuneRun, "tune.Validated"]], dict, list[GateBench]]:
    """Every check ``job run`` makes before it starts; on the first failing one a UsageError of one
    line, ``<source>: <key>: <why>``, the key in pydantic's location form (``layouts.1``,
    ``gate.reference``; ``source``: the spec file). Returns each tune run with its validation,
    every (model, layout, dtype) shape, and the gate's benches."""
    try:
        return _validate(spec)
    except UsageError as exc:
        keyed = _keyed(exc, "(spec)")
        raise UsageError(f"{source}: {keyed}" if source else str(keyed)) from None


def _validate(spec: JobSpec) -> tuple[list[tuple[TuneRun, "tune.Validated"]], dict, list[GateBench]]:
    try:
        cluster_address(spec.address)
    except OptionError as exc:
        raise SpecError("address", exc.reason) from None
    except UsageError as exc:  # RAY_ADDRESS, taken where the spec sets no address or auto
        raise SpecError("address", f"{spec.address}: {exc}" if spec.address else f"not set, and {exc}") from None
    for index, layout in enumerate(spec.layouts):
        if layout in spec.layouts[:index]:
            raise SpecError(f"layouts.{index}", f"repeats layouts.{spec.layouts.index(layout)} ({layout.label}): "
                                                "each layout is one tune run")
    shapes = _shapes(spec)
    folders: dict[str, str] = {}
    for index, routing in enumerate(spec.routing):
        try:
            pin_file(routing)  # parsed, and a file: routing's file read
        except ValueError as exc:
            raise SpecError(f"routing.{index}", str(exc)) from None
        if routing_folder(routing) in folders:
            raise SpecError(f"routing.{index}", f"{folders[routing_folder(routing)]!r} and {routing!r} are the same "
                                                "routing")
        folders[routing_folder(routing)] = routing
    for index, folder in enumerate(spec.baseline):
        if not folder.is_dir():
            raise SpecError(f"baseline.{index}", f"{folder}: not a folder")
    if spec.search_space:
        try:
            load_space(str(spec.search_space))
        except UsageError as exc:
            raise SpecError("search_space", str(exc)) from None
    if spec.interpret:
        problem = interpret_shape_problem(shapes.values())
        if problem:
            raise SpecError("interpret", problem.replace("--interpret", "interpret: true", 1))
        problem = interpret_batch_problem(resolve_batch_sizes(spec.batch_sizes))
        if problem:
            hint = "; the default batch sizes go further: set batch_sizes" if spec.batch_sizes is None else ""
            raise SpecError("batch_sizes", problem.replace("--interpret", "interpret: true", 1) + hint)
    tunes = []
    for tune_run in tune_runs(spec):
        try:
            tunes.append((tune_run, tune.validate(tune_run.options)))
        except UsageError as exc:
            indices = {"layouts": spec.layouts.index(tune_run.layout), "routing": spec.routing.index(tune_run.routing)}
            raise _keyed(exc, f"layouts.{indices['layouts']}", indices) from None
    if spec.gate is not None and not spec.gate.reference.is_dir():
        raise SpecError("gate.reference", f"{spec.gate.reference}: not a folder (create it: an empty folder gates "
                                          "against the server's default config)")
    if spec.gate is not None:
        written = {spec.output.dir.resolve(), *(output_dir(spec, r).resolve() for r in spec.routing)}
        if spec.gate.reference.resolve() in written:
            raise SpecError("gate.reference", f"{spec.gate.reference}: the folder the job writes its configs to "
                                              "(output.dir): the gate would time them against themselves")
    return tunes, shapes, gate_benches(spec, tunes, shapes)


def _gate(spec: JobSpec, benches: list[GateBench], session: RaySession) -> list[str]:
    """Run the gate's benches, one GPU worker per kernel; the regressions, one line each."""
    gate = spec.gate
    batch_sizes = resolve_batch_sizes(gate.batch_sizes or spec.batch_sizes)
    regressions: list[str] = []
    read = bench.FolderReader()  # the reference (and each routing's fresh folder) read once for every check
    for kernel in dict.fromkeys(b.kernel for b in benches):
        with bench.bench_pool(kernel=kernel) as pool:
            for planned in [b for b in benches if b.kernel == kernel]:
                check = planned.check
                variants, reference = bench.variants_for([check.fresh], gate.reference, read)
                result = bench.bench_on(pool, planned.shape, variants, reference, batch_sizes, check.routing,
                                        gate.rounds, planned.rule)
                print(f"gate {check.label}", file=session.stdout)
                print(bench.format_table(result, gate.fail_if_slower), file=session.stdout, flush=True)
                regressions += [f"{check.label}: {line}" for line in result.regressions(gate.fail_if_slower)]
    return regressions


def run(args: argparse.Namespace) -> int:
    if args.action == "keys":
        print(reference_markdown(), end="")
        return 0
    spec = load_job_spec(args.spec)
    tunes, shapes, benches = validate(spec, str(args.spec))
    tune.print_warnings([valid for _, valid in tunes])  # after every check: refused input stays one line
    runs = [tune_run for tune_run, _ in tunes]
    if args.action == "validate":
        gate = f"; gate vs {spec.gate.reference} at {spec.gate.fail_if_slower}" if spec.gate else ""
        print(f"{args.spec}: valid: {len(runs)} tune run(s), {len(shapes)} shape(s){gate}")
        return 0

    with ray_session(spec.address, spec.interpret, spec.workers, spec.connect_timeout) as session:
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
        regressions = _gate(spec, benches, session)
    if regressions:
        raise RunFailed(f"gate failed at {len(regressions)} point(s): {regressions[0]}")
    print(f"job {spec.name}: {len(runs)} tune run(s) done; gate passed")
    return 0
