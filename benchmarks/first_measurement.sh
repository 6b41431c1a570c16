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
# Its Ray is its own, whatever else runs on the host: RAY_TMPDIR under $WORK (where `ray start` records its
# address and --address auto finds it), a free port, and `ray start --block` in a session of its own whose
# processes are killed at the end (never `ray stop`, which would end every Ray cluster of the host).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moe-first-out}
WORK=${WORK:-/tmp/moe-first}
ROUNDS=${ROUNDS:-3}
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$WORK/triton-cache RAY_TMPDIR=$WORK/rt
mkdir -p "$RAY_TMPDIR"
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

stop_head() {  # every process of the head's session: its id is the pid setsid kept (a background job of
  # a script is no process group leader, so setsid makes it a session leader without forking)
  timeout 30 python3 - "$HEAD_SESSION" <<'PY'
import os, signal, sys
session = int(sys.argv[1])
for entry in filter(str.isdigit, os.listdir("/proc")):
    try:
        if os.getsid(int(entry)) == session:
            os.kill(int(entry), signal.SIGKILL)
    except OSError:
        pass
PY
  wait "$HEAD_SESSION" 2>/dev/null  # reaped quietly
}
port=$(python3 -c "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])")
started=$(date +%s.%N)
setsid python3 -m ray.scripts.scripts start --head --block --port "$port" --include-dashboard=false \
  --disable-usage-stats "${HEAD[@]}" >"$OUT/ray_start.log" 2>&1 &
HEAD_SESSION=$!
trap stop_head EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# up once it has recorded its address (which `ray start` does after "Ray runtime started")
for _ in $(seq 900); do
  [ -s "$RAY_TMPDIR/ray/ray_current_cluster" ] || ! kill -0 "$HEAD_SESSION" 2>/dev/null && break
  sleep 0.1
done
echo "ray start: $([ -s "$RAY_TMPDIR/ray/ray_current_cluster" ] && echo up || echo failed), port $port," \
  "$(python3 -c "import time; print(round(time.time() - $started, 1))")s" >>"$OUT/table.txt"
one cluster_warmup --address auto
for round in $(seq 1 "$ROUNDS"); do
  one "embedded_$round"
  one "cluster_$round" --address auto
done
cat "$OUT/table.txt"
