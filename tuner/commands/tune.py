"""``moe-tune tune``: tune configs on GPU workers through Ray and write the server's files.

Everything the user gave is validated here, before Ray starts and before anything is written:
models, layout, dtypes, batch sizes, the search space, routing, the output and journal paths
(each folder is probed: a file is created, written, renamed and removed there), that no live
run holds the journal, config files already in ``--out`` that writing would refuse (where the
device name is known before Ray starts: ``known_device_name``), and (with ``--interpret``) that
the shapes are small enough for the CPU interpreter.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from tuner import driver, kernel_choice, writers
from tuner.baseline import Baseline
from tuner.bench import ratio_convention
from tuner.commands.arguments import (add_batch_sizes_argument, add_dtype_argument, add_fresh_arguments,
                                      add_layout_arguments, block_shape_arg, check_interpret_limits,
                                      check_output_location, check_routing_file, confirm_fresh, nonblank, path_arg,
                                      positive_float, positive_int, routing_arg)
from tuner.commands.plan import format_plan, plan_estimate, resolve_device_name
from tuner.errors import OptionError, RunFailed, UsageError, about
from tuner.dispatch import SERVER_READ_DTYPES
from tuner.journal import JOURNAL_NAME, JournalBusy, check_not_busy, count_measurements, not_a_journal
from tuner.models import load_model
from tuner.options import TuneOptions
from tuner.select import BASELINE_MARGIN
from tuner.plan import BUILTIN_FP4_HELP, DEFAULT_BATCH_SIZES, DevicePlan, Plan, nothing_to_tune, plan
from tuner.progress import Progress, format_duration
from tuner.ray_session import (DEFAULT_CONNECT_TIMEOUT_S, INTERPRET_NUM_GPUS, RaySession, cluster_address,
                                ray_session)
from tuner.search import STRATEGIES, SearchJob
from tuner.spaces import load_space
from tuner.timeline import Timeline
from tuner.writers import FORMATS, partial_file_warnings, probe_writable
from workers import backends
from workers.backends.base import describe_label
from workers.records import MoEShape, Status
from workers.routing import parse_routing, pin_file

PREFLIGHT_DEVICE = "preflight"
"""Device name for the validation plan made before any worker exists (generic limits);
each device group is planned again under its own name once the workers report it."""


def configure(parser: argparse.ArgumentParser) -> None:
    add_layout_arguments(parser, repeatable_model=True)
    add_dtype_argument(parser, "kernel dtype; default: each model's own")
    parser.add_argument("--block-shape", type=block_shape_arg, metavar="BN,BK", help="fp8 weight block shape")
    add_batch_sizes_argument(parser)
    parser.add_argument("--search-space", type=nonblank, metavar="NAME|PATH",
                        help="search space name (search_spaces/<name>.yaml) or YAML file")
    parser.add_argument("--routing", type=routing_arg, help="uniform (default), zipf:<alpha> or file:<topk_ids.pt|.npy>")
    parser.add_argument("--strategy", choices=sorted(STRATEGIES),
                        help="fast (default: cost model, neighbours, local search) or exhaustive (every pruned config)")
    parser.add_argument("--budget-minutes", type=positive_float, metavar="MINUTES",
                        help="stop searching this long after the first measurement (Ray and worker start-up "
                             "are not counted) and write the best found so far")
    parser.add_argument("--baseline", action="append", type=path_arg, metavar="DIR",
                        help="config folder a server uses today (vLLM's shipped JSONs, last night's output; "
                             "repeatable): its config at each M is always timed against the winner, and the "
                             "summary reports the ratio")
    parser.add_argument("--split-gemms", action="store_true",
                        help="also tune the up and down GEMMs apart (SGLang's _down files; the summary reports the gain)")
    parser.add_argument("--no-compile-ahead", action="store_true",
                        help="let the GPU workers compile for themselves instead of CPU processes ahead of them")
    parser.add_argument("--compile-timeout", type=positive_float, metavar="SECONDS",
                        help="a compile running longer is killed and its config recorded as timeout (default 180)")
    parser.add_argument("--kernel", type=kernel_choice.kernel_arg, metavar=kernel_choice.kernel_metavar(),
                        help="kernel to tune on: auto (default: the kernel of the server each --format is for, "
                             "builtin with a warning where it does not import), builtin (moe-tune's), vllm, sglang "
                             "(triton_kernels is refused: its matmul_ogs takes no config)")
    parser.add_argument("--server-code", type=path_arg, metavar="DIR",
                        help="folder with the server's extracted Python packages (DIR/vllm, DIR/sglang) to use "
                             "instead of the installed ones (also MOE_TUNE_SERVER_CODE)")
    parser.add_argument("--server-version", metavar="RULE|SERVER==VERSION",
                        help="whose default config --baseline falls back to where a folder has no file: vllm, "
                             "vllm-pre-34846, sglang, or vllm==X.Y.Z / sglang==X.Y.Z (default: the tuned server's "
                             "version, else the installed vLLM's, else vLLM's newest rule)")
    parser.add_argument("--builtin-fp4", action="store_true", help=BUILTIN_FP4_HELP)
    parser.add_argument("--address", help="Ray cluster to join (auto, ray://host:port; default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--connect-timeout", type=positive_float, metavar="SECONDS",
                        help=f"give up joining --address after this long (default {DEFAULT_CONNECT_TIMEOUT_S:g})")
    parser.add_argument("--workers", type=positive_int, metavar="N",
                        help="use at most N GPUs (default: every GPU Ray reports; --interpret: 2 logical GPUs)")
    parser.add_argument("--out", type=nonblank, help=f"output folder (default: ./{writers.DEFAULT_OUT}/)")
    parser.add_argument("--format", choices=FORMATS, help="file layout to write (default: vllm)")
    parser.add_argument("--replace", action="store_true",
                        help="overwrite existing config files; by default their entries for batch sizes not tuned "
                             "now are kept when tuned for the same kernel and Triton version, else the run refuses")
    parser.add_argument("--disable-shared-experts-fusion", action="store_true",
                        help="SGLang layout: the server runs with this SGLang flag (shared experts not fused into E)")
    parser.add_argument("--journal", type=nonblank, metavar="PATH", help=f"journal file (default: <out>/{JOURNAL_NAME})")
    add_fresh_arguments(parser)
    parser.add_argument("--interpret", action="store_true",
                        help="no GPU: Triton interpreter on CPU workers (tiny shapes only)")
    parser.add_argument("--timeout", type=positive_float, metavar="SECONDS",
                        help="per-candidate limit; a candidate running longer ends its worker (default 300)")
    parser.add_argument("--finalists", type=positive_int, metavar="N",
                        help="fastest candidates per batch size re-timed back to back before choosing (default 3)")
    parser.add_argument("--json", action="store_true", help="print the run summary as one JSON object")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan, what the strategy will measure, roughly how long, and the files it "
                             "would write; start nothing")
    parser.add_argument("--device-name", help='with --dry-run: the GPU to plan for, as torch names it, e.g. '
                                              '"NVIDIA H200" (default: this host\'s GPU)')
    parser.set_defaults(**TuneOptions.defaults())


@dataclass(frozen=True)
class Validated:
    plan: Plan
    out: Path
    journal: Path
    routing: str
    runs: list[kernel_choice.KernelRun]
    baselines: dict[str, Baseline]
    """Per kernel backend run: the baseline folders, with that server version's default rule."""
    warnings: tuple[str, ...] = ()
    """``--kernel auto``'s fallback lines (``tuner.kernel_choice``), printed by ``print_warnings``
    once every check has passed, so refused input stays one line."""


def print_warnings(valids: list[Validated]) -> None:
    for line in dict.fromkeys(line for valid in valids for line in valid.warnings):
        print(line, file=sys.stderr)


def validate(args: TuneOptions, probe: bool = True) -> Validated:
    """Everything ``args`` asks for, checked before Ray starts. Bad input raises an OptionError
    naming the option (a ``TuneOptions`` field) it is about, so ``job`` names its spec key."""
    cluster_address(args.address)  # a bad --address / RAY_ADDRESS: refused before anything else
    try:  # a file: its absolute path (workers may run elsewhere) and its content's digest (the journal key)
        routing = parse_routing(pin_file(args.routing))
    except ValueError as exc:
        raise OptionError("routing", f"{args.routing}: {exc}") from None
    kernel_choice.use_server_code(args.server_code)

    out = Path(args.out).expanduser()
    check_output_location(out, "out", folder=True)
    journal = Path(args.journal).expanduser() if args.journal else out / JOURNAL_NAME
    check_journal(journal, busy=probe)  # a live run's lock: a run's check, not --dry-run's

    with about("model"):
        models = [load_model(m) for m in args.model]
    with about("search_space"):
        space = load_space(args.search_space)
    planned = plan(models, args.tp, args.ep, args.dtype, args.block_shape, args.batch_sizes, space, args.format,
                   not args.disable_shared_experts_fusion, builtin_fp4=args.builtin_fp4)
    preflight = planned.for_device("cpu" if args.interpret else PREFLIGHT_DEVICE)
    if not preflight.jobs:  # which dtypes a server reads files for does not depend on the GPU
        raise OptionError("dtype", nothing_to_tune(preflight), flagged=False)
    if args.interpret:
        check_interpret_limits([s.shape for s in planned.shapes], planned.batch_sizes)
    check_routing_file(str(routing), [s.shape for s in planned.shapes])
    empty = [(job.shape.label, M) for job in preflight.jobs for M, configs in job.candidates.items() if not configs]
    if empty:
        raise OptionError("search_space", f"search space {planned.space.name} leaves no config for {empty[0][0]} "
                          f"at M={empty[0][1]}", flagged=False)
    baseline = Baseline.load(args.baseline)  # bad input is refused (one line) before auto's fallback warning
    pinned = kernel_choice.pinned_rule(args.server_version)  # likewise, and before --kernel's errors
    # which backend times which layout; each backend's check refuses the dtypes and layouts it cannot run
    # (moe-tune's own fp4 kernel's jobs always run on builtin)
    warnings: list[str] = []
    runs = kernel_choice.plan_runs(args.kernel, preflight, args.format, warnings)
    needs_rule = bool(args.baseline or pinned)  # the rule matters only where a baseline falls back
    baselines = {run.kernel: replace(baseline, rules={
        server: kernel_choice.default_rule(run.kernel, pinned, server)
        for server in writers.format_servers(run.format)}) if needs_rule else baseline for run in runs}
    if args.fresh:
        work = {(s.shape, str(routing), M) for s in planned.shapes for M in planned.batch_sizes}
        confirm_fresh(journal, count_measurements(journal, work), args.yes)
    valid = Validated(planned, out, journal, str(routing), runs, baselines, tuple(warnings))
    if probe:  # a run's checks, not --dry-run's (which starts nothing and writes nothing)
        device = known_device_name(args.interpret, args.address)
        if device is not None:  # else ``tuner.driver.tune`` checks the files once the workers report it
            device_plan = planned.for_device(device)
            refuse_existing_files(device_plan, runs, lambda choice: writers.ServerFilesWriter(
                out, _servers_of({job.shape: job.servers for job in device_plan.jobs},
                                 writers.format_servers(choice.format)), args.replace), "out")
        probe_writable(out, "out")  # last: creates folders; input refused earlier leaves no folder behind
        probe_writable(journal.parent, "journal")
    return valid


def check_journal(journal: Path, *, busy: bool) -> None:
    """Refuse (``OptionError`` about ``journal``, one line) a journal path a run cannot use: one
    that cannot become a file (``check_output_location``), an existing file that is no journal
    (``tuner.journal.not_a_journal``: a run appends to it) and, with ``busy``, one a live run holds
    (``tuner.journal.check_not_busy``)."""
    check_output_location(journal, "journal", folder=False)
    foreign = not_a_journal(journal)
    if foreign:
        raise OptionError("journal", f"{journal}: {foreign}")
    if busy:
        try:
            check_not_busy(journal)
        except JournalBusy as exc:
            raise OptionError("journal", str(exc), flagged=False) from None


def known_device_name(interpret: bool, address: str | None) -> str | None:
    """The device name the workers will report, where it is known before Ray starts, else None.

    Known under ``--interpret`` in a Ray the command starts (no ``--address``/``RAY_ADDRESS``,
    ``address``: the option as given): the workers are this host's processes on the CPU ("cpu"),
    with this host's Triton and kernel code. Not known for GPUs (the driver never initializes
    CUDA: a context there would hold memory on a GPU the workers measure on) nor on a cluster
    (its nodes may run other GPUs and software): there only the workers know it, and
    ``tuner.driver.tune`` refuses conflicting files once they report it, still before any
    measurement."""
    if interpret and cluster_address(address) is None:
        return "cpu"
    return None


def _servers_of(servers_by_shape: Mapping[MoEShape, tuple[str, ...]], layouts: tuple[str, ...]):
    """The servers whose files a run in ``layouts`` writes for a shape (``ServerFilesWriter``'s
    ``servers_of``): the shape's own (``servers_by_shape``, a plan's ``job.servers``), in ``layouts``."""
    return lambda shape: tuple(server for server in servers_by_shape[shape] if server in layouts)


def refuse_existing_files(plan: DevicePlan, runs: list[kernel_choice.KernelRun],
                          writer_for: Callable[[kernel_choice.KernelRun], writers.ServerFilesWriter],
                          option: str) -> None:
    """Refuse (``OptionError`` about ``option``, the output folder's option; one line) config files
    already there that writing would refuse after the tune (``tuner.writers``' rule: entries of
    batch sizes not re-tuned, written for another kernel or Triton version or without a record,
    and no ``--replace``). ``plan``: the plan for the device the workers will report
    (``known_device_name``); ``writer_for``: the writer each run of ``runs`` writes through. The
    worker environment is this host's (``known_device_name`` says when it is the workers')."""
    import triton

    for choice in runs:
        env = {"device": plan.device_name, "triton": triton.__version__, **backends.load(choice.kernel).describe()}
        batch_sizes: dict = {}
        for job in plan.jobs:
            if choice.takes(job):
                batch_sizes.setdefault(job.shape, set()).update(job.batch_sizes)
        try:
            writer_for(choice).check(plan.device_name, env, batch_sizes)
        except writers.FileConflict as exc:
            raise OptionError(option, str(exc), flagged=False) from None


def _dry_run(args: TuneOptions, device_name: str, valid: Validated) -> None:
    """The plan for ``device_name`` (the GPU named, or this host's), the estimate, and the paths a
    run would write."""
    import triton  # the workers' Triton names SGLang's folder; on their host this is the same one

    planned = valid.plan.for_device(device_name)
    workers = args.workers or (INTERPRET_NUM_GPUS if args.interpret else _local_gpus())
    compiles_ahead = all(backends.load(run.kernel).compiles_ahead for run in valid.runs)
    processes = 1 if args.interpret or not compiles_ahead or args.no_compile_ahead else None
    expected = plan_estimate(planned, args.strategy, workers, processes, valid.routing, args.split_gemms)
    print(format_plan(planned, expected))
    if args.interpret:
        print("(the time is modelled for a GPU: under --interpret the kernels run far slower)")
    print("kernel: " + "; ".join(f"{run.kernel} for {run.what}" for run in valid.runs))
    print(f"would write to {valid.out}/ ({args.format} layout):")
    for job in planned.jobs:
        server_read = job.shape.dtype in SERVER_READ_DTYPES  # the builtin fp4 kernel's files: vLLM layout, apart
        if "vllm" in job.servers or not server_read:
            print(f"  {writers.vllm_path(valid.out, job.shape, device_name)}")
        if "sglang" in job.servers and server_read:
            print(f"  {writers.sglang_paths(valid.out, job.shape, device_name, triton.__version__)[0]}")
            if args.split_gemms:
                print(f"  {writers.sglang_paths(valid.out, job.shape, device_name, triton.__version__)[1]}")
    work = {(job.shape, valid.routing, M) for job in planned.jobs for M in job.batch_sizes}
    saved = count_measurements(valid.journal, work)
    reuse = ("--fresh would set it aside and measure everything again" if args.fresh
             else "reused, never measured again" if saved else "none of this work in it yet")
    print(f"journal {valid.journal}: {saved} measurements of this work ({reuse})")
    print("dry run: nothing started, nothing written")


def _local_gpus() -> int:
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def _triton_version() -> str | None:
    """This host's Triton version (the workers run the same image): which SGLang folder comes first."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:  # no Triton here: SGLang folders newest first
        return None


def run(parsed: argparse.Namespace) -> int:
    if parsed.device_name is not None and not parsed.dry_run:
        raise UsageError("--device-name names the GPU a --dry-run plans for; a run tunes on its workers' GPUs")
    args = TuneOptions.from_args(parsed)
    if parsed.dry_run:
        valid = validate(replace(args, fresh=False), probe=False)  # asks, writes nothing
        device_name = "cpu" if args.interpret else resolve_device_name(parsed.device_name)  # input: before warnings
        print_warnings([valid])
        _dry_run(args, device_name, valid)
        return 0
    valid = validate(args)
    print_warnings([valid])
    timeline = Timeline()
    with timeline.phase("ray_start"), ray_session(args.address, args.interpret, args.workers,
                                                  args.connect_timeout) as session:
        timeline.touch("ray_start")
        return tune_in_session(args, valid, session, timeline)


def tune_in_session(args: TuneOptions, valid: Validated, session: RaySession, timeline: Timeline | None = None) -> int:
    """Tune what ``args`` (validated as ``valid``) asks for inside an open Ray session and print
    the summary on the command's stdout (``job run`` runs several tunes in one session)."""

    servers_by_shape: dict = {}

    def jobs_for(baseline: Baseline, choice: kernel_choice.KernelRun):
        layouts = writers.format_servers(choice.format)

        def jobs_for_device(device_name: str) -> list[SearchJob]:
            jobs = [job for job in valid.plan.for_device(device_name).jobs if choice.takes(job)]
            servers_by_shape.update({job.shape: job.servers for job in jobs})
            return [SearchJob(job, valid.routing, baseline.configs_for(
                        job.shape, device_name, job.batch_sizes, _triton_version(),
                        tuple(server for server in job.servers if server in layouts)))
                    for job in jobs]
        return jobs_for_device

    summaries = []
    for index, choice in enumerate(valid.runs):
        baseline = valid.baselines[choice.kernel]
        layouts = writers.format_servers(choice.format)
        request = driver.TuneRequest(
            jobs_for_device=jobs_for(baseline, choice),
            write_outputs=writers.ServerFilesWriter(valid.out, _servers_of(servers_by_shape, layouts), args.replace),
            journal_path=valid.journal, fresh=args.fresh and index == 0, workers=args.workers,
            interpret=args.interpret, kernel=choice.kernel, timeout_s=args.timeout, finalists=args.finalists,
            strategy=args.strategy, split_gemms=args.split_gemms,
            budget_s=args.budget_minutes * 60 if args.budget_minutes is not None else None,
            compile_ahead=not args.no_compile_ahead, compile_timeout_s=args.compile_timeout,
        )
        try:
            result = driver.tune(request, Progress(), timeline)
        except JournalBusy as exc:
            raise UsageError(str(exc)) from None
        if not result.files_written:
            if result.budget_ended and not any(m.ok for d in result.devices for m in d.measurements):
                raise RunFailed(f"the time budget ({args.budget_minutes:g} min from the first measurement) ended "
                                "before any candidate produced a correct result; nothing was written "
                                "(raise --budget-minutes)")
            raise RunFailed("no candidate produced a correct result; nothing was written")
        summary = summarize(result)
        summary["format"], summary["kernel"] = choice.format, choice.kernel
        if baseline.folders:
            summary["baseline_default_rules"] = dict(baseline.rules)
            summary["ratio"] = BASELINE_RATIO
        summaries.append(summary)
        if not args.json:
            print(format_summary(summary), file=session.stdout)
            for line in summary["partial_files"]:  # in --json: the summary's partial_files
                print(f"moe-tune: warning: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps(summaries[0] if len(summaries) == 1 else {"runs": summaries}), file=session.stdout)
    return 0


BASELINE_RATIO = ratio_convention("baseline")
"""What ``vs_baseline`` means: tuned time / baseline time, below 1 faster (as ``bench``'s ratios)."""

LISTED_FAILURES = (Status.WRONG_RESULT, Status.CRASHED, Status.TIMEOUT)
"""Failures listed config by config in the summary; compile errors and out-of-resources are only
counted (a large space has hundreds, and they say nothing about the machine or the kernel's health)."""


def summarize(result: driver.TuneResult) -> dict:
    """The run summary (``--json`` prints exactly this object)."""
    devices = []
    for d in result.devices:
        best = {}
        for key, s in sorted(d.selections.items()):
            entry = {"config": s.candidate.config.to_dict(), "latency_us": round(s.latency_us, 3),
                     "search_latency_us": round(s.search_latency_us, 3), "retimed": s.retimed}
            if s.baseline_us is not None:
                entry.update(baseline_us=round(s.baseline_us, 3), vs_baseline=round(s.latency_us / s.baseline_us, 4),
                             kept_baseline=s.kept_baseline)
            best.setdefault(key.shape_label, {})[str(key.M)] = entry
        failures = [{"shape": m.candidate.shape.label, "M": m.candidate.M, "config": m.candidate.config.label,
                     "status": m.status.value, "message": m.message}
                    for m in d.measurements if m.status in LISTED_FAILURES]
        device = {"device": d.device, "workers": d.workers, "env": d.env, "best": best, "failures": failures,
                  "without_winner": [{"shape": k.shape_label, "M": k.M} for k in d.without_winner],
                  "measured": _count_levels(d)}
        if d.compile is not None:
            device["compile_ahead"] = d.compile.to_json()
        if d.split:
            device["split_gemms"] = _split_summary(d)
        devices.append(device)
    return {
        "evaluations_run": result.evaluations_run,
        "evaluations_reused": result.evaluations_reused,
        "failed": dict(sorted(result.failed.items())),
        "files_written": [str(p) for p in result.files_written],
        "files": [{"path": str(w.path), "action": w.action, "kept_batch_sizes": list(w.kept)}
                  for d in result.devices for w in d.files],
        "partial_files": partial_file_warnings([p for p in result.files_written if not p.name.endswith("_down.json")],
                                               DEFAULT_BATCH_SIZES),
        "wall_s": round(result.wall_s, 3),
        "timeline": result.timeline.to_json(),
        "retimed_groups": result.retimed_groups,
        "retimes_reused": result.retimes_reused,
        "retimes_cut": result.retimes_cut,
        "retime_cap_s": result.retime_cap_s,
        "budget_ended": result.budget_ended,
        "budget_minutes": result.budget_s / 60 if result.budget_s is not None else None,
        "devices": devices,
    }


def _count_levels(d: driver.DeviceResult) -> dict[str, int]:
    """Measurements by timing level (screens vs full timings): how much screening saved."""
    counts: dict[str, int] = {}
    for m in d.measurements:
        key = f"{m.candidate.gemm.value}/{m.candidate.level.value}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _split_summary(d: driver.DeviceResult) -> dict:
    """Per shape and M: the split pair, the shared config, and the split's gain over it."""
    out: dict[str, dict] = {}
    for (shape, _routing), per_m in d.split.items():
        for M, choice in sorted(per_m.items()):
            out.setdefault(shape.label, {})[str(M)] = {
                "up": choice.up.label, "down": choice.down.label, "split_us": round(choice.split_us, 3),
                "shared": choice.shared.label if choice.shared else None,
                "shared_us": round(choice.shared_us, 3) if choice.shared_us is not None else None,
                "gain_pct": round(100 * choice.gain, 2) if choice.gain is not None else None}
    return out


def format_summary(summary: dict) -> str:
    lines = [f"tuned in {format_duration(summary['wall_s'])}: {summary['evaluations_run']} evaluations run, "
             f"{summary['evaluations_reused']} reused from the journal"]
    if "baseline_default_rules" in summary:
        rules = "; ".join(f"{server}: the {rule} rule" for server, rule in summary["baseline_default_rules"].items())
        lines.append(f"baseline: the --baseline folders; where one has no file, the server's default config ({rules}); "
                     f"(x) = {BASELINE_RATIO}")
    if summary["budget_ended"]:
        retimed = (f"their finalists were re-timed back to back ({summary['retimed_groups']} batch sizes"
                   + (f", {summary['retimes_reused']} from the journal" if summary["retimes_reused"] else "") + ")")
        if summary["retimes_cut"]:
            retimed += (f"; {summary['retimes_cut']} batch sizes kept the search's numbers (the "
                        f"{summary['retime_cap_s']:g}s re-timing cap ran out)")
        lines.append(f"the time budget ({summary['budget_minutes']:g} min from the first measurement) ended the "
                     f"search: the configs written are the best found by then; {retimed}")
    if summary["failed"]:
        lines.append("failed: " + ", ".join(f"{status} {n}" for status, n in summary["failed"].items()))
    for device in summary["devices"]:
        lines.append(f"{device['device']} ({device['workers']} worker(s)), kernel: {describe_label(device['env'])}")
        for shape, per_m in device["best"].items():
            lines.append(f"  {shape}")
            for M, best in per_m.items():
                c = best["config"]
                label = (f"BLOCK_SIZE_M={c['BLOCK_SIZE_M']} N={c['BLOCK_SIZE_N']} K={c['BLOCK_SIZE_K']} "
                         f"GROUP_SIZE_M={c['GROUP_SIZE_M']} warps={c['num_warps']} stages={c['num_stages']}")
                versus = (f"  ({best['vs_baseline']:.3f}x the baseline's time, {best['baseline_us']:.1f} us"
                          + (f"; baseline kept: nothing re-timed more than {BASELINE_MARGIN:.0%} faster" if best.get("kept_baseline") else "")
                          + ")" if "vs_baseline" in best else "")
                lines.append(f"    M={M:>5}  {best['latency_us']:10.1f} us  {label}{versus}")
        lines += [f"  no correct config: {gap['shape']} M={gap['M']}" for gap in device["without_winner"]]
        if "compile_ahead" in device:
            c = device["compile_ahead"]
            spec = c["speculative"]
            lines.append(f"  compile-ahead: {c['jobs']} configs on {c['processes']} processes ({spec['jobs']} "
                         f"speculative, {spec['used']} of them used; {c['taken_uncompiled']} taken by idle GPUs "
                         f"still compiling), {c['compile_s']:.0f} CPU-s, "
                         + ", ".join(f"{k} {v}" for k, v in c["outcomes"].items()))
            r = c["retiming"]
            if r["jobs"]:
                lines.append(f"  compile-ahead for the re-timing: {r['jobs']} finalists' configs this run had not "
                             f"compiled; {r['batch_sizes_compiled_ahead']} batch sizes re-timed compiled ahead, "
                             f"{r['batch_sizes_taken_uncompiled']} taken by idle GPUs still compiling")
        for shape, per_m in device.get("split_gemms", {}).items():
            lines.append(f"  split GEMMs {shape}:")
            lines += [f"    M={M:>5}  up {s['up']}  down {s['down']}  {s['split_us']:.1f} us"
                      + (f"  vs shared {s['shared']} {s['shared_us']:.1f} us: split saves {s['gain_pct']:.1f}%"
                         if s["gain_pct"] is not None else "")
                      for M, s in per_m.items()]
        lines += [f"  {f['status']}: {f['config']} at M={f['M']} ({f['message']})" for f in device["failures"]]
    lines += [f"wrote {f['path']} ({f['action']}" + (f"; kept M={','.join(map(str, f['kept_batch_sizes']))} from "
                                                     "the file that was there" if f["kept_batch_sizes"] else "") + ")"
              for f in summary["files"]]
    t = summary["timeline"]
    if t.get("first_measurement_s") is not None:
        lines.append("timeline: first measurement at " + f"{t['first_measurement_s']:.1f}s; "
                     + ", ".join(f"{name} {span['duration_s']:.1f}s" for name, span in t.items()
                                 if isinstance(span, dict)))
    return "\n".join(lines)
