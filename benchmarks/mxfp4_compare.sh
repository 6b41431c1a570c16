#!/usr/bin/env bash
# Issue 10's table re-measured by moe-tune itself: `moe-tune compare` for gpt-oss-120b over bf16,
# fp8_w8a8, mxfp4 and nvfp4 at M = 1, 16, 64, 256, 1024, 4096, no budget cut, each dtype timed in the
# kernel vLLM 0.33 dispatches for it on the GPU (mxfp4 on Hopper: triton_kernels' matmul_ogs) with
# moe-tune's builtin kernel as the second column. One TP layout per call (TP=1 or TP=4: estimated
# 5-6 and 3-4 minutes on one H200 with a cold Triton cache: 4 dtypes x 6 batch sizes of the fast
# search at ~7 s each for TP1, plus compile-ahead, the accuracy pass and matmul_ogs; each call stops
# at TOTAL_S, default 520 s, and still packs what it has). Everything comes back as flat files in
# $OUT, prefixed tpN-: report.{md,html,json}, configs.tgz, journal.jsonl.gz; compare.log; a short
# table is printed last. DTYPES (default bf16,fp8_w8a8,mxfp4,nvfp4) splits a call further.
#
#   GPU host, repository root:   TP=1 bash benchmarks/mxfp4_compare.sh ; TP=4 bash benchmarks/mxfp4_compare.sh
#   needs: .gpu-wheels/ (the project's offline wheels, as compare_run.sh; or .gpu-site/ left by
#   benchmarks/server_kernel_bench.sh on a warm host, with vLLM's import needs) and SERVER_KERNELS
#   (default .server-kernels, made by ../shared/tools/server-kernels: triton_kernels/ is put on
#   PYTHONPATH; vLLM's Python files there serve --kernel vllm). KERNEL (default vllm): the kernel the
#   fused-MoE dtypes are tuned on; with builtin their numbers are reported but not ranked.
#   CPU dry run of the same pipeline (tiny model, Triton interpreter):  DRY=1 bash benchmarks/mxfp4_compare.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mxfp4-compare-out}
TP=${TP:-1}
WORK=/tmp/mxfp4-compare-tp$TP
# The journal is kept between calls (a call cut by TOTAL_S is finished by running it again on the same
# machine; RESUME_JOURNAL=<tpN-journal.jsonl.gz from an earlier $OUT> carries it to a fresh one).
[[ -n "${FRESH:-}" ]] && rm -rf "$WORK"
rm -rf "$WORK/report" "$WORK/configs" && mkdir -p "$OUT" "$WORK"
[[ -n "${RESUME_JOURNAL:-}" && -f "${RESUME_JOURNAL:-}" ]] && gunzip -c "$RESUME_JOURNAL" >"$WORK/journal.jsonl"
SERVER_KERNELS=$(cd "${SERVER_KERNELS:-.server-kernels}" 2>/dev/null && pwd)
if [[ -n "${DRY:-}" ]]; then
  ARGS=(--model tests/fixtures/tiny-moe.json --tp 1 --batch-sizes 1,4 --search-space tests/fixtures/tune-space.yaml
        --interpret --kernel builtin)
else
  ARGS=(--model gpt-oss-120b --tp "$TP" --moe-layers 36 --batch-sizes 1,16,64,256,1024,4096 --kernel "${KERNEL:-vllm}")
  # .gpu-site/: what benchmarks/server_kernel_bench.sh installed on this (warm) host, vLLM's import needs included
  [[ -d .gpu-site/ray ]] || timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --target .gpu-site \
    .gpu-wheels/*.whl >"$OUT/compare.log" 2>&1
  # vLLM's Python files (extracted from .server-kernels/vllm-py.zip) serve --kernel vllm
  [[ -d .vllm-src/vllm ]] || timeout 60 python3 -c "import zipfile; zipfile.ZipFile('$SERVER_KERNELS/vllm-py.zip').extractall('.vllm-src')"
  export MOE_TUNE_SERVER_CODE=$PWD/.vllm-src
fi
export PYTHONPATH=$PWD/.gpu-site:$PWD${SERVER_KERNELS:+:$SERVER_KERNELS} PYTHONUNBUFFERED=1
{ date -u; nvidia-smi -L 2>/dev/null; timeout 60 python3 -c "import torch, triton, ray; print('torch', torch.__version__, 'triton', triton.__version__, 'ray', ray.__version__)"
  timeout 60 python3 -c "import triton_kernels as t; print('triton_kernels at', t.__file__)"; } >>"$OUT/compare.log" 2>&1
START=$(date +%s)
timeout "${TOTAL_S:-520}" python3 -m tuner.cli compare "${ARGS[@]}" --dtypes "${DTYPES:-bf16,fp8_w8a8,mxfp4,nvfp4}" \
  --out "$WORK/report" --configs-out "$WORK/configs" --journal "$WORK/journal.jsonl" >>"$OUT/compare.log" 2>&1
echo "compare exit $? after $(( $(date +%s) - START ))s" >>"$OUT/compare.log"
for f in "$WORK"/report/report.*; do [[ -f $f ]] && cp "$f" "$OUT/tp$TP-$(basename "$f")"; done
tar czf "$OUT/tp$TP-configs.tgz" -C "$WORK" configs 2>/dev/null
gzip -c "$WORK/journal.jsonl" >"$OUT/tp$TP-journal.jsonl.gz" 2>/dev/null
grep -v '^moe-tune: \[' "$OUT/compare.log" | tail -12
timeout 60 python3 - "$WORK/report/report.json" <<'EOF'
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("no report.json")
print(f"\n{data['model']} {data['layout']} on {data['device']} (µs per MoE call; * = the server's kernel, "
      "builtin = moe-tune's)")
dtypes = list(data["dtypes"])
print("M".rjust(5) + "".join(f"{d:>26}" for d in dtypes))
for M in sorted({p["M"] for p in data["points"]}):
    cells = []
    for d in dtypes:
        p = next((p for p in data["points"] if p["M"] == M and p["dtype"] == d), None)
        server = "—" if not p or p["latency_us"] is None else f"{p['latency_us']:.1f}{'*' if p['server_kernel'] else ''}"
        builtin = "—" if not p or p["builtin_latency_us"] is None else f"{p['builtin_latency_us']:.1f}"
        cells.append(f"{server} / {builtin}".rjust(26))
    print(f"{M:>5}" + "".join(cells))
kernels = sorted({p["kernel"] for p in data["points"] if p["kernel"]})
print("kernels: " + " | ".join(kernels))
for line in [r["text"] for r in data["recommendations"]] + data.get("not_ranked", []):
    print("- " + line)
EOF
