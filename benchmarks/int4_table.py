"""The short table `benchmarks/int4_bench.sh` prints last: per batch size, the tuned latency of
int4_w4a16, fp8_w8a8 and bf16 (from `compare`'s report.json), int4's error against bf16 and
against the fp32 reference (the journal's full timings of its winning config), and the tuned int4
file against vLLM's default int4 config (from `bench --json`). Missing inputs print as "-"."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path


def _load(path: str) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _journal_errors(path: str) -> dict[tuple[str, int, str], float]:
    """(dtype, M, config label) → rel. error vs the fp32 reference, from the journal's records."""
    errors: dict[tuple[str, int, str], float] = {}
    file = Path(path)
    if not file.is_file():
        return errors
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rt") as lines:
        for line in lines:
            try:
                record = json.loads(line)
                candidate = record["candidate"]
                config = candidate["config"]
                label = (f"M{config['BLOCK_SIZE_M']}_N{config['BLOCK_SIZE_N']}_K{config['BLOCK_SIZE_K']}"
                         f"_G{config['GROUP_SIZE_M']}_w{config['num_warps']}_s{config['num_stages']}")
                if record.get("rel_err") is not None:
                    errors[(candidate["shape"]["dtype"], int(candidate["M"]), label)] = float(record["rel_err"])
            except (KeyError, TypeError, ValueError):
                continue
    return errors


def _label(config: dict) -> str:
    return (f"M{config['BLOCK_SIZE_M']}_N{config['BLOCK_SIZE_N']}_K{config['BLOCK_SIZE_K']}"
            f"_G{config['GROUP_SIZE_M']}_w{config['num_warps']}_s{config['num_stages']}")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(journal: str, report_path: str, bench_path: str) -> None:
    report, bench, errors = _load(report_path) or {}, _load(bench_path) or {}, _journal_errors(journal)
    points = {(p["dtype"], p["M"]): p for p in report.get("points", [])}
    bench_rows = {row["M"]: row["results"] for row in bench.get("rows", [])}
    sizes = sorted({M for _, M in points} | set(bench_rows))
    print(f"kernel: moe-tune builtin Triton kernel, workers/fused_moe_kernel.py (the servers run Marlin for this "
          f"checkpoint by default) · {report.get('device', '-')} · {report.get('versions', {})}")
    print(f"shape: {report.get('dtypes', {}).get('int4_w4a16', {}).get('shape', bench.get('shape', '-'))}")
    print(f"{'M':>5} {'int4 us':>9} {'fp8 us':>9} {'bf16 us':>9} {'int4 err/bf16':>13} {'int4 err/fp32':>13} "
          f"{'default us':>10} {'tuned/default':>13}")
    for M in sizes:
        int4, fp8, bf16 = (points.get((d, M)) for d in ("int4_w4a16", "fp8_w8a8", "bf16"))
        fp32_err = errors.get(("int4_w4a16", M, _label(int4["config"]))) if int4 else None
        cells = bench_rows.get(M, {})
        default = cells.get("default")  # tuner.bench's label for vLLM's default config
        tuned = next((c for c in cells.values() if c is not default), None)
        ratio = (tuned["latency_us"] / default["latency_us"]
                 if tuned and default and tuned.get("latency_us") and default.get("latency_us") else None)
        print(f"{M:>5} {_fmt(int4 and int4['latency_us'], '9.1f')} {_fmt(fp8 and fp8['latency_us'], '9.1f')} "
              f"{_fmt(bf16 and bf16['latency_us'], '9.1f')} {_fmt(int4 and int4['rel_err_vs_bf16'], '13.2e')} "
              f"{_fmt(fp32_err, '13.2e')} {_fmt(default and default.get('latency_us'), '10.1f')} "
              f"{_fmt(ratio, '13.3f')}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
