"""``--kernel``: auto resolution per format and for a missing server (tune, and compare's
default), usage errors naming what is missing or takes no config, and one ``tune`` end to end on a
server's kernel (the stand-in vLLM launcher, CPU, interpreter) whose summary names that kernel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tune_helpers import TINY_MODEL, moe_tune_process, tune_argv
from tuner import kernel_choice
from tuner.errors import UsageError
from workers.records import DType, MoEShape

STAND_INS = Path(__file__).parent / "stand_in_servers"
BF16 = MoEShape(E=4, N=64, K=64, topk=2, dtype=DType.BF16)
MXFP4 = MoEShape(E=4, N=64, K=64, topk=2, dtype=DType.MXFP4)


def test_auto_picks_each_formats_server(servers):
    servers("vllm_launcher", "sglang_topk_output")
    assert kernel_choice.resolve("auto", "vllm", [BF16]) == [kernel_choice.KernelRun("vllm", "vllm")]
    assert kernel_choice.resolve("auto", "sglang", [BF16]) == [kernel_choice.KernelRun("sglang", "sglang")]
    assert kernel_choice.resolve("auto", "both", [BF16]) == [kernel_choice.KernelRun("vllm", "vllm"),
                                                             kernel_choice.KernelRun("sglang", "sglang")]


def test_auto_falls_back_to_builtin_with_one_warning_per_layout(servers, capsys):
    servers("vllm_launcher")
    runs = kernel_choice.resolve("auto", "both", [BF16])
    assert runs == [kernel_choice.KernelRun("vllm", "vllm"), kernel_choice.KernelRun("sglang", "builtin")]
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "sglang" in line and "builtin" in line and "tuned and timed on moe-tune's" in line
    assert kernel_choice.resolve("auto", "vllm", [MXFP4]) == [kernel_choice.KernelRun("vllm", "builtin")]
    assert "mxfp4" in capsys.readouterr().err
    servers()
    assert kernel_choice.resolve("auto", "both", [BF16]) == [kernel_choice.KernelRun("both", "builtin")]
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_a_named_server_kernel_that_cannot_run_is_a_usage_error(servers):
    servers()
    with pytest.raises(UsageError, match="--kernel sglang"):
        kernel_choice.resolve("sglang", "sglang", [BF16])
    servers("vllm_launcher")
    with pytest.raises(UsageError, match="mxfp4"):
        kernel_choice.resolve("vllm", "vllm", [MXFP4])
    assert kernel_choice.resolve("builtin", "both", [MXFP4]) == [kernel_choice.KernelRun("both", "builtin")]


def test_auto_checks_each_server_only_on_its_own_shapes(servers, capsys):
    """With SGLang's shared-expert fusion a model has one shape per server (``tuner.plan``): each
    server's kernel is checked on its own shapes, and a layout planned for no shape makes no run."""
    servers("vllm_launcher", "sglang_topk_output")
    fused = MoEShape(E=5, N=64, K=64, topk=3, dtype=DType.BF16, fused_shared=1)
    ep = MoEShape(E=4, N=64, K=64, topk=2, dtype=DType.BF16, ep=2)
    planned = {BF16: ("vllm",), fused: ("sglang",)}
    assert kernel_choice.resolve("auto", "both", list(planned), planned.__getitem__) == [
        kernel_choice.KernelRun("vllm", "vllm"), kernel_choice.KernelRun("sglang", "sglang")]
    planned = {ep: ("vllm",), fused: ("sglang",)}  # vLLM's EP shape: its kernel call has no expert map
    assert kernel_choice.resolve("auto", "both", list(planned), planned.__getitem__) == [
        kernel_choice.KernelRun("vllm", "builtin"), kernel_choice.KernelRun("sglang", "sglang")]
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "vllm" in line and "ep" in line and "builtin" in line
    assert kernel_choice.resolve("auto", "both", [BF16], {BF16: ("sglang",)}.__getitem__) == [
        kernel_choice.KernelRun("sglang", "sglang")]
    with pytest.raises(UsageError, match="ep layouts"):
        kernel_choice.resolve("vllm", "vllm", [ep])


def test_a_kernel_that_takes_no_config_is_refused_in_one_line(moe_tune, tmp_path):
    """triton_kernels' matmul_ogs reads no config file: tune and bench refuse it before any work
    (and so does ``resolve``, which every other path to a tune goes through)."""
    for argv in (tune_argv(tmp_path / "out", "--kernel", "triton_kernels"),
                 ["bench", "--model", str(TINY_MODEL), "--configs", str(tmp_path), "--interpret",
                  "--kernel", "triton_kernels"]):
        rc, out, err = moe_tune(*argv)
        assert (rc, out) == (2, ""), err
        (line,) = err.strip().splitlines()
        assert "--kernel" in line and "triton_kernels" in line and "takes no fused-MoE config" in line, line
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="--kernel triton_kernels: .*takes no fused-MoE config"):
        kernel_choice.resolve("triton_kernels", "vllm", [MXFP4])


def _compare_request(tmp_path: Path, *extra: str):
    from tuner.cli import build_parser
    from tuner.commands import compare

    args = build_parser("compare").parse_args(
        ["compare", "--model", str(TINY_MODEL), "--out", str(tmp_path / "report"), "--batch-sizes", "1",
         "--dtypes", "bf16,fp8_w8a8,mxfp4", *extra])
    request, warnings = compare._request(args)
    # the kernel of the fused-MoE dtypes' run (moe-tune's own fp4 kernel always has a builtin one)
    return next(run.kernel for run in request.runs if run.server_files), warnings


def test_compare_defaults_to_auto_resolved_on_the_dtypes_the_servers_fused_moe_kernel_runs(servers, tmp_path,
                                                                                          capsys):
    """mxfp4 is timed in its own kernel (matmul_ogs, or builtin as the second column): it is no
    reason for auto to leave the server's fused-MoE kernel."""
    from tuner.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser("compare").parse_args(["compare", "--help"])
    assert "Default auto: the --server's own kernel" in " ".join(capsys.readouterr().out.split())
    servers("vllm_launcher", "sglang_topk_output")
    kernel, warnings = _compare_request(tmp_path)
    assert (kernel, warnings) == ("vllm", [])
    kernel, warnings = _compare_request(tmp_path, "--server", "sglang")
    assert (kernel, warnings) == ("sglang", [])
    kernel, warnings = _compare_request(tmp_path, "--interpret")  # server kernels do not run under it
    assert (kernel, warnings) == ("builtin", [])
    kernel, warnings = _compare_request(tmp_path, "--kernel", "builtin")
    assert (kernel, warnings) == ("builtin", [])
    servers("sglang_topk_output")
    kernel, (line,) = _compare_request(tmp_path)
    assert kernel == "builtin" and "vllm" in line and "builtin" in line, line
    with pytest.raises(UsageError, match="--kernel vllm"):  # named and missing: refused before any work
        _compare_request(tmp_path, "--kernel", "vllm")
    assert not (tmp_path / "report").exists()


def test_tune_and_compare_make_their_runs_from_a_plan_in_one_place(servers):
    """``kernel_choice.plan_runs``: tune's runs are one per layout on its server's kernel, compare's
    the --server's kernel writing every layout; moe-tune's fp4 jobs go to a builtin run in both."""
    from tuner.plan import plan

    planned = plan([TINY_MODEL], 1, 1, ["bf16", "mxfp4"], None, [1], "tests/fixtures/tune-space.yaml", "both",
                   builtin_fp4=True).for_device("cpu")
    servers("vllm_launcher", "sglang_topk_output")
    fp4 = kernel_choice.KernelRun("both", "builtin", server_files=False, builtin_fp4=True)
    warnings: list[str] = []
    assert kernel_choice.plan_runs("auto", planned, "both", warnings) == [
        kernel_choice.KernelRun("vllm", "vllm"), kernel_choice.KernelRun("sglang", "sglang"), fp4]
    assert kernel_choice.plan_runs("auto", planned, "both", warnings, server="sglang") == [
        kernel_choice.KernelRun("both", "sglang"), fp4]
    assert kernel_choice.plan_runs("builtin", planned, "vllm", warnings, server="sglang") == [
        kernel_choice.KernelRun("vllm", "builtin", builtin_fp4=True)]
    assert warnings == []
    servers("sglang_topk_output")
    assert kernel_choice.plan_runs("auto", planned, "both", warnings) == [
        kernel_choice.KernelRun("vllm", "builtin", builtin_fp4=True), kernel_choice.KernelRun("sglang", "sglang")]
    assert len(warnings) == 1 and "vllm's kernel is not usable here" in warnings[0]


def test_builtin_fp4_jobs_always_run_on_builtin(servers, capsys):
    """moe-tune's own fp4 kernel's jobs go to a builtin run: the server runs' own when they fall
    back to builtin, one of their own otherwise; a server kernel never gets them to refuse."""
    from tuner.plan import Job

    servers("vllm_launcher")
    runs = kernel_choice.resolve("vllm", "vllm", [BF16], builtin_fp4=True)
    assert runs == [kernel_choice.KernelRun("vllm", "vllm"),
                    kernel_choice.KernelRun("vllm", "builtin", server_files=False, builtin_fp4=True)]
    fp4_job = Job(model="m", shape=MXFP4, tp=1, ep=1, file_name=None, sglang_file_name=None, candidates={},
                  dropped_by_reason={}, servers=(), builtin_file_name="E=4,...,dtype=mxfp4_w4a16.json")
    bf16_job = Job(model="m", shape=BF16, tp=1, ep=1, file_name="E=4,...", sglang_file_name=None, candidates={},
                   dropped_by_reason={}, servers=("vllm",))
    assert [[run.takes(job) for job in (bf16_job, fp4_job)] for run in runs] == [[True, False], [False, True]]
    assert kernel_choice.resolve("auto", "both", [BF16], builtin_fp4=True) == [
        kernel_choice.KernelRun("vllm", "vllm"), kernel_choice.KernelRun("sglang", "builtin", builtin_fp4=True)]
    assert kernel_choice.resolve("vllm", "vllm", [], builtin_fp4=True) == [
        kernel_choice.KernelRun("vllm", "builtin", server_files=False, builtin_fp4=True)]
    servers()
    assert kernel_choice.resolve("builtin", "vllm", [BF16], builtin_fp4=True) == [
        kernel_choice.KernelRun("vllm", "builtin", builtin_fp4=True)]


def test_tune_builtin_fp4_writes_the_builtin_kernel_s_file_apart(tmp_path):
    """``tune --dtype mxfp4 --builtin-fp4`` once planned a job no run took (it had no server), and
    wrote nothing."""
    done = moe_tune_process(tune_argv(tmp_path / "out", "--dtype", "mxfp4", "--builtin-fp4", "--kernel", "builtin"),
                     timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert [Path(p).relative_to(tmp_path / "out").as_posix() for p in summary["files_written"]] == [
        "moe-tune-builtin/E=4,N=64,device_name=cpu,dtype=mxfp4_w4a16.json"]


def test_missing_server_exits_2_naming_it_before_any_work(tmp_path):
    done = moe_tune_process(tune_argv(tmp_path / "out", "--kernel", "sglang", "--format", "sglang"), timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert "--kernel sglang" in line and "sglang" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(900)
def test_tune_on_the_server_kernel_names_it_in_the_summary(tmp_path):
    """No flag: ``--format vllm`` with vLLM (its launcher) importable tunes vLLM's kernel."""
    done = moe_tune_process(tune_argv(tmp_path / "out", "--format", "vllm"), STAND_INS / "vllm_launcher", STAND_INS)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["kernel"] == "vllm" and summary["format"] == "vllm"
    env = summary["devices"][0]["env"]
    assert env["kernel"] == "vllm" and env["kernel_version"] == "vllm 0.0.0+stand-in-launcher"
    assert env["kernel_entry"].endswith("fused_moe.invoke_fused_moe_triton_kernel") and len(env["kernel_hash"]) == 16
    assert summary["files_written"] and "warning" not in done.stderr


def test_the_default_rule_is_the_servers_whatever_kernel_times_it(servers):
    """The baseline of ``bench --server sglang`` / SGLang files is SGLang's default config even when
    builtin (no SGLang here, or --interpret) or vLLM's kernel times it; vLLM's files get vLLM's rule
    (the timed vLLM's version, else the newest rule); --server-version names the rule for all."""
    servers()  # no server importable
    for kernel in ("builtin", "vllm", "sglang"):
        assert kernel_choice.default_rule(kernel, None, "sglang") == "sglang"
    assert kernel_choice.default_rule("builtin", None, "vllm") == "vllm"
    assert kernel_choice.default_rule("builtin", None) == "vllm"
    assert kernel_choice.default_rule("builtin", "vllm-pre-34846", "sglang") == "vllm-pre-34846"
    assert kernel_choice.default_rule("sglang", "sglang==0.5.2", "vllm") == "sglang"
    with pytest.raises(UsageError, match="vllm==0.1"):
        kernel_choice.default_rule("builtin", "vllm==0.1", "sglang")


def test_a_baseline_times_the_default_config_of_each_server_reading_the_file(tmp_path: Path):
    """``tune --baseline``: a shape written for SGLang is held against SGLang's default config, one
    written for vLLM against vLLM's, one both read against both."""
    from tuner.baseline import Baseline
    from tuner.writers import write_vllm
    from workers.default_config import default_config
    from workers.records import Config

    fp8 = MoEShape(E=4, N=64, K=64, topk=2, dtype=DType.FP8_W8A8)
    write_vllm(tmp_path, BF16, "cpu", {1: Config(16, 32, 32, 1, 4, 2)}, "3.9.0")  # no file for fp8
    baseline = Baseline.load([tmp_path], {"vllm": "vllm", "sglang": "sglang"})
    M = 64  # > E: SGLang's fp8 rule differs from vLLM's
    vllm_default, sglang_default = default_config(fp8, M, "vllm"), default_config(fp8, M, "sglang")
    assert vllm_default != sglang_default
    assert baseline.configs_for(fp8, "cpu", [M], servers=("sglang",)) == {M: (sglang_default,)}
    assert baseline.configs_for(fp8, "cpu", [M], servers=("vllm",)) == {M: (vllm_default,)}
    assert baseline.configs_for(fp8, "cpu", [M], servers=("vllm", "sglang")) == {M: (vllm_default, sglang_default)}
    assert baseline.configs_for(BF16, "cpu", [M], servers=("sglang",))[M][0] == Config(16, 32, 32, 1, 4, 2)


def test_the_kernel_names_are_read_without_importing_torch():
    """``--kernel``'s names and refusals come from ``workers.backends``, which imports no backend:
    building a command's arguments does not pay torch's import for them, and the names are one
    owner's (every backend's own ``name`` is its registry name)."""
    import subprocess
    import sys

    probe = ("import sys\nfrom tuner import kernel_choice\n"
             "assert kernel_choice.kernel_metavar() == '{auto,builtin,vllm,sglang}', kernel_choice.kernel_metavar()\n"
             "assert 'takes no fused-MoE config' in kernel_choice.refusal('triton_kernels')\n"
             "assert 'torch' not in sys.modules, 'torch imported'\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    from workers import backends
    from workers.backends.builtin import BuiltinBackend
    from workers.backends.sglang import SglangBackend
    from workers.backends.triton_kernels import TritonKernelsBackend
    from workers.backends.vllm import VllmBackend

    assert (BuiltinBackend.name, VllmBackend.name, SglangBackend.name, TritonKernelsBackend.name) == (
        backends.BUILTIN, backends.VLLM, backends.SGLANG, backends.TRITON_KERNELS)


def test_a_bad_server_version_is_the_one_line_before_any_kernel_error_or_warning(servers, moe_tune, tmp_path):
    """``--server-version`` names the default rule whatever kernel runs (``pinned_rule``): tune and
    bench refuse a version without a recorded rule first, as their only line, before a named server
    kernel that cannot run here is refused and before ``auto`` prints its fallback warning."""
    servers()  # no server importable: --kernel vllm is refused, auto falls back with a warning
    assert kernel_choice.pinned_rule(None) is None and kernel_choice.pinned_rule("") is None
    assert kernel_choice.pinned_rule("sglang==0.5.2") == "sglang"
    with pytest.raises(UsageError) as refused:
        kernel_choice.pinned_rule("vllm==0.1")
    assert refused.value.option == "server_version"
    bench = ["bench", "--model", str(TINY_MODEL), "--configs", str(tmp_path), "--interpret", "--batch-sizes", "1"]
    for argv in (tune_argv(tmp_path / "out"), bench):
        for kernel in ("vllm", "auto"):
            rc, out, err = moe_tune(*argv, "--kernel", kernel, "--server-version", "vllm==0.1")
            assert (rc, out) == (2, ""), err
            (line,) = err.strip().splitlines()
            assert line.startswith("moe-tune: error: --server-version vllm==0.1"), line
    assert not (tmp_path / "out").exists()
