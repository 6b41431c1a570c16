"""``moe-tune bench``: time the server version's default config and config folders back to back for
the shape of each dtype asked for (``--dtype``, as ``plan``/``tune``: repeatable or comma-separated;
default the model's own), in one kernel backend; ``--fail-if-slower`` turns it into a regression
gate over every dtype (exit 1). Where a folder has no file, and for the ``default`` column, the
default rule is ``--server``'s (``tuner.kernel_choice.default_rule``), named in the output."""

from __future__ import annotations

import argparse
import json

from tuner import bench, kernel_choice
from tuner.commands.arguments import (add_batch_sizes_argument, add_dtype_argument, add_layout_arguments,
                                      block_shape_arg, check_interpret_limits, check_routing_file, positive_float,
                                      path_arg, positive_int,
                                      ratio_arg, routing_arg)
from tuner.errors import RunFailed
from tuner.models import SERVERS, derive_shape, dtype_block_shape, load_model
from tuner.plan import resolve_batch_sizes
from tuner.ray_session import DEFAULT_CONNECT_TIMEOUT_S, cluster_address
from workers.records import DType, MoEShape


def configure(parser: argparse.ArgumentParser) -> None:
    add_layout_arguments(parser)
    add_dtype_argument(parser, "kernel dtype, one bench each; default: the model's own")
    parser.add_argument("--block-shape", type=block_shape_arg, metavar="BN,BK",
                        help="fp8 weight block shape (for the dtypes that take one)")
    add_batch_sizes_argument(parser)
    parser.add_argument("--configs", type=path_arg, nargs="+", required=True, metavar="DIR",
                        help="config folders to time (vLLM or SGLang layout)")
    parser.add_argument("--reference", type=path_arg, metavar="DIR",
                        help="the folder the others must not be slower than (default: the server's default config)")
    parser.add_argument("--fail-if-slower", type=ratio_arg, metavar="RATIO",
                        help="exit 1 if a folder is slower than the reference by more than this speed fraction at "
                             "any batch size of any dtype: its time ratio (time / reference time) above 1/RATIO "
                             "(0.98: more than ~2%% slower)")
    parser.add_argument("--routing", type=routing_arg, default="uniform", help="uniform | zipf:<alpha> | file:<path>")
    parser.add_argument("--rounds", type=positive_int, default=bench.RETIME_ROUNDS, metavar="N",
                        help=f"interleaved timing rounds per batch size (default {bench.RETIME_ROUNDS})")
    parser.add_argument("--kernel", default=kernel_choice.AUTO, type=kernel_choice.kernel_arg,
                        metavar=kernel_choice.kernel_metavar(),
                        help="kernel to time in: auto (default: --server's where it imports and runs the shape, else "
                             "builtin with a warning), "
                             "builtin, vllm, sglang")
    parser.add_argument("--server-code", type=path_arg, metavar="DIR",
                        help="folder with the server's extracted Python packages (also MOE_TUNE_SERVER_CODE)")
    parser.add_argument("--server-version", metavar="RULE|SERVER==VERSION",
                        help="whose default config is the baseline: vllm (PR #34846 and later, e.g. vLLM 0.33), "
                             "vllm-pre-34846, sglang, or vllm==X.Y.Z / sglang==X.Y.Z (default: --server's rule: "
                             "SGLang's, or for vLLM the timed vLLM's version, else the installed vLLM's, else "
                             "vLLM's newest rule)")
    parser.add_argument("--address", help="Ray cluster to run on (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--connect-timeout", type=positive_float, default=DEFAULT_CONNECT_TIMEOUT_S, metavar="SECONDS",
                        help=f"give up joining --address after this long (default {DEFAULT_CONNECT_TIMEOUT_S:g})")
    parser.add_argument("--interpret", action="store_true",
                        help="run the kernels under the Triton interpreter on the CPU (tiny shapes only)")
    parser.add_argument("--server", default="vllm", choices=SERVERS,
                        help="whose kernel shape to time (sglang: with its shared-expert fusion; default vllm)")
    parser.add_argument("--disable-shared-experts-fusion", action="store_true",
                        help="with --server sglang: SGLang runs with this flag")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def bench_shapes(model: str, tp: int, ep: int, dtypes: list[DType] | None, block_shape: tuple[int, int] | None,
                 server: str = "vllm", fuse_shared_experts: bool = True) -> list[MoEShape]:
    """The shape ``server``'s kernel runs for the model's first MoE layer shape, per dtype (None:
    the model's own). ``block_shape`` goes to the dtypes that take one; given with none of them,
    the model's refusal (UsageError) stands."""
    spec = load_model(model)
    wanted = dtypes or [None]
    takes_block = any(dtype_block_shape(d, block_shape) for d in wanted)
    shapes = []
    for dtype in wanted:
        block = dtype_block_shape(dtype, block_shape) if takes_block else block_shape
        shapes.append(derive_shape(spec, tp=tp, ep=ep, dtype=dtype, block_shape=block, server=server,
                                   fuse_shared_experts=fuse_shared_experts))
    return list(dict.fromkeys(shapes))


def run(args: argparse.Namespace) -> int:
    cluster_address(args.address)  # a bad --address / RAY_ADDRESS: refused before anything else
    shapes = bench_shapes(args.model, args.tp, args.ep, args.dtype, args.block_shape, args.server,
                          not args.disable_shared_experts_fusion)
    batch_sizes = resolve_batch_sizes(args.batch_sizes)
    if args.interpret:
        check_interpret_limits(shapes, batch_sizes)
    check_routing_file(args.routing, shapes)
    # the folders read once, here: an unreadable file is bad input, refused before auto's fallback warning
    variants, reference = bench.variants_for(args.configs, args.reference)
    kernel_choice.use_server_code(args.server_code)
    # refused before --kernel's errors and auto's fallback warning: bad input stays one line
    pinned = kernel_choice.pinned_rule(args.server_version)
    (run,) = kernel_choice.resolve(args.kernel, args.server, shapes)  # auto: the kernel of --server
    rule = kernel_choice.default_rule(run.kernel, pinned, args.server)
    results = bench.run_bench(shapes, variants, reference, batch_sizes, routing=args.routing, rounds=args.rounds,
                              address=args.address, interpret=args.interpret, kernel=run.kernel, rule=rule,
                              connect_timeout_s=args.connect_timeout)
    if args.json:
        data = [result.to_json(args.fail_if_slower) for result in results]
        print(json.dumps(data[0] if len(data) == 1 else {"benches": data}))
    else:
        print("\n\n".join(bench.format_table(result, args.fail_if_slower) for result in results))
    if args.fail_if_slower is not None:
        regressions = [(f"{result.shape.dtype.value}: " if len(results) > 1 else "") + line
                       for result in results for line in result.regressions(args.fail_if_slower)]
        if regressions:
            more = f" (and {len(regressions) - 1} more)" if len(regressions) > 1 else ""
            raise RunFailed(f"gate failed: {regressions[0]}{more}")
    return 0
