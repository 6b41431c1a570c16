#!/usr/bin/env bash
# One GPU call: `moe-tune compare` for one model under a time budget, with everything it produced
# brought back as flat files in $OUT (the device tool returns plain files only): the three reports,
# the tuned config files (configs.tgz), the journal (journal.jsonl.gz, to resume elsewhere) and
# the log. The compare runs under `timeout`, so the packing below happens even if it overruns.
#
#   run from the repository root on the GPU host:  bash benchmarks/compare_run.sh
#   knobs (environment): MODEL_ARGS (default "--model gpt-oss-120b --tp 1 --moe-layers 36"),
#   BATCH_SIZES (default 1,16,1024), DTYPES (default fp8_w8a8,mxfp4,nvfp4,int8_w8a16: the order the
#   GPU takes them in, so put the ones the question is about first), BUDGET_MIN (tuning budget,
#   default 2.4), TOTAL_S (hard limit for the compare, default 225)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moe-compare-out}
WORK=/tmp/moe-compare
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK"
read -r -a MODEL <<<"${MODEL_ARGS:---model gpt-oss-120b --tp 1 --moe-layers 36}"

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/*.whl >"$OUT/compare.log" 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{ date -u; nvidia-smi -L; python3 -c "import torch, triton, ray; print('torch', torch.__version__, 'triton', triton.__version__, 'ray', ray.__version__)"; } >>"$OUT/compare.log" 2>&1
START=$(date +%s)
timeout "${TOTAL_S:-225}" python3 -m tuner.cli compare "${MODEL[@]}" --dtypes "${DTYPES:-fp8_w8a8,mxfp4,nvfp4,int8_w8a16}" \
  --batch-sizes "${BATCH_SIZES:-1,16,1024}" --budget-minutes "${BUDGET_MIN:-2.4}" --out "$WORK/report" \
  --configs-out "$WORK/configs" --journal "$WORK/journal.jsonl" >>"$OUT/compare.log" 2>&1
echo "compare exit $? after $(( $(date +%s) - START ))s" >>"$OUT/compare.log"
cp "$WORK"/report/report.* "$OUT/" 2>/dev/null
tar czf "$OUT/configs.tgz" -C "$WORK" configs 2>/dev/null
gzip -c "$WORK/journal.jsonl" >"$OUT/journal.jsonl.gz" 2>/dev/null
grep -v '^moe-tune: \[' "$OUT/compare.log" | tail -20
