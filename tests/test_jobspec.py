"""Job specs: valid and invalid files, their expansion into tune runs, the manifests' embedded
specs, and one ``moe-tune job run`` end to end on the CPU (tune, then a failing gate)."""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tune_helpers import moe_tune_process
from tuner.cli import main
from tuner.commands.job import _dtypes_by_model, _shapes
from tuner.jobspec import (Gate, JobSpec, Layout, Output, gate_checks, load_job_spec, reference_markdown,
                           routing_folder, tune_runs)
from tuner.models import derive_shape, load_model
from tuner.spaces import load_space
from tuner.writers import write_vllm
from workers.default_config import default_config
from workers.faults import FaultPlan
from workers.records import Candidate, Config, DType

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
MODEL = str(FIXTURES / "job-tiny-moe.json")
SPACE = str(FIXTURES / "job-space.yaml")
STAND_INS = Path(__file__).parent / "stand_in_servers"


def _write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _minimal(**overrides) -> dict:
    return {"models": [MODEL], "dtypes": ["bf16"], **overrides}


def test_fixture_validates_with_paths_from_its_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    folder = tmp_path / "specs"
    folder.mkdir()
    for name in ("job-tiny.yaml", "job-tiny-moe.json", "tune-space.yaml"):
        shutil.copy(FIXTURES / name, folder / name)
    monkeypatch.chdir(tmp_path)  # not the spec's folder: relative paths must not resolve here
    code = main(["job", "validate", str(folder / "job-tiny.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and f"job-tiny.yaml: gate.reference: {folder / 'accepted'}: not a folder" in err, err
    (folder / "accepted").mkdir(parents=True)
    code = main(["job", "validate", "specs/job-tiny.yaml"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"valid: 2 tune run(s), 4 shape(s); gate vs {folder / 'accepted'} at 0.5" in out
    spec = load_job_spec(Path("specs/job-tiny.yaml"))
    assert spec.models == [str(folder / "job-tiny-moe.json")] and spec.output.dir == folder / "out" / "nightly"
    assert spec.journal == folder / "out" / "journal.jsonl"


def test_validate_makes_the_checks_run_makes(tmp_path: Path, capsys) -> None:
    """Everything ``job run`` would refuse before starting, ``job validate`` refuses too."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for data, message in [
        (_minimal(output={"dir": str(a_file / "out")}),
         f"job.yaml: output.dir: {a_file / 'out'}: {a_file} is a file, not a folder"),
        (_minimal(journal=str(a_file / "j.jsonl")), f"job.yaml: journal: {a_file / 'j.jsonl'}: {a_file} is a file"),
        (_minimal(baseline=[str(tmp_path), "no-such-folder"]), f"job.yaml: baseline.1: {tmp_path / 'no-such-folder'}"),
        (_minimal(routing=["uniform", "file:missing-ids.pt"]), "job.yaml: routing.1: routing file "),
        (_minimal(search_space="missing.yaml"), "job.yaml: search_space: search space "),
        (_minimal(output={"dir": str(tmp_path / "o")}, gate={"reference": "absent"}),
         f"job.yaml: gate.reference: {tmp_path / 'absent'}: not a folder"),
    ]:
        for action in ("validate", "run"):
            code = main(["job", action, str(_write(tmp_path, data))])
            err = capsys.readouterr().err
            assert code == 2 and message in err and err.count("\n") == 1, (action, data, err)
    assert not list(tmp_path.rglob("*.json*"))  # nothing tuned, nothing written


def test_a_tune_runs_refusal_names_the_key_of_the_option_it_is_about(tmp_path: Path, capsys) -> None:
    """``tune.validate`` raises OptionErrors carrying the option they are about (whatever their
    line says), and the job names that option's spec key, with the index of the list entry at fault."""
    from tuner.commands import tune
    from tuner.errors import OptionError
    from tuner.options import TuneOptions

    empty, bad = tmp_path / "empty", tmp_path / "bad"
    empty.mkdir(), bad.mkdir()
    (bad / "E=4,N=64,device_name=NVIDIA_H200.json").write_text("{")
    for data, message in [
        (_minimal(baseline=[str(tmp_path)], layouts=[{"tp": 1}]), f"job.yaml: baseline.0: {tmp_path}: no MoE config"),
        (_minimal(baseline=[str(empty), str(bad)]), f"job.yaml: baseline.0: {empty}: no MoE config"),
        (_minimal(baseline=[str(bad)]), f"job.yaml: baseline.0: {bad / 'E=4,N=64,device_name=NVIDIA_H200.json'}: "
                                        "cannot read config file"),
        (_minimal(kernel="sglang"), "job.yaml: kernel: --kernel sglang: cannot import SGLang's fused-MoE code"),
    ]:
        code = main(["job", "validate", str(_write(tmp_path, data))])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (data, err)

    for options, option in [(dict(search_space="missing.yaml"), "search_space"), (dict(block_shape=(128, 128)), "block_shape"),
                            (dict(baseline=[empty]), "baseline"), (dict(out=str(bad / "E=4,N=64,device_name=NVIDIA_H200.json")), "out")]:
        with pytest.raises(OptionError) as refused:
            tune.validate(TuneOptions(model=[MODEL], batch_sizes=[1], interpret=True, **options), probe=False)
        assert refused.value.option == option, (options, str(refused.value))


def test_dtypes_default_to_each_models_own(tmp_path: Path, capsys) -> None:
    spec = JobSpec.model_validate({"models": [MODEL, "deepseek-v3"], "layouts": [{"tp": 8}]})
    runs = tune_runs(spec)
    assert all(run.options.dtype is None for run in runs)
    path = _write(tmp_path, {"models": ["deepseek-v3", "mixtral-8x7b"], "layouts": [{"tp": 8}],
                             "output": {"dir": str(tmp_path / "o")}, "gate": {"reference": str(tmp_path)}})
    assert main(["job", "validate", str(path)]) == 0, capsys.readouterr().err
    assert "2 shape(s)" in capsys.readouterr().out
    spec = load_job_spec(path)
    checks = gate_checks(spec, _dtypes_by_model(_shapes(spec)))
    assert [(c.model, c.dtype) for c in checks] == [("deepseek-v3", DType.FP8_W8A8), ("mixtral-8x7b", DType.BF16)]


def test_every_key_is_documented_in_one_generated_place(capsys) -> None:
    assert main(["job", "keys"]) == 0
    printed = capsys.readouterr().out
    assert printed == reference_markdown() == (ROOT / "docs" / "job-spec.md").read_text()

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            yield prefix + name
            for sub in (Layout, Output, Gate):
                if sub.__name__ in str(field.annotation):
                    yield from keys(sub, f"{prefix}{name}{'[]' if sub is Layout else ''}.")

    for key in keys(JobSpec):
        assert re.search(rf"^\| `{re.escape(key)}` \| [^|]+ \| [^|]+ \| [^|]+ \|$", printed, re.MULTILINE), key
    assert "`interpret`" in printed


def test_spec_expands_into_tune_invocations_tune_accepts(rng: random.Random) -> None:
    layouts = rng.sample([{"tp": 1}, {"tp": 2}, {"tp": 2, "ep": 2}, {"tp": 4, "ep": 2}], rng.randint(1, 3))
    routings = rng.sample(["uniform", "zipf:1.2", "zipf:0.5"], rng.randint(1, 2))
    dtypes = rng.sample(["bf16", "fp8_w8a8", "mxfp4"], 2)
    spec = JobSpec.model_validate(_minimal(dtypes=dtypes, layouts=layouts, routing=routings, batch_sizes=[8, 2, 8],
                                           output={"dir": "o", "format": "sglang"}, workers=3,
                                           budget_minutes=7.5, baseline=["shipped", "accepted"],
                                           gate={"reference": "ref"}))
    runs = tune_runs(spec)
    assert [(r.layout.tp, r.layout.ep, r.routing) for r in runs] == \
        [(layout.get("tp"), layout.get("ep", 1), r) for layout in layouts for r in routings]
    for run in runs:
        args = run.options
        assert (args.model, args.dtype, args.tp, args.ep, args.routing) == \
            ([MODEL], dtypes, run.layout.tp, run.layout.ep, run.routing)
        out = Path("o") if len(routings) == 1 else Path("o") / routing_folder(run.routing)
        assert (args.batch_sizes, args.out, args.format, args.workers) == ([2, 8], str(out), "sglang", 3)
        assert run.out == out
        assert args.budget_minutes == 7.5 and [str(p) for p in args.baseline] == ["shipped", "accepted"]
    assert len({run.out for run in runs}) == len(routings)  # one folder per routing, shared by the layouts
    checks = gate_checks(spec, {MODEL: [DType(d) for d in dtypes]})
    assert len(checks) == len(layouts) * len(routings) * len(dtypes)
    assert all(check.fresh == next(r.out for r in runs if r.routing == check.routing) for check in checks)


def test_routing_folders_are_safe_names_equal_only_for_equal_routings() -> None:
    names = {spec: routing_folder(spec) for spec in ("uniform", "zipf:1.2", "zipf:1.20", "zipf:0.5", "zipf:0",
                                                     "file:a/ids.pt", "file:b/ids.pt", "file:ids.npy")}
    assert names["uniform"] == "routing=uniform" and names["zipf:1.2"] == "routing=zipf-1.2"
    assert names["zipf:1.2"] == names["zipf:1.20"]
    assert len(set(names.values())) == len(names) - 1
    assert all(re.fullmatch(r"routing=[A-Za-z0-9._+-]+", n) for n in names.values())
    assert names["file:a/ids.pt"].startswith("routing=file-ids-")
    with pytest.raises(ValueError):
        routing_folder("zipf:-1")
    several = JobSpec.model_validate(_minimal(routing=["uniform", "zipf:1.2"], layouts=[{"tp": 1}, {"tp": 2}],
                                              output={"dir": "o"}, gate={"reference": "ref"}))
    outs = [Path("o/routing=uniform"), Path("o/routing=zipf-1.2")] * 2
    assert [run.out for run in tune_runs(several)] == outs
    assert [run.options.out for run in tune_runs(several)] == [str(out) for out in outs]
    assert [check.fresh for check in gate_checks(several, {MODEL: [DType.BF16]})] == outs
    one = JobSpec.model_validate(_minimal(routing=["zipf:1.2"], output={"dir": "o"}))
    assert [run.out for run in tune_runs(one)] == [Path("o")]


@pytest.mark.parametrize("data,message", [
    ("models: [a\n", "not valid YAML (line 2)"),
    ("- bf16\n", "a job spec is a YAML mapping"),
    (_minimal(bogus=1), "bogus: Extra inputs are not permitted"),
    (_minimal(dtypes=["fp9"]), "dtypes.0: Input should be"),
    (_minimal(models=[]), "models: List should have at least 1 item"),
    (_minimal(layouts=[{"tp": 2, "ep": 3}]), "layouts.0.ep: ep=3 must divide tp=2"),
    (_minimal(batch_sizes=[0]), "batch_sizes.0: Input should be greater than 0"),
    (_minimal(gate={"reference": "r", "fail_if_slower": 1.5}), "gate.fail_if_slower: Input should be less than"),
    (_minimal(gate={"fail_if_slower": 0.9}), "gate.reference: Field required"),
    (_minimal(output={"format": "tensorrt"}), "output.format: Input should be 'vllm', 'sglang' or 'both'"),
    (_minimal(models=[MODEL, "no-such-model"]), "job.yaml: models.1: no-such-model: not a config.json"),
    (_minimal(layouts=[{"tp": 1}, {"tp": 3}]), "job.yaml: layouts.1: job-tiny-moe: intermediate size 64 does not "
                                               "split over tp/ep=3 (tp: 3, ep: 1)"),
    (_minimal(layouts=[{"tp": 8, "ep": 8}]), "job.yaml: layouts.0: job-tiny-moe: 4 experts do not split over ep=8"),
    (_minimal(dtypes=["bf16", "fp8_w8a8"], block_shape=[48, 64]), "job.yaml: block_shape: job-tiny-moe: N=64 per GPU "
                                                                   "is not a multiple of block shape [48,64]"),
    (_minimal(dtypes=["fp8_w8a8"], block_shape=[8, 8]), "job.yaml: block_shape: expected [block_n, block_k], two "
                                                        "multiples of 16 (e.g. 128,128), got [8, 8]"),
    (_minimal(block_shape=[128, 128]), "job.yaml: block_shape: applies to fp8_w8a8 only: add fp8_w8a8 to the dtypes"),
    (_minimal(dtypes=["bf16", "int4_w4a16"], models=[str(FIXTURES / "mixtral-8x7b.json")], layouts=[{"tp": 128}]),
     "job.yaml: dtypes.1: mixtral-8x7b: int4_w4a16 needs K and N per GPU multiples of its group size 128"),
    ("models: [x]\nlayouts: [{tp: 1, tp: 2}]\n",
     "job.yaml: not valid YAML (line 2): key 'tp' given twice"),
    (_minimal(routing=["zipf:1.2", "uniform", "zipf:1.20"]),
     "job.yaml: routing.2: 'zipf:1.2' and 'zipf:1.20' are the same routing"),
    (_minimal(routing=["zipf:x"]), "job.yaml: routing.0: "),
    (_minimal(layouts=[{"tp": 1}, {"tp": 2, "ep": 2}, {"tp": 1, "ep": 1}]),
     "job.yaml: layouts.2: repeats layouts.0 (tp=1): each layout is one tune run"),
    (_minimal(interpret=True, batch_sizes=[128]), "job.yaml: batch_sizes: interpret: true takes batch sizes up to 64"),
    (_minimal(budget_minutes=0), "budget_minutes: Input should be greater than 0"),
    (_minimal(budget_minutes=float("inf")), "budget_minutes: Input should be a finite number"),
    (_minimal(connect_timeout=float("inf")), "connect_timeout: Input should be a finite number"),
    (_minimal(strategy="magic"), "strategy: unknown strategy 'magic'; expected one of exhaustive, fast"),
    (_minimal(dtypes=["mxfp4"]), "job.yaml: dtypes: nothing to tune: no server reads a fused-MoE config file"),
    (_minimal(kernel="triton_kernels"), "kernel: triton_kernels: triton_kernels' matmul_ogs takes no "
                                        "fused-MoE config"),
    (_minimal(kernel="tensorrt"), "kernel: tensorrt: unknown kernel; expected one of auto, builtin"),
    (_minimal(server_version="vllm==0.1"), "job.yaml: server_version: vllm==0.1: which default rule vLLM 0.1 applies"),
])
def test_invalid_specs_exit_2_with_one_line(tmp_path: Path, data, message: str, capsys) -> None:
    for action in ("validate", "run"):
        code = main(["job", action, str(_write(tmp_path, data))])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.count("\n") == 1 and message in err, err


def test_the_gate_benches_on_the_kernel_each_run_tuned_on(tmp_path: Path, servers, capsys) -> None:
    """The job's ``kernel`` resolved per run as tune resolves it: the gate times the fresh files in
    the kernel that tuned them, at the shape of the server whose file it reads, with that kernel's
    default rule where a folder has no file."""
    from tuner.commands.job import validate

    reference = tmp_path / "accepted"
    reference.mkdir()

    def benches(output_format: str = "vllm", **keys):
        spec = JobSpec.model_validate(_minimal(output={"dir": str(tmp_path / "o"), "format": output_format},
                                               gate={"reference": str(reference)}, **keys))
        return [(b.kernel, b.rule, b.shape, b.check.dtype) for b in validate(spec)[2]]

    shape = {server: derive_shape(load_model(MODEL), dtype=DType.BF16, server=server) for server in ("vllm", "sglang")}
    servers("vllm_launcher", "sglang_topk_output")
    assert benches(server_version="vllm") == [("vllm", "vllm", shape["vllm"], DType.BF16)]
    assert benches("both", server_version="vllm") == [("vllm", "vllm", shape["vllm"], DType.BF16)]  # vLLM's file first
    assert benches("sglang") == [("sglang", "sglang", shape["sglang"], DType.BF16)]
    # SGLang fuses shared experts into E: its file, hence the gate's shape, differs from vLLM's
    shared = str(FIXTURES / "glm-4.5.json")
    fused = derive_shape(load_model(shared), dtype=DType.BF16, server="sglang")
    assert fused != derive_shape(load_model(shared), dtype=DType.BF16, server="vllm")
    assert benches("sglang", models=[shared], batch_sizes=[1]) == [("sglang", "sglang", fused, DType.BF16)]
    assert benches(kernel="builtin", server_version="vllm-pre-34846") == [
        ("builtin", "vllm-pre-34846", shape["vllm"], DType.BF16)]
    code = main(["job", "validate", str(_write(tmp_path, _minimal(gate={"reference": str(reference)})))])
    (line,) = capsys.readouterr().err.strip().splitlines()  # the stand-in's vLLM 0.0.0 has no known rule
    assert code == 2 and "job.yaml: server_version: vllm==0.0.0+stand-in-launcher: " in line, line
    servers()
    assert benches() == [("builtin", "vllm", shape["vllm"], DType.BF16)]


def test_missing_spec_file(tmp_path: Path, capsys) -> None:
    assert main(["job", "validate", str(tmp_path / "absent.yaml")]) == 2
    assert "cannot read job spec" in capsys.readouterr().err


@pytest.mark.parametrize("manifest", ["rayjob.yaml", "raycronjob-nightly.yaml"])
def test_kuberay_manifests_carry_a_valid_job_spec(manifest: str, tmp_path: Path, capsys) -> None:
    docs = list(yaml.safe_load_all((ROOT / "docker" / manifest).read_text()))
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(config_map["data"]["job.yaml"])
    # Validated as on the cluster, with the results volume under tmp_path; the entry point creates
    # the gate's reference folder before the job runs, so the test does too.
    local = tmp_path / "local.yaml"
    local.write_text(config_map["data"]["job.yaml"].replace("/results", str(tmp_path / "results")))
    reference = load_job_spec(local).gate
    if reference is not None:
        reference.reference.mkdir(parents=True)
    assert main(["job", "validate", str(local)]) == 0, capsys.readouterr().err

    ray_doc = next(d for d in docs if d["apiVersion"] == "ray.io/v1")
    job = ray_doc["spec"]["jobTemplate"] if ray_doc["kind"] == "RayCronJob" else ray_doc["spec"]
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == "job-spec")
    volume = next(v for v in head["volumes"] if v["name"] == "job-spec")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert f"moe-tune job run {mount['mountPath']}/job.yaml" in job["entrypoint"]
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={job['rayClusterSpec']['rayVersion']}" in dockerfile
    spec = load_job_spec(spec_path)
    results = next(m["mountPath"] for m in head["containers"][0]["volumeMounts"] if m["name"] == "results")
    assert str(spec.output.dir).startswith(results)
    if spec.gate:
        assert str(spec.gate.reference).startswith(results) and f"mkdir -p {spec.gate.reference}" in job["entrypoint"]


def test_job_run_tunes_then_fails_the_gate_on_a_regression(tmp_path: Path, monkeypatch, capsys) -> None:
    """Latencies are a fixed function of the candidate (the worker's test hook), so the test knows
    which config the tune picks and can put a faster one in the reference folder."""
    plan = tmp_path / "faults.json"
    plan.write_text(json.dumps({"deterministic_latency": True}))
    monkeypatch.setenv("MOE_TUNE_FAULTS", str(plan))
    latency = FaultPlan(deterministic_latency=True).latency_us
    shapes = {d: derive_shape(load_model(MODEL), dtype=d) for d in (DType.BF16, DType.FP8_W8A8)}
    space = load_space(SPACE).expand()
    pool = [Config(*v) for v in itertools.product([16, 32], [32, 64], [32, 64], [1, 8], [4], [2, 3])]

    def pick(dtype: DType, M: int, configs) -> Config:
        return min(configs, key=lambda c: latency(Candidate(shapes[dtype], M, c)))

    M = next(M for M in range(1, 9)
             if latency(Candidate(shapes[DType.BF16], M, pick(DType.BF16, M, pool)))
             < 0.99 * latency(Candidate(shapes[DType.BF16], M, pick(DType.BF16, M, space))))
    accepted = tmp_path / "accepted"
    write_vllm(accepted, shapes[DType.BF16], "cpu", {M: pick(DType.BF16, M, pool)}, "3.9.0")
    spec = _write(tmp_path, {
        "name": "nightly-test", "models": [MODEL], "dtypes": ["bf16", "fp8_w8a8"], "batch_sizes": [M],
        "search_space": SPACE, "interpret": True, "workers": 1,
        "output": {"dir": str(tmp_path / "nightly"), "format": "vllm"},
        "gate": {"reference": str(accepted), "fail_if_slower": 0.999, "rounds": 1}})

    from tuner import writers

    reads: list[Path] = []
    read_file = writers._read_config_file
    monkeypatch.setattr(writers, "_read_config_file", lambda path: reads.append(path) or read_file(path))
    code = main(["job", "run", str(spec)])
    captured = capsys.readouterr()
    assert code == 1
    assert [p for p in reads if p.parent == accepted] == [accepted / "E=4,N=64,device_name=cpu.json"]  # once, 2 checks
    written = sorted(p.name for p in (tmp_path / "nightly").glob("E=*.json"))
    assert written == ["E=4,N=64,device_name=cpu,dtype=fp8_w8a8.json", "E=4,N=64,device_name=cpu.json"]
    tables = re.findall(r"^gate .*? (bf16|fp8_w8a8) routing=uniform$", captured.out, re.MULTILINE)
    assert tables == ["bf16", "fp8_w8a8"]  # both shapes gated, on one worker
    fp8 = shapes[DType.FP8_W8A8]
    fp8_tuned = pick(DType.FP8_W8A8, M, space)
    fp8_ratio = latency(Candidate(fp8, M, default_config(fp8, M))) / latency(Candidate(fp8, M, fp8_tuned))
    failing = ["bf16"] + (["fp8_w8a8"] if fp8_ratio < 0.999 else [])
    assert f"gate failed at {len(failing)} point(s)" in captured.err.strip().splitlines()[-1]


@pytest.mark.timeout(900)
def test_job_run_gates_on_the_server_kernel_it_tuned_on(tmp_path: Path) -> None:
    """With vLLM (its launcher stand-in) importable in the job and its Ray workers, the job's
    default ``kernel: auto`` tunes on vLLM's kernel, and the gate times the fresh file in that
    same kernel, not moe-tune's."""
    accepted = tmp_path / "accepted"
    accepted.mkdir()  # empty: the gate compares with the server's default config
    spec = _write(tmp_path, {
        "name": "server-kernel", "models": [MODEL], "dtypes": ["bf16"], "batch_sizes": [1], "search_space": SPACE,
        "interpret": True, "workers": 1, "server_version": "vllm",
        "output": {"dir": str(tmp_path / "nightly"), "format": "vllm"},
        "gate": {"reference": str(accepted), "fail_if_slower": 0.01, "rounds": 1}})
    done = moe_tune_process(["job", "run", str(spec)], STAND_INS / "vllm_launcher", STAND_INS)
    assert done.returncode == 0, done.stderr[-3000:]
    tuned = json.loads((tmp_path / "nightly" / "E=4,N=64,device_name=cpu.json").read_text())
    assert "1" in tuned
    (table,) = done.stdout.split("\ngate ")[1:]
    (kernel,) = [line for line in table.splitlines() if line.startswith("kernel: ")]
    assert kernel.startswith("kernel: vllm (vllm.model_executor.layers.fused_moe.fused_moe.invoke_fused_moe_triton_kernel"
                             ", vllm 0.0.0+stand-in-launcher"), kernel
    assert kernel.endswith("default: the vllm rule"), kernel


def test_each_routing_writes_its_own_folder_and_is_gated_under_its_own_routing(tmp_path: Path, monkeypatch,
                                                                               capsys) -> None:
    """Latencies are a fixed function of the candidate, routing included (the worker's test hook),
    at a batch size where the two routings pick different configs: one shared folder would keep
    only the last routing's file, and a gate under the wrong routing would time other numbers."""
    plan = tmp_path / "faults.json"
    plan.write_text(json.dumps({"deterministic_latency": True}))
    monkeypatch.setenv("MOE_TUNE_FAULTS", str(plan))
    latency = FaultPlan(deterministic_latency=True).latency_us
    shape = derive_shape(load_model(MODEL), dtype=DType.BF16)
    space = load_space(SPACE).expand()
    routings = ["uniform", "zipf:1.2"]

    def pick(M: int, routing: str) -> Config:
        return min(space, key=lambda c: latency(Candidate(shape, M, c, routing=routing)))

    M = next(M for M in range(1, 9) if pick(M, routings[0]) != pick(M, routings[1]))
    accepted = tmp_path / "accepted"
    accepted.mkdir()  # empty: the gate compares with vLLM's default heuristic
    out = tmp_path / "nightly"
    spec = _write(tmp_path, {
        "name": "routings", "models": [MODEL], "dtypes": ["bf16"], "batch_sizes": [M], "routing": routings,
        "search_space": SPACE, "interpret": True, "workers": 1, "output": {"dir": str(out), "format": "vllm"},
        "gate": {"reference": str(accepted), "fail_if_slower": 0.01, "rounds": 1}})

    code = main(["job", "run", str(spec)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("E=*.json")) == \
        sorted(f"{routing_folder(r)}/E=4,N=64,device_name=cpu.json" for r in routings)
    tables = captured.out.split("\ngate ")[1:]
    assert [t.splitlines()[0] for t in tables] == [f"{MODEL} tp=1 bf16 routing={r}" for r in routings]
    for routing, table in zip(routings, tables):
        folder = out / routing_folder(routing)
        written = json.loads((folder / "E=4,N=64,device_name=cpu.json").read_text())
        assert Config.from_dict(written[str(M)]) == pick(M, routing)
        # gated on its own folder's file, timed under its own routing
        assert f"{folder.resolve().name}: {folder}/E=4,N=64,device_name=cpu.json" in table
        row = next(line for line in table.splitlines() if line.split()[:1] == [str(M)])
        assert f"{latency(Candidate(shape, M, pick(M, routing), routing=routing)):.1f}" in row
        assert f"{latency(Candidate(shape, M, default_config(shape, M), routing=routing)):.1f}" in row


def test_the_shipped_example_and_the_readme_spec_are_valid(capsys) -> None:
    """``tests/fixtures/job-tiny.yaml`` validates where it is (its gate reference ships with it),
    leaving nothing behind; README's minimal spec is a valid spec, dtypes as a comma string too."""
    ran_before = (FIXTURES / "out").exists()  # someone ran the example here
    assert main(["job", "validate", str(FIXTURES / "job-tiny.yaml")]) == 0, capsys.readouterr().err
    assert "valid: 2 tune run(s), 4 shape(s)" in capsys.readouterr().out
    assert (FIXTURES / "out").exists() == ran_before
    readme = (ROOT / "README.md").read_text()
    block = readme.split("A minimal nightly spec:\n\n```yaml\n", 1)[1].split("```", 1)[0]
    spec = JobSpec.model_validate(yaml.safe_load(block))
    assert spec.dtypes == [DType.BF16, DType.FP8_W8A8] and spec.gate.reference == Path("/results/accepted")
    data = yaml.safe_load(block)
    data["dtypes"] = "bf16, fp8_w8a8"
    assert JobSpec.model_validate(data).dtypes == spec.dtypes


def test_a_dtypes_string_reads_as_the_dtype_flag_reads_it(tmp_path: Path, capsys) -> None:
    """One reading of a comma-separated dtype list (``DType.parse_list``): the spec's ``dtypes``
    string and tune's ``--dtype`` take the same dtypes, each once, and refuse alike."""
    from tuner.commands.arguments import dtype_list

    for text in ("bf16,fp8_w8a8,bf16", " fp8_w8a8 , bf16,", "mxfp4"):
        assert JobSpec.model_validate(_minimal(dtypes=text)).dtypes == dtype_list(text) == DType.parse_list(text)
    for text in ("bf16,fp9", " , "):
        with pytest.raises(ValueError) as refused:
            DType.parse_list(text)
        code = main(["job", "validate", str(_write(tmp_path, _minimal(dtypes=text)))])
        err = capsys.readouterr().err
        assert code == 2 and "dtypes" in err and str(refused.value) in err and err.count("\n") == 1, err
        assert main(["plan", "--model", MODEL, "--dtype", text]) == 2
        assert str(refused.value) in capsys.readouterr().err


@pytest.mark.parametrize("output,reference", [("accepted", "accepted"), ("out", "out/routing=uniform"),
                                              ("out/../accepted", "accepted")])
def test_a_gate_against_the_folder_the_job_writes_is_refused(tmp_path: Path, output: str, reference: str,
                                                            capsys) -> None:
    """A gate whose reference is where the job writes its fresh configs would time them against
    themselves and always pass."""
    (tmp_path / reference).mkdir(parents=True)
    routing = ["uniform", "zipf:1.2"] if "routing=" in reference else ["uniform"]
    spec = _write(tmp_path, _minimal(output={"dir": output}, routing=routing, gate={"reference": reference}))
    assert main(["job", "validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "job.yaml: gate.reference: " in err and "against themselves" in err, err
