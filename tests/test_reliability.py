"""Unattended runs (issue 11): bounded waits on Ray, outputs checked before Ray starts, hostile
journals, SIGTERM, the time budget, a real-looking poisoned context and every worker lost.

The end-to-end runs use the tiny fixture model under the interpreter with deterministic
latencies (``tune_helpers``), so the files a run must write are known exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
import yaml

from tune_helpers import (VLLM_FILE, deterministic_ranking, expected_vllm_file, run_tune, tune_argv,
                          write_fault_plan)
from tuner.cli import main
from tuner.journal import JOURNAL_NAME, Journal, measurement_key, measurement_to_record
from workers.faults import ENV_VAR
from workers.records import Candidate, Config, DType, Measurement, MoEShape, Status
from workers.worker import POISON_EXIT_CODE

pytestmark = pytest.mark.timeout(600)
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _cli(argv: list[str]) -> subprocess.CompletedProcess:
    """``moe-tune`` in its own process (stderr exactly as a user sees it; the environment's fault plan)."""
    return subprocess.run([sys.executable, "-m", "tuner.cli", *argv], capture_output=True, text=True, timeout=500,
                          cwd=REPO)


def _one_error_line(err: str, prefix: str) -> str:
    """The run's last stderr line, which must start with ``prefix``; no other error line, no traceback
    (progress notes, also ``moe-tune: ...``, and worker output may come before it)."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith(prefix), err[-3000:]
    errors = [line for line in lines if line.startswith(("moe-tune: error", "moe-tune: run failed",
                                                         "moe-tune: terminated"))]
    assert errors == [lines[-1]], err[-3000:]
    # Worker output that Ray forwards is tagged "(BenchmarkWorker pid=...)"; the driver's own must be clean.
    assert not [line for line in lines if "Traceback" in line and "pid=" not in line], err[-3000:]
    return lines[-1]


# -- 4: nothing waits on Ray without a bound ------------------------------------------------------

def test_an_unreachable_address_fails_within_the_connect_timeout(tmp_path, capsys):
    started = time.monotonic()
    code = main(tune_argv(tmp_path / "out", "--address", f"127.0.0.1:{_free_port()}", "--connect-timeout", "2"))
    assert code == 1 and time.monotonic() - started < 10
    line = _one_error_line(capsys.readouterr().err, "moe-tune: run failed: cannot reach the Ray cluster")
    assert "within 2s" in line and "--connect-timeout" in line


def test_bench_and_job_give_up_on_an_unreachable_address_within_their_connect_timeout(tmp_path, capsys):
    fixtures = Path(__file__).parent / "fixtures"
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "E=4,N=64,device_name=cpu.json").write_text('{"1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, '
                                                           '"BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1, '
                                                           '"num_warps": 4, "num_stages": 2}}')
    address = f"127.0.0.1:{_free_port()}"
    started = time.monotonic()
    code = main(["bench", "--model", str(fixtures / "job-tiny-moe.json"), "--batch-sizes", "2", "--interpret",
                 "--configs", str(configs), "--address", address, "--connect-timeout", "2"])
    assert code == 1 and time.monotonic() - started < 10
    assert "within 2s" in _one_error_line(capsys.readouterr().err, "moe-tune: run failed: cannot reach the Ray cluster")

    shutil.copy(fixtures / "job-tiny-moe.json", tmp_path)
    spec = {"name": "unreachable", "models": ["job-tiny-moe.json"], "batch_sizes": [2], "interpret": True,
            "output": {"dir": "out"}, "address": address, "connect_timeout": 2}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    started = time.monotonic()
    code = main(["job", "run", str(tmp_path / "job.yaml")])
    assert code == 1 and time.monotonic() - started < 10
    assert "within 2s" in _one_error_line(capsys.readouterr().err, "moe-tune: run failed: cannot reach the Ray cluster")


def test_an_address_where_something_else_listens_fails_within_the_connect_timeout(tmp_path):
    """A port that accepts connections but is no Ray head: ``ray.init`` would retry for minutes."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted = []
    threading.Thread(target=lambda: [accepted.append(server.accept()) for _ in iter(int, 1)], daemon=True).start()
    try:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "tuner.cli",
                               *tune_argv(tmp_path / "out", "--address", f"127.0.0.1:{server.getsockname()[1]}",
                                          "--connect-timeout", "3")],
                              capture_output=True, text=True, timeout=120, cwd=REPO)
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert done.returncode == 1, done.stderr
    assert "could not join the Ray cluster" in done.stderr and "within 3s" in done.stderr
    assert elapsed < 60  # interpreter start-up (torch, Triton) included


@pytest.mark.parametrize("address, why", [
    ("localhost", "no port"), ("garbage!!", "no port"), ("::1", "IPv6 host goes in brackets"),
    ("[::1]", "malformed IPv6"), ("[zz]:6379", "malformed IPv6"), (":", "invalid host name"),
    ("bad host:6379", "invalid host name"), ("10.0.0.1:99999", "invalid port"), ("10.0.0.1:0", "invalid port"),
    ("10.0.0.1:port", "invalid port"), ("host:6379:1", "IPv6 host goes in brackets"),
    ("http://127.0.0.1:8265", "dashboard"), ("", "blank"),
])
def test_a_malformed_address_exits_2_with_one_line_before_ray_starts(address, why, tmp_path, capsys):
    """Ray took such an address into ``ray.init`` (a traceback for ':'; 'localhost' failed as a run
    failure after start-up); now each is bad input, refused before anything starts."""
    import ray

    out = tmp_path / "out"
    assert main(tune_argv(out, "--address", address, "--connect-timeout", "2")) == 2
    line = _one_error_line(capsys.readouterr().err, "moe-tune: error: --address")
    assert why in line and not out.exists() and not ray.is_initialized()


def test_ray_address_is_checked_like_address_and_local_means_a_ray_started_here(monkeypatch, tmp_path, capsys):
    from tuner.ray_session import cluster_address

    for value, expected in [("", None), ("   ", None), ("local", None), (" 10.0.0.1:6379 ", "10.0.0.1:6379"),
                            ("[fe80::1]:6379", "[fe80::1]:6379"), ("auto", "auto")]:
        monkeypatch.setenv("RAY_ADDRESS", value)
        assert cluster_address(None) == expected, value
    assert cluster_address("local") is None and cluster_address("my-head.svc_1:6379") == "my-head.svc_1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "head.example")
    assert main(tune_argv(tmp_path / "out")) == 2
    assert "RAY_ADDRESS=head.example: no port" in _one_error_line(capsys.readouterr().err, "moe-tune: error:")
    spec = {"models": [str(Path(__file__).parent / "fixtures" / "job-tiny-moe.json")], "batch_sizes": [2],
            "interpret": True, "output": {"dir": str(tmp_path / "job-out")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["job", "validate", str(tmp_path / "job.yaml")]) == 2
    line = _one_error_line(capsys.readouterr().err, "moe-tune: error:")
    assert "job.yaml: address: not set, and RAY_ADDRESS=head.example: no port" in line
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({**spec, "address": "auto"}))  # auto follows RAY_ADDRESS
    assert main(["job", "validate", str(tmp_path / "job.yaml")]) == 2
    line = _one_error_line(capsys.readouterr().err, "moe-tune: error:")
    assert "job.yaml: address: auto: RAY_ADDRESS=head.example: no port" in line
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert main(tune_argv(tmp_path / "out", "--address", "auto")) == 2
    assert "RAY_ADDRESS=local: names no cluster for --address auto" in _one_error_line(
        capsys.readouterr().err, "moe-tune: error:")
    assert not (tmp_path / "out").exists()
    monkeypatch.delenv("RAY_ADDRESS")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({**spec, "address": "ray-head"}))
    assert main(["job", "validate", str(tmp_path / "job.yaml")]) == 2
    assert "job.yaml: address: ray-head: no port" in _one_error_line(capsys.readouterr().err, "moe-tune: error:")


@pytest.mark.parametrize("option, variable", [(["--address", "auto"], None), ([], "auto")])
def test_auto_with_a_stale_ray_current_cluster_says_where_the_address_came_from(option, variable, monkeypatch,
                                                                                 tmp_path, capsys):
    """``--address auto`` follows the address the last ``ray start`` recorded; once that cluster
    is stopped the file stays behind. The run fails within the timeout naming the file, not with
    "something answers there". ``RAY_ADDRESS=auto`` is the same ``auto`` (it went to Ray's own)."""
    ray_tmp = Path(f"/tmp/mt-{os.getpid()}")  # Ray's temp dir: short (socket paths are length-limited)
    (ray_tmp / "ray").mkdir(parents=True, exist_ok=True)
    try:
        (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}\n")
        monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
        if variable:
            monkeypatch.setenv("RAY_ADDRESS", variable)
        else:
            monkeypatch.delenv("RAY_ADDRESS", raising=False)
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # auto would turn token mode on for this process
        started = time.monotonic()
        assert main(tune_argv(tmp_path / "out", *option, "--connect-timeout", "2")) == 1
        assert time.monotonic() - started < 15
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    line = _one_error_line(capsys.readouterr().err, "moe-tune: run failed: cannot reach the Ray cluster at auto")
    assert f"recorded by 'ray start' in {ray_tmp}/ray/ray_current_cluster" in line and "within 2s" in line


def test_auto_joins_the_cluster_ray_address_names(monkeypatch):
    """``--address auto`` under ``RAY_ADDRESS=host:port`` joins that address (as Ray's own auto
    does), not the recorded cluster nor a Ray head found running here."""
    from tuner import ray_session

    joined = []
    monkeypatch.setattr(ray_session.ray, "init", lambda **kwargs: joined.append(kwargs["address"]))
    monkeypatch.setenv("RAY_TMPDIR", "/nonexistent-moe-tune")  # no recorded cluster to prefer
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen(4)
        address = f"127.0.0.1:{head.getsockname()[1]}"
        monkeypatch.setenv("RAY_ADDRESS", f" {address} ")
        assert ray_session.cluster_address("auto") == "auto"
        ray_session.join("auto", None, 5)
    assert joined == [address]


def test_a_huge_connect_timeout_joins_instead_of_overflowing(monkeypatch):
    """``--connect-timeout 1e308`` is a positive number, but a thread wait that long raised
    OverflowError (a traceback) even where the cluster answered at once."""
    from tuner import ray_session

    joined = []
    monkeypatch.setattr(ray_session.ray, "init", lambda **kwargs: joined.append(kwargs["address"]))
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen(4)
        address = f"127.0.0.1:{head.getsockname()[1]}"
        ray_session.join(address, None, 1e308)
    assert joined == [address]


# -- 5: outputs checked before Ray starts -----------------------------------------------------------

@pytest.mark.parametrize("where", ["under a file", "under /proc"])
def test_an_unwritable_out_exits_2_before_ray_starts(where, tmp_path, capsys):
    import ray

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "out" if where == "under a file" else Path("/proc/moe-tune-out")
    started = time.monotonic()
    assert main(tune_argv(out)) == 2
    assert time.monotonic() - started < 30 and not ray.is_initialized()
    line = _one_error_line(capsys.readouterr().err, "moe-tune: error: --out")
    assert "cannot write there" in line or "is a file" in line


def test_compare_out_under_a_file_exits_2(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    argv = ["compare", "--model", str(REPO / "tests/fixtures/tiny-moe.json"), "--dtypes", "bf16",
            "--batch-sizes", "1", "--search-space", str(REPO / "tests/fixtures/tune-space.yaml"), "--interpret",
            "--out", str(blocker / "report"), "--configs-out", str(tmp_path / "configs")]
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err, "moe-tune: error: --out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


class _RayStarted(Exception):
    pass


def _forbid_ray(monkeypatch) -> None:
    """``ray.init`` fails as a run failure (exit 1, "Ray started"): a check that ought to refuse
    the input before Ray starts shows as exit 1 instead of 2, one passed as exit 1 with that line."""
    import ray

    from tuner.errors import RunFailed

    def init(*args, **kwargs):
        raise RunFailed("Ray started")
    monkeypatch.setattr(ray, "init", init)


def _compare_argv(configs: Path, *extra: str) -> list[str]:
    return ["compare", "--model", str(REPO / "tests/fixtures/tiny-moe.json"), "--dtypes", "bf16",
            "--batch-sizes", "1", "--search-space", str(REPO / "tests/fixtures/tune-space.yaml"), "--interpret",
            "--out", str(configs.parent / "report"), "--configs-out", str(configs), *extra]


@pytest.mark.parametrize("command", ["tune", "compare", "job run"])
def test_a_journal_another_live_run_holds_exits_2_before_ray_starts(command, tmp_path, monkeypatch, capsys):
    """The lock the run takes in ``Journal`` is tried (and let go) while the input is checked:
    refused in well under a second, not after Ray and the workers started (13-16 s)."""
    _forbid_ray(monkeypatch)
    journal = tmp_path / "held" / JOURNAL_NAME
    if command == "tune":
        argv = tune_argv(tmp_path / "out", "--journal", str(journal))
    elif command == "compare":
        argv = _compare_argv(tmp_path / "configs", "--journal", str(journal))
    else:
        shutil.copy(REPO / "tests/fixtures/tiny-moe.json", tmp_path)
        spec = {"name": "held", "models": ["tiny-moe.json"], "batch_sizes": [1], "interpret": True,
                "search_space": str(REPO / "tests/fixtures/tune-space.yaml"), "output": {"dir": "out"},
                "journal": str(journal)}
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        argv = ["job", "run", str(tmp_path / "job.yaml")]
    with Journal(journal):  # another run, live
        started = time.monotonic()
        assert main(argv) == 2
        assert time.monotonic() - started < 30
    line = _one_error_line(capsys.readouterr().err, "moe-tune: error:")
    assert f"journal {journal} is in use by another moe-tune run" in line, line
    assert main(argv) == 1  # once it is free, the same input passes every check
    _one_error_line(capsys.readouterr().err, "moe-tune: run failed: Ray started")


def _existing_file(out: Path, triton_version: str | None, kernel_hash: str | None) -> Path:
    """A config file of the tiny model on "cpu" with an entry for M=8 (not re-tuned by ``tune_argv``):
    written by this tool for ``kernel_hash``/``triton_version`` (None: this host's), or, with
    ``triton_version`` "unrecorded", by something else."""
    from workers import backends
    from tuner.writers import write_vllm
    from tune_helpers import tiny_candidates

    import triton

    candidate = tiny_candidates()[0]
    if triton_version == "unrecorded":
        out.mkdir(parents=True)
        (out / VLLM_FILE).write_text(json.dumps({"8": candidate.config.to_dict()}))
        return out / VLLM_FILE
    env = {"device": "cpu", **backends.load("builtin").describe()}
    if kernel_hash is not None:
        env["kernel_hash"] = kernel_hash
    return write_vllm(out, candidate.shape, "cpu", {8: candidate.config}, triton_version or triton.__version__,
                      kernel=env).path


@pytest.mark.parametrize("existing, refused", [
    (("unrecorded", None), "this tool has no record of the kernel it was tuned for"),
    (("0.0.1", None), "it was tuned for another triton"),
    ((None, "0" * 16), "it was tuned for another kernel_hash"),
    ((None, None), None),  # same kernel and Triton: merged, so not refused
])
def test_a_config_file_writing_would_refuse_exits_2_before_ray_starts(existing, refused, tmp_path, monkeypatch,
                                                                      capsys):
    """Under --interpret in a Ray started here the workers' device name ("cpu"), Triton and kernel
    are this host's: a file in --out that the write would refuse is refused before Ray starts."""
    _forbid_ray(monkeypatch)
    out = tmp_path / "out"
    path = _existing_file(out, *existing)
    before = path.read_bytes()
    started = time.monotonic()
    code = main(tune_argv(out))
    err = capsys.readouterr().err
    if refused is None:
        assert code == 1, err
        _one_error_line(err, "moe-tune: run failed: Ray started")
    else:
        assert code == 2 and time.monotonic() - started < 30, err
        line = _one_error_line(err, f"moe-tune: error: {path} holds configs for batch sizes 8")
        assert refused in line and "--replace" in line, line
        assert main(tune_argv(out, "--replace")) == 1  # --replace: every check passes
        _one_error_line(capsys.readouterr().err, "moe-tune: run failed: Ray started")
    assert path.read_bytes() == before


def test_compare_refuses_a_config_file_writing_would_refuse_before_ray_starts(tmp_path, monkeypatch, capsys):
    _forbid_ray(monkeypatch)
    configs = tmp_path / "configs"
    path = _existing_file(configs, "0.0.1", None)
    assert main(_compare_argv(configs)) == 2
    line = _one_error_line(capsys.readouterr().err, f"moe-tune: error: {path} holds configs for batch sizes 8")
    assert "it was tuned for another triton" in line, line
    assert main(_compare_argv(configs, "--replace")) == 1
    _one_error_line(capsys.readouterr().err, "moe-tune: run failed: Ray started")
    assert not (tmp_path / "report").exists()


def test_a_cluster_leaves_the_config_file_check_to_the_workers(tmp_path, monkeypatch, capsys):
    """With --address the workers may run other GPUs and software than this host: only they know
    the file names, so the file is not judged before Ray starts (``tuner.driver`` checks it then)."""
    from tuner.commands.tune import known_device_name

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert known_device_name(True, None) == "cpu" and known_device_name(True, "local") == "cpu"
    assert known_device_name(True, "10.0.0.1:6379") is None
    assert known_device_name(False, None) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert known_device_name(True, None) is None
    monkeypatch.delenv("RAY_ADDRESS")
    from tuner.errors import RunFailed

    def ray_session(*args, **kwargs):
        raise RunFailed("Ray started")
    monkeypatch.setattr("tuner.commands.tune.ray_session", ray_session)
    out = tmp_path / "out"
    _existing_file(out, "unrecorded", None)
    assert main(tune_argv(out, "--address", "127.0.0.1:6379", "--connect-timeout", "2")) == 1
    _one_error_line(capsys.readouterr().err, "moe-tune: run failed: Ray started")


# -- 6: hostile journals ----------------------------------------------------------------------------

def test_hostile_journal_lines_are_skipped_and_counted_in_one_warning(tmp_path):
    shape = MoEShape(E=4, N=64, K=64, topk=2, dtype=DType.BF16)
    env = {"device": "cpu", "kernel": "builtin"}
    good = Measurement(candidate=Candidate(shape, 4, Config(16, 32, 32, 1, 4, 2)), status=Status.OK,
                       latency_us=12.5, device="cpu", versions={"torch": "t", "triton": "x"})
    record = measurement_to_record(measurement_key(env, good.candidate), good, 1)
    hostile = [{**record, "key": "a", "status": "bogus"}, {k: v for k, v in {**record, "key": "b"}.items()
                                                          if k != "candidate"},
               {**record, "key": "c", "latency_us": []}, {**record, "key": "d", "latency_us": None},
               {**record, "key": "e", "candidate": {**record["candidate"], "M": "4"}},
               {**record, "key": "f", "candidate": {**record["candidate"], "config": {"BLOCK_SIZE_M": 16}}},
               {"v": 1, "kind": "retime", "key": "g", "finalists": ["a"], "latency_us": ["fast"]},
               [1, 2, 3], "just a string"]
    path = tmp_path / JOURNAL_NAME
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in [record, *hostile]) + b"{torn\n\xff\xfe\n")
    with Journal(path) as journal:
        assert list(journal.records) == [record["key"]]
        assert journal.invalid_records == len(hostile) and journal.unreadable_lines == 2
        warning = journal.warning()
    assert warning.count("\n") == 0 and f"skipped {len(hostile) + 2} line(s)" in warning


# -- 7: SIGTERM -------------------------------------------------------------------------------------

def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a live process; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[0]


def _descendants(root: int) -> dict[int, str]:
    """Every process below ``root``, pid → command line."""
    parents = {int(d): _stat(int(d)) for d in os.listdir("/proc") if d.isdigit()}
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, stat in parents.items():
            if stat and stat[0] == parent and pid not in found:
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") \
                    if Path(f"/proc/{pid}").exists() else ""
                frontier.append(pid)
    return found


def _alive(pids) -> list[int]:
    return [pid for pid in pids if (stat := _stat(pid)) is not None and stat[1] != "Z"]


def _records(journal: Path, skip: int = 0) -> list[dict]:
    """The journal's records after its first ``skip`` lines (every one must parse)."""
    lines = journal.read_bytes().splitlines()[skip:] if journal.exists() else []
    return [orjson.loads(line) for line in lines]


def test_sigterm_finishes_the_record_stops_ray_and_exits_143(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(write_fault_plan(tmp_path / "faults.json")))
    out = tmp_path / "out"
    journal = out / JOURNAL_NAME
    driver = subprocess.Popen([sys.executable, "-m", "tuner.cli", *tune_argv(out)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    ours: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 400
        while len(_records(journal)) < 2 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
        ours = _descendants(driver.pid)
        assert any("raylet" in cmdline for cmdline in ours.values()), ours
        driver.send_signal(signal.SIGTERM)
        code = driver.wait(60)
        err = driver.stderr.read().decode()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.stderr.close()
    assert code == 143, err[-3000:]
    line = _one_error_line(err, "moe-tune: terminated by SIGTERM")
    assert "run the same command again to resume" in line and str(journal) in line
    assert "Traceback" not in err
    deadline = time.monotonic() + 10  # "a few seconds": no Ray process of ours outlives the driver longer
    while _alive(ours) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(ours), [ours[pid] for pid in _alive(ours)]
    measured = _records(journal)  # every line whole: the record being written was finished
    assert len(measured) >= 2

    code, summary = run_tune(tune_argv(out))
    assert code == 0 and summary["evaluations_reused"] >= len(measured)
    assert json.loads((out / VLLM_FILE).read_text()) == expected_vllm_file()


def _plan_slow_compile(path: Path) -> Path:
    """Compile-ahead (the plan's stand-in compiler) that never finishes, and candidates that hang
    once an idle worker takes them still compiling: the engine waits in ``CompileAhead.pump``'s
    and the pool's ``ray.wait`` with every candidate compiling or running."""
    labels = sorted({c.config.label for ranked in deterministic_ranking().values() for c in ranked})
    path.write_text(json.dumps({"deterministic_latency": True,
                                "faults": [{"config": label, "action": "hang"} for label in labels],
                                "compile_ahead": {"setup_s": 0, "job_s": 600}}))
    return path


def _plan_hanging_candidates(path: Path) -> Path:
    """Every candidate hangs on its worker: the engine waits in the pool's ``ray.wait``."""
    labels = sorted({c.config.label for ranked in deterministic_ranking().values() for c in ranked})
    return write_fault_plan(path, [{"config": label, "action": "hang"} for label in labels])


@pytest.mark.parametrize("waiting_in, plan, marker", [
    ("compile-ahead", _plan_slow_compile, "compile-ahead: "),
    ("measuring", _plan_hanging_candidates, "searching ("),
])
def test_sigterm_while_the_driver_waits_on_ray_exits_143_quietly(tmp_path, monkeypatch, waiting_in, plan, marker):
    """Ray's ``ray.wait`` runs the SIGTERM handler from compiled code and ends in a SystemError
    around our ``Terminated``: still one line, exit 143, no traceback, no Ray process left behind."""
    monkeypatch.setenv(ENV_VAR, str(plan(tmp_path / "faults.json")))
    out = tmp_path / "out"
    driver = subprocess.Popen([sys.executable, "-m", "tuner.cli", *tune_argv(out, timeout_s=300)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(driver.stderr), daemon=True)
    reader.start()
    ours: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 300
        while not any(marker in line for line in lines) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert driver.poll() is None and any(marker in line for line in lines), "".join(lines)[-3000:]
        time.sleep(3)  # well inside the wait: nothing can finish (the compile or the candidates never end)
        ours = _descendants(driver.pid)
        assert any("raylet" in cmdline for cmdline in ours.values()), ours
        driver.send_signal(signal.SIGTERM)
        code = driver.wait(60)
        reader.join(10)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    err = "".join(lines)
    assert code == 143, err[-3000:]
    line = _one_error_line(err, "moe-tune: terminated by SIGTERM")
    # Nothing finished: no journal is left, and the line does not pretend one is.
    assert f"nothing was measured and the journal {out / JOURNAL_NAME} was not started" in line, line
    assert "run the same command again to start over" in line and "measurements are in" not in line
    assert "SystemError" not in err and "Traceback" not in err, err[-3000:]
    assert not (out / JOURNAL_NAME).exists()
    _gone_within(ours, 10)


def _signal_once_ray_shows(out: Path, sig: int, ready) -> tuple[int, str, dict[int, str]]:
    """Start a tune, send ``sig`` as soon as ``ready(descendants)`` holds (polled every 20 ms, at
    most 120 s); its exit code, stderr and the Ray processes seen under it."""
    driver = subprocess.Popen([sys.executable, "-m", "tuner.cli", *tune_argv(out)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ours: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while driver.poll() is None and time.monotonic() < deadline:
            ours = _descendants(driver.pid)
            if ready(ours):
                break
            time.sleep(0.02)
        assert driver.poll() is None and ready(ours), "Ray never got that far"
        driver.send_signal(sig)
        code = driver.wait(60)
        err = driver.stderr.read()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.stderr.close()
    return code, err, ours


def _gone_within(ours: dict[int, str], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while _alive(ours) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(ours), [ours[pid] for pid in _alive(ours)]


def test_sigterm_while_ray_starts_exits_143_and_leaves_no_ray_process(tmp_path):
    """While ``ray.init`` runs, Ray's own SIGTERM handler is the active one (it exits with code 15):
    the signal still ends the command as a termination. Sent as soon as Ray's first process is up."""
    code, err, ours = _signal_once_ray_shows(
        tmp_path / "out", signal.SIGTERM, lambda ours: any("gcs_server" in cmdline for cmdline in ours.values()))
    assert code == 143, err[-3000:]
    line = _one_error_line(err, "moe-tune: terminated by SIGTERM")
    assert line.endswith("run the same command again"), line  # no journal was opened: nothing to resume from
    assert "Traceback" not in err and "SystemExit" not in err, err[-3000:]
    _gone_within(ours, 10)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_ray_starts_its_agents_leaves_no_ray_process(tmp_path, sig, code):
    """Later in ``ray.init`` than the test above: the raylet has started its dashboard and
    runtime-env agents. ``ray.shutdown`` left those running for a minute or more; now every Ray
    process the run started is gone within seconds of its exit."""
    agents = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
    exit_code, err, ours = _signal_once_ray_shows(
        tmp_path / "out", sig, lambda ours: sum(name in cmdline for cmdline in ours.values() for name in agents) == 2)
    assert exit_code == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    _gone_within(ours, 8)


def test_reap_kills_only_the_ray_processes_it_found_and_not_a_pid_given_to_another_process():
    """What ``ray_session`` ends after ``ray.shutdown``: the Ray processes under the driver (here a
    stand-in whose command line names Ray's package), each known by pid and start time, so a pid
    the system has since given to another process is left alone."""
    from tuner.ray_session import ray_processes_below, reap

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    ray_like = subprocess.Popen([*sleeper, "/site-packages/ray/stand-in"])
    other = subprocess.Popen(sleeper)
    try:
        found = {pid: start for pid, start in ray_processes_below(os.getpid())}
        assert ray_like.pid in found and other.pid not in found
        reap([(ray_like.pid, str(int(found[ray_like.pid]) - 1))], grace_s=0.2)  # an older process's pid
        with pytest.raises(subprocess.TimeoutExpired):
            ray_like.wait(1)  # still running
        reap([(ray_like.pid, found[ray_like.pid])], grace_s=0.2)
        assert ray_like.wait(10) == -signal.SIGKILL and other.poll() is None
    finally:
        for process in (ray_like, other):
            process.kill()
            process.wait(10)


@pytest.mark.parametrize("records", [0, 1])
def test_a_sigterm_before_any_measurement_says_so_and_names_no_missing_journal(records, tmp_path, monkeypatch):
    """SIGTERM while the workers start: a journal this run created holds nothing and is removed,
    so the hint says nothing was measured (it said "0 measurements are in the journal" of a file
    that was gone); an earlier run's journal keeps its records, and the hint counts them."""
    from tuner import driver, signals
    from tune_helpers import tiny_candidates

    def start_pool(*args, **kwargs):
        raise signals.Terminated()
    monkeypatch.setattr(driver, "start_pool", start_pool)
    journal = tmp_path / "out" / JOURNAL_NAME
    if records:
        with Journal(journal) as earlier:
            m = Measurement(tiny_candidates()[0], Status.OK, latency_us=5.0, device="cpu")
            earlier.append(measurement_to_record(measurement_key({"device": "cpu"}, m.candidate), m, attempts=1))
    request = driver.TuneRequest(jobs_for_device=lambda device: [], write_outputs=lambda *args: [],
                                 journal_path=journal, compile_ahead=False)
    with pytest.raises(signals.Terminated) as ended:
        driver.tune(request)
    if records:
        assert ended.value.hint == (f"1 measurements are in the journal {journal}; run the same command again to "
                                    "resume")
        assert len(_records(journal)) == 1
    else:
        assert ended.value.hint == (f"nothing was measured and the journal {journal} was not started; run the same "
                                    "command again to start over")
        assert not journal.exists() and not journal.parent.exists()


def test_termination_is_recognised_however_it_surfaces():
    """The cases the handler produces, without a process: Ray's SystemError around ``Terminated``
    (its ``__context__``), one raised ``from`` it, and an exception after a swallowed one."""
    from tuner import signals

    signals.install()
    assert not signals.caused(SystemError("unrelated")) and not signals.received()
    try:
        try:
            raise signals.Terminated("resume hint")
        except signals.Terminated:
            raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set")
    except SystemError as wrapped:
        assert signals.caused(wrapped) and signals.hint_of(wrapped) == "resume hint"
    try:
        raise RuntimeError("converted") from signals.Terminated()
    except RuntimeError as converted:
        assert signals.caused(converted) and signals.hint_of(converted) == ""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(signals.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs in the main thread at the next bytecode
        assert signals.received() and signals.caused(ValueError("anything after it"))
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM during the stop is ignored
        time.sleep(0.2)
        with pytest.raises(signals.Terminated):
            signals.check()  # a swallowed one still stops the next waiting loop
        with signals.deferred():
            signals.check()  # held while a journal line is written
    finally:
        signals.install()
        signal.signal(signal.SIGTERM, previous)
    assert not signals.received()


def test_a_swallowed_ctrl_c_still_ends_the_command_with_130(monkeypatch, capsys):
    """Ctrl-C while Ray forks its processes raised KeyboardInterrupt inside an at-fork handler,
    where Python reports and ignores it: the run went on to the end and exited 0. Inside Ray's
    compiled core it surfaces as a SystemError. Either way the command now ends as interrupted."""
    from tuner import cli, signals
    from tuner.commands import plan

    def swallowed(args) -> int:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
        except KeyboardInterrupt:
            pass  # as an at-fork handler does
        return 0

    def wrapped(args) -> int:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            raise SystemError("<cyfunction CoreWorker.get_objects> returned a result with an exception set")
        return 0

    previous = signal.getsignal(signal.SIGINT)
    try:
        for command in (swallowed, wrapped):
            monkeypatch.setattr(plan, "run", command)
            assert cli.main(["plan", "--model", "mixtral-8x7b", "--device-name", "X"]) == 130
            assert capsys.readouterr().err.strip().splitlines()[-1] == "moe-tune: interrupted"
            with pytest.raises(KeyboardInterrupt):
                signals.check()  # and every waiting loop stops on it
    finally:
        signal.signal(signal.SIGINT, previous)
        signals.install()


def test_a_command_started_with_sigint_ignored_keeps_it_ignored():
    """A job a shell starts in the background has SIGINT ignored (a Ctrl-C at the terminal is not
    for it): ``signals.install`` flags SIGINT only where Python's own handler is in place."""
    from tuner import signals

    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signals.install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signals.install()
        assert signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, signal.default_int_handler)
    finally:
        signal.signal(signal.SIGINT, previous)
        signals.install()


# -- 9: start-up -------------------------------------------------------------------------------------

def test_compile_processes_start_while_the_workers_start(tmp_path, monkeypatch):
    """On a GPU both ends import the server's package (~10 s each): the GPU workers, and the
    compile-ahead processes whose first outcome every candidate waits for. Stand-ins for both
    (the fault plan: each worker's start and each compile process's start-up take 10 s longer)
    show they overlap: the first measurement follows the workers' start at once, not 10 s later."""
    slow_s = 10.0
    plan = tmp_path / "faults.json"
    plan.write_text(json.dumps({"deterministic_latency": True, "faults": [], "worker_start_s": slow_s,
                                "compile_ahead": {"setup_s": slow_s, "job_s": 0}}))
    monkeypatch.setenv(ENV_VAR, str(plan))
    out = tmp_path / "out"
    argv = tune_argv(out, "--strategy", "exhaustive")
    argv[argv.index("--batch-sizes") + 1] = "1"
    code, summary = run_tune(argv)
    assert code == 0
    assert json.loads((out / VLLM_FILE).read_text()) == {k: v for k, v in expected_vllm_file().items()
                                                         if k in ("triton_version", "1")}
    compile_stats = summary["devices"][0]["compile_ahead"]
    assert compile_stats["jobs"] > 0 and compile_stats["not_compiled_ahead"] == compile_stats["jobs"]
    t = summary["timeline"]
    assert t["compile_ahead"]["start_s"] <= t["worker_start"]["start_s"]  # started before the workers were up
    assert t["worker_start"]["end_s"] - t["worker_start"]["start_s"] >= slow_s
    # Serially the compile processes would start once the workers are up and be ready slow_s later.
    assert t["first_measurement_s"] - t["worker_start"]["end_s"] < slow_s / 2, t


# -- 8: the time budget -----------------------------------------------------------------------------

def test_a_budget_that_ends_before_any_result_says_so_once(tmp_path, monkeypatch):
    faults = [{"config": c.config.label, "action": "raise"} for c in deterministic_ranking()[1]]
    monkeypatch.setenv(ENV_VAR, str(write_fault_plan(tmp_path / "faults.json", faults)))
    out = tmp_path / "out"
    done = _cli(tune_argv(out, "--budget-minutes", "0.0001"))
    assert done.returncode == 1 and done.stdout == ""
    err = done.stderr
    final = _one_error_line(err, "moe-tune: run failed: the time budget")
    assert "before any candidate produced" in final
    assert "nothing was written" in final and err.count("nothing was written") == 1
    assert "best found by then" not in err
    # The budget counted from the first measurement: Ray's start-up did not eat it.
    assert 1 <= len(_records(out / JOURNAL_NAME)) < 16
    assert not (out / VLLM_FILE).exists()


# -- 2: a poisoned CUDA context ---------------------------------------------------------------------

def test_a_poison_fault_ends_the_worker_as_a_poisoned_context(tmp_path):
    victim = deterministic_ranking()[1][-1]
    plan = write_fault_plan(tmp_path / "faults.json", [{"config": victim.config.label, "M": 1, "action": "poison"}])
    script = ("import pickle, sys; from workers.worker import BenchmarkWorker\n"
              "BenchmarkWorker(timeout_s=120).measure(pickle.loads(bytes.fromhex(sys.argv[1])))\n")
    import pickle

    done = subprocess.run([sys.executable, "-c", script, pickle.dumps(victim).hex()], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, ENV_VAR: str(plan), "TRITON_INTERPRET": "1"})
    assert done.returncode == POISON_EXIT_CODE, done.stderr[-2000:]
    assert "CUDA context poisoned" in done.stderr and "illegal memory access" in done.stderr


# -- 1: every worker lost ---------------------------------------------------------------------------

def test_every_worker_lost_writes_the_finished_batch_sizes_and_keeps_the_journal(tmp_path, monkeypatch, capsys):
    ranking = deterministic_ranking()
    out = tmp_path / "out"
    journal = out / JOURNAL_NAME
    # First M=1 alone, over a journal with hostile lines (skipped, one warning), with a candidate
    # that poisons its worker's context: retried on the other worker, quarantined, the worker
    # restarted; the file holds M=1's winner.
    out.mkdir()
    journal.write_bytes(b'{"v": 1, "kind": "measure", "key": "k", "status": "bogus"}\n[]\n{oops\n')
    # One plan for both runs (its digest is part of every journal key): at M=4 a candidate takes
    # its worker's GPU away for good.
    poison, lost = ranking[1][-1], ranking[4][-1]
    monkeypatch.setenv(ENV_VAR, str(write_fault_plan(tmp_path / "faults.json", [
        {"config": poison.config.label, "M": 1, "action": "poison"},
        {"config": lost.config.label, "M": 4, "action": "lose"}])))
    argv = tune_argv(out, "--strategy", "exhaustive")
    argv[argv.index("--batch-sizes") + 1] = "1"
    code, summary = run_tune(argv)
    assert code == 0 and summary["failed"] == {"crashed": 1} and summary["evaluations_reused"] == 0
    assert capsys.readouterr().err.count("skipped 3 line(s) (1 unreadable, 2 with wrong fields)") == 1
    (failure,) = summary["devices"][0]["failures"]
    assert failure["config"] == poison.config.label and "died" in failure["message"]
    poisoned = [r for r in _records(journal, skip=3) if r.get("status") == "crashed"]
    assert [r["attempts"] for r in poisoned] == [2]
    timeline = summary["timeline"]
    order = ["ray_start", "worker_start", "screening", "full_timing", "retiming", "writing"]
    assert all(phase in timeline for phase in order), timeline
    assert [timeline[p]["start_s"] for p in order] == sorted(timeline[p]["start_s"] for p in order)
    assert timeline["worker_start"]["end_s"] <= timeline["first_measurement_s"] <= timeline["screening"]["end_s"]
    first_file = json.loads((out / VLLM_FILE).read_text())
    assert first_file == {k: v for k, v in expected_vllm_file().items() if k in ("triton_version", "1")}
    assert oct((out / VLLM_FILE).stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    # Then M=1,4: M=1 is answered by the journal (finished at once); the M=4 candidate that
    # loses its worker's GPU is retried on the other worker and loses that one too.
    before = len(_records(journal, skip=3))
    done = _cli(tune_argv(out, "--strategy", "exhaustive"))
    assert done.returncode == 1
    line = _one_error_line(done.stderr, "moe-tune: run failed: every worker was lost")
    assert "run the same command again to resume" in line and str(out / VLLM_FILE) in line
    assert json.loads((out / VLLM_FILE).read_text()) == first_file  # M=1 kept; M=4 had not finished
    records = _records(journal, skip=3)  # after the hostile lines, every line whole, no key twice
    assert len(records) > before and len({r["key"] for r in records}) == len(records)
    lost_records = [r for r in records if r["kind"] == "measure" and r["candidate"]["M"] == 4
                    and r["candidate"]["config"] == lost.config.to_dict()]
    # Normally charged twice and quarantined. With two calls in flight per worker, a worker that
    # dies right after finishing the call before it can take that call's result with it: then the
    # earlier call is blamed and requeued, this one requeued uncharged, and the resume tries both.
    assert [(r["status"], r["attempts"]) for r in lost_records] in ([("crashed", 2)], [])
    assert not [r for r in records[before:] if r["kind"] == "measure" and r["candidate"]["M"] == 1]
    assert f"{len([r for r in records if r['kind'] == 'measure'])} measurements are in the journal" in line


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -- 10: a two-node cluster that loses a node -------------------------------------------------------

def _ray_node(args: list[str], log: Path) -> subprocess.Popen:
    """``ray start ... --block`` in its own session: every process of the node stays in that
    session, so the test kills exactly this node (never ``ray stop``, which would end every
    Ray cluster on the machine)."""
    handle = open(log, "wb")
    return subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--num-cpus", "2",
                             "--num-gpus", "1", "--disable-usage-stats", *args],
                            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
                            env={**os.environ, "RAY_health_check_period_ms": "500",
                                 "RAY_health_check_failure_threshold": "4", "RAY_AUTH_MODE": "disabled"})


def _session_pids(session: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _kill_session(node: subprocess.Popen) -> None:
    for pid in _session_pids(node.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        node.wait(30)
    except subprocess.TimeoutExpired:
        pass


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.timeout(900)
def test_a_node_killed_mid_run_costs_nothing_and_the_run_ends_on_the_other(tmp_path, monkeypatch):
    """A head and a second node (``ray start``, one logical GPU each) on this machine; moe-tune
    joins with ``--address``; the second node is killed mid-run. The run ends on the head's
    worker with the clean run's file, and no candidate is lost or measured twice."""
    monkeypatch.setenv(ENV_VAR, str(write_fault_plan(tmp_path / "faults.json")))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a local test cluster: no token to share between nodes
    port = _free_port()
    temp = Path("/tmp") / f"moe-tune-test-{os.getpid()}-{port}"  # short: Ray's socket paths are length-limited
    logs = {name: tmp_path / f"{name}.log" for name in ("head", "second", "driver")}
    def started(name: str) -> bool:
        node = nodes[-1]
        assert node.poll() is None, logs[name].read_text()[-3000:]
        return b"Ray runtime started" in logs[name].read_bytes()

    out = tmp_path / "out"
    journal = out / JOURNAL_NAME
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(_ray_node(["--head", "--port", str(port), "--temp-dir", str(temp), "--include-dashboard=false"],
                               logs["head"]))
        _wait_for(lambda: started("head"), 180, "the head node")
        address = f"127.0.0.1:{port}"
        nodes.append(_ray_node(["--address", address], logs["second"]))
        _wait_for(lambda: started("second"), 180, "the second node")
        with open(logs["driver"], "wb") as err:
            driver = subprocess.Popen([sys.executable, "-m", "tuner.cli",
                                       *tune_argv(out, "--address", address, "--connect-timeout", "120")],
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
            try:
                # Both nodes' workers are measuring before one node goes.
                _wait_for(lambda: driver.poll() is not None or (
                    b"2 worker(s)" in logs["driver"].read_bytes() and len(_records(journal)) >= 4), 400, "the run")
                assert driver.poll() is None, logs["driver"].read_text()[-3000:]
                _kill_session(nodes[1])
                stdout, _ = driver.communicate(timeout=500)
            finally:
                if driver.poll() is None:
                    os.killpg(driver.pid, signal.SIGKILL)
                    driver.wait(30)
    finally:
        for node in reversed(nodes):
            _kill_session(node)
        shutil.rmtree(temp, ignore_errors=True)
    stderr = logs["driver"].read_text()
    assert driver.returncode == 0, stderr[-3000:]
    assert "lost while running" in stderr or "is gone" in stderr, stderr[-3000:]
    summary = json.loads(stdout)
    assert summary["devices"][0]["workers"] == 2 and summary["failed"] == {}
    assert json.loads((out / VLLM_FILE).read_text()) == expected_vllm_file()
    records = _records(journal)
    assert len({r["key"] for r in records}) == len(records)
    assert summary["evaluations_run"] == len([r for r in records if r["kind"] == "measure"])


# -- 9: two workers build each batch size's problem once --------------------------------------------

def test_two_workers_split_the_batch_sizes_instead_of_both_building_each(tmp_path):
    """Every worker builds weights and the fp32 reference for each (shape, M) it measures. Both
    workers once took the queue's head, so each built every M's problem: a serial cost per M
    that a second GPU did not shorten. Now a worker without work for its own M takes an M no
    other worker holds."""
    import io
    import random

    from test_search import CONFIGS, ENV, StandInPool, _search_job, bowl
    from tuner.engine import DeviceGroup, Engine
    from tuner.journal import WorkerEnv
    from tuner.progress import Progress
    from tuner.search import Exhaustive

    class Recording(StandInPool):
        def submit(self, slot, work, call) -> None:
            runs.append((slot.index, work.candidate.M))
            super().submit(slot, work, call)

    runs: list[tuple[int, int]] = []
    rng = random.Random(0)
    pool = Recording(bowl({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1,
                           "num_warps": 4, "num_stages": 3}, rng), [0.0])
    batch_sizes = (1, 16, 64, 256, 1024, 4096)
    job = _search_job({M: list(CONFIGS[:40]) for M in batch_sizes})
    group = DeviceGroup(env=WorkerEnv.of(ENV), slots=pool.slots, strategy=Exhaustive([job]))
    with Journal(tmp_path / "journal.jsonl") as journal:
        Engine(pool, [group], journal, Progress(io.StringIO(), live=False)).run()
    builds = {slot: [M for i, (s, M) in enumerate(runs) if s == slot
                     and M != next((m for t, m in reversed(runs[:i]) if t == slot), None)]
              for slot in (0, 1)}
    per_m = {M: sum(M in b for b in builds.values()) for M in batch_sizes}
    assert {M for M, n in per_m.items() if n == 1} >= set(batch_sizes[:-1]), builds
    assert sum(len(b) for b in builds.values()) <= len(batch_sizes) + 4, builds
    assert {s for s, _ in runs} == {0, 1}
