"""``moe-tune bench`` on the CPU (Triton interpreter, one logical GPU) and its gate's exit codes.

Wall-clock timing under the interpreter is noise, so the gate tests make latencies a fixed
function of the candidate (the worker's test-only fault hook, ``MOE_TUNE_FAULTS``); the kernels
still run and are still checked against the reference.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from tuner.cli import main
from tuner.models import derive_shape, load_model
from tuner.writers import write_sglang, write_vllm
from workers.default_config import default_config
from workers.faults import FaultPlan
from workers.records import Candidate, Config, DType

MODEL = str(Path(__file__).parent / "fixtures" / "job-tiny-moe.json")
BATCH_SIZES = (2, 6)  # one decode-sized (M <= E) and one prefill-sized default config
SHAPE = derive_shape(load_model(MODEL), dtype=DType.BF16)
POOL = [Config(*v) for v in itertools.product([16, 32], [32, 64], [32, 64], [1, 8], [4], [2, 3])]
LATENCY = FaultPlan(deterministic_latency=True)


def _latency(config: Config, M: int) -> float:
    return LATENCY.latency_us(Candidate(SHAPE, M, config))


def _extremes(M: int) -> tuple[Config, Config]:
    """The fastest and the slowest config of the pool at M under the deterministic latencies."""
    ranked = sorted(POOL, key=lambda c: _latency(c, M))
    return ranked[0], ranked[-1]


@pytest.fixture
def deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def use(raise_on: Config | None = None, action: str = "raise") -> None:
        faults = [{"config": raise_on.label, "action": action}] if raise_on else []
        plan = tmp_path / "faults.json"
        plan.write_text(json.dumps({"deterministic_latency": True, "faults": faults}))
        monkeypatch.setenv("MOE_TUNE_FAULTS", str(plan))
    return use


def _folder(root: Path, name: str, configs: dict[int, Config], sglang: bool = False) -> Path:
    folder = root / name
    folder.mkdir()
    if sglang:
        write_sglang(folder, SHAPE, "cpu", configs, None, "3.9.0")
    else:
        write_vllm(folder, SHAPE, "cpu", configs, "3.9.0")
    return folder


def _bench(*extra: str) -> list[str]:
    return ["bench", "--model", MODEL, "--batch-sizes", ",".join(map(str, BATCH_SIZES)), "--interpret",
            "--rounds", "2", *extra]


def test_gate_passes_when_no_folder_is_slower(tmp_path: Path, deterministic, capsys) -> None:
    deterministic()
    fast = _folder(tmp_path, "fast", {M: _extremes(M)[0] for M in BATCH_SIZES}, sglang=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(_bench("--configs", str(fast), str(empty), "--fail-if-slower", "0.999"))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "gate: PASS" in out
    assert "* no file for this shape in that folder" in out  # the empty folder fell back, and says so
    assert "(x) = time / reference time (below 1: faster than the reference)" in out
    for M in BATCH_SIZES:
        best = _extremes(M)[0]
        heuristic = _latency(default_config(SHAPE, M), M)
        row = next(line for line in out.splitlines() if line.split()[:1] == [str(M)])
        assert f"{_latency(best, M):.1f} ({_latency(best, M) / heuristic:.2f}x)" in row  # time / reference time
        assert f"{heuristic:.1f}* (1.00x)" in row


def test_gate_fails_on_a_slower_or_broken_folder(tmp_path: Path, deterministic, capsys) -> None:
    slow_configs = {M: _extremes(M)[1] for M in BATCH_SIZES}
    broken = next(c for c in POOL if c not in slow_configs.values()
                  and all(c != default_config(SHAPE, M) for M in BATCH_SIZES))
    deterministic(raise_on=broken)
    slow = _folder(tmp_path, "slow", slow_configs)
    broken_folder = _folder(tmp_path, "broken", {M: broken for M in BATCH_SIZES})
    code = main(_bench("--configs", str(slow), str(broken_folder), "--fail-if-slower", "0.999", "--json"))
    captured = capsys.readouterr()
    assert code == 1
    assert "gate failed" in captured.err.strip().splitlines()[-1]
    result = json.loads(captured.out)
    assert result["reference"] == "default" and result["gate"]["passed"] is False
    for row in result["rows"]:
        M, cells = row["M"], row["results"]
        expected = _latency(slow_configs[M], M) / _latency(default_config(SHAPE, M), M)  # time / reference time
        assert cells["slow"]["vs_reference"] == pytest.approx(expected)
        assert cells["broken"]["status"] == "crashed" and cells["broken"]["latency_us"] is None
        assert f"broken at M={M}: crashed ({broken.label})" in result["gate"]["regressions"]
        assert any(r.startswith(f"slow at M={M}:") for r in result["gate"]["regressions"]) == (expected > 1 / 0.999)
    assert result["ratio"].startswith("time / reference time") and result["gate"]["max_time_ratio"] == 1.001


def test_a_config_that_kills_the_worker_is_crashed_and_a_fresh_worker_times_the_rest(tmp_path: Path, deterministic,
                                                                                      capsys) -> None:
    fast_configs = {M: _extremes(M)[0] for M in BATCH_SIZES}
    deadly = next(c for c in POOL if c not in fast_configs.values()
                  and all(c != default_config(SHAPE, M) for M in BATCH_SIZES))
    deterministic(raise_on=deadly, action="kill")
    fast = _folder(tmp_path, "fast", fast_configs)
    deadly_folder = _folder(tmp_path, "deadly", {M: deadly for M in BATCH_SIZES})
    code = main(_bench("--configs", str(deadly_folder), str(fast), "--fail-if-slower", "0.999", "--json"))
    captured = capsys.readouterr()
    assert code == 1, captured.err
    result = json.loads(captured.out)
    for row in result["rows"]:
        M, cells = row["M"], row["results"]
        assert cells["deadly"]["status"] == "crashed" and cells["deadly"]["latency_us"] is None
        assert "died" in cells["deadly"]["message"]
        # measured after the kill, on the worker that replaced the dead one
        assert cells["fast"]["status"] == "ok"
        assert cells["fast"]["latency_us"] == pytest.approx(_latency(fast_configs[M], M))
        assert cells["default"]["latency_us"] == pytest.approx(_latency(default_config(SHAPE, M), M))
    assert result["gate"]["regressions"] == [f"deadly at M={M}: crashed ({deadly.label})" for M in BATCH_SIZES]


def test_each_dtype_is_benched_against_the_named_servers_default(tmp_path: Path, deterministic, capsys,
                                                                 monkeypatch) -> None:
    """``--server sglang`` without ``--server-version``: the default column and a folder without a
    file for the shape run SGLang's default rule (not vLLM's), named in the result, whatever kernel
    times them (builtin here); two dtypes, given repeated, are two benches, and the folder's files
    are read once for both."""
    from dataclasses import replace

    from tuner import writers

    deterministic()
    empty = tmp_path / "empty"
    write_vllm(empty, replace(SHAPE, E=8), "cpu", {1: POOL[0]}, "3.9.0")  # another shape's file: read, never used
    reads: list[Path] = []
    read_file = writers._read_config_file
    monkeypatch.setattr(writers, "_read_config_file", lambda path: reads.append(path) or read_file(path))
    code = main(_bench("--configs", str(empty), "--server", "sglang", "--dtype", "bf16", "--dtype", "fp8_w8a8",
                       "--json"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    benches = json.loads(captured.out)["benches"]
    assert [b["shape"].split("dtype=")[1] for b in benches] == ["bf16", "fp8_w8a8"]
    for bench in benches:
        shape = derive_shape(load_model(MODEL), dtype=bench["shape"].split("dtype=")[1], server="sglang")
        assert bench["default_rule"] == "sglang"
        for row in bench["rows"]:
            for cell in row["results"].values():
                assert Config.from_dict(cell["config"]) == default_config(shape, row["M"], "sglang")
                assert cell["source"] == "sglang default rule (moe-tune encoding)"
    assert any(default_config(SHAPE, M, "sglang") != default_config(SHAPE, M, "vllm") for M in BATCH_SIZES)
    assert [path.name for path in reads] == ["E=8,N=64,device_name=cpu.json"]


@pytest.mark.parametrize("argv,message", [
    (["--configs", "/nonexistent/folder", "--batch-sizes", "2"], "not a folder"),
    (["--configs", ".", "--batch-sizes", "2", "--fail-if-slower", "1.5"], "(0, 1]"),
    (["--configs", ".", "--batch-sizes", "2", "--routing", "zipf:-1"], "alpha"),
    (["--configs", "."], "--interpret takes batch sizes up to"),
])
def test_bad_input_exits_2_with_one_line(argv: list[str], message: str, capsys) -> None:
    code = main(["bench", "--model", MODEL, "--interpret", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err


def test_an_unreadable_config_file_exits_2_with_one_line_before_ray(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "E=4,N=64,device_name=cpu.json").write_text("{not json")
    code = main(["bench", "--model", MODEL, "--interpret", "--batch-sizes", "2", "--configs", str(folder)])
    captured = capsys.readouterr()
    assert (code, captured.out) == (2, "")
    assert captured.err.count("\n") == 1 and "cannot read config file" in captured.err


def test_bench_and_tune_print_one_ratio_convention() -> None:
    """``bench``'s ratios and ``tune``'s against its baseline are one convention, each phrase
    naming its own denominator (the text users see)."""
    from tuner.bench import RATIO_CONVENTION, ratio_convention
    from tuner.commands.tune import BASELINE_RATIO

    assert RATIO_CONVENTION == ratio_convention("reference") == \
        "time / reference time (below 1: faster than the reference)"
    assert BASELINE_RATIO == ratio_convention("baseline") == "time / baseline time (below 1: faster than the baseline)"


def test_a_gate_reading_the_same_folders_for_every_check_reads_each_once(tmp_path: Path, monkeypatch) -> None:
    """``FolderReader`` (a job's gate: ``variants_for`` once per check) reads a folder once, by
    resolved path, and every check's variants hold the same files."""
    from tuner import bench, writers

    reference, fresh = tmp_path / "reference", tmp_path / "fresh"
    write_vllm(reference, SHAPE, "cpu", {1: POOL[0]}, "3.9.0")
    write_vllm(fresh, SHAPE, "cpu", {1: POOL[1]}, "3.9.0")
    reads: list[Path] = []
    read_file = writers._read_config_file
    monkeypatch.setattr(writers, "_read_config_file", lambda path: reads.append(path) or read_file(path))
    read = bench.FolderReader()
    checks = [bench.variants_for([folder], reference, read) for folder in (fresh, reference / ".." / "fresh", fresh)]
    assert sorted(path.parent.name for path in reads) == ["fresh", "reference"]
    for variants, ref in checks:
        files = {v.label: v.files for v in variants}
        assert ref.label == "reference" and {label: dict(f) for label, f in files.items()} == {
            "default": {}, "fresh": {"E=4,N=64,device_name=cpu.json": {1: POOL[1]}},
            "reference": {"E=4,N=64,device_name=cpu.json": {1: POOL[0]}}}
