"""Which kernel each server runs per dtype and GPU, the padding rule, and the plans and files that
follow: only files a server reads, gpt-oss planned as vLLM runs it."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tuner.dispatch import Arch, gpu_arch, mxfp4_padding, server_kernel
from tuner.models import preset_names
from tuner.plan import build_plan
from tuner.writers import FileConflict, ServerFilesWriter, read_config_folder, server_file, write_vllm
from workers.records import Config, DType, MoEShape

FIXTURES = Path(__file__).parent / "fixtures"
H200 = "NVIDIA H200"


@pytest.mark.parametrize("name,arch", [
    ("NVIDIA H200", Arch.HOPPER), ("NVIDIA H100 80GB HBM3", Arch.HOPPER), ("NVIDIA_H200_NVL", Arch.HOPPER),
    ("NVIDIA H20", Arch.HOPPER), ("NVIDIA B200", Arch.BLACKWELL), ("NVIDIA GB300", Arch.BLACKWELL),
    ("NVIDIA GeForce RTX 5090", Arch.BLACKWELL_CONSUMER), ("NVIDIA A100-SXM4-80GB", Arch.AMPERE),
    ("NVIDIA A10", Arch.AMPERE), ("NVIDIA L40S", Arch.AMPERE), ("Tesla T4", Arch.UNKNOWN),
    ("cpu", Arch.UNKNOWN), ("preflight", Arch.UNKNOWN),
])
def test_gpu_generation_from_the_device_name(name, arch):
    assert gpu_arch(name) is arch


def test_what_vllm_and_sglang_run_for_each_dtype_on_hopper():
    for server, dtype in itertools.product(("vllm", "sglang"), (DType.BF16, DType.FP8_W8A8, DType.INT8_W8A16)):
        kernel = server_kernel(server, dtype, Arch.HOPPER)
        assert (kernel.kernel, kernel.file_dtype) == ("fused_moe", dtype)
    for server in ("vllm", "sglang"):
        mxfp4 = server_kernel(server, DType.MXFP4, Arch.HOPPER)
        assert (mxfp4.kernel, mxfp4.reads_config) == ("matmul_ogs", False)
    # SGLang with expert parallelism upcasts mxfp4 to bf16 and reads the bf16 (no-dtype) file
    assert server_kernel("sglang", DType.MXFP4, Arch.HOPPER, ep=2).file_dtype is DType.BF16
    assert server_kernel("vllm", DType.MXFP4, Arch.HOPPER, ep=2).kernel == "matmul_ogs"
    # nvfp4 on Hopper: vLLM runs Marlin (or Humming), SGLang not at all; neither reads a Triton config
    assert server_kernel("vllm", DType.NVFP4, Arch.HOPPER).kernel == "marlin"
    assert not server_kernel("sglang", DType.NVFP4, Arch.HOPPER).reads_config
    assert server_kernel("vllm", DType.MXFP4, Arch.AMPERE).kernel == "marlin"
    assert server_kernel("vllm", DType.MXFP4, Arch.BLACKWELL).kernel == "flashinfer"
    with pytest.raises(ValueError):
        server_kernel("trtllm", DType.BF16, Arch.HOPPER)


@pytest.mark.parametrize("arch,n,k,expected", [
    (Arch.HOPPER, 2880, 2880, (2880, 2880)), (Arch.HOPPER, 1440, 2880, (1472, 2880)),
    (Arch.HOPPER, 720, 2880, (768, 2880)), (Arch.HOPPER, 360, 2880, (384, 2880)),
    (Arch.BLACKWELL, 720, 2880, (768, 3072)), (Arch.AMPERE, 360, 2880, (384, 3072)),
    (Arch.UNKNOWN, 720, 2880, (736, 2880)), (Arch.UNKNOWN, 96, 80, (96, 96)),
])
def test_mxfp4_padding_rule(arch, n, k, expected):
    padding = mxfp4_padding(n, k, arch)
    assert (padding.padded_N, padding.padded_K) == expected
    assert padding.padded == ((n, k) != expected)


@pytest.mark.parametrize("tp,n,padded", [(1, 2880, 2880), (2, 1440, 1472), (4, 720, 768), (8, 360, 384)])
def test_gpt_oss_plans_at_every_tp(tp, n, padded, moe_tune):
    """mxfp4: nothing to tune on an H200 (matmul_ogs reads no file), the padding shown; bf16 keeps
    its own N and both servers' file; --builtin-fp4 plans moe-tune's kernel at the padded N, apart."""
    plan = build_plan(["gpt-oss-120b"], tp=tp, ep=1, dtypes=["mxfp4", "bf16"], block_shape=None, batch_sizes=[1],
                      space="default", device_name=H200)
    [bf16] = plan.jobs
    assert (bf16.shape.N, bf16.file_name, bf16.sglang_file_name) == (
        n, f"E=128,N={n},device_name=NVIDIA_H200.json", f"E=128,N={n},device_name=NVIDIA_H200.json")
    [mxfp4] = plan.served_elsewhere
    assert (mxfp4.shape.N, mxfp4.padding.N, mxfp4.padding.padded_N) == (padded, n, padded)
    builtin = build_plan(["gpt-oss-120b"], tp=tp, ep=1, dtypes=["mxfp4"], block_shape=None, batch_sizes=[1],
                         space="default", device_name=H200, builtin_fp4=True)
    [job] = builtin.jobs
    assert (job.file_name, job.sglang_file_name) == (None, None)
    assert job.builtin_file_name == f"moe-tune-builtin/E=128,N={padded},device_name=NVIDIA_H200,dtype=mxfp4_w4a16.json"

    rc, out, err = moe_tune("plan", "--model", "gpt-oss-120b", "--tp", str(tp), "--dtype", "mxfp4", "--batch-sizes",
                            "1", "--device-name", H200)
    assert rc == 0, err
    assert "matmul_ogs" in out and "mxfp4_w4a16" not in out
    assert (f"N {n} -> {padded}" in out) == (n != padded)


def test_sglang_with_expert_parallelism_gets_the_bf16_file_it_reads_for_mxfp4():
    plan = build_plan(["gpt-oss-120b"], tp=4, ep=2, dtypes=None, block_shape=None, batch_sizes=[1],
                      space="default", device_name=H200)
    [job] = plan.jobs
    assert (job.shape.dtype, job.shape.E, job.shape.N) == (DType.BF16, 64, 1472)
    assert (job.file_name, job.sglang_file_name) == (None, "E=64,N=1472,device_name=NVIDIA_H200.json")
    assert [k.server for k in plan.served_elsewhere[0].servers] == ["vllm"]


@pytest.mark.parametrize("device", [H200, "NVIDIA B200", "NVIDIA A100-SXM4-80GB", "NVIDIA L40S"])
def test_every_planned_file_is_one_a_server_reads(device):
    """Across every preset, dtype and common TP: each job's file is named for a dtype the server
    that reads it runs with its fused-MoE kernel; no dtype=mxfp4*/nvfp4* name anywhere."""
    for model, tp in itertools.product(preset_names(), (1, 2, 4, 8)):
        for dtype in DType:
            try:
                plan = build_plan([model], tp=tp, ep=1, dtypes=[dtype], block_shape=None, batch_sizes=[1],
                                  space="default", device_name=device)
            except Exception:  # noqa: BLE001 - layouts a model cannot take are refused, tested elsewhere
                continue
            for job in plan.jobs:
                assert job.shape.dtype not in (DType.MXFP4, DType.NVFP4) and job.builtin_file_name is None
                for name in (job.file_name, job.sglang_file_name):
                    assert name is None or ("fp4" not in name and name.startswith(f"E={job.shape.E},"))
                readers = {s for s, n in (("vllm", job.file_name), ("sglang", job.sglang_file_name)) if n}
                assert {k.server for k in job.kernels} == set(job.servers) == readers
            if dtype in (DType.MXFP4, DType.NVFP4):
                assert plan.served_elsewhere


def test_tune_of_a_dtype_no_server_reads_is_refused_with_one_line(moe_tune, tmp_path):
    rc, out, err = moe_tune("tune", "--model", "gpt-oss-120b", "--tp", "4", "--batch-sizes", "1", "--out",
                            str(tmp_path / "out"))
    assert rc == 2 and err.count("\n") == 1
    assert "no server reads a fused-MoE config file for gpt-oss-120b mxfp4" in err and "--builtin-fp4" in err
    assert not (tmp_path / "out").exists()


def test_builtin_fp4_configs_are_written_apart_and_found_again(tmp_path):
    shape = MoEShape(E=128, N=768, K=2880, topk=4, dtype=DType.MXFP4)
    configs = {1: Config(16, 64, 64, 1, 4, 3), 64: Config(64, 128, 128, 1, 8, 3)}
    written = write_vllm(tmp_path, shape, H200, configs, "3.6.0")
    assert written.path.relative_to(tmp_path).as_posix() == (
        "moe-tune-builtin/E=128,N=768,device_name=NVIDIA_H200,dtype=mxfp4_w4a16.json")
    assert not list(tmp_path.glob("E=*.json")) and not list(tmp_path.glob("triton_*"))  # nothing where a server looks
    files = read_config_folder(tmp_path)
    assert server_file(files, shape, H200) == (written.path.relative_to(tmp_path).as_posix(), configs)
    # the server-file writer sends fp4 winners there whatever servers the plan names (no SGLang copy)
    ServerFilesWriter(tmp_path, lambda _: ("vllm", "sglang")).check(H200, {"triton": "3.6.0", "kernel": "builtin"}, {shape: {1, 64}})
    # a writer without builtin_fp4 (compare without --builtin-fp4) neither checks nor writes them: M=64,
    # kept from another Triton version, refuses only the writer that would merge into the file
    other_triton = {"triton": "3.7.0", "kernel": "builtin"}
    with pytest.raises(FileConflict):
        ServerFilesWriter(tmp_path, lambda _: ("vllm",)).check(H200, other_triton, {shape: {1}})
    ServerFilesWriter(tmp_path, lambda _: ("vllm",), builtin_fp4=False).check(H200, other_triton, {shape: {1}})
    assert not ServerFilesWriter(tmp_path, lambda _: ("vllm",), builtin_fp4=False).writes(shape)


def test_int4_checkpoints_plan_the_file_the_servers_read_in_triton():
    """int4_w4a16 once fell through to the NVFP4 rule ("Humming ... Marlin NVFP4"): no job, and
    its files would have gone to moe-tune-builtin/. Both servers read ``dtype=int4_w4a16`` when
    they run int4 MoE in Triton."""
    for server in ("vllm", "sglang"):
        kernel = server_kernel(server, DType.INT4_W4A16, Arch.HOPPER)
        assert (kernel.kernel, kernel.file_dtype) == ("fused_moe", DType.INT4_W4A16) and "Marlin" in kernel.why
    plan = build_plan(["mixtral-8x7b"], tp=2, ep=1, dtypes=["int4_w4a16"], block_shape=None, batch_sizes=[1],
                      space="default", device_name=H200)
    [job] = plan.jobs
    assert job.file_name == "E=8,N=7168,device_name=NVIDIA_H200,dtype=int4_w4a16.json" and job.sglang_file_name
    assert job.builtin_file_name is None and not plan.served_elsewhere
