"""On a GPU host: does a GPU process find what compile-ahead compiled, without compiling it again?

Compiles one config in a child process that sees no GPU (``CUDA_VISIBLE_DEVICES=""``, as Ray's
CPU actors do) through ``workers.compile_ahead``, then runs that config and a config nobody
compiled on the GPU here, counting new entries in the Triton cache and timing each first run.
The precompiled config must add no entry (every kernel was a cache hit) and start fast.

    python benchmarks/compile_cache_check.py      # prints one JSON line; exit 1 if the cache missed
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from triton import knobs  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

from workers.compile_ahead import CompileTarget  # noqa: E402
from workers.moe import MoERunner  # noqa: E402
from workers.quant import quantize_weight  # noqa: E402
from workers.records import Config, DType, MoEShape  # noqa: E402
from workers.routing import make_routing  # noqa: E402

SHAPE = MoEShape(E=8, N=1024, K=1024, topk=2, dtype=DType.BF16)
BATCH_SIZES = (1, 64)
PRECOMPILED = Config(64, 128, 64, 16, 4, 3)
COLD = Config(32, 64, 128, 1, 8, 4)

CHILD = """
import json, sys
from workers.compile_ahead import CompileJob, CompileTarget, compile_job, setup_compile_process
from workers.records import Config, DType, MoEShape
setup_compile_process()
job = CompileJob(MoEShape(**json.loads(sys.argv[1])), Config(**json.loads(sys.argv[2])),
                 tuple(json.loads(sys.argv[3])), CompileTarget(**json.loads(sys.argv[4])))
outcome = compile_job(job)
print(json.dumps([outcome.status.value, outcome.message, outcome.kernels, outcome.seconds]))
"""


def cache_entries() -> set[str]:
    folder = Path(knobs.cache.dir)
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def first_run(config: Config, M: int) -> tuple[float, int]:
    """Seconds of the first run of ``config`` at batch size ``M`` and the cache entries it added."""
    gen = torch.Generator(device="cuda").manual_seed(M)
    w13 = quantize_weight(torch.randn((SHAPE.E, 2 * SHAPE.N, SHAPE.K), device="cuda", generator=gen,
                                      dtype=torch.bfloat16) * SHAPE.K ** -0.5, SHAPE.dtype)
    w2 = quantize_weight(torch.randn((SHAPE.E, SHAPE.K, SHAPE.N), device="cuda", generator=gen,
                                     dtype=torch.bfloat16) * SHAPE.N ** -0.5, SHAPE.dtype)
    x = torch.randn((M, SHAPE.K), device="cuda", dtype=torch.bfloat16, generator=gen)
    weights, ids = make_routing("uniform", M, SHAPE.E, SHAPE.topk, torch.Generator().manual_seed(M), "cuda")
    runner = MoERunner(x, w13, w2, weights, ids, config)
    before = cache_entries()
    torch.cuda.synchronize()
    started = time.perf_counter()
    runner.run()
    torch.cuda.synchronize()
    return time.perf_counter() - started, len(cache_entries() - before)


def main() -> int:
    torch.cuda.init()
    target = driver.active.get_current_target()
    shared = driver.active.utils.get_device_properties(torch.cuda.current_device())["max_shared_mem"]
    compile_target = CompileTarget(target.backend, target.arch, target.warp_size, int(shared))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [json.dumps({"E": SHAPE.E, "N": SHAPE.N, "K": SHAPE.K, "topk": SHAPE.topk, "dtype": SHAPE.dtype.value}),
            json.dumps(PRECOMPILED.to_dict()), json.dumps(list(BATCH_SIZES)), json.dumps(compile_target.__dict__)]
    started = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, timeout=300)
    if child.returncode != 0:
        print(child.stderr[-3000:], file=sys.stderr)
        return 1
    status, message, kernels, compile_s = json.loads(child.stdout.strip().splitlines()[-1])
    report = {"device": torch.cuda.get_device_name(), "target": compile_target.__dict__,
              "compile_ahead": {"status": status, "message": message, "kernels": kernels,
                                "seconds": round(time.perf_counter() - started, 2)}}
    for label, config in (("precompiled", PRECOMPILED), ("cold", COLD)):
        for M in BATCH_SIZES:
            seconds, new = first_run(config, M)
            report[f"{label}_M{M}"] = {"first_run_s": round(seconds, 3), "new_cache_entries": new}
    hits = all(report[f"precompiled_M{M}"]["new_cache_entries"] == 0 for M in BATCH_SIZES)
    report["cache_hit"] = hits and status == "ok"
    print(json.dumps(report))
    return 0 if report["cache_hit"] else 1


if __name__ == "__main__":
    sys.exit(main())
