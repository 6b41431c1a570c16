#!/usr/bin/env bash
set -u
[ -d /tmp/site/ray ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=/tmp/c3; rm -rf $R; mkdir -p $R
# 1. started Ray cluster vs embedded Ray: first measurement, warm Triton cache, the fixture space
export TRITON_CACHE_DIR=$R/tc
one() { # name [extra tune flags]
  local name=$1; shift
  local t0=$(date +%s.%N)
  timeout 90 python3 -m tuner.cli tune --model mixtral-8x7b --tp 2 --batch-sizes 1,64 \
    --search-space tests/fixtures/tune-space.yaml --kernel builtin --out $R/o_$name --journal $R/j_$name.jsonl --json "$@" \
    > $R/$name.json 2> $R/$name.err
  local rc=$? t1=$(date +%s.%N)
  python3 - "$R/$name.json" "$name" "$rc" "$t0" "$t1" >> $R/table.txt <<'PY'
import json, sys
f, name, rc, t0, t1 = sys.argv[1:]
try:
    s = json.loads(open(f).read().strip().splitlines()[-1]); tl = s.get("timeline", {})
    sp = lambda k: "%.1f-%.1f" % (tl[k]["start_s"], tl[k]["end_s"]) if k in tl else "-"
    print(f"{name:14s} rc={rc} proc={float(t1)-float(t0):5.1f} first={tl.get('first_measurement_s')} "
          f"ray={sp('ray_start')} worker={sp('worker_start')} ca={sp('compile_ahead')} scr={sp('screening')} wall={s.get('wall_s')}")
except Exception as e:
    print(f"{name} rc={rc} unreadable {e!r}")
PY
}
t=$(date +%s.%N); timeout 60 python3 -m ray.scripts.scripts start --head --include-dashboard=false --disable-usage-stats > $R/raystart.log 2>&1; echo "ray start rc=$? $(python3 -c "import time;print(round(time.time()-$t,1))")s" >> $R/table.txt
one cluster_warmup --address auto
one embedded_1
one cluster_1 --address auto
one embedded_2
one cluster_2 --address auto
one embedded_3
one cluster_3 --address auto
timeout 60 python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1
cat $R/table.txt
rm -rf $R/tc $R/o_* 
tar czf $OUT/c3.tgz -C /tmp c3  2>/dev/null; ls -la $OUT
