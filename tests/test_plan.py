"""``build_plan`` and the ``moe-tune plan`` command: shapes, file names, counts, JSON schema, bad input."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tuner.commands import plan as plan_command
from tuner.errors import UsageError
from tuner.plan import DEFAULT_BATCH_SIZES, build_plan
from tuner.spaces import DeviceLimits, load_space, prune
from workers.records import DType, MoEShape

FIXTURES = Path(__file__).parent / "fixtures"
MIXTRAL = str(FIXTURES / "mixtral-8x7b.json")


def test_done_when_mixtral_fp8_tp2_on_h200(moe_tune):
    rc, out, err = moe_tune("plan", "--model", MIXTRAL, "--tp", "2", "--dtype", "fp8_w8a8",
                            "--device-name", "NVIDIA H200", "--json")
    assert (rc, err) == (0, "")
    (job,) = json.loads(out)["jobs"]
    assert {k: job[k] for k in ("model", "dtype", "E", "N", "K", "topk", "block_shape", "file_name")} == {
        "model": "mixtral-8x7b", "dtype": "fp8_w8a8", "E": 8, "N": 7168, "K": 4096, "topk": 2,
        "block_shape": None, "file_name": "E=8,N=7168,device_name=NVIDIA_H200,dtype=fp8_w8a8.json"}
    assert job["batch_sizes"] == list(DEFAULT_BATCH_SIZES)
    assert list(job["configs_per_batch"]) == [str(M) for M in DEFAULT_BATCH_SIZES]


def test_json_schema_types(moe_tune):
    rc, out, _ = moe_tune("plan", "--model", "deepseek-v3", "--model", MIXTRAL, "--tp", "8", "--dtype",
                          "fp8_w8a8", "--batch-sizes", "64,1,64", "--device-name", "NVIDIA H100", "--json",
                          "--format", "vllm")
    assert rc == 0
    jobs = json.loads(out)["jobs"]
    assert len(jobs) == 2
    types = {"model": str, "dtype": str, "E": int, "N": int, "K": int, "topk": int, "file_name": str,
             "batch_sizes": list, "configs_per_batch": dict}
    for job in jobs:
        for key, kind in types.items():
            assert isinstance(job[key], kind), key
        assert job["batch_sizes"] == [1, 64]
        assert all(isinstance(v, int) and v > 0 for v in job["configs_per_batch"].values())
    assert jobs[0]["block_shape"] == [128, 128]
    assert jobs[0]["file_name"] == "E=256,N=256,device_name=NVIDIA_H100,dtype=fp8_w8a8,block_shape=[128,128].json"


def test_counts_are_prune_counts(rng: random.Random):
    sizes = sorted(rng.sample(range(1, 8193), 4))
    plan = build_plan([MIXTRAL], tp=2, ep=1, dtypes=["bf16"], block_shape=None, batch_sizes=sizes,
                      space="default", device_name="NVIDIA H200")
    (job,) = plan.jobs
    configs = load_space("default").expand()
    shape = MoEShape(8, 7168, 4096, 2, DType.BF16)
    assert job.shape == shape
    for M in sizes:
        expected = prune(configs, shape, M, DeviceLimits.for_device("NVIDIA H200"))
        assert job.candidates[M] == expected.kept, f"M={M}"
        assert job.dropped_by_reason[M] == expected.dropped_by_reason, f"M={M}"
        assert len(job.candidates[M]) + sum(job.dropped_by_reason[M].values()) == 1920
    assert plan.total_candidates == sum(len(job.candidates[M]) for M in sizes)


def test_same_shape_shares_one_job_and_dtypes_multiply():
    plan = build_plan(["qwen3-30b-a3b", str(FIXTURES / "qwen3-vl-30b-a3b.json"), "qwen3-30b-a3b"], tp=1, ep=1,
                      dtypes=["bf16", "fp8_w8a8"], block_shape=None, batch_sizes=[16], space="default",
                      device_name="NVIDIA H200")
    assert [(j.model, j.shape.dtype) for j in plan.jobs] == [
        ("qwen3-30b-a3b, qwen3-vl-30b-a3b", DType.BF16), ("qwen3-30b-a3b, qwen3-vl-30b-a3b", DType.FP8_W8A8)]


def test_natural_dtypes_without_dtype_flag():
    """gpt-oss's own mxfp4 is what vLLM runs on an H200: triton_kernels' matmul_ogs, no config file."""
    plan = build_plan(["gpt-oss-120b", "deepseek-v3", MIXTRAL], tp=1, ep=1, dtypes=None, block_shape=None,
                      batch_sizes=[1], space="default", device_name="NVIDIA H200", formats="vllm")
    assert [(j.shape.dtype, j.shape.block_shape) for j in plan.jobs] == [(DType.FP8_W8A8, (128, 128)),
                                                                         (DType.BF16, None)]
    [gpt_oss] = plan.served_elsewhere
    assert (gpt_oss.model, gpt_oss.shape.dtype, gpt_oss.shape.N) == ("gpt-oss-120b", DType.MXFP4, 2880)
    assert [(k.server, k.kernel, k.reads_config) for k in gpt_oss.servers] == [("vllm", "matmul_ogs", False)]
    # both servers (the default --format) run matmul_ogs for it
    both = build_plan(["gpt-oss-120b"], tp=1, ep=1, dtypes=None, block_shape=None, batch_sizes=[1],
                      space="default", device_name="NVIDIA H200")
    assert not both.jobs
    [gpt_oss] = both.served_elsewhere
    assert [(k.server, k.kernel, k.reads_config) for k in gpt_oss.servers] == [
        ("vllm", "matmul_ogs", False), ("sglang", "matmul_ogs", False)]


def test_block_shape_flag_applies_to_fp8_jobs_only():
    plan = build_plan([MIXTRAL], tp=2, ep=1, dtypes=["bf16", "fp8_w8a8"], block_shape=(128, 128),
                      batch_sizes=[8], space="default", device_name="NVIDIA H200")
    assert [j.shape.block_shape for j in plan.jobs] == [None, (128, 128)]
    with pytest.raises(UsageError, match="add fp8_w8a8 to the dtypes"):
        build_plan([MIXTRAL], tp=2, ep=1, dtypes=["bf16"], block_shape=(128, 128), batch_sizes=[8],
                   space="default", device_name="NVIDIA H200")


@pytest.mark.parametrize("name", ["NVIDIA H200/x", " "])
def test_a_device_name_no_file_name_can_hold_is_refused(name):
    with pytest.raises(UsageError, match="device name"):
        build_plan([MIXTRAL], tp=2, ep=1, dtypes=["bf16"], block_shape=None, batch_sizes=[8], space="default",
                   device_name=name)


def test_human_table(moe_tune):
    rc, out, _ = moe_tune("plan", "--model", MIXTRAL, "--tp", "2", "--dtype", "fp8_w8a8", "--batch-sizes",
                          "1,4096", "--device-name", "NVIDIA H200")
    assert rc == 0
    assert "E=8,N=7168,device_name=NVIDIA_H200,dtype=fp8_w8a8.json" in out
    assert "search space default (1920 configs)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith("  ") and line.split()[0].isdigit()}
    assert set(rows) == {"1", "4096"}
    assert re.search(r"^1 job\(s\): \d+ configs left after pruning \(3840 before\)$", out, re.MULTILINE)
    assert "candidates to time" not in out  # the pruned space is not what the default strategy times
    assert out.splitlines()[-2].startswith("fast strategy: about ") and out.splitlines()[-1].startswith("roughly ")


def test_detected_device_is_the_default(moe_tune, monkeypatch):
    monkeypatch.setattr(plan_command, "detect_device_name", lambda: "NVIDIA H100 80GB HBM3")
    rc, out, _ = moe_tune("plan", "--model", MIXTRAL, "--batch-sizes", "1", "--json")
    assert rc == 0
    assert json.loads(out)["jobs"][0]["file_name"] == "E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3.json"


@pytest.mark.parametrize("argv,message", [
    (["--model", "no-such-model"], "not a config.json"),
    (["--model", str(FIXTURES / "llama-3-8b.json")], "no MoE layers"),
    (["--model", MIXTRAL, "--tp", "3"], "does not split"),
    (["--model", MIXTRAL, "--tp", "2", "--ep", "4"], "must divide"),
    (["--model", MIXTRAL, "--batch-sizes", "1,x"], "comma-separated integers"),
    (["--model", MIXTRAL, "--batch-sizes", "0,4"], ">= 1"),
    (["--model", MIXTRAL, "--dtype", "int4"], "expected dtypes from bf16, fp16, fp8_w8a8, int8_w8a16, int4_w4a16, "
                                              "mxfp4, nvfp4, got 'int4'"),
    (["--model", MIXTRAL, "--block-shape", "128"], "[block_n, block_k]"),
    (["--model", MIXTRAL, "--block-shape", "128,128"], "add fp8_w8a8 to the dtypes"),
    (["--model", MIXTRAL, "--search-space", "nope"], "search space 'nope' not found"),
    (["--tp", "2"], "--model"),
])
def test_bad_input_exits_2_with_one_line(moe_tune, argv, message):
    rc, out, err = moe_tune("plan", *argv, "--device-name", "NVIDIA H200")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_plan_starts_without_torch_ray_or_matplotlib():
    """Planning is the command people run on laptops: it must not pay seconds of heavy imports."""
    probe = ("import sys; from tuner.cli import main; "
             f"rc = main(['plan', '--model', {MIXTRAL!r}, '--device-name', 'NVIDIA H200', '--json']); "
             "heavy = sorted(m for m in ('torch', 'ray', 'matplotlib', 'triton') if m in sys.modules); "
             "print(rc, heavy, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent.parent)
    assert done.stderr.strip().splitlines()[-1] == "0 []", done.stderr


def test_no_gpu_and_no_device_name(moe_tune, monkeypatch):
    monkeypatch.setattr(plan_command, "detect_device_name", lambda: None)
    rc, out, err = moe_tune("plan", "--model", MIXTRAL)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "--device-name" in err
