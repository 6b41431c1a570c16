"""``moe-tune bench``: time the server version's default config and config folders back to back for
one shape, in one kernel backend; ``--fail-if-slower`` turns it into a regression gate (exit 1)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tuner import bench, kernel_choice
from tuner.commands.arguments import (add_batch_sizes_argument, add_layout_arguments, block_shape_arg,
                                      check_interpret_limits, check_routing_file, positive_int, ratio_arg,
                                      routing_arg)
from tuner.errors import RunFailed
from tuner.models import SERVERS, derive_shape, load_model
from tuner.plan import resolve_batch_sizes
from workers.records import DType, MoEShape


def configure(parser: argparse.ArgumentParser) -> None:
    add_layout_arguments(parser)
    parser.add_argument("--dtype", choices=[d.value for d in DType], help="kernel dtype (default: the model's own)")
    parser.add_argument("--block-shape", type=block_shape_arg, metavar="BN,BK", help="fp8 weight block shape")
    add_batch_sizes_argument(parser)
    parser.add_argument("--configs", type=Path, nargs="+", required=True, metavar="DIR",
                        help="config folders to time (vLLM or SGLang layout)")
    parser.add_argument("--reference", type=Path, metavar="DIR",
                        help="the folder the others must not be slower than (default: the server's default config)")
    parser.add_argument("--fail-if-slower", type=ratio_arg, metavar="RATIO",
                        help="exit 1 if a folder's reference latency / latency drops below RATIO at any batch size")
    parser.add_argument("--routing", type=routing_arg, default="uniform", help="uniform | zipf:<alpha> | file:<path>")
    parser.add_argument("--rounds", type=positive_int, default=bench.RETIME_ROUNDS,
                        help="interleaved timing rounds per batch size")
    parser.add_argument("--kernel", default=kernel_choice.AUTO, type=kernel_choice.kernel_arg,
                        metavar=kernel_choice.kernel_metavar(),
                        help="kernel to time in: auto (default: --server's where it imports and runs the shape, else "
                             "builtin with a warning), "
                             "builtin, vllm, sglang")
    parser.add_argument("--server-code", type=Path, metavar="DIR",
                        help="folder with the server's extracted Python packages (also MOE_TUNE_SERVER_CODE)")
    parser.add_argument("--server-version", metavar="RULE|SERVER==VERSION",
                        help="whose default config is the baseline: vllm (PR #34846 and later, e.g. vLLM 0.33), "
                             "vllm-pre-34846, sglang, or vllm==X.Y.Z / sglang==X.Y.Z (default: the timed server's "
                             "version, else the installed vLLM's, else vLLM's newest rule)")
    parser.add_argument("--address", help="Ray cluster to run on (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--interpret", action="store_true",
                        help="run the kernels under the Triton interpreter on the CPU (tiny shapes only)")
    parser.add_argument("--server", default="vllm", choices=SERVERS,
                        help="whose kernel shape to time (sglang: with its shared-expert fusion; default vllm)")
    parser.add_argument("--disable-shared-experts-fusion", action="store_true",
                        help="with --server sglang: SGLang runs with this flag")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def bench_shape(model: str, tp: int, ep: int, dtype: str | None, block_shape: tuple[int, int] | None,
                server: str = "vllm", fuse_shared_experts: bool = True) -> MoEShape:
    """The shape ``server``'s kernel runs for the model's first MoE layer shape."""
    return derive_shape(load_model(model), tp=tp, ep=ep, dtype=dtype, block_shape=block_shape, server=server,
                        fuse_shared_experts=fuse_shared_experts)


def run(args: argparse.Namespace) -> int:
    shape = bench_shape(args.model, args.tp, args.ep, args.dtype, args.block_shape, args.server,
                        not args.disable_shared_experts_fusion)
    batch_sizes = resolve_batch_sizes(args.batch_sizes)
    if args.interpret:
        check_interpret_limits([shape], batch_sizes)
    check_routing_file(args.routing, [shape])
    variants, reference = bench.variants_for(args.configs, args.reference)
    kernel_choice.use_server_code(args.server_code)
    if args.server_version:  # refused before auto's fallback warning: bad input stays one line
        kernel_choice.default_rule(args.kernel, args.server_version)
    (run,) = kernel_choice.resolve(args.kernel, args.server, [shape])  # auto: the kernel of --server
    rule = kernel_choice.default_rule(run.kernel, args.server_version)
    result = bench.run_bench(shape, variants, reference, batch_sizes, routing=args.routing, rounds=args.rounds,
                             address=args.address, interpret=args.interpret, kernel=run.kernel, rule=rule)
    if args.json:
        print(json.dumps(result.to_json(args.fail_if_slower)))
    else:
        print(bench.format_table(result, args.fail_if_slower))
    if args.fail_if_slower is not None and result.regressions(args.fail_if_slower):
        raise RunFailed(f"gate failed: {result.regressions(args.fail_if_slower)[0]}")
    return 0
