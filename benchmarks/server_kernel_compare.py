"""Time config folders in one kernel backend, in one GPU process, interleaved round by round.

A measurement aid for ``benchmarks/server_kernel_bench.sh`` (not the product: ``moe-tune bench``
is). For each shape (``MODEL:TP:DTYPE``) and batch size it resolves the config each source
would make the server use — each ``--configs`` folder (its file for the shape, nearest key, as
vLLM or SGLang (``--server``) looks up; a folder without the file is reported as missing there) and the server version's
default rule (``workers.default_config.server_default``: the server's own ``get_default_config``
when importable) — checks each once against the fp32 reference, then times all of them back to
back, ``--rounds`` interleaved rounds (``BenchmarkWorker.retime``), and reports per variant the
median over rounds and the spread (max − min of the round medians). ``ratio`` is a variant's
median over the better of ``--versus`` variants. One JSON file per shape is written to ``--out``
as soon as that shape is done; a table is printed last.

    python3 benchmarks/server_kernel_compare.py --kernel vllm --shape mixtral-8x7b:2:bf16 \
        --configs tuned=DIR --configs shipped=DIR --versus shipped,default --out OUT
    python3 benchmarks/server_kernel_compare.py --kernel sglang --server sglang --rule sglang \
        --shape qwen3-30b-a3b:1:bf16 --configs tuned=DIR --configs shipped=DIR --out OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from tuner.models import derive_shape, load_model
from tuner.writers import lookup, read_config_folder, server_file
from workers.backends.base import describe_label
from workers.default_config import RULES, VLLM, server_default
from workers.records import Candidate, MoEShape
from workers.worker import BenchmarkWorker

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096)


def parse_shape(text: str) -> tuple[str, MoEShape]:
    """``MODEL:TP:DTYPE``, or for dry runs an explicit ``E=4,N=64,K=128,topk=2,dtype=fp16``."""
    if "=" in text:
        fields = dict(part.split("=") for part in text.split(","))
        return text, MoEShape(int(fields["E"]), int(fields["N"]), int(fields["K"]), int(fields["topk"]),
                              fields["dtype"])
    model, tp, dtype = text.split(":")
    return text, derive_shape(load_model(model), tp=int(tp), dtype=dtype)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="vllm")
    parser.add_argument("--shape", action="append", required=True, metavar="MODEL:TP:DTYPE")
    parser.add_argument("--configs", action="append", default=[], metavar="LABEL=DIR")
    parser.add_argument("--server", choices=("vllm", "sglang"), default=None,
                        help="look files up as this server does (vLLM: flat files; SGLang: triton_X_Y_Z folders, "
                             "the running Triton's first, then the newest other); default: either")
    parser.add_argument("--rule", default=VLLM, choices=RULES, help="default rule timed as variant 'default'")
    parser.add_argument("--versus", default="shipped,default", help="variants the ratio is taken against")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        shapes = [parse_shape(s) for s in args.shape]
        folders = {label: read_config_folder(path) for label, path in (c.split("=", 1) for c in args.configs)}
        batch_sizes = [int(m) for m in args.batch_sizes.split(",")]
    except Exception as exc:  # noqa: BLE001 - bad input: one line, exit 2
        print(f"server_kernel_compare: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    worker = BenchmarkWorker(kernel=args.kernel, timeout_s=300)
    env = worker.describe()
    versus = args.versus.split(",")
    lines = [f"kernel: {describe_label(env)}; "
             f"{env['device']}, torch {env['torch']}, triton {env['triton']}; median of {args.rounds} interleaved "
             f"rounds, µs (spread)"]
    for name, shape in shapes:
        started = time.monotonic()
        report = {"shape": name, "label": shape.label, "env": env, "batch_sizes": {}}
        for M in batch_sizes:
            variants: dict[str, Candidate] = {}
            sources: dict[str, str] = {}
            for label, files in folders.items():
                found = server_file(files, shape, env["device"], env["triton"], args.server)
                if found:
                    variants[label] = Candidate(shape, M, lookup(found[1], M))
                    sources[label] = found[0]
            config, source = server_default(shape, M, args.rule)
            variants["default"] = Candidate(shape, M, config)
            sources["default"] = source.label
            ok = {}
            for label, candidate in variants.items():
                measured = worker.measure(candidate)
                ok[label] = measured.ok
                if not measured.ok:
                    sources[label] += f" [{measured.status.value}: {measured.message}]"
            timed = [label for label in variants if ok[label]]
            rounds = [worker.retime([variants[label] for label in timed], rounds=None) for _ in range(args.rounds)]
            cell = {}
            for i, label in enumerate(timed):
                values = [r[i] for r in rounds]
                cell[label] = {"median_us": statistics.median(values), "spread_us": max(values) - min(values),
                               "rounds_us": values, "config": variants[label].config.label,
                               "source": sources[label]}
            best_versus = min((cell[v]["median_us"] for v in versus if v in cell), default=None)
            for label in cell:
                cell[label]["ratio"] = cell[label]["median_us"] / best_versus if best_versus else None
            report["batch_sizes"][str(M)] = {"variants": cell,
                                             "failed": {k: sources[k] for k in variants if not ok[k]}}
        report["wall_s"] = time.monotonic() - started
        (args.out / f"compare_{''.join(c if c.isalnum() else '_' for c in name)}.json").write_text(json.dumps(report, indent=1))
        lines.append(f"{name}  {shape.label}  ({report['wall_s']:.0f}s)")
        for M, entry in report["batch_sizes"].items():
            parts = [f"{label} {c['median_us']:.1f} ({c['spread_us']:.1f})"
                     + (f" x{c['ratio']:.3f}" if c["ratio"] and label not in versus else "")
                     for label, c in entry["variants"].items()]
            failed = f"  FAILED: {', '.join(entry['failed'])}" if entry["failed"] else ""
            lines.append(f"  M={M:>5}  " + "  ".join(parts) + failed)
        print(lines[-1 - len(report['batch_sizes'])], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
