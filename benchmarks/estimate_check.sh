#!/usr/bin/env bash
# One GPU call (about 3 minutes on one H200): what `moe-tune plan` estimates for a tune, then the
# tune itself from a cold Triton cache, and the two side by side (measurements, compiled configs,
# wall time), plus what the user's terminal got from the run (Ray's start-up notices must be
# absent; the progress lines are counted). Every step runs under `timeout`; everything
# lands in $OUT (flat names) and a short table is printed last.
#
#   on the GPU host, from the repository root:  bash benchmarks/estimate_check.sh
#   on a CPU (the pipeline only, tiny shapes):   INTERPRET=1 bash benchmarks/estimate_check.sh
#   knobs (environment): MODEL_ARGS (default "--model mixtral-8x7b --tp 2 --dtype bf16"),
#   BATCH_SIZES (default vLLM's 18), TUNE_S (default 240)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moe-estimate-out}
WORK=/tmp/moe-estimate
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
LOG="$OUT/run.log"
TUNE_S=${TUNE_S:-240}
if [ "${INTERPRET:-0}" = 1 ]; then
  read -r -a MODEL <<<"${MODEL_ARGS:---model tests/fixtures/tiny-moe.json --search-space tests/fixtures/tune-space.yaml}"
  BATCH_SIZES=${BATCH_SIZES:-1,4}
  EXTRA=(--interpret)
  DEVICE=(--device-name cpu)
else
  read -r -a MODEL <<<"${MODEL_ARGS:---model mixtral-8x7b --tp 2 --dtype bf16}"
  BATCH_SIZES=${BATCH_SIZES:-1,2,4,8,16,24,32,48,64,96,128,256,512,1024,1536,2048,3072,4096}
  EXTRA=()
  DEVICE=()
  if ls .gpu-wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/*.whl >>"$LOG" 2>&1
    export PYTHONPATH=/tmp/site:$PWD
  fi
  nvidia-smi -L >>"$LOG" 2>&1
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=$WORK/triton-cache   # cold, as the estimate's compile time assumes
python3 -m tuner.cli --version >"$OUT/versions.txt" 2>>"$LOG"

echo "== plan" >>"$LOG"
timeout 120 python3 -m tuner.cli plan "${MODEL[@]}" --batch-sizes "$BATCH_SIZES" "${DEVICE[@]}" --json \
  >"$OUT/plan.json" 2>>"$LOG"
echo "plan exit $?" >>"$LOG"

echo "== tune" >>"$LOG"
# stderr is a file here, as in a nightly job: the log-mode progress lines are what is checked.
timeout "$TUNE_S" python3 -m tuner.cli tune "${MODEL[@]}" --batch-sizes "$BATCH_SIZES" "${EXTRA[@]}" \
  --out "$WORK/tuned" --json >"$OUT/tune.json" 2>"$OUT/tune_stderr.txt"
echo "tune exit $?" >>"$LOG"

python3 - "$OUT" <<'EOF'
import json, re, sys
from pathlib import Path

out = Path(sys.argv[1])
try:
    estimate = json.loads((out / "plan.json").read_text())["estimate"]
    tune = json.loads((out / "tune.json").read_text())
except (OSError, ValueError, KeyError) as exc:
    print(f"no result to compare: {exc}"); sys.exit(1)
device = tune["devices"][0]
measured = device["measured"]
screens = sum(v for k, v in measured.items() if k.endswith("/screen"))
fulls = sum(v for k, v in measured.items() if k.endswith("/full"))
compiled = device.get("compile_ahead", {}).get("jobs")
stderr = (out / "tune_stderr.txt").read_text()
stamps = [line for line in stderr.splitlines() if line.startswith("moe-tune: ")]
chatter = [line for line in stderr.splitlines() if re.search(r"(WARNING|INFO) \w+\.py:\d+ -- ", line)]
rows = [("kernel", "", f"{device['env'].get('kernel')} {device['env'].get('kernel_hash', '')}".strip()),
        ("screens", estimate["screens"], screens), ("full timings", estimate["full_timings"], fulls),
        ("screens bounds", "{}..{}".format(*estimate["screens_bounds"]), screens),
        ("configs compiled", estimate["configs_to_compile"], compiled),
        ("wall s", estimate["wall_s"], tune["wall_s"]),
        ("Ray log lines on stderr", 0, len(chatter)), ("progress/phase lines", "", len(stamps))]
(out / "estimate_check.json").write_text(json.dumps({"estimate": estimate, "measured": measured,
                                                     "wall_s": tune["wall_s"], "ray_lines": chatter}, indent=2))
print(f"{'':26}{'estimated':>14}{'measured':>14}")
for name, a, b in rows:
    print(f"{name:26}{str(a):>14}{str(b):>14}")
EOF
