#!/usr/bin/env bash
# Table 4 of docs/benchmarks.md: tune on vLLM's own fused-MoE kernel (--kernel vllm, vLLM 0.33's
# Python code from the extracted wheel, launcher entry point) and time the written files in that
# kernel, in one GPU process, interleaved, next to vLLM's shipped H200 files and vLLM 0.33's
# default config (its own get_default_config). Every step runs under `timeout`; results land in
# $OUT as they come (flat names) and a table is printed last.
#
# Phases (PHASES, space-separated; default "tune compare"), each call about 9 minutes at most:
#   install     pip-install every wheel of .gpu-wheels/ and .vllm-wheels/ that is here into
#               .gpu-site/ (kept on the GPU host between calls: an ignored path), then stop.
#   tune        Mixtral-8x7B TP2 bf16 and fp8_w8a8, Qwen3-30B-A3B TP1 bf16, gpt-oss-120b TP1 bf16,
#               18 batch sizes, --kernel vllm, --baseline = vLLM's shipped configs.
#   compare     the tuned files vs shipped vs default in vLLM's kernel (>= 3 rounds).
#   exhaustive  EXHAUSTIVE_SHAPE (default qwen3-30b-a3b:1:bf16) at M 1,64,1024,4096, exhaustive
#               strategy in vLLM's kernel, then tuned vs exhaustive vs shipped vs default there.
# Needs: .server-kernels/vllm-py.zip and .server-kernels/configs/vllm (carried), Ray and
# vLLM's import-time dependencies installed (the install phase), torch + Triton on the host.
#
# Calls (carry <= 64 MiB each; .gpu-site/ and .vllm-src/ stay on the warm GPU host between calls, which
# must follow each other within the host's idle window, ~30 s):
#   here, once:  ../shared/tools/offline-wheels .vllm-wheels pyzmq cbor2 httpx2 httpcore2 truststore openai-harmony \
#                  openai sniffio pybase64 cachetools msgspec xgrammar apache-tvm-ffi fastapi starlette \
#                  opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-exporter-otlp \
#                  partial-json-parser llguidance blake3
#                then delete from .vllm-wheels/ Ray and the wheels .gpu-wheels/ already has (~16 MB left: vLLM
#                0.33's fused-MoE import chain minus what the GPU image holds, see the device's KINDS.md)
#   call 1:  PHASES=install bash benchmarks/server_kernel_bench.sh        carry [".gpu-wheels"]
#   call 2:  SHAPES="…" bash benchmarks/server_kernel_bench.sh            carry [".vllm-wheels",
#                                     ".server-kernels/vllm-py.zip", ".server-kernels/configs/vllm"]
#            (about 2.5 minutes per shape for a complete 18-batch tune from a cold cache, then ~20-50 s per
#            shape to compare; RESUME_JOURNAL=<journal.jsonl.gz of an earlier call> finishes cut tunes)
#   call 3:  PHASES=exhaustive bash benchmarks/server_kernel_bench.sh     same carry as call 2
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-/tmp/moe-server-bench-out}
mkdir -p "$OUT"
WORK=${WORK:-/tmp/moe-server-bench}
mkdir -p "$WORK"
LOG="$OUT/run.log"
TOTAL_S=${TOTAL_S:-540}
PHASES=${PHASES:-tune compare}
SITE=$PWD/.gpu-site
BATCH_SIZES=${BATCH_SIZES:-1,2,4,8,16,24,32,48,64,96,128,256,512,1024,1536,2048,3072,4096}
SHAPES=${SHAPES:-mixtral-8x7b:2:bf16 mixtral-8x7b:2:fp8_w8a8 qwen3-30b-a3b:1:bf16 gpt-oss-120b:1:bf16}
EXHAUSTIVE_SHAPE=${EXHAUSTIVE_SHAPE:-qwen3-30b-a3b:1:bf16}
SHIPPED=.server-kernels/configs/vllm

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
step() { echo "== $1 (t=$(( $(date +%s) - START ))s, $(left)s left)" | tee -a "$LOG"; }
has() { case " $PHASES " in *" $1 "*) return 0;; esac; return 1; }

step "setup"
for wheels in .gpu-wheels .vllm-wheels; do
  if ls "$wheels"/*.whl >/dev/null 2>&1; then
    stamp="$SITE/.installed-${wheels#.}"
    if [ -f "$stamp" ] && [ "$(ls "$wheels")" = "$(cat "$stamp")" ]; then
      echo "$wheels: installed by an earlier call" | tee -a "$LOG"; continue
    fi
    timeout 200 python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
      "$wheels"/*.whl >>"$LOG" 2>&1
    rc=$?; echo "installed $wheels: exit $rc" | tee -a "$LOG"
    [ "$rc" = 0 ] && ls "$wheels" >"$stamp"
  fi
done
has install && [ "$PHASES" = install ] && { echo "install done"; exit 0; }
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=$WORK/triton-cache
if [ ! -d .vllm-src/vllm ]; then
  timeout 60 python3 -c "import zipfile; zipfile.ZipFile('.server-kernels/vllm-py.zip').extractall('.vllm-src')" \
    >>"$LOG" 2>&1 || { echo "no .server-kernels/vllm-py.zip carried" | tee -a "$LOG"; exit 2; }
fi
export MOE_TUNE_SERVER_CODE=$PWD/.vllm-src
nvidia-smi -L | tee -a "$LOG"
timeout 120 python3 -c "
import torch, triton
from workers import backends
b = backends.load('vllm')
print('torch', torch.__version__, 'triton', triton.__version__, 'kernel', b.describe())" 2>&1 | tail -3 | tee -a "$LOG" \
  "$OUT/kernel.txt"
grep -q "kernel_entry" "$OUT/kernel.txt" || { echo "vLLM's kernel does not import (see above)"; exit 1; }

name() { echo "$1" | tr ':' '_'; }
# RESUME_JOURNAL: journal.jsonl.gz of an earlier call; its measurements are reused, never repeated
if [ -n "${RESUME_JOURNAL:-}" ] && [ -f "$RESUME_JOURNAL" ] && [ ! -s "$WORK/journal.jsonl" ]; then
  gunzip -c "$RESUME_JOURNAL" >"$WORK/journal.jsonl" && echo "resuming $(wc -l <"$WORK/journal.jsonl") journal records" | tee -a "$LOG"
fi
if has tune; then
  n=$(echo $SHAPES | wc -w)
  for shape in $SHAPES; do
    IFS=: read -r model tp dtype <<<"$shape"
    reserve=20; has compare && reserve=${COMPARE_RESERVE_S:-200}; has exhaustive && reserve=$((reserve + ${EXHAUSTIVE_S:-0}))
    per=$(( ($(left) - reserve) / n )); n=$((n - 1))
    [ "$per" -lt 45 ] && { echo "skip $shape: $per s left for it" | tee -a "$LOG"; continue; }
    # start-up before the first measurement (Ray, the workers' and 15 compile processes' vLLM import,
    # first compiles: ~40 s on an H200 host when measured, before the compile services were started
    # alongside the workers) and re-timing (capped at max(30 s, budget/4)) + writing after the budget
    budget=$(python3 -c "print(round(max(0.3, ($per - ${OVERHEAD_S:-75}) / 60), 2))")
    step "tune $shape (--kernel vllm, budget ${budget} min, limit ${per}s)"
    timeout "$per" python3 -m tuner.cli tune --model "$model" --tp "$tp" --dtype "$dtype" --kernel vllm \
      --batch-sizes "$BATCH_SIZES" --budget-minutes "$budget" --baseline "$SHIPPED" --out "$WORK/tuned" \
      --journal "$WORK/journal.jsonl" --json >"$OUT/tune_$(name "$shape").json" 2>>"$LOG"
    echo "tune $shape exit $?" | tee -a "$LOG"
  done
  cp "$WORK"/tuned/E=*.json "$OUT/" 2>/dev/null
fi

if has compare; then
  step "compare in vLLM's kernel: tuned vs shipped vs vLLM 0.33 default (3 interleaved rounds)"
  args=(); for shape in $SHAPES; do args+=(--shape "$shape"); done
  timeout $(( $(left) > 60 ? $(left) - 10 : 60 )) python3 benchmarks/server_kernel_compare.py --kernel vllm "${args[@]}" \
    --configs tuned="$WORK/tuned" --configs shipped="$SHIPPED" --versus shipped,default --rounds 3 \
    --batch-sizes "$BATCH_SIZES" --out "$OUT" 2>>"$LOG" | tee "$OUT/compare.txt"
  echo "compare exit ${PIPESTATUS[0]}" | tee -a "$LOG"
fi

if has exhaustive; then
  IFS=: read -r model tp dtype <<<"$EXHAUSTIVE_SHAPE"
  budget=$(python3 -c "print(round(max(0.5, ($(left) - 170) / 60), 2))")
  step "exhaustive $EXHAUSTIVE_SHAPE at M=1,64,1024,4096 (budget ${budget} min)"
  timeout $(( $(left) - 120 )) python3 -m tuner.cli tune --model "$model" --tp "$tp" --dtype "$dtype" --kernel vllm \
    --strategy exhaustive --batch-sizes 1,64,1024,4096 --budget-minutes "$budget" --out "$WORK/exhaustive" \
    --journal "$WORK/journal.jsonl" --json >"$OUT/exhaustive.json" 2>>"$LOG"
  echo "exhaustive exit $?" | tee -a "$LOG"
  step "compare at M=1,64,1024,4096: tuned vs exhaustive (vs shipped, default)"
  timeout $(( $(left) > 40 ? $(left) - 5 : 40 )) python3 benchmarks/server_kernel_compare.py --kernel vllm \
    --shape "$EXHAUSTIVE_SHAPE" --configs tuned="$WORK/tuned" --configs exhaustive="$WORK/exhaustive" \
    --configs shipped="$SHIPPED" --versus exhaustive --rounds 3 --batch-sizes 1,64,1024,4096 \
    --out "$OUT/vs_exhaustive" 2>>"$LOG" | tee "$OUT/compare_exhaustive.txt"
fi
gzip -c "$WORK/journal.jsonl" >"$OUT/journal.jsonl.gz" 2>/dev/null
step "done"
tail -n 40 "$LOG" | grep -E "exit|skip|==" | tail -n 15
