#!/usr/bin/env bash
# Issue 11, a tune resumed from a journal that holds the whole search but no re-timing record, with an empty
# Triton cache (the driver killed while re-timing, a node that restarted, another node): the search ends at once
# (all reused) and nothing in that run compiled the finalists it then re-times. One GPU call, about 5 minutes:
#   full       the tune from a cold Triton cache (its journal is the one resumed below);
#   resumed    the journal's re-timing records removed, the Triton cache emptied, the same tune again: the
#              finalists are compiled ahead on the CPU before they are re-timed;
#   no_ahead   the same with --no-compile-ahead: the GPU worker compiles every finalist itself, one after
#              another (what every resumed run did before compile-ahead covered the re-timing).
# Every step runs under `timeout`; $OUT gets tune_<run>.json (the --json summaries), run.log and summary.txt,
# a table printed last: the re-timing span, wall time, batch sizes re-timed, and the compile-ahead counts.
#
#   bash benchmarks/resume_retiming.sh                      carry [".gpu-wheels"]          (moe-tune's builtin kernel)
#   KERNEL=vllm bash benchmarks/resume_retiming.sh          vLLM 0.33's own kernel: on a warm host where
#       `PHASES=install bash benchmarks/server_kernel_bench.sh` ran; carry [".server-kernels/vllm-py.zip"]
#   knobs (environment): MODEL_ARGS (default "--model mixtral-8x7b --tp 2 --dtype bf16"), BATCH_SIZES (default
#   vLLM's 18), TOTAL_S (default 290).
# DRY=1: the whole path on the CPU: the tiny fixture model under --interpret, the fault plan's stand-in compiler
# (workers.faults: compile-ahead jobs that compile nothing) and `retime_s` (each re-timing call 1 s longer, as a
# worker compiling its finalists itself) in place of Triton's compiler and a GPU's own compiles, deterministic
# latencies. E.g. DRY=1 OUT=/tmp/dry bash benchmarks/resume_retiming.sh
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-/tmp/moe-resume-out}
mkdir -p "$OUT"
WORK=${WORK:-/tmp/moe-resume}
rm -rf "$WORK" && mkdir -p "$WORK"
LOG="$OUT/run.log"
TOTAL_S=${TOTAL_S:-290}
KERNEL=${KERNEL:-builtin}
DRY=${DRY:-}
BATCH_SIZES=${BATCH_SIZES:-1,2,4,8,16,24,32,48,64,96,128,256,512,1024,1536,2048,3072,4096}
read -r -a MODEL <<<"${MODEL_ARGS:---model mixtral-8x7b --tp 2 --dtype bf16}"
EXTRA=(--kernel "$KERNEL")

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
step() { echo "== $1 (t=$(( $(date +%s) - START ))s, $(left)s left)" | tee -a "$LOG"; }

step "setup"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$WORK/triton-cache
if [ -n "$DRY" ]; then
  export PYTHONPATH=$PWD TRITON_INTERPRET=1 MOE_TUNE_FAULTS=$WORK/faults.json
  echo '{"deterministic_latency": true, "faults": [], "compile_ahead": {"setup_s": 0, "job_s": 0.05},
         "retime_s": 1}' >"$MOE_TUNE_FAULTS"
  MODEL=(--model tests/fixtures/tiny-moe.json); BATCH_SIZES=1,2,4
  EXTRA=(--kernel builtin --interpret --workers 1 --search-space tests/fixtures/tune-space.yaml)
elif [ "$KERNEL" = vllm ]; then
  [ -d .gpu-site ] || { echo "no .gpu-site: run PHASES=install bash benchmarks/server_kernel_bench.sh first" | tee -a "$LOG"; exit 2; }
  if [ ! -d .vllm-src/vllm ]; then
    timeout 60 python3 -c "import zipfile; zipfile.ZipFile('.server-kernels/vllm-py.zip').extractall('.vllm-src')" \
      >>"$LOG" 2>&1 || { echo "no .server-kernels/vllm-py.zip carried" | tee -a "$LOG"; exit 2; }
  fi
  export PYTHONPATH=$PWD/.gpu-site:$PWD MOE_TUNE_SERVER_CODE=$PWD/.vllm-src
else
  timeout 200 python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/*.whl >>"$LOG" 2>&1
  export PYTHONPATH=/tmp/site:$PWD
fi
[ -z "$DRY" ] && nvidia-smi -L | tee -a "$LOG"

# tune NAME TIMEOUT_S JOURNAL [FLAGS...]: one run, its summary in $OUT/tune_NAME.json
tune() {
  local name=$1 limit=$2 journal=$3; shift 3
  step "$name (at most ${limit}s)"
  timeout "$limit" python3 -m tuner.cli tune "${MODEL[@]}" "${EXTRA[@]}" --batch-sizes "$BATCH_SIZES" \
    --out "$WORK/out_$name" --journal "$journal" --json "$@" >"$OUT/tune_$name.json" 2>>"$LOG"
  local rc=$?
  echo "$rc" >"$OUT/exit_$name"
  echo "$name exit $rc" | tee -a "$LOG"
}

tune full 170 "$WORK/journal.jsonl"
step "journal without its re-timing records; empty Triton cache"
timeout 30 python3 - "$WORK/journal.jsonl" "$WORK/resumed.jsonl" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
lines = open(sys.argv[1], encoding="utf-8").read().splitlines()
kept = [line for line in lines if json.loads(line).get("kind") != "retime"]
open(sys.argv[2], "w", encoding="utf-8").write("".join(line + "\n" for line in kept))
print(f"{len(lines) - len(kept)} re-timing records removed, {len(kept)} measurements kept")
EOF
cp "$WORK/resumed.jsonl" "$WORK/no_ahead.jsonl"
rm -rf "$TRITON_CACHE_DIR"
tune resumed $(( $(left) / 2 > 30 ? $(left) / 2 : 30 )) "$WORK/resumed.jsonl"
rm -rf "$TRITON_CACHE_DIR"
tune no_ahead $(( $(left) > 30 ? $(left) : 30 )) "$WORK/no_ahead.jsonl" --no-compile-ahead

step "summary"
timeout 30 python3 - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path

from workers.backends.base import describe_label

out = Path(sys.argv[1])
kernel = {}
print(f"{'run':<10} {'exit':>4} {'wall s':>7} {'re-timing s':>11} {'re-timed':>8} {'reused evals':>12}  compile-ahead for the re-timing")
for name in ("full", "resumed", "no_ahead"):
    code = (out / f"exit_{name}").read_text().strip() if (out / f"exit_{name}").exists() else "-"
    try:
        s = json.loads((out / f"tune_{name}.json").read_text())
    except (OSError, ValueError):
        print(f"{name:<10} {code:>4} no summary (124: killed by its timeout; else see run.log)")
        continue
    span = s.get("timeline", {}).get("retiming", {})
    device = (s.get("devices") or [{}])[0]
    ahead = device.get("compile_ahead") or {}
    r = ahead.get("retiming")
    kernel = device.get("env") or kernel
    what = (f"{r['jobs']} configs; batch sizes compiled ahead {r['batch_sizes_compiled_ahead']}, taken still "
            f"compiling {r['batch_sizes_taken_uncompiled']}" if r else "off")
    print(f"{name:<10} {code:>4} {s.get('wall_s', 0):>7.1f} {span.get('duration_s', float('nan')):>11.1f} "
          f"{s.get('retimed_groups', 0):>8} {s.get('evaluations_reused', 0):>12}  {what}")
print(f"kernel: {describe_label(kernel)}, torch {kernel.get('torch')}, triton {kernel.get('triton')}, "
      f"{kernel.get('device')}")
EOF
