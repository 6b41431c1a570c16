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
#            (CONTROL=1 adds the shipped folder again as a control variant to the compare phase;
#            TUNED=<folder>: the tuned files compared, default $WORK/tuned, where the tune phase writes;
#            e.g. TUNED=results/h200/vllm-0.33-kernel for a host that did not run the tune phase)
#
# KERNEL=sglang (default vllm): the same on SGLang's own fused-MoE kernel, SGLang 0.5.10's Python package from
# .server-kernels/sglang imported through MOE_TUNE_SERVER_CODE=.server-kernels, launcher entry point
# (fused_moe_triton_kernels.invoke_fused_moe_kernel: sgl_kernel's wheel is built for another torch and is not
# carried; SGLang's module-level imports of its ops, on CUDA, get ops that raise if called, none is on the timed
# path). Tune: --kernel sglang --format sglang, baseline = SGLang's shipped configs (.server-kernels/configs/sglang,
# triton_X_Y_Z folders: the running Triton's, else the newest other, as SGLang falls back), default = SGLang's own
# get_default_config (rule sglang). Compare: --kernel sglang --server sglang --rule sglang (SGLang's lookup in both
# the tuned and the shipped folder). Default SHAPES: the bf16 ones (SGLang's launcher quantizes fp8 activations with
# sgl_kernel: fp8 shapes are refused by name).
# Needs, beyond the GPU image (SGLang 0.5.10's import chain to the launcher with its top-level __init__ not run,
# checked on CPU with Python 3.11 and CUDA faked at import): pyzmq openai httpx2 httpcore2 sniffio
# partial-json-parser truststore pybase64 starlette (in .vllm-wheels), pydantic (.gpu-wheels), and ipython
# traitlets dill (.sglang-wheels: server_args -> openai protocol -> sglang.utils imports IPython.display; the
# sampling code imports dill). And sglang/jit_kernel/include and csrc (C++ sources, 0.85 MB; SGLang checks at
# import on CUDA that they exist): ../shared/tools/server-kernels extracts only .py files, so add them from the
# same wheel (sglang/jit_kernel/**, non-.py) before carrying.
#   here, once:  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                  --platform manylinux_2_28_x86_64 -d .sglang-wheels ipython traitlets dill     (0.85 MB)
#   call 1:  PHASES=install bash benchmarks/server_kernel_bench.sh     carry [".gpu-wheels"] (once per GPU host)
#   call 2:  KERNEL=sglang bash benchmarks/server_kernel_bench.sh      carry [".vllm-wheels", ".sglang-wheels",
#                                     ".server-kernels/sglang", ".server-kernels/configs/sglang"]
#            (23 + 16 + 0.85 + 1.3 MB, ~44 MB with the repo: under the 64 MiB a call carries)
#
# DRY=1: the whole path on CPU, no GPU: the tiny fixture model (tests/fixtures/tiny-moe.json, 2 batch sizes,
# tests/fixtures/tune-space.yaml), --interpret, the stand-in server of tests/stand_in_servers for KERNEL
# (sglang_topk_output / vllm_launcher) through MOE_TUNE_SERVER_CODE, "shipped" = the real shipped folder when
# carried plus a stand-in file for the fixture shape (for SGLang in an older triton_X_Y_Z folder, so the compare
# must apply SGLang's fallback to find it). E.g. DRY=1 KERNEL=sglang OUT=/tmp/dry bash benchmarks/server_kernel_bench.sh
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
KERNEL=${KERNEL:-vllm}
DRY=${DRY:-}
case "$KERNEL" in
  vllm)   SHAPES=${SHAPES:-mixtral-8x7b:2:bf16 mixtral-8x7b:2:fp8_w8a8 qwen3-30b-a3b:1:bf16 gpt-oss-120b:1:bf16}
          SERVER="vLLM"; RULE=vllm; STAND_IN=vllm_launcher ;;
  sglang) SHAPES=${SHAPES:-mixtral-8x7b:2:bf16 qwen3-30b-a3b:1:bf16 gpt-oss-120b:1:bf16}
          SERVER="SGLang"; RULE=sglang; STAND_IN=sglang_topk_output ;;
  *) echo "server_kernel_bench: KERNEL must be vllm or sglang, not '$KERNEL'" >&2; exit 2 ;;
esac
EXHAUSTIVE_SHAPE=${EXHAUSTIVE_SHAPE:-qwen3-30b-a3b:1:bf16}
EXHAUSTIVE_BATCH_SIZES=1,64,1024,4096
SHIPPED=.server-kernels/configs/$KERNEL
TUNED=${TUNED:-$WORK/tuned}
TUNE_EXTRA=()
if [ -n "$DRY" ]; then
  BATCH_SIZES=1,4; EXHAUSTIVE_BATCH_SIZES=1,4; SHAPES=tests/fixtures/tiny-moe.json:1:bf16; EXHAUSTIVE_SHAPE=$SHAPES
  TOTAL_S=${TOTAL_S_DRY:-900}
  # the stand-ins' versions (0.0.0+stand-in…) name no rule: the rule is given
  TUNE_EXTRA=(--interpret --workers 1 --search-space tests/fixtures/tune-space.yaml --server-version "$RULE")
fi

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
step() { echo "== $1 (t=$(( $(date +%s) - START ))s, $(left)s left)" | tee -a "$LOG"; }
has() { case " $PHASES " in *" $1 "*) return 0;; esac; return 1; }

step "setup"
for wheels in .gpu-wheels .vllm-wheels .sglang-wheels; do
  if [ -z "$DRY" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then   # DRY: this host's packages
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
if [ -n "$DRY" ]; then
  export TRITON_INTERPRET=1 PYTHONPATH=$PYTHONPATH:$PWD/tests/stand_in_servers
  export MOE_TUNE_SERVER_CODE=$PWD/tests/stand_in_servers/$STAND_IN
  dry_shipped=$WORK/shipped-dry; rm -rf "$dry_shipped"; mkdir -p "$dry_shipped"
  [ -d "$SHIPPED" ] && cp -r "$SHIPPED"/. "$dry_shipped"/
  SHIPPED=$dry_shipped
elif [ "$KERNEL" = vllm ]; then
  if [ ! -d .vllm-src/vllm ]; then
    timeout 60 python3 -c "import zipfile; zipfile.ZipFile('.server-kernels/vllm-py.zip').extractall('.vllm-src')" \
      >>"$LOG" 2>&1 || { echo "no .server-kernels/vllm-py.zip carried" | tee -a "$LOG"; exit 2; }
  fi
  export MOE_TUNE_SERVER_CODE=$PWD/.vllm-src
else
  [ -f .server-kernels/sglang/__init__.py ] || { echo "no .server-kernels/sglang carried" | tee -a "$LOG"; exit 2; }
  # on CUDA SGLang imports sglang.jit_kernel, which requires its C++ sources' folders at import
  [ -d .server-kernels/sglang/jit_kernel/include ] && [ -d .server-kernels/sglang/jit_kernel/csrc ] || {
    echo "no .server-kernels/sglang/jit_kernel/{include,csrc}: extract them from the sglang wheel too" | tee -a "$LOG"
    exit 2; }
  [ -d "$SHIPPED" ] || { echo "no $SHIPPED carried" | tee -a "$LOG"; exit 2; }
  export MOE_TUNE_SERVER_CODE=$PWD/.server-kernels
fi
[ -z "$DRY" ] && nvidia-smi -L | tee -a "$LOG"
timeout 120 python3 -c "
import torch, triton
from workers import backends
b = backends.load('$KERNEL')
print('torch', torch.__version__, 'triton', triton.__version__, 'kernel', b.describe())" 2>&1 | tail -3 | tee -a "$LOG" \
  "$OUT/kernel.txt"
grep -q "kernel_entry" "$OUT/kernel.txt" || { echo "$SERVER's kernel does not import (see above)"; exit 1; }

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
    step "tune $shape (--kernel $KERNEL, budget ${budget} min, limit ${per}s)"
    timeout "$per" python3 -m tuner.cli tune --model "$model" --tp "$tp" --dtype "$dtype" --kernel "$KERNEL" \
      --format "$KERNEL" --batch-sizes "$BATCH_SIZES" --budget-minutes "$budget" --baseline "$SHIPPED" \
      --out "$WORK/tuned" --journal "$WORK/journal.jsonl" "${TUNE_EXTRA[@]}" --json \
      >"$OUT/tune_$(name "$shape" | tr '/' '_').json" 2>>"$LOG"
    echo "tune $shape exit $?" | tee -a "$LOG"
  done
  (cd "$WORK/tuned" 2>/dev/null && find . -name 'E=*.json' | while read -r f; do   # flat names in $OUT
     cp "$f" "$OUT/$(echo "${f#./}" | tr '/' '_')"; done)
fi
if [ -n "$DRY" ] && has compare; then
  # the stand-in "shipped" file for the fixture shape: the tuned file's keys with its first config at
  # every key (so it differs from tuned), for SGLang in an older Triton's folder than the running one
  timeout 60 python3 - "$WORK/tuned" "$SHIPPED" "$KERNEL" >>"$LOG" 2>&1 <<'PY'
import json, pathlib, sys
tuned, shipped, kernel = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
for f in sorted(tuned.rglob("E=*.json")):
    entries = json.loads(f.read_text())
    first = next(value for key, value in entries.items() if key.isdigit())
    target = shipped / ("triton_3_1_0" if kernel == "sglang" else "") / f.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({key: first if key.isdigit() else value for key, value in entries.items()}, indent=4))
    print("dry stand-in shipped file:", target.relative_to(shipped))
PY
fi

if has compare; then
  step "compare in $SERVER's kernel: tuned vs shipped vs $SERVER's default (rule $RULE; 3 interleaved rounds)"
  args=(); for shape in $SHAPES; do args+=(--shape "$shape"); done
  # CONTROL=1: the shipped folder a second time (shipped_again): the same configs as separate runners,
  # the comparison's own floor (identical configs should read alike)
  [ -n "${CONTROL:-}" ] && args+=(--configs shipped_again="$SHIPPED")
  timeout $(( $(left) > 60 ? $(left) - 10 : 60 )) python3 benchmarks/server_kernel_compare.py --kernel "$KERNEL" \
    --server "$KERNEL" --rule "$RULE" "${args[@]}" \
    --configs tuned="$TUNED" --configs shipped="$SHIPPED" --versus shipped,default --rounds 3 \
    --batch-sizes "$BATCH_SIZES" --out "$OUT" 2>>"$LOG" | tee "$OUT/compare.txt"
  echo "compare exit ${PIPESTATUS[0]}" | tee -a "$LOG"
fi

if has exhaustive; then
  IFS=: read -r model tp dtype <<<"$EXHAUSTIVE_SHAPE"
  # EXHAUSTIVE_RESERVE_S: kept after the search's budget for its re-timing and writing (at most 50 s of it)
  # and the comparison that follows
  budget=$(python3 -c "print(round(max(0.5, ($(left) - ${EXHAUSTIVE_RESERVE_S:-170}) / 60), 2))")
  step "exhaustive $EXHAUSTIVE_SHAPE at M=$EXHAUSTIVE_BATCH_SIZES (budget ${budget} min)"
  timeout $(( $(left) - ${EXHAUSTIVE_RESERVE_S:-170} + 50 )) python3 -m tuner.cli tune --model "$model" --tp "$tp" --dtype "$dtype" \
    --kernel "$KERNEL" --format "$KERNEL" --strategy exhaustive --batch-sizes $EXHAUSTIVE_BATCH_SIZES --budget-minutes "$budget" \
    --out "$WORK/exhaustive" --journal "$WORK/journal.jsonl" "${TUNE_EXTRA[@]}" --json >"$OUT/exhaustive.json" 2>>"$LOG"
  echo "exhaustive exit $?" | tee -a "$LOG"
  step "compare at M=$EXHAUSTIVE_BATCH_SIZES: tuned vs exhaustive (vs shipped, default)"
  timeout $(( $(left) > 40 ? $(left) - 5 : 40 )) python3 benchmarks/server_kernel_compare.py --kernel "$KERNEL" \
    --server "$KERNEL" --rule "$RULE" --shape "$EXHAUSTIVE_SHAPE" --configs tuned="$TUNED" \
    --configs exhaustive="$WORK/exhaustive" --configs shipped="$SHIPPED" --versus exhaustive --rounds 3 --batch-sizes $EXHAUSTIVE_BATCH_SIZES \
    --out "$OUT/vs_exhaustive" 2>>"$LOG" | tee "$OUT/compare_exhaustive.txt"
fi
gzip -c "$WORK/journal.jsonl" >"$OUT/journal.jsonl.gz" 2>/dev/null
step "done"
tail -n 40 "$LOG" | grep -E "exit|skip|==" | tail -n 15
