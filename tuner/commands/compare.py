"""``moe-tune compare``: time every dtype of one model and layout in the kernel the named server
dispatches for it on the GPU (tuning it first where it has a config; the journal is shared with
tune), measure each against bf16 on the same inputs, and write report.md, report.html and
report.json."""

from __future__ import annotations

import argparse
import sys

from tuner import compare, kernel_choice, report
from tuner.commands.arguments import (add_batch_sizes_argument, add_dtype_argument, add_fresh_arguments,
                                      add_layout_arguments, check_interpret_limits, check_output_location,
                                      check_routing_file, confirm_fresh, dtype_list, nonblank, path_arg,
                                      positive_float, positive_int, routing_arg)
from tuner.commands.tune import PREFLIGHT_DEVICE, check_journal, known_device_name, refuse_existing_files
from tuner.dispatch import SERVERS
from tuner.errors import UsageError
from tuner.journal import JOURNAL_NAME, JournalBusy, count_measurements
from tuner.models import derive_shape, load_model
from tuner.plan import plan, resolve_batch_sizes
from tuner.search import STRATEGIES
from tuner.ray_session import DEFAULT_CONNECT_TIMEOUT_S, cluster_address
from tuner.spaces import load_space
from tuner.naming import BUILTIN_FOLDER
from tuner.writers import DEFAULT_OUT, ServerFilesWriter, probe_writable
from workers.backends import BUILTIN
from workers.records import DType, MoEShape

DEFAULT_DTYPES = "bf16,fp8_w8a8,int8_w8a16,mxfp4,nvfp4"


def configure(parser: argparse.ArgumentParser) -> None:
    add_layout_arguments(parser)
    add_dtype_argument(parser, f"dtypes to compare; bf16 is always included as the yardstick (default: "
                               f"{DEFAULT_DTYPES})", "--dtypes", "--dtype", default=dtype_list(DEFAULT_DTYPES))
    add_batch_sizes_argument(parser)
    parser.add_argument("--routing", type=routing_arg, default="uniform", help="uniform | zipf:<alpha> | file:<path>")
    parser.add_argument("--search-space", default="default", type=nonblank, metavar="NAME|PATH", help="search space name or YAML file")
    parser.add_argument("--strategy", default="fast", choices=sorted(STRATEGIES),
                        help="search strategy (default fast, as for tune)")
    parser.add_argument("--budget-minutes", type=positive_float, metavar="MINUTES",
                        help="stop tuning after this long; the report uses the best found by then and says so")
    parser.add_argument("--out", type=path_arg, required=True, metavar="DIR", help="folder for report.md/.html/.json")
    parser.add_argument("--configs-out", type=path_arg, default=DEFAULT_OUT, metavar="DIR",
                        help=f"folder for the tuned config files (default: ./{DEFAULT_OUT}/, as tune)")
    parser.add_argument("--builtin-fp4", action="store_true",
                        help="also write the configs of moe-tune's own fp4 kernel (the mxfp4/nvfp4 second column, "
                             f"tuned either way) to <configs-out>/{BUILTIN_FOLDER}/, which no server reads")
    parser.add_argument("--format", default="vllm", choices=("vllm", "sglang", "both"),
                        help="config file layout (default: vllm)")
    parser.add_argument("--journal", type=path_arg, metavar="PATH",
                        help=f"journal (default: <configs-out>/{JOURNAL_NAME}, shared with tune)")
    add_fresh_arguments(parser)
    parser.add_argument("--moe-layers", type=positive_int, default=1, metavar="N",
                        help="MoE layers of the model, for the weight total per GPU (default 1: one layer)")
    parser.add_argument("--memory-budget-gib", type=positive_float, metavar="GIB",
                        help="memory per GPU for weights + MoE buffers (default: 90%% of the memory the GPU reports)")
    parser.add_argument("--max-rel-err", type=positive_float, default=report.DEFAULT_MAX_REL_ERR, metavar="ERR",
                        help="recommend only dtypes within this relative error of bf16 (default "
                             f"{report.DEFAULT_MAX_REL_ERR:g}: fp8 and int8 pass; on a bf16 checkpoint the 4-bit "
                             "formats do not; a quantized checkpoint's own format carries only kernel error)")
    parser.add_argument("--json", action="store_true", help="print the report's JSON (report.json) on stdout")
    parser.add_argument("--server", choices=SERVERS, default="vllm",
                        help="whose kernel choice per dtype to follow (default vllm: vLLM 0.33's)")
    parser.add_argument("--kernel", type=kernel_choice.kernel_arg, default=kernel_choice.AUTO,
                        metavar=kernel_choice.kernel_metavar(),
                        help="kernel the fused-MoE dtypes are tuned on; numbers count as the server's only "
                             "when this is the --server. Default auto: the --server's own kernel where its code "
                             "imports here and runs those dtypes, else builtin with a warning (as tune's auto; "
                             "builtin under --interpret)")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--connect-timeout", type=positive_float, default=DEFAULT_CONNECT_TIMEOUT_S, metavar="SECONDS",
                        help=f"give up joining --address after this long (default {DEFAULT_CONNECT_TIMEOUT_S:g})")
    parser.add_argument("--replace", action="store_true",
                        help="overwrite existing config files instead of merging into them (see tune --replace)")
    parser.add_argument("--workers", type=positive_int, metavar="N",
                        help="use at most N GPUs (default: every GPU Ray reports; --interpret: 2 logical GPUs)")
    parser.add_argument("--interpret", action="store_true",
                        help="run the kernels under the Triton interpreter on the CPU (tiny shapes only)")


def _request(args: argparse.Namespace) -> tuple[compare.CompareRequest, list[str]]:
    """The request, and ``--kernel auto``'s fallback warning (if any) to print once all input is accepted."""
    cluster_address(args.address)  # a bad --address / RAY_ADDRESS: refused before anything else
    spec = load_model(args.model)
    dtypes = [DType.BF16] + [d for d in args.dtypes if d is not DType.BF16]
    # The dtypes are compared on the shape of the server whose files are asked for (vLLM's for "both").
    shape_server = "sglang" if args.format == "sglang" else "vllm"

    def shapes_for_device(device_name: str) -> dict[DType, MoEShape]:
        return {dtype: derive_shape(spec, tp=args.tp, ep=args.ep, dtype=dtype, server=shape_server,
                                    device_name=device_name)
                for dtype in dtypes}

    shapes = shapes_for_device("cpu")  # fails fast on bad input
    batch_sizes = resolve_batch_sizes(args.batch_sizes)
    if args.interpret:
        check_interpret_limits(list(shapes.values()), batch_sizes)
    check_output_location(args.out, "out", folder=True)
    check_output_location(args.configs_out, "configs_out", folder=True)
    space = load_space(args.search_space)
    # moe-tune's own fp4 kernel too: the report's second column (its files written apart)
    planned = plan([spec], args.tp, args.ep, dtypes, None, batch_sizes, space, args.format, builtin_fp4=True)
    warnings: list[str] = []
    # the dtypes --server runs in its fused-MoE Triton kernel on the backend --kernel means (auto under
    # --interpret: builtin); moe-tune's own fp4 kernel (the second column) always on builtin
    kernel = BUILTIN if args.interpret and args.kernel == kernel_choice.AUTO else args.kernel
    runs = kernel_choice.plan_runs(kernel, planned.for_device("cpu" if args.interpret else PREFLIGHT_DEVICE),
                                   args.format, warnings, server=args.server)
    check_routing_file(args.routing, [s.shape for s in planned.shapes])
    grid, reference_weights = compare.accuracy_reference(spec)
    servers_by_shape: dict = {}
    journal = args.journal or args.configs_out / JOURNAL_NAME
    check_journal(journal, busy=True)
    if args.fresh:
        work = {(s.shape, args.routing, M) for s in planned.shapes for M in planned.batch_sizes}
        confirm_fresh(journal, count_measurements(journal, work), args.yes)

    device = known_device_name(args.interpret, args.address)
    if device is not None:  # else ``tuner.driver.tune`` checks the files once the workers report it
        device_plan = planned.for_device(device)
        servers = {job.shape: job.servers for job in device_plan.jobs}  # as ``search_jobs``
        refuse_existing_files(device_plan, runs, lambda choice: ServerFilesWriter(
            args.configs_out, servers.__getitem__, args.replace, args.builtin_fp4), "configs_out")

    def plan_for_device(device_name: str):
        return compare.search_jobs(planned, args.routing, device_name, servers_by_shape)

    layout = f"tp={args.tp}" + (f",ep={args.ep}" if args.ep > 1 else "")
    return compare.CompareRequest(
        model=spec.name, layout=layout, shapes_for_device=shapes_for_device, batch_sizes=batch_sizes,
        routing=args.routing, plan_for_device=plan_for_device, configs_out=args.configs_out, file_format=args.format,
        servers_by_shape=servers_by_shape, journal=journal, fresh=args.fresh, address=args.address,
        connect_timeout_s=args.connect_timeout, replace=args.replace,
        workers=args.workers, interpret=args.interpret, strategy=args.strategy,
        budget_s=args.budget_minutes * 60 if args.budget_minutes else None, moe_layers=args.moe_layers,
        memory_budget_bytes=int(args.memory_budget_gib * 2**30) if args.memory_budget_gib else None,
        max_rel_err=args.max_rel_err, server=args.server, runs=tuple(runs), ep=args.ep, grid=grid,
        write_builtin_fp4=args.builtin_fp4,
        reference_weights=reference_weights), warnings


def run(args: argparse.Namespace) -> int:
    request, warnings = _request(args)
    probe_writable(args.out, "out")  # before Ray starts: the report is written last
    probe_writable(args.configs_out, "configs_out")
    probe_writable(request.journal.parent, "journal")
    for line in warnings:  # after every check: refused input stays one line
        print(line, file=sys.stderr)
    try:
        results = compare.run_compare(request)
    except JournalBusy as exc:
        raise UsageError(str(exc)) from None
    paths = report.write_reports(results, args.out)
    if args.json:
        print((args.out / "report.json").read_text())
        return 0
    print(f"recommendation ({args.server}'s kernels, dtypes within {args.max_rel_err:.1%} relative error of bf16):")
    for recommendation in report.recommend(results):
        print(f"  {recommendation.text}")
    for line in report.unranked(results):
        print(f"  {line}")
    print(f"accuracy reference: {results.reference_weights}")
    print(f"tuned config files in {results.configs_folder}: {', '.join(results.config_files) or 'none'}")
    for path in paths:
        print(f"wrote {path}")
    return 0
