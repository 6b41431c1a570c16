"""Fault injection on the GPUs present (one device call), and the 1-GPU vs 2-GPU scaling tune.

Faults (default mode): Mixtral-8x7B TP2 bf16 at batch sizes 1,64,1024 over a fixed 32-config
space, ``--strategy exhaustive``, latencies made deterministic by the fault hook
(``MOE_TUNE_FAULTS``) so every run must write the same bytes. Runs, each a fresh output folder
and journal, one shared Triton cache (only the first run compiles):

  clean-cold   the reference files (fills the Triton cache)
  clean        the reference wall time (warm cache)
  raise        ~5% of the candidates raise in the worker
  poison       one candidate stores out of bounds (a real illegal memory access on a GPU)
  hang         one candidate never returns (the worker's watchdog ends it after --timeout)
  worker-kill  one BenchmarkWorker process SIGKILLed from outside, mid-run
  driver-kill  the driver (and its embedded Ray) SIGKILLed mid-run, then the command rerun
  combined     all of the above in one run (the driver kill last, then the rerun)

Faults go to candidates that lose anyway (the slowest screens of the clean run, never promoted
to a full timing), so a run that survives them must write the clean run's files. Checked per
run: it ended (exit code), files byte-identical to clean-cold's, journal without a duplicated key
and holding every candidate the clean run measured, every injected config named in the summary's
failures, the wall-time cost against ``clean``. Results: ``$OUT/fault_injection.json``, one log
per run, and a table printed last.

Scaling (``--scaling``): the full 18-batch-size tune (default space, fast strategy, real
timings) with ``--workers 1`` and then ``--workers 2`` (when two GPUs are present), each from a
cold Triton cache of its own, then (while the time allows) the same pair again on those now warm
caches (fresh output folders and journals, so everything is measured again). Per run: the wall
time of the process, the summary's per-phase timeline and first measurement, compile-ahead's
counts (jobs, speculative jobs used/unused, candidates idle workers took still compiling), and the
fixed time outside the timeline: ``pre_timeline_s`` (process launch to the timeline's zero:
interpreter, imports, input checks) and ``tail_s`` (the summary printed to the process's exit:
``ray.shutdown`` and interpreter exit). A start-up probe first times, in fresh processes, what
the fixed time is made of on this host: importing torch and initialising CUDA, importing Ray,
``ray.init``, two GPU actors (one on a 1-GPU host) and one CPU actor ready, ``ray.shutdown`` —
with Ray's default worker prestart and without it. Results: ``$OUT/scaling.json``.

``--interpret`` runs either mode on the CPU (tiny fixture model, two logical GPUs, Triton
interpreter), to test this script.

    python3 benchmarks/fault_injection.py [--interpret] [--scaling] [--out DIR] [--total-s 330]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAULT_SPACE = """description: fixed 32-config space for the fault-injection runs
BLOCK_SIZE_M: [16, 64]
BLOCK_SIZE_N: [64, 128]
BLOCK_SIZE_K: [64, 128]
GROUP_SIZE_M: [1, 16]
num_warps: [4, 8]
num_stages: [3]
"""
RAISE_FRACTION = 0.05
READ_GRACE_S = 5.0
ALL_18 = "1,2,4,8,16,24,32,48,64,96,128,256,512,1024,1536,2048,3072,4096"


@dataclass
class Setup:
    model_args: list[str]
    batch_sizes: str
    space: Path
    workers: int
    timeout_s: int
    interpret: bool
    out: Path
    work: Path
    deadline: float
    only: set[str] = field(default_factory=set)

    def tune_argv(self, out: Path, *extra: str) -> list[str]:
        argv = [sys.executable, "-m", "tuner.cli", "tune", *self.model_args, "--batch-sizes", self.batch_sizes,
                "--search-space", str(self.space), "--strategy", "exhaustive", "--workers", str(self.workers),
                "--timeout", str(self.timeout_s), "--out", str(out), "--json", *extra]
        return argv + (["--interpret"] if self.interpret else [])


@dataclass
class Run:
    name: str
    rc: int | None = None
    wall_s: float = 0.0
    summary: dict = field(default_factory=dict)
    injected: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files_identical: bool | None = None
    journal_ok: bool | None = None
    named: bool | None = None
    fixed: dict = field(default_factory=dict)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _launch(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    handle = open(log, "ab")
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=handle, start_new_session=True)


@dataclass
class Finished:
    """How a launched command ended: its exit code (124: killed at its limit), its stdout, and
    (``time.monotonic()``) when its first stdout line arrived (None: it printed nothing) and when
    it ended."""

    rc: int
    stdout: str
    printed_at: float | None
    ended_at: float


def _finish(proc: subprocess.Popen, limit_s: float) -> Finished:
    """Wait for ``proc`` up to ``limit_s`` (then SIGKILL its process group: exit code 124). Its
    stdout is read meanwhile in a thread, so when the summary (one line) arrives is known apart
    from when the process ends; the reader gets ``READ_GRACE_S`` after the end for the rest."""
    printed: list[float] = []
    lines: list[bytes] = []

    def read() -> None:
        for line in proc.stdout:
            printed.append(time.monotonic())
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(1.0, limit_s))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = 124
    ended = time.monotonic()
    reader.join(READ_GRACE_S)
    return Finished(rc, b"".join(lines).decode(errors="replace"), printed[0] if printed else None, ended)


def _summary(run: Run, stdout: str) -> None:
    """The command's JSON summary (its stdout) into ``run.summary``; a note where it is none."""
    try:
        run.summary = json.loads(stdout) if stdout.strip() else {}
    except json.JSONDecodeError:
        run.notes.append("stdout was not the JSON summary")


def _records(journal: Path) -> list[dict]:
    if not journal.exists():
        return []
    return [json.loads(line) for line in journal.read_bytes().splitlines() if line.strip()]


def _session_pids(session: int, needle: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != session:
                continue
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(entry))
    return sorted(found)


def _when_records(journal: Path, count: int, proc: subprocess.Popen, action, limit_s: float) -> threading.Thread:
    """Run ``action()`` once the journal holds ``count`` records (in a thread, while ``proc`` runs)."""
    def watch() -> None:
        deadline = time.monotonic() + limit_s
        while proc.poll() is None and time.monotonic() < deadline:
            if len(_records(journal)) >= count:
                action()
                return
            time.sleep(0.1)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _write_plan(path: Path, faults: list[dict]) -> Path:
    path.write_text(json.dumps({"deterministic_latency": True, "faults": faults}))
    return path


def _config_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("E=*.json"))}


def _tune(setup: Setup, name: str, faults: list[dict], kill_worker_at: int | None = None,
          kill_driver_at: int | None = None) -> tuple[Run, Path]:
    """One tune with this fault plan; with ``kill_driver_at`` the driver is SIGKILLed then rerun."""
    run = Run(name, injected=faults)
    out = setup.work / name
    shutil.rmtree(out, ignore_errors=True)
    log = setup.out / f"{name}.log"
    env = {**os.environ, "MOE_TUNE_FAULTS": str(_write_plan(setup.work / f"{name}.faults.json", faults)),
           "PYTHONUNBUFFERED": "1"}
    journal = out / ".moe-tune-journal.jsonl"
    started = time.monotonic()
    left = setup.deadline - started
    proc = _launch(setup.tune_argv(out), env, log)
    if kill_worker_at is not None:
        def kill_worker() -> None:
            pids = _session_pids(proc.pid, "BenchmarkWorker")
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                run.notes.append(f"SIGKILLed worker pid {pids[0]} after {len(_records(journal))} records")
        _when_records(journal, kill_worker_at, proc, kill_worker, left)
    if kill_driver_at is not None:
        def kill_driver() -> None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the embedded Ray it started, as when its node dies
            run.notes.append(f"SIGKILLed the driver after {len(_records(journal))} records")
        _when_records(journal, kill_driver_at, proc, kill_driver, left)
    done = _finish(proc, left)
    if kill_driver_at is not None:
        before = len(_records(journal))
        if done.rc == 0:
            run.notes.append("the driver finished before it could be killed")
        else:
            time.sleep(2)
            lingering = _session_pids(proc.pid, "ray")
            if lingering:
                run.notes.append(f"{len(lingering)} Ray processes outlived the killed driver")
            proc = _launch(setup.tune_argv(out), env, log)
            done = _finish(proc, setup.deadline - time.monotonic())
            run.notes.append(f"resumed over {before} journal records")
    run.rc, run.wall_s = done.rc, done.ended_at - started
    _summary(run, done.stdout)
    return run, out


def _measured(records: list[dict]) -> set[str]:
    """The candidates measured, by content (journal keys also hash the fault plan, which differs per run)."""
    return {json.dumps(r["candidate"], sort_keys=True) for r in records if r["kind"] == "measure"}


def _check(run: Run, out: Path, reference: dict[str, bytes], reference_candidates: set[str]) -> None:
    run.files_identical = bool(reference) and _config_files(out) == reference
    records = _records(out / ".moe-tune-journal.jsonl")
    keys = [r["key"] for r in records]
    run.journal_ok = len(keys) == len(set(keys)) and reference_candidates <= _measured(records)
    failures = {(f["config"], f["M"]) for d in run.summary.get("devices", []) for f in d.get("failures", [])}
    run.named = all((f["config"], f["M"]) in failures for f in run.injected)


def _pick_victims(records: list[dict], count: int, label) -> list[tuple[str, int]]:
    """The slowest ok screens the clean run never promoted to a full timing: (config label, M),
    spread over the batch sizes. Failing them cannot change what is chosen."""
    screens: dict[int, list[tuple[float, str]]] = {}
    promoted = {(label(r["candidate"]["config"]), r["candidate"]["M"]) for r in records
                if r.get("kind") == "measure" and r["candidate"]["level"] == "full"}
    for r in records:
        c = r.get("candidate", {})
        if r.get("kind") == "measure" and r["status"] == "ok" and c.get("level") == "screen" \
                and (label(c["config"]), c["M"]) not in promoted:
            screens.setdefault(c["M"], []).append((r["latency_us"], label(c["config"])))
    ranked = {M: sorted(v, reverse=True) for M, v in screens.items()}
    picked: list[tuple[str, int]] = []
    while len(picked) < count and any(ranked.values()):
        for M in sorted(ranked):
            if ranked[M] and len(picked) < count:
                picked.append((ranked[M].pop(0)[1], M))
    return picked


def _label(config: dict) -> str:
    return (f"M{config['BLOCK_SIZE_M']}_N{config['BLOCK_SIZE_N']}_K{config['BLOCK_SIZE_K']}"
            f"_G{config['GROUP_SIZE_M']}_w{config['num_warps']}_s{config['num_stages']}")


def faults_mode(setup: Setup) -> list[Run]:
    runs: list[Run] = []
    cold, cold_out = _tune(setup, "clean-cold", [])
    runs.append(cold)
    if cold.rc != 0:
        cold.notes.append("the clean run failed: nothing to compare against")
        return runs
    reference = _config_files(cold_out)
    records = _records(cold_out / ".moe-tune-journal.jsonl")
    measured = [r for r in records if r["kind"] == "measure"]
    reference_candidates = _measured(records)
    cold.files_identical, cold.journal_ok, cold.named = True, len(records) == len({r["key"] for r in records}), True
    screens = sum(1 for r in measured if r["candidate"]["level"] == "screen")
    n_raise = max(1, round(RAISE_FRACTION * screens))
    victims = _pick_victims(records, n_raise + 2, _label)
    if len(victims) < n_raise + 2:
        cold.notes.append(f"only {len(victims)} losing candidates to inject faults into")
        return runs
    raise_faults = [{"config": c, "M": M, "action": "raise"} for c, M in victims[:n_raise]]
    poison = [{"config": victims[n_raise][0], "M": victims[n_raise][1], "action": "poison"}]
    hang = [{"config": victims[n_raise + 1][0], "M": victims[n_raise + 1][1], "action": "hang"}]
    kill_at = max(3, len(measured) // 3)
    plans = [("clean", [], {}), ("raise", raise_faults, {}), ("poison", poison, {}), ("hang", hang, {}),
             ("worker-kill", [], {"kill_worker_at": kill_at}), ("driver-kill", [], {"kill_driver_at": kill_at}),
             ("combined", raise_faults + poison + hang, {"kill_worker_at": kill_at // 2,
                                                         "kill_driver_at": (2 * len(measured)) // 3})]
    for name, faults, kills in plans:
        if setup.only and name not in setup.only:
            continue
        if time.monotonic() + 1.2 * cold.wall_s > setup.deadline:
            runs.append(Run(name, notes=["not run: --total-s would be exceeded"]))
            continue
        _log(f"== {name}")
        run, out = _tune(setup, name, faults, **kills)
        _check(run, out, reference, reference_candidates)
        runs.append(run)
    return runs


STARTUP_PROBE = r"""
import json, sys, time
t0 = time.monotonic(); out = {}
import torch
out["import_torch_s"] = time.monotonic() - t0
t = time.monotonic(); gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
if gpus:
    torch.zeros(1, device="cuda")
out["cuda_init_s"] = time.monotonic() - t
t = time.monotonic(); import ray
out["import_ray_s"] = time.monotonic() - t
kwargs = {"num_cpus": 4, "num_gpus": 2} if not gpus else {}
if sys.argv[1] == "no-prestart":
    kwargs["_system_config"] = {"prestart_worker_first_driver": False}
t = time.monotonic(); ray.init(include_dashboard=False, logging_level=40, **kwargs)
out["ray_init_s"] = time.monotonic() - t

class Probe:
    def ready(self):
        import torch
        if torch.cuda.is_available():
            torch.zeros(1, device="cuda")
        return True

t = time.monotonic()
actors = [ray.remote(Probe).options(num_gpus=1).remote() for _ in range(min(2, gpus) if gpus else 2)]
actors.append(ray.remote(Probe).options(num_cpus=0).remote())
ray.get([a.ready.remote() for a in actors], timeout=60)
out["actors_ready_s"] = time.monotonic() - t
t = time.monotonic(); ray.shutdown()
out["ray_shutdown_s"] = time.monotonic() - t
print(json.dumps({k: round(v, 3) for k, v in out.items()}))
"""


def startup_probe(setup: Setup) -> dict:
    """Where the fixed start-up and shutdown time goes on this host (see the module docstring)."""
    probes = {}
    for variant in ("default", "no-prestart"):
        try:
            done = subprocess.run([sys.executable, "-c", STARTUP_PROBE, variant], capture_output=True, text=True,
                                  timeout=max(1.0, min(90.0, setup.deadline - time.monotonic())), cwd=REPO)
            probes[variant] = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                               else {"error": done.stderr.strip().splitlines()[-1:]})
        except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as exc:
            probes[variant] = {"error": type(exc).__name__}
        _log(f"start-up probe ({variant}): {probes[variant]}")
    return probes


def _scaling_run(setup: Setup, workers: int, cache: Path, name: str) -> Run:
    os.environ["TRITON_CACHE_DIR"] = str(cache)
    out = setup.work / name
    shutil.rmtree(out, ignore_errors=True)  # a fresh journal: everything is measured again
    argv = [sys.executable, "-m", "tuner.cli", "tune", *setup.model_args, "--batch-sizes", setup.batch_sizes,
            "--workers", str(workers), "--out", str(out), "--json"]
    if setup.interpret:
        argv += ["--interpret", "--search-space", str(setup.space)]
    _log(f"== {name}")
    env = {k: v for k, v in os.environ.items() if k != "MOE_TUNE_FAULTS"}
    started = time.monotonic()
    done = _finish(_launch(argv, env, setup.out / f"{name}.log"), setup.deadline - started)
    run = Run(name, rc=done.rc, wall_s=done.ended_at - started)
    _summary(run, done.stdout)
    if run.summary and done.printed_at is not None:
        run.fixed = {"pre_timeline_s": round(done.printed_at - started - run.summary["wall_s"], 2),
                     "tail_s": round(done.ended_at - done.printed_at, 2)}
    return run


def scaling_mode(setup: Setup, gpus: int) -> list[Run]:
    counts = sorted({1, min(2, gpus)})
    caches = {workers: setup.work / f"triton-cache-{workers}" for workers in counts}
    for cache in caches.values():
        shutil.rmtree(cache, ignore_errors=True)
    runs = [_scaling_run(setup, workers, caches[workers], f"scaling-{workers}gpu") for workers in counts]
    for workers, cold in zip(counts, list(runs)):
        left = setup.deadline - time.monotonic()
        if cold.rc != 0 or left < 1.2 * cold.wall_s:
            _log(f"== warm-{workers}gpu skipped ({left:.0f}s left)")
            continue
        runs.append(_scaling_run(setup, workers, caches[workers], f"warm-{workers}gpu"))
    return runs


def _span(span: dict | None) -> str:
    return f"{span['start_s']:.1f}-{span['end_s']:.1f}" if span else "-"


def _scaling_table(runs: list[Run]) -> str:
    phases = ("ray_start", "worker_start", "compile_ahead", "screening", "full_timing", "retiming")
    head = (f"{'run':<15} {'exit':>4} {'wall s':>7} {'pre s':>5} {'tail s':>6} {'1st meas':>8} "
            + " ".join(f"{p:>13}" for p in phases) + "  compile-ahead (jobs, speculative used/jobs, taken compiling)")
    lines = [head]
    for r in runs:
        t = r.summary.get("timeline") or {}
        spans = " ".join(f"{_span(t.get(p)):>13}" for p in phases)
        c = ((r.summary.get("devices") or [{}])[0]).get("compile_ahead") or {}
        spec = c.get("speculative") or {}
        first = t.get("first_measurement_s")
        lines.append(f"{r.name:<15} {r.rc if r.rc is not None else '-':>4} {r.wall_s:7.1f} "
                     f"{r.fixed.get('pre_timeline_s', '-'):>5} {r.fixed.get('tail_s', '-'):>6} "
                     f"{first if first is not None else '-':>8} {spans}  "
                     + (f"{c.get('jobs')}, {spec.get('used')}/{spec.get('jobs')}, {c.get('taken_uncompiled')}"
                        if c else "-") + ("  " + "; ".join(r.notes) if r.notes else ""))
    return "\n".join(lines)


def _environment() -> dict:
    import torch
    import triton

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"torch": torch.__version__, "triton": triton.__version__, "gpus": gpus,
            "device": torch.cuda.get_device_name(0) if gpus else "cpu (Triton interpreter)"}


def _table(runs: list[Run], clean_s: float | None) -> str:
    lines = [f"{'run':<12} {'exit':>4} {'wall s':>7} {'cost s':>7} {'1st meas s':>10} {'files=':>6} {'journal':>7} "
             f"{'named':>5}  notes"]
    for r in runs:
        cost = f"{r.wall_s - clean_s:+.1f}" if clean_s is not None and r.rc is not None else "-"
        first = r.summary.get("timeline", {}).get("first_measurement_s")

        def yn(v):
            return "-" if v is None else ("yes" if v else "NO")

        lines.append(f"{r.name:<12} {r.rc if r.rc is not None else '-':>4} {r.wall_s:7.1f} {cost:>7} "
                     f"{first if first is not None else '-':>10} {yn(r.files_identical):>6} {yn(r.journal_ok):>7} "
                     f"{yn(r.named):>5}  {'; '.join(r.notes)}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true", help="CPU dry run: tiny model, Triton interpreter")
    parser.add_argument("--scaling", action="store_true", help="the 18-batch 1-GPU vs 2-GPU tune instead of faults")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/moe-fault-out")))
    parser.add_argument("--total-s", type=float, default=330.0,
                        help="start no run that would end after this long (default 330)")
    parser.add_argument("--runs", default="", metavar="NAME,...",
                        help="only these fault runs (clean-cold always runs first); default: all")
    args = parser.parse_args()
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out.parent / f"{args.out.name}-work"  # beside --out, so two runs on one host never share it
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    env = _environment()
    gpus = 2 if args.interpret else env["gpus"]
    if gpus < 1:
        print("no CUDA GPU visible; pass --interpret for the CPU dry run", file=sys.stderr)
        return 2
    space = work / "space.yaml"
    if args.interpret:
        space = REPO / "tests/fixtures/tune-space.yaml"
        model = ["--model", str(REPO / "tests/fixtures/tiny-moe.json")]
        batch_sizes, timeout_s = "1,4", 20
    else:
        space.write_text(FAULT_SPACE)
        model = ["--model", "mixtral-8x7b", "--tp", "2", "--dtype", "bf16"]
        batch_sizes, timeout_s = ("1,64,1024" if not args.scaling else ALL_18), 20
    os.environ.setdefault("TRITON_CACHE_DIR", str(work / "triton-cache"))
    setup = Setup(model, batch_sizes, space, gpus, timeout_s, args.interpret, args.out, work,
                  started + args.total_s, {name for name in args.runs.split(",") if name})
    probe = startup_probe(setup) if args.scaling else None
    runs = scaling_mode(setup, gpus) if args.scaling else faults_mode(setup)
    report = {"environment": env, "mode": "scaling" if args.scaling else "faults", "workers": gpus,
              "batch_sizes": batch_sizes, "kernel": "builtin (moe-tune's fused_moe_kernel)",
              "runs": [{"name": r.name, "exit": r.rc, "wall_s": round(r.wall_s, 2), "notes": r.notes,
                        "files_identical": r.files_identical, "journal_ok": r.journal_ok,
                        "bad_configs_named": r.named, "injected": r.injected,
                        "timeline": r.summary.get("timeline"), "failed": r.summary.get("failed"),
                        "summary_wall_s": r.summary.get("wall_s"), "fixed": r.fixed,
                        "compile_ahead": (r.summary.get("devices") or [{}])[0].get("compile_ahead"),
                        "kernel_env": (r.summary.get("devices") or [{}])[0].get("env")} for r in runs]}
    if args.scaling:
        report["startup_probe"] = probe
        by_name = {r.name: r for r in runs}
        for label, prefix in (("speedup", "scaling"), ("speedup_warm", "warm")):
            one, two = by_name.get(f"{prefix}-1gpu"), by_name.get(f"{prefix}-2gpu")
            if one and two and one.rc == 0 and two.rc == 0:
                report[label] = round(one.wall_s / two.wall_s, 3)
    (args.out / ("scaling.json" if args.scaling else "fault_injection.json")).write_text(json.dumps(report, indent=2))
    clean = next((r.wall_s for r in runs if r.name == "clean" and r.rc == 0), None)
    print(f"{env['device']} x{gpus} · torch {env['torch']} · triton {env['triton']} · kernel builtin"
          f" · batch sizes {batch_sizes}")
    print(_scaling_table(runs) if args.scaling else _table(runs, clean))
    for label, what in (("speedup", "cold cache"), ("speedup_warm", "warm cache")):
        if label in report:
            print(f"speed-up 2 GPUs vs 1 ({what}): {report[label]:.2f}x")
    if probe:
        print("start-up probe (s): " + "; ".join(f"{variant}: " + ", ".join(f"{k} {v}" for k, v in values.items())
                                                 for variant, values in probe.items()))
    bad = [r for r in runs if r.rc not in (0, None) or False in (r.files_identical, r.journal_ok, r.named)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
