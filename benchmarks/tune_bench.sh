#!/usr/bin/env bash
# One GPU call (about 9 minutes on one H200): tune Mixtral-8x7B TP2 bf16 with the fast strategy
# from a cold Triton cache; with the time left, an exhaustive search at one batch size for
# reference; then time the written configs against vLLM's default heuristic and the shipped vLLM
# H200 config (.vllm-shipped/, carried by the caller), all interleaved in one GPU process. Every step runs under `timeout` so a
# slow step cannot take the others' results with it; everything lands in $OUT (flat names: the
# device tool returns only plain file names) and a compact summary is printed last.
#
#   run from the repository root on the GPU host:  bash benchmarks/tune_bench.sh
#   knobs (environment): BATCH_SIZES (default 1,16,64,256,1024,4096), TOTAL_S (default 520),
#   EXHAUSTIVE_M (default 64; a comma list works; empty skips it), MODEL_ARGS (default
#   "--model mixtral-8x7b --tp 2 --dtype bf16"), CACHE_CHECK (default 1; 0 skips that step),
#   TUNE_EXTRA (more flags for the fast tune, e.g. "--split-gemms"; the summary prints the split gain)
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-/tmp/moe-bench-out}
mkdir -p "$OUT"
WORK=/tmp/moe-bench
rm -rf "$WORK" && mkdir -p "$WORK"
LOG="$OUT/run.log"
BATCH_SIZES=${BATCH_SIZES:-1,16,64,256,1024,4096}
TOTAL_S=${TOTAL_S:-520}
EXHAUSTIVE_M=${EXHAUSTIVE_M-64}
read -r -a MODEL <<<"${MODEL_ARGS:---model mixtral-8x7b --tp 2 --dtype bf16}"
read -r -a TUNE_EXTRA <<<"${TUNE_EXTRA:-}"

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
step() { echo "== $1 (t=$(( $(date +%s) - START ))s, $(left)s left)" | tee -a "$LOG"; }

step "setup"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/*.whl >>"$LOG" 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=$WORK/triton-cache   # cold: a fresh cache for this run, shared by workers and compilers
nvidia-smi -L | tee -a "$LOG"
python3 -c "import torch, triton, ray; print('torch', torch.__version__, 'triton', triton.__version__, 'ray', ray.__version__)" \
  2>&1 | tee -a "$LOG"

if [ "${CACHE_CHECK:-1}" = 1 ]; then
  step "compile-ahead cache check (a GPU process must find a CPU process's compile in the cache)"
  timeout 150 python3 benchmarks/compile_cache_check.py >"$WORK/cache_check.json" 2>>"$LOG"
  echo "cache check exit $?" >>"$LOG"
  rm -rf "$TRITON_CACHE_DIR"   # the tune below starts cold again
fi

step "tune (fast strategy, cold cache; the shipped vLLM configs as baseline when carried)"
BASELINE=()
[ -d .vllm-shipped ] && BASELINE=(--baseline .vllm-shipped)
timeout 330 python3 -m tuner.cli tune "${MODEL[@]}" --batch-sizes "$BATCH_SIZES" --budget-minutes 4.5 "${BASELINE[@]}" "${TUNE_EXTRA[@]}" \
  --out "$WORK/tuned" --journal "$WORK/journal.jsonl" --json >"$OUT/tune.json" 2>>"$LOG"
echo "tune exit $?" >>"$LOG"
cp "$WORK"/tuned/E=*.json "$OUT/tuned_config.json" 2>/dev/null

if [ -n "$EXHAUSTIVE_M" ] && [ "$(left)" -gt 240 ]; then
  BUDGET=$(python3 -c "print(round(($(left) - 190) / 60, 2))")  # keeps ~3 min for the bench
  step "exhaustive at M=$EXHAUSTIVE_M (budget ${BUDGET} min; screens the fast run measured are reused)"
  timeout $(( $(left) - 160 )) python3 -m tuner.cli tune "${MODEL[@]}" --batch-sizes "$EXHAUSTIVE_M" \
    --strategy exhaustive --budget-minutes "$BUDGET" --out "$WORK/exhaustive" --journal "$WORK/journal.jsonl" \
    --json >"$OUT/exhaustive.json" 2>>"$LOG"
  echo "exhaustive exit $?" >>"$LOG"
fi
step "bench: tuned vs vLLM default heuristic vs shipped vLLM H200 config"
FOLDERS=("$WORK/tuned")
[ -d .vllm-shipped ] && FOLDERS+=(.vllm-shipped)
[ -d "$WORK/exhaustive" ] && FOLDERS+=("$WORK/exhaustive")   # its M only; other M fall back to the heuristic
timeout $(( $(left) > 60 ? $(left) : 60 )) python3 -m tuner.cli bench "${MODEL[@]}" --batch-sizes "$BATCH_SIZES" \
  --configs "${FOLDERS[@]}" --json >"$OUT/bench.json" 2>>"$LOG"
echo "bench exit $?" >>"$LOG"

gzip -c "$WORK/journal.jsonl" >"$OUT/journal.jsonl.gz" 2>/dev/null

step "summary"
python3 - "$OUT" "$WORK/cache_check.json" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path

out, check_path = Path(sys.argv[1]), Path(sys.argv[2])

def load(path):
    try:
        text = Path(path).read_text().strip()
        return json.loads(text.splitlines()[-1]) if text else None
    except (OSError, ValueError, IndexError):
        return None

check = load(check_path)
if check:
    pre = {k: v for k, v in check.items() if k.startswith(("precompiled", "cold"))}
    print(f"cache check: hit={check['cache_hit']} compile-ahead {check['compile_ahead']['status']} "
          f"({check['compile_ahead']['seconds']}s); first runs: {json.dumps(pre)}")
tune = load(out / "tune.json")
if tune:
    dev = tune["devices"][0] if tune["devices"] else {}
    print(f"fast tune: wall {tune['wall_s']:.0f}s, evaluations {tune['evaluations_run']} "
          f"(measured {dev.get('measured')}), failed {tune['failed']}, budget ended {tune['budget_ended']}")
    print(f"  compile-ahead: {dev.get('compile_ahead')}")
    for shape, per_m in dev.get("best", {}).items():
        ratios = {M: b["vs_baseline"] for M, b in per_m.items() if "vs_baseline" in b}
        if ratios:
            print(f"  {shape} tuned / baseline, same re-timing: " + " ".join(f"M={M}:{r:.3f}" for M, r in ratios.items()))
    for shape, per_m in dev.get("split_gemms", {}).items():
        print(f"  {shape} split up/down configs save (% of the two GEMMs' time vs one shared config): "
              + " ".join(f"M={M}:{s['gain_pct']:.1f}" for M, s in per_m.items() if s["gain_pct"] is not None))
bench = load(out / "bench.json")
exhaustive = load(out / "exhaustive.json")
ex_best = {}
if exhaustive and exhaustive["devices"]:
    for per_m in exhaustive["devices"][0]["best"].values():
        ex_best.update({int(M): b for M, b in per_m.items()})
    print(f"exhaustive: wall {exhaustive['wall_s']:.0f}s, evaluations {exhaustive['evaluations_run']} "
          f"(+{exhaustive['evaluations_reused']} reused), budget ended {exhaustive['budget_ended']}")
if bench:
    labels = [v["label"] for v in bench["variants"]]
    print(f"bench on {bench['device']} (us per MoE call; ratio = {bench['ratio']}):")
    print("      M " + "".join(f"{l[-22:]:>26}" for l in labels))
    for row in bench["rows"]:
        cells = []
        for l in labels:
            r = row["results"][l]
            us = r["latency_us"]
            ratio = r["vs_reference"]
            cells.append(f"{us:12.1f} ({ratio:5.3f}x)" if ratio is not None else f"{r['status']:>20}")
        print(f"  {row['M']:5d} " + "".join(f"{c:>26}" for c in cells))
for M, b in sorted(ex_best.items()):
    print(f"  exhaustive pick at M={M}: {b['latency_us']:.1f} us {b['config']}")
EOF
echo "total $(( $(date +%s) - START ))s"
