"""``moe-tune compare`` end to end on the CPU: tunes each dtype through the engine, measures each
against bf16 on the same inputs, writes the three reports and the tuned config files."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tuner.cli import main
from tuner.errors import RunFailed
from tuner.writers import read_config_folder
from workers.problem import ERROR_BOUNDS
from workers.records import DType

FIXTURES = Path(__file__).parent / "fixtures"
MODEL = str(FIXTURES / "job-tiny-moe.json")
SPACE = str(FIXTURES / "job-space.yaml")


@pytest.fixture
def deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interpreter wall-clock timings are noise: fixed per-candidate latencies (the kernels still run)."""
    plan = tmp_path / "faults.json"
    plan.write_text(json.dumps({"deterministic_latency": True}))
    monkeypatch.setenv("MOE_TUNE_FAULTS", str(plan))


def test_compare_writes_three_reports_from_tuned_configs(tmp_path: Path, deterministic, capsys) -> None:
    out, configs = tmp_path / "report", tmp_path / "configs"
    code = main(["compare", "--model", MODEL, "--dtypes", "fp8_w8a8", "--batch-sizes", "2,6", "--search-space", SPACE,
                 "--out", str(out), "--configs-out", str(configs), "--moe-layers", "2", "--memory-budget-gib", "1",
                 "--interpret"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md"]

    data = json.loads((out / "report.json").read_text())
    assert list(data["dtypes"]) == ["bf16", "fp8_w8a8"]  # bf16 is added as the yardstick
    assert data["budget_ended"] is False and "time budget ended" not in (out / "report.md").read_text()
    points = {(p["dtype"], p["M"]): p for p in data["points"]}
    assert set(points) == {(d, M) for d in ("bf16", "fp8_w8a8") for M in (2, 6)}

    files = read_config_folder(configs)
    assert len(files) == 2
    for (dtype, M), point in points.items():
        tuned = next(c for name, c in files.items() if ("dtype=fp8_w8a8" in name) == (dtype == "fp8_w8a8"))
        assert point["config"] == tuned[M].to_dict()  # the report describes the configs written
        if dtype == "bf16":
            assert point["rel_err_vs_bf16"] == 0.0 and point["speedup_vs_bf16"] == 1.0
        else:
            # fp8 rounding of weights and activations: visibly non-zero, far below a broken kernel's error
            assert 1e-3 < point["rel_err_vs_bf16"] < 5 * ERROR_BOUNDS[DType.FP8_W8A8]
            bf16 = points[("bf16", M)]
            assert point["speedup_vs_bf16"] == pytest.approx(bf16["latency_us"] / point["latency_us"])
    budget = 2**30
    for summary in data["dtypes"].values():
        weights, per_token = summary["weight_bytes_per_gpu"], summary["working_bytes_per_token"]
        assert summary["max_batch_in_budget"] == (budget - weights) // per_token

    markdown = (out / "report.md").read_text()
    for recommendation in data["recommendations"]:
        assert recommendation["text"] in markdown and recommendation["text"] in stdout
    html = (out / "report.html").read_text()
    assert len(re.findall(r'<img id="plot-\w+"[^>]*src="data:image/png;base64,', html)) == 3

    # The report says where the configs went, the bound its recommendations used, the memory's source.
    assert data["configs_folder"] == str(configs) and sorted(data["config_files"]) == sorted(files)
    assert f"tuned config files in {configs}: " in stdout and str(configs) in markdown
    assert data["max_rel_err"] == 0.1 and "within 10.0% relative error of bf16" in stdout
    assert data["memory_source"] == "--memory-budget-gib"

    # Again (all from the journal) with --json and no memory budget: the device's own memory.
    code = main(["compare", "--model", MODEL, "--dtypes", "fp8_w8a8", "--batch-sizes", "2,6", "--search-space", SPACE,
                 "--out", str(out), "--configs-out", str(configs), "--moe-layers", "2", "--interpret", "--json"])
    stdout = capsys.readouterr().out
    assert code == 0
    printed = json.loads(stdout)
    assert printed == json.loads((out / "report.json").read_text())
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert printed["memory_budget_bytes"] == int(0.9 * host) and "the host's memory" in printed["memory_source"]


def test_compare_refuses_bad_input_before_tuning(tmp_path: Path, capsys) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    code = main(["compare", "--model", MODEL, "--dtypes", "fp8_w8a8", "--batch-sizes", "2", "--interpret",
                 "--out", str(not_a_folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a folder" in err
    assert main(["compare", "--model", MODEL, "--dtypes", "fp9", "--out", str(tmp_path / "r")]) == 2


@pytest.mark.parametrize("option", ["--out", "--configs-out", "--journal"])
def test_compare_refuses_an_output_under_a_file_as_tune_does(tmp_path: Path, capsys, option: str) -> None:
    """compare's output paths are checked by tune's check (``check_output_location``: one line about
    the option, before anything is made): a file on the way is named, not met later as an unwritable
    place."""
    a_file = tmp_path / "file"
    a_file.write_text("")
    paths = {"--out": tmp_path / "report", "--configs-out": tmp_path / "configs", "--journal": tmp_path / "j.jsonl"}
    paths[option] = a_file / "below"
    assert main(["compare", "--model", MODEL, "--dtypes", "fp8_w8a8", "--batch-sizes", "2", "--interpret",
                 *(word for flag, path in paths.items() for word in (flag, str(path)))]) == 2
    assert capsys.readouterr().err == f"moe-tune: error: {option} {a_file / 'below'}: {a_file} is a file, not a folder\n"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_budget_and_strategy_reach_the_tuning_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def stop_at_tune(request, progress=None):
        seen.append(request)
        raise RunFailed("stopped by the test")

    monkeypatch.setattr("tuner.compare.driver.tune", stop_at_tune)
    argv = ["compare", "--model", MODEL, "--dtypes", "fp8_w8a8", "--batch-sizes", "2", "--search-space", SPACE,
            "--out", str(tmp_path / "r"), "--configs-out", str(tmp_path / "c"), "--interpret"]
    assert main([*argv, "--budget-minutes", "1.5"]) == 1
    assert main(argv) == 1
    assert [(r.budget_s, r.strategy) for r in seen] == [(90.0, "fast"), (None, "fast")]
    assert not (tmp_path / "r").exists()


def test_compare_times_fp4_in_the_server_kernel_or_says_why_not(tmp_path: Path, deterministic, capsys) -> None:
    """mxfp4 whose per-GPU N the servers pad (80 → 96 with no GPU named: the MX block): moe-tune's
    own kernel is tuned at the padded shape (the second column; its moe-tune-builtin/ file is not
    written: no --builtin-fp4), its error
    measured against bf16 at that same shape; without a server kernel it runs (no GPU here) the
    dtype is left out of the recommendation with the reason, and so is everything tuned on the
    builtin kernel."""
    model = tmp_path / "padded-moe.json"
    model.write_text(json.dumps({"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 80,
                                 "num_local_experts": 4, "num_experts_per_tok": 2}))
    out, configs = tmp_path / "report", tmp_path / "configs"
    code = main(["compare", "--model", str(model), "--dtypes", "mxfp4", "--batch-sizes", "3", "--search-space", SPACE,
                 "--out", str(out), "--configs-out", str(configs), "--interpret"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    data = json.loads((out / "report.json").read_text())
    assert data["dtypes"]["mxfp4"]["shape"].startswith("E=4,N=96,") and data["dtypes"]["bf16"]["shape"].startswith(
        "E=4,N=80,")
    points = {p["dtype"]: p for p in data["points"]}
    assert points["mxfp4"]["latency_us"] is None and points["mxfp4"]["builtin_latency_us"] > 0
    assert points["bf16"]["kernel"].startswith("builtin (workers.moe.MoERunner") and not points["bf16"]["server_kernel"]
    assert data["recommendations"] == []
    assert len(data["not_ranked"]) == 2 and all(line in stdout for line in data["not_ranked"])
    assert sorted(read_config_folder(configs)) == ["E=4,N=80,device_name=cpu.json"]
    assert not (configs / "moe-tune-builtin").exists() and data["config_files"] == ["E=4,N=80,device_name=cpu.json"]


STAND_INS = Path(__file__).parent / "stand_in_servers"


@pytest.mark.timeout(900)
def test_compare_sends_no_candidate_to_a_kernel_that_refuses_its_dtype(tmp_path: Path) -> None:
    """``--kernel vllm`` (the stand-in vLLM launcher, CPU) with mxfp4 asked for: on the H200 the
    builtin-kernel search of mxfp4 and nvfp4 was handed to vLLM's backend, whose ``check`` refuses
    them (512 crashed candidates, the builtin column empty). Now the fused-MoE dtypes run on
    vLLM's kernel and moe-tune's own fp4 kernel on builtin: no candidate fails, the builtin column
    is filled, and with --builtin-fp4 its configs are written apart. The checkpoint is mxfp4
    (gpt-oss-like), so the errors are measured on its grid."""
    import subprocess
    import sys

    model = tmp_path / "oss-like.json"
    model.write_text(json.dumps({"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 64,
                                 "num_local_experts": 4, "num_experts_per_tok": 2,
                                 "quantization_config": {"quant_method": "mxfp4"}}))
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"deterministic_latency": True}))
    out, configs, journal = tmp_path / "report", tmp_path / "configs", tmp_path / "journal.jsonl"
    argv = ["compare", "--model", str(model), "--dtypes", "mxfp4", "--batch-sizes", "3", "--search-space", SPACE,
            "--out", str(out), "--configs-out", str(configs), "--journal", str(journal), "--interpret",
            "--kernel", "vllm", "--workers", "1", "--builtin-fp4"]
    env = {**os.environ, "MOE_TUNE_FAULTS": str(faults),
           "PYTHONPATH": os.pathsep.join([str(STAND_INS / "vllm_launcher"), str(STAND_INS),
                                          os.environ.get("PYTHONPATH", "")])}
    env.pop("MOE_TUNE_SERVER_CODE", None)
    done = subprocess.run([sys.executable, "-c", "import sys; from tuner.cli import main; sys.exit(main(sys.argv[1:]))",
                           *argv], capture_output=True, text=True, timeout=800, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    measured = [r for r in records if r["kind"] == "measure"]
    assert {r["candidate"]["shape"]["dtype"] for r in measured} == {"bf16", "mxfp4"}
    assert [r for r in measured if r["status"] != "ok"] == []  # nothing refused, nothing crashed

    data = json.loads((out / "report.json").read_text())
    points = {p["dtype"]: p for p in data["points"]}
    assert points["bf16"]["kernel"].startswith("vllm (") and points["bf16"]["server_kernel"]
    assert points["mxfp4"]["builtin_latency_us"] > 0 and points["mxfp4"]["latency_us"] is None
    assert sorted(data["config_files"]) == ["E=4,N=64,device_name=cpu.json",
                                            "moe-tune-builtin/E=4,N=64,device_name=cpu,dtype=mxfp4_w4a16.json"]
    assert data["reference_weights"].startswith("weights on the mxfp4 grid of the checkpoint")
    assert "Accuracy reference: weights on the mxfp4 grid" in (out / "report.md").read_text()


def test_a_screen_only_winner_is_explained_by_what_happened() -> None:
    """The caveat of a winner chosen on a screen names its real cause: failed full timings, else
    the time budget, never the budget when there was none (the H200 report blamed a budget the
    run did not have)."""
    from tuner.compare import _screened_why
    from tuner.select import Selection
    from workers.records import Candidate, Config, Level, Measurement, MoEShape, Status

    shape = MoEShape(E=4, N=64, K=64, topk=2, dtype=DType.FP8_W8A8)
    screen = Candidate(shape, 4096, Config(16, 32, 64, 1, 4, 2), level=Level.SCREEN)
    won = Selection(screen, 1678.5, 1678.5, retimed=False)
    other_m = Measurement(Candidate(shape, 1024, Config(16, 32, 64, 1, 4, 2)), Status.CRASHED)
    assert _screened_why(won, [other_m], budget_ended=True) == "the time budget ended before a full timing"
    assert _screened_why(won, [other_m], budget_ended=False) == "the search ended without a full timing"
    failed = [Measurement(Candidate(shape, 4096, Config(16, 32, b, 1, 4, 2)), status)
              for b, status in ((32, Status.CRASHED), (64, Status.TIMEOUT), (128, Status.CRASHED))]
    assert _screened_why(won, failed, budget_ended=True) == "its full timings failed (crashed 2, timeout 1)"


def test_a_routing_file_changed_during_the_server_kernel_timing_ends_the_compare(monkeypatch) -> None:
    """The server-kernel timing task's ``InputChanged`` (a pinned routing file changed: Ray hands it
    back as a task error's ``cause``) ends the compare with its message, one line; any other error
    of the task is let out as it came, never reported as an input change."""
    from types import SimpleNamespace

    import ray

    from tuner import compare
    from workers.failures import InputChanged

    class TaskError(Exception):
        def __init__(self, cause: BaseException) -> None:
            super().__init__(f"task failed\ntraceback ...\n{cause}")
            self.cause = cause

    raised: list[BaseException] = []

    def get(ref, timeout):  # noqa: ARG001 - ray.get's signature
        raise raised[-1]

    monkeypatch.setattr(compare, "_time_kernels", SimpleNamespace(remote=lambda *args: "ref"))
    monkeypatch.setattr(ray, "get", get)
    request = SimpleNamespace(batch_sizes=[2], routing="file:ids.pt", grid=None)
    raised.append(TaskError(InputChanged("routing file ids.pt changed since it was pinned")))
    with pytest.raises(RunFailed, match=r"^routing file ids.pt changed since it was pinned$"):
        compare._server_kernel_timings({}, [DType.MXFP4], {}, request)
    raised.append(TaskError(ValueError("matmul_ogs went wrong")))
    with pytest.raises(TaskError) as other:
        compare._server_kernel_timings({}, [DType.MXFP4], {}, request)
    assert other.value is raised[-1]


def test_a_malformed_address_is_refused_first_like_tune_does(tmp_path: Path, capsys) -> None:
    """compare checked --address only when its Ray session opened, after loading the model and
    planning; it is refused first now, as tune refuses it (here before a model that does not exist)."""
    code = main(["compare", "--model", str(tmp_path / "missing.json"), "--address", "localhost",
                 "--out", str(tmp_path / "r"), "--interpret"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moe-tune: error: --address") and "no port" in err[0], err
    assert not (tmp_path / "r").exists()
