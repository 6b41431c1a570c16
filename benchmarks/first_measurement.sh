#!/usr/bin/env bash
# Issue 11's "first measurement" on one host: how long a tune takes to its first measurement when it starts
# Ray of its own (no --address) and when it joins a Ray already running there (`ray start --head`, then
# --address auto). One GPU call, about 3 minutes: Ray started once, a warm-up run joining it (fills the Triton
# cache), then the two kinds interleaved ROUNDS times (default 3), each on the 8-config fixture space at
# M = 1, 64 (Mixtral-8x7B TP2 bf16, moe-tune's builtin kernel), each under `timeout`. Prints one line a run: exit
# code, the process's wall time, the summary's first measurement and phase spans (s from the timeline's zero);
# $OUT gets the --json summaries and table.txt.
#
#   bash benchmarks/first_measurement.sh      carry [".gpu-wheels"]
# DRY=1: the same on the CPU (the tiny fixture model, --interpret, a Ray started with two logical GPUs).
# It ends with `ray stop --force`, which stops every Ray of this host: run it where no other Ray runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moe-first-out}
WORK=${WORK:-/tmp/moe-first}
ROUNDS=${ROUNDS:-3}
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$WORK/triton-cache
if [ -n "${DRY:-}" ]; then
  MODEL=(--model tests/fixtures/tiny-moe.json --interpret); HEAD=(--num-gpus 2 --num-cpus 2)
else
  timeout 200 python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  MODEL=(--model mixtral-8x7b --tp 2); HEAD=()
fi
: >"$OUT/table.txt"

one() {  # NAME [tune flags...]
  local name=$1; shift
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout 120 python3 -m tuner.cli tune "${MODEL[@]}" --batch-sizes 1,64 --search-space tests/fixtures/tune-space.yaml \
    --kernel builtin --out "$WORK/out_$name" --journal "$WORK/journal_$name.jsonl" --json "$@" \
    >"$OUT/$name.json" 2>"$OUT/$name.err"
  rc=$?
  t1=$(date +%s.%N)
  timeout 30 python3 - "$OUT/$name.json" "$name" "$rc" "$t0" "$t1" >>"$OUT/table.txt" <<'PY'
import json, sys
path, name, rc, t0, t1 = sys.argv[1:]
try:
    summary = json.loads(open(path, encoding="utf-8").read().strip().splitlines()[-1])
except (OSError, ValueError, IndexError):
    print(f"{name:<16} exit {rc:>3}  no summary (see {name}.err)")
    sys.exit()
timeline = summary.get("timeline", {})
spans = "  ".join(f"{phase} {timeline[phase]['start_s']:.1f}-{timeline[phase]['end_s']:.1f}"
                  for phase in ("ray_start", "worker_start", "screening") if phase in timeline)
print(f"{name:<16} exit {rc:>3}  process {float(t1) - float(t0):5.1f}s  first measurement "
      f"{timeline.get('first_measurement_s', float('nan')):5.2f}s  {spans}")
PY
}

started=$(date +%s.%N)
timeout 90 python3 -m ray.scripts.scripts start --head --include-dashboard=false --disable-usage-stats "${HEAD[@]}" \
  >"$OUT/ray_start.log" 2>&1
echo "ray start: exit $?, $(python3 -c "import time; print(round(time.time() - $started, 1))")s" >>"$OUT/table.txt"
one cluster_warmup --address auto
for round in $(seq 1 "$ROUNDS"); do
  one "embedded_$round"
  one "cluster_$round" --address auto
done
timeout 60 python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
cat "$OUT/table.txt"
