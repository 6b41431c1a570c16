"""The CLI a newcomer meets first: usage on a bare call, --version, Ray's start-up chatter kept
quiet unless --verbose, ``tune --dry-run`` (plan, estimate, files; nothing started) and the
``--fresh`` confirmation."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

import tuner.cli as cli
from tuner.commands.arguments import confirm_fresh
from tuner.errors import RunFailed, UsageError
from tuner.journal import Journal, WorkerEnv, count_measurements
from tuner.models import derive_shape, load_model
from workers.records import Candidate, Config, Level, Measurement, Status

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
TINY = str(FIXTURES / "tiny-moe.json")
SPACE = str(FIXTURES / "tune-space.yaml")


def _tune(out: Path, *extra: str) -> list[str]:
    return ["tune", "--model", TINY, "--search-space", SPACE, "--batch-sizes", "1,4", "--interpret",
            "--out", str(out), *extra]


def test_bare_call_prints_usage_and_the_commands(capsys) -> None:
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: moe-tune ") and "moe-tune: error: moe-tune" not in err
    for command in cli.COMMANDS:
        assert f"    {command} " in err
    assert cli.main(["plan"]) == 2
    err = capsys.readouterr().err
    assert err == "moe-tune: error: plan: the following arguments are required: --model\n"  # no doubled prefix


def test_version_names_every_component_and_a_missing_server_is_no_error(capsys) -> None:
    import ray
    import torch
    import triton

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    lines = dict(line.split(" ", 1) for line in capsys.readouterr().out.splitlines())
    assert list(lines) == ["moe-tune", "torch", "triton", "ray", "vllm", "sglang"]
    assert (lines["torch"], lines["triton"], lines["ray"]) == (torch.__version__, triton.__version__, ray.__version__)
    versions = cli.versions()
    for server in ("vllm", "sglang"):
        assert lines[server] == (versions[server] or "not installed")


def test_a_server_source_tree_is_found_by_its_version_module(tmp_path: Path, monkeypatch) -> None:
    from importlib import metadata

    try:
        metadata.version("sglang")
        pytest.skip("an installed sglang's metadata answers first")
    except metadata.PackageNotFoundError:
        pass
    (tmp_path / "sglang").mkdir()
    (tmp_path / "sglang" / "__init__.py").write_text("")
    (tmp_path / "sglang" / "version.py").write_text("__version__ = '0.9.test'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.versions()["sglang"] == "0.9.test"
    (tmp_path / "sglang" / "version.py").write_text("raise ImportError('half a package')\n")
    sys.modules.pop("sglang.version", None)
    assert cli.versions()["sglang"] == "importable, version unknown"


def test_ray_start_up_chatter_stays_out_of_the_terminal_unless_verbose() -> None:
    probe = ("import os, sys; from tuner.ray_session import ray_session\n"
             "with ray_session(None, True):\n    pass\n"
             "print('verbose' if os.environ.get('MOE_TUNE_VERBOSE') else 'quiet', file=sys.stderr)\n")
    for verbose in (False, True):
        env = {k: v for k, v in __import__("os").environ.items() if k not in ("MOE_TUNE_VERBOSE", "RAY_AUTH_MODE")}
        if verbose:
            env["MOE_TUNE_VERBOSE"] = "1"
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env=env)
        assert done.returncode == 0, done.stderr
        chatter = [line for line in done.stderr.splitlines() if " -- " in line and ".py:" in line]
        if verbose:
            assert any("Started a local Ray instance" in line for line in chatter), done.stderr
        else:
            assert chatter == [], done.stderr
            assert "Token authentication" not in done.stderr


def test_without_address_ray_session_starts_its_own_ray_even_where_ray_start_left_a_cluster_address() -> None:
    """``ray.init()`` without an address joins the cluster the last ``ray start`` on this host
    recorded (``$RAY_TMPDIR/ray/ray_current_cluster``): a moe-tune run without ``--address``
    would land on somebody else's cluster, or fail (--interpret's logical GPUs: "When connecting
    to an existing cluster, num_cpus and num_gpus must not be provided"), or wait on a dead one
    whose file was left behind. Here the file names a port nothing listens on."""
    import os
    import socket
    import tempfile

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    probe = ("import ray, sys; from tuner.ray_session import ray_session\n"
             "with ray_session(None, True, workers=2) as session:\n"
             "    print(int(ray.cluster_resources().get('GPU', 0)), ray.get_runtime_context().gcs_address,\n"
             "          file=session.stdout)\n")
    with tempfile.TemporaryDirectory(prefix="mt-", dir="/tmp") as tmp:  # short: Ray's socket paths are limited
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": tmp}
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    gpus, gcs = done.stdout.split()
    assert gpus == "2" and not gcs.endswith(f":{port}")


def test_verbose_flag_sets_the_variable_ray_session_reads(monkeypatch, capsys) -> None:
    from tuner import ray_session

    monkeypatch.setenv(cli.VERBOSE_ENV, "")  # tracked: whatever main sets is undone after the test
    assert ray_session.ray_logging_level() == 40  # ERROR
    cli.main(["--verbose", "plan", "--model", TINY, "--device-name", "X", "--batch-sizes", "1"])
    capsys.readouterr()
    assert ray_session.ray_logging_level() == 20  # INFO
    monkeypatch.setenv(cli.VERBOSE_ENV, "")
    cli.main(["plan", "--model", TINY, "--device-name", "X", "--batch-sizes", "1", "--verbose"])
    capsys.readouterr()
    assert ray_session.ray_logging_level() == 20


def test_dry_run_prints_plan_estimate_and_files_and_starts_nothing(tmp_path: Path, capsys) -> None:
    import ray
    import triton

    out = tmp_path / "out"
    assert cli.main(_tune(out, "--dry-run", "--format", "both", "--split-gemms")) == 0
    printed = capsys.readouterr().out
    assert "tiny-moe: bf16 E=4 N=64 K=64 topk=2" in printed and "fast strategy: about " in printed
    version = "triton_" + triton.__version__.replace(".", "_")
    for path in (out / "E=4,N=64,device_name=cpu.json", out / version / "E=4,N=64,device_name=cpu.json",
                 out / version / "E=4,N=64,device_name=cpu_down.json"):
        assert f"  {path}\n" in printed
    assert "0 measurements of this work" in printed and printed.rstrip().endswith("nothing started, nothing written")
    assert not out.exists() and not ray.is_initialized()
    assert cli.main(_tune(out, "--device-name", "NVIDIA H200")) == 2
    assert "--device-name names the GPU a --dry-run plans for" in capsys.readouterr().err


def _journal_with(path: Path, M: int) -> None:
    shape = derive_shape(load_model(TINY))
    candidate = Candidate(shape=shape, M=M, config=Config(16, 32, 32, 1, 4, 2), level=Level.SCREEN)
    env = WorkerEnv.of({"device": "cpu", "torch": "t", "triton": "t", "kernel": "builtin", "kernel_hash": "h"})
    with Journal(path) as journal:
        journal.record_measurement(env, Measurement(candidate, Status.OK, latency_us=5.0), 1)


def test_fresh_refuses_without_a_terminal_unless_yes(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    journal = out / ".moe-tune-journal.jsonl"
    _journal_with(journal, M=4)
    before = journal.read_bytes()
    assert count_measurements(journal, {(derive_shape(load_model(TINY)), "uniform", 4)}) == 1
    assert count_measurements(journal, {(derive_shape(load_model(TINY)), "uniform", 2)}) == 0  # other work

    assert cli.main(_tune(out, "--fresh")) == 2  # pytest's stdin is no terminal
    err = capsys.readouterr().err
    assert "holds 1 measurements of this work" in err and "pass --yes" in err and err.count("\n") == 1
    assert journal.read_bytes() == before and not list(out.glob("*.old"))

    reached = []

    def stop(request, *_):
        reached.append(request.fresh)
        raise RunFailed("stopped by the test")

    monkeypatch.setattr("tuner.commands.tune.driver.tune", stop)
    assert cli.main(_tune(out, "--fresh", "--yes")) == 1
    assert cli.main(_tune(tmp_path / "empty", "--fresh")) == 1  # nothing saved for this work: nothing to ask
    assert reached == [True, True]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("answer,confirmed", [("y\n", True), ("yes\n", True), ("n\n", False), ("\n", False)])
def test_fresh_asks_on_a_terminal(monkeypatch, answer: str, confirmed: bool) -> None:
    stdin, stderr = _Terminal(answer), _Terminal()
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stderr", stderr)
    if confirmed:
        confirm_fresh(Path("j.jsonl"), 7, yes=False)
    else:
        with pytest.raises(UsageError, match="not confirmed"):
            confirm_fresh(Path("j.jsonl"), 7, yes=False)
    assert "holds 7 measurements of this work" in stderr.getvalue() and "[y/N]" in stderr.getvalue()
    confirm_fresh(Path("j.jsonl"), 0, yes=False)  # nothing to lose: no question


def test_ci_runs_exactly_the_readme_set_up_and_test_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("   #")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert len(commands) == 2 and "venv" in commands[0] and "pytest" in commands[1]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in commands:
        assert command in ci, command


def test_the_default_output_folder_is_not_the_committed_results() -> None:
    from tuner.jobspec import Output
    from tuner.writers import DEFAULT_OUT

    assert DEFAULT_OUT == Path("moe-tune-out") == Output().dir
    assert not (ROOT / DEFAULT_OUT).is_dir() or not any((ROOT / DEFAULT_OUT).glob("E=*.json"))
    assert any((ROOT / "results" / "h200").glob("E=*.json")) and not (ROOT / "configs_out").exists()
    assert f"./{DEFAULT_OUT}/" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("command,required", [
    ("plan", ["--model", "mixtral-8x7b"]), ("tune", ["--model", "mixtral-8x7b"]),
    ("bench", ["--model", "mixtral-8x7b", "--configs", "."]), ("check", ["--shape", "4,64,64,2"]),
    ("compare", ["--model", "mixtral-8x7b", "--out", "r"])])
def test_every_command_takes_dtypes_repeated_and_comma_separated(command: str, required: list[str]) -> None:
    from workers.records import DType

    option = "--dtypes" if command == "compare" else "--dtype"
    parser = cli.build_parser(command)
    for words in (["--dtype", "bf16,fp8_w8a8", "--dtype", "int8_w8a16,bf16"],
                  [option, "bf16", option, "fp8_w8a8,int8_w8a16"], ["--dtype", " bf16 , fp8_w8a8,int8_w8a16"]):
        args = parser.parse_args([command, *required, *words])
        assert (args.dtypes if command == "compare" else args.dtype) == [DType.BF16, DType.FP8_W8A8,
                                                                          DType.INT8_W8A16], words
    with pytest.raises(UsageError, match="got 'bf16,fp9'"):
        parser.parse_args([command, *required, "--dtype", "bf16,fp9"])
    if command == "compare":  # the default list is replaced, not extended
        assert parser.parse_args([command, *required]).dtypes == [DType(d) for d in
                                                                  "bf16,fp8_w8a8,int8_w8a16,mxfp4,nvfp4".split(",")]
    else:
        assert parser.parse_args([command, *required]).dtype is None


def test_a_run_that_measures_nothing_leaves_no_journal_or_folder(tmp_path: Path, capsys) -> None:
    """Without a GPU and without --interpret the run fails at the workers (exit 1, one line), and
    the output folder and the journal it would have written are not left behind, empty."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a host without a GPU")
    out = tmp_path / "out"
    argv = ["tune", "--model", TINY, "--search-space", SPACE, "--batch-sizes", "1,4", "--out", str(out)]
    assert cli.main(argv) == 1
    assert "Ray reports no GPUs" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()
