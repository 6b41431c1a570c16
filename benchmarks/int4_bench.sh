#!/usr/bin/env bash
# One GPU call (< 4 minutes): int4_w4a16 on the Kimi-K2-style shape (E=384, N=256 per GPU, K=7168,
# top-8: Kimi-K2-Thinking at TP8, group 32 from its compressed-tensors checkpoint) on our builtin
# Triton kernel (the servers' GPTQ/AWQ fused-MoE arithmetic; Marlin is what both servers run for
# this checkpoint on NVIDIA GPUs by default, see `moe-tune plan`):
#   1. `moe-tune compare --dtypes int4_w4a16,fp8_w8a8` (bf16 is always the reference): tuned
#      latency per M of int4, fp8 and bf16 at the same shape, and each one's error vs bf16;
#      every timed config was also checked against the fp32 reference (error in the journal);
#   2. `moe-tune bench --dtype int4_w4a16`: the tuned int4 file against vLLM's default int4 config
#      (the heuristic it uses without a file), back to back.
# Results as files in $OUT (reports, tuned configs, journal, logs); a short table last.
#
#   GPU host, repository root:  bash benchmarks/int4_bench.sh       (carry .gpu-wheels)
#   CPU dry run (tiny shape under the Triton interpreter):  bash benchmarks/int4_bench.sh --interpret
#   knobs: BATCH_SIZES (default 1,16,64,256,1024), BUDGET_MIN (compare's tuning budget, default 2),
#   COMPARE_S / BENCH_S (hard limits, default 160 / 60)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moe-int4-out}
WORK=/tmp/moe-int4
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK"
LOG="$OUT/int4_bench.log"
MODEL=tests/fixtures/cases/kimi-k2-thinking-int4-w4a16.json
LAYOUT=(--tp 8)
SIZES=${BATCH_SIZES:-1,16,64,256,1024}
EXTRA=()
if [[ "${1:-}" == "--interpret" ]]; then
  # Same pipeline on a tiny shape: E=4, N=64, K=64, top-2, group 32.
  python3 - "$WORK/tiny-int4.json" <<'PY'
import json, sys
cfg = json.load(open("tests/fixtures/cases/kimi-k2-thinking-int4-w4a16.json"))
cfg.update(hidden_size=64, moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2)
json.dump(cfg, open(sys.argv[1], "w"))
PY
  MODEL="$WORK/tiny-int4.json"; LAYOUT=(--tp 1); SIZES=${BATCH_SIZES:-1,16}
  EXTRA=(--interpret --search-space tests/fixtures/tune-space.yaml)
  COMPARE_S=${COMPARE_S:-900} BENCH_S=${BENCH_S:-300}  # the interpreter is slow: no 4-minute target
  : >"$LOG"
else
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/*.whl >"$LOG" 2>&1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
{ date -u; nvidia-smi -L 2>/dev/null; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } >>"$LOG" 2>&1
python3 -m tuner.cli plan --model "$MODEL" "${LAYOUT[@]}" --device-name "${DEVICE_NAME:-NVIDIA H200}" --batch-sizes 1 \
  --format vllm >"$OUT/plan.txt" 2>&1

START=$(date +%s)
COMPARE_EXTRA=("${EXTRA[@]}")
[[ ${#EXTRA[@]} -gt 0 ]] && COMPARE_EXTRA=(--interpret --search-space tests/fixtures/tune-space.yaml)
timeout "${COMPARE_S:-160}" python3 -m tuner.cli compare --model "$MODEL" "${LAYOUT[@]}" --dtypes int4_w4a16,fp8_w8a8 \
  --batch-sizes "$SIZES" --budget-minutes "${BUDGET_MIN:-2}" --out "$WORK/report" --configs-out "$WORK/configs" \
  --journal "$WORK/journal.jsonl" "${COMPARE_EXTRA[@]}" >"$OUT/compare.log" 2>&1
echo "compare exit $? after $(( $(date +%s) - START ))s" >>"$LOG"

START=$(date +%s)
BENCH_EXTRA=()
[[ ${#EXTRA[@]} -gt 0 ]] && BENCH_EXTRA=(--interpret)
timeout "${BENCH_S:-60}" python3 -m tuner.cli bench --model "$MODEL" "${LAYOUT[@]}" --dtype int4_w4a16 \
  --batch-sizes "$SIZES" --configs "$WORK/configs" "${BENCH_EXTRA[@]}" --json >"$OUT/bench.json" 2>"$OUT/bench.log"
echo "bench exit $? after $(( $(date +%s) - START ))s" >>"$LOG"

cp "$WORK"/report/report.* "$OUT/" 2>/dev/null
tar czf "$OUT/configs.tgz" -C "$WORK" configs 2>/dev/null
gzip -c "$WORK/journal.jsonl" >"$OUT/journal.jsonl.gz" 2>/dev/null
cat "$LOG"
python3 benchmarks/int4_table.py "$WORK/journal.jsonl" "$OUT/report.json" "$OUT/bench.json" | tee "$OUT/table.txt"
