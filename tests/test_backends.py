"""Kernel backends (``workers.backends``) on CPU.

- The ``vllm``/``sglang`` contract against the stand-ins in tests/stand_in_servers, one per call
  form: the candidate config is forced through ``override_config`` for exactly the call (package
  entry) or handed to the server's per-GEMM launcher (launcher entry), weights, routing and scales
  reach the server in its layout, and the result is what the fp32 reference says.
- vLLM 0.33's own launcher and Triton kernel under the interpreter, when the extracted sources
  are present (``MOE_TUNE_VLLM_SOURCES``: a folder or vllm-py.zip; skipped otherwise, as in CI).
- ``--kernel auto`` resolution per format and for a missing server; the kernel named in the
  worker environment and the summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from workers.backends.base import BackendUnavailable, describe_label
from workers.problem import ERROR_BOUNDS, build_problem, rel_error
from workers.records import Config, DType, MoEShape

STAND_INS = Path(__file__).parent / "stand_in_servers"
CONFIG = Config(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=4, num_stages=3)
FORMS = {"vllm_quant_config": "vllm", "vllm_legacy": "vllm", "vllm_launcher": "vllm",
         "sglang_topk_output": "sglang", "sglang_legacy": "sglang"}


def _forget_servers() -> None:
    from workers import backends
    from workers.backends import server_code

    server_code._finder.versions.clear()

    for name in [n for n in sys.modules
                 if n.split(".")[0] in ("vllm", "sglang", "sgl_kernel", "stand_in_moe_math")]:
        del sys.modules[name]
    backends._loaded.clear()


@pytest.fixture
def stand_in(monkeypatch):
    """``stand_in(form)`` puts that stand-in server on sys.path and loads its backend."""
    from workers import backends

    def use(form: str):
        monkeypatch.syspath_prepend(str(STAND_INS))
        monkeypatch.syspath_prepend(str(STAND_INS / form))
        _forget_servers()
        return backends.load(FORMS[form])

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("MOE_TUNE_SERVER_CODE", raising=False)
    yield use
    _forget_servers()


def problem(dtype: DType, seed: int, block_shape=None, M: int = 5, E: int = 4):
    return build_problem(MoEShape(E=E, N=64, K=128, topk=2, dtype=dtype, block_shape=block_shape), M, seed=seed)


def server_calls(backend) -> list[dict]:
    return getattr(backend.module, "CALLS", None) or sys.modules[backend._fused_experts.__module__].CALLS


@pytest.mark.parametrize("form", ["vllm_quant_config", "vllm_legacy", "sglang_topk_output", "sglang_legacy"])
@pytest.mark.parametrize("dtype,block_shape", [(DType.BF16, None), (DType.INT8_W8A16, None), (DType.FP8_W8A8, None),
                                               (DType.FP8_W8A8, (64, 64))])
def test_package_entry_forces_the_config_and_matches_the_reference(form, dtype, block_shape, stand_in, seed):
    backend = stand_in(form)
    assert backend.entry == "fused_experts" and not backend.compiles_ahead
    p = problem(dtype, seed, block_shape)
    runner = backend.runner(p, CONFIG)
    runner.output.fill_(float("nan"))
    out = runner.run()
    call = server_calls(backend)[-1]
    assert call["config"] == CONFIG.to_dict()
    assert call["inplace"] is False, "an in-place call would overwrite the inputs between timed runs"
    assert sys.modules[backend._override.__module__].get_config() is None, "override must end with the call"
    assert rel_error(out, p.reference) <= ERROR_BOUNDS[dtype]
    env = backend.describe()
    assert env["kernel"] == FORMS[form] and env["kernel_version"].startswith(f"{FORMS[form]} 0.0.0+stand-in")
    assert env["kernel_entry"].endswith("fused_experts+override_config") and len(env["kernel_hash"]) == 16
    assert describe_label(env) == (f"{env['kernel']} ({env['kernel_entry']}, {env['kernel_version']}, "
                                   f"source {env['kernel_hash']})")  # every summary, table and report names it so


@pytest.mark.parametrize("block_shape", [None, (64, 64)])
def test_fp8_scales_and_block_shape_reach_each_call_form(block_shape, stand_in, seed):
    p = problem(DType.FP8_W8A8, seed, block_shape)
    expected_block = list(block_shape) if block_shape else None
    backend = stand_in("vllm_quant_config")
    backend.runner(p, CONFIG).run()
    quant = server_calls(backend)[-1]["quant_config"]
    assert quant.quant_dtype == torch.float8_e4m3fn
    assert quant.w1_scale is p.w13.scale and quant.w2_scale is p.w2.scale
    assert quant.a1_scale is None and quant.a2_scale is None, "activation scales are dynamic, as in the reference"
    assert quant.block_shape == expected_block
    for form in ("vllm_legacy", "sglang_topk_output", "sglang_legacy"):
        backend = stand_in(form)
        backend.runner(p, CONFIG).run()
        call = server_calls(backend)[-1]
        assert call["use_fp8_w8a8"] and not call["use_int8_w8a16"], form
        assert call["w1_scale"] is p.w13.scale and call["block_shape"] == expected_block, form


@pytest.mark.parametrize("dtype,block_shape", [(DType.BF16, None), (DType.FP8_W8A8, None), (DType.FP8_W8A8, (64, 64)),
                                               (DType.INT8_W8A16, None)])
def test_launcher_entry_runs_the_servers_launcher_around_our_sort(dtype, block_shape, stand_in, seed):
    backend = stand_in("vllm_launcher")  # its package __init__ cannot import: only the module file does
    assert backend.entry == "launcher" and backend.compiles_ahead
    env = backend.describe()
    assert env["kernel_entry"] == "vllm.model_executor.layers.fused_moe.fused_moe.invoke_fused_moe_triton_kernel"
    assert env["kernel_version"] == "vllm 0.0.0+stand-in-launcher"
    p = problem(dtype, seed, block_shape)
    runner = backend.runner(p, CONFIG)
    runner.output.fill_(float("nan"))
    out = runner.run()
    launches = backend.module.LAUNCHES[-2:]
    assert [l["top_k"] for l in launches] == [2, 1] and all(l["config"] == CONFIG.to_dict() for l in launches)
    assert not any(l["naive"] for l in launches)
    assert all(l["a_dtype"] == (torch.float8_e4m3fn if dtype is DType.FP8_W8A8 else p.x.dtype) for l in launches), \
        "vLLM's launcher takes fp8 activations quantized"
    assert rel_error(out, p.reference) <= ERROR_BOUNDS[dtype]


def test_launcher_entry_follows_the_servers_unsorted_small_batch_choice(stand_in, seed):
    backend = stand_in("vllm_launcher")
    p = problem(DType.BF16, seed, M=1, E=16)  # 1 token × top-2 × 4 <= 16 experts: vLLM skips the sort
    out = backend.runner(p, CONFIG).run()
    assert all(l["naive"] for l in backend.module.LAUNCHES[-2:])
    assert rel_error(out, p.reference) <= ERROR_BOUNDS[DType.BF16]


def test_unsupported_shapes_and_missing_servers(stand_in, seed, monkeypatch):
    from workers import backends

    backend = stand_in("vllm_quant_config")
    assert "mxfp4" in backend.check(MoEShape(4, 64, 128, 2, DType.MXFP4))
    assert "GPTQ" in backend.check(MoEShape(4, 64, 128, 2, DType.INT8_W8A16, (0, 128)))
    with pytest.raises(ValueError, match="mxfp4"):
        backend.runner(problem(DType.MXFP4, seed), CONFIG)
    _forget_servers()
    monkeypatch.setitem(sys.modules, "sglang", None)
    with pytest.raises(BackendUnavailable, match="--kernel sglang"):
        backends.load("sglang")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        backends.load("tensorrt")


@pytest.mark.parametrize("form", ["vllm_quant_config", "vllm_launcher", "sglang_topk_output"])
def test_server_backends_refuse_the_layouts_their_call_cannot_express(form, stand_in):
    """No expert map (EP), no activation choice (non-gated experts), no per-channel fp8 scales in the
    server call: refused in ``check`` (so ``auto`` falls back and a named kernel is a usage error);
    SGLang's fused shared experts and int4_w4a16 (the servers' GPTQ/AWQ kernel) likewise per shape."""
    backend = stand_in(form)
    for shape, field in ((MoEShape(8, 64, 128, 2, DType.BF16, ep=2), "ep"),
                         (MoEShape(8, 64, 128, 2, DType.BF16, gated=False), "gated"),
                         (MoEShape(8, 64, 128, 2, DType.FP8_W8A8, per_channel=True), "per_channel")):
        reason = backend.check(shape)
        assert reason and field in reason and f"--kernel {backend.name}" in reason and "builtin" in reason
    assert backend.check(MoEShape(9, 64, 128, 3, DType.BF16, fused_shared=1)) is None
    assert "int4_w4a16" in backend.check(MoEShape(8, 64, 128, 2, DType.INT4_W4A16, (0, 128)))


@contextlib.contextmanager
def extracted_vllm(root: Path, monkeypatch, fused_moe: str, package_init: str = "",
                   modules: dict[str, str] | None = None):
    """A vLLM 9.9 of extracted Python files under ``root`` (``MOE_TUNE_SERVER_CODE``): the fused-MoE
    module's source, its package ``__init__`` and further ``vllm/<name>.py`` modules; forgotten after."""
    module = root / "vllm" / "model_executor" / "layers" / "fused_moe"
    module.mkdir(parents=True)
    (root / "vllm" / "__init__.py").write_text('__version__ = "9.9"\n')
    for folder in (root / "vllm" / "model_executor", module.parent):
        (folder / "__init__.py").write_text("")
    (module / "__init__.py").write_text(package_init)
    (module / "fused_moe.py").write_text(fused_moe)
    for name, source in (modules or {}).items():
        (root / "vllm" / f"{name}.py").write_text(source)
    monkeypatch.setenv("MOE_TUNE_SERVER_CODE", str(root))
    _forget_servers()
    try:
        yield
    finally:
        if str(root) in sys.path:
            sys.path.remove(str(root))
        _forget_servers()


def test_missing_server_dependency_is_named(tmp_path, monkeypatch):
    """Extracted sources whose fused-MoE module imports a package this host lacks: the error names it."""
    from workers import backends

    with extracted_vllm(tmp_path, monkeypatch, "import cbor2_not_installed_here\n"):
        with pytest.raises(BackendUnavailable, match="cbor2_not_installed_here"):
            backends.load("vllm")


def test_failed_package_import_keeps_modules_it_loaded(tmp_path, monkeypatch):
    """The GPU host's case: the fused-MoE package ``__init__`` fails on a missing dependency after
    other server modules were imported (vLLM's register torch types, which fails on a second
    import). The retry with bare parents reuses those modules instead of importing them again."""
    import builtins

    from workers import backends

    registry = ("import builtins\n"
                "if getattr(builtins, '_moe_tune_test_registered', False):\n"
                "    raise RuntimeError('type already registered')\n"
                "builtins._moe_tune_test_registered = True\n")
    try:
        with extracted_vllm(tmp_path, monkeypatch,
                            "import vllm.registry\ndef invoke_fused_moe_triton_kernel(*args, **kwargs):\n    pass\n",
                            package_init="import vllm.registry\nimport harmony_not_installed_here\n",
                            modules={"registry": registry}):
            backend = backends.load("vllm")
            assert backend.entry == "launcher" and backend.describe()["kernel_version"] == "vllm 9.9"
    finally:
        builtins.__dict__.pop("_moe_tune_test_registered", None)


SGLANG_LAUNCHER_STAND_IN = """
from sglang.srt.layers.moe import MoeRunner  # names from a parent package: it must really be imported
from sglang.srt.server_args import get_global_server_args
from sgl_kernel import sgl_per_token_quant_fp8  # what SGLang's fp8_kernel imports on CUDA
LAUNCHES = []
def invoke_fused_moe_kernel(A, B, bias, C, A_scale, B_scale, B_zp, topk_weights, topk_ids, sorted_token_ids,
                            expert_ids, num_tokens_post_padded, mul_routed_weight, top_k, config, compute_type,
                            use_fp8_w8a8, use_int8_w8a8, use_int8_w8a16, use_int4_w4a16, per_channel_quant,
                            block_shape=None, no_combine=False, a_use_tma=False, b_use_tma=False, c_sorted=False,
                            filter_expert=True, fuse_sum_all_reduce=False, router_topk=1):
    get_global_server_args()  # raises outside a server unless moe-tune set SGLang's defaults
    LAUNCHES.append({"config": config, "filter_expert": filter_expert, "top_k": top_k})
    C.zero_()
"""

SGLANG_SERVER_ARGS_STAND_IN = """
from dataclasses import dataclass
_global = None
@dataclass
class ServerArgs:
    model_path: str
    def __post_init__(self):
        if self.model_path != "dummy":
            raise RuntimeError("No accelerator is available.")  # what a real model path asks for
def set_global_server_args_for_scheduler(args):
    global _global
    _global = args
def get_global_server_args():
    if _global is None:
        raise ValueError("Global server args is not set yet!")
    return _global
"""


def _sglang_launcher_tree(root: Path, compiled_ops: str | None = None) -> None:
    """SGLang's layout on the GPU host under ``root`` (see the test below); with ``compiled_ops``,
    ``root/sgl_kernel/__init__.py`` holds that text."""
    files = {"__init__.py": "import ipython_not_installed_here\n",
             "version.py": '__version__ = "7.7.post1"\n',
             "srt/__init__.py": "", "srt/layers/__init__.py": "",
             "srt/server_args.py": SGLANG_SERVER_ARGS_STAND_IN,
             "srt/layers/moe/__init__.py": "MoeRunner = object\n",
             "srt/layers/moe/fused_moe_triton/__init__.py": "import sgl_kernel_not_installed_here\n",
             "srt/layers/moe/fused_moe_triton/fused_moe_triton_kernels.py": SGLANG_LAUNCHER_STAND_IN}
    for name, text in files.items():
        path = root / "sglang" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if compiled_ops is not None:
        (root / "sgl_kernel").mkdir()
        (root / "sgl_kernel" / "__init__.py").write_text(compiled_ops)


def test_sglang_package_whose_init_fails_imports_its_launcher(tmp_path, monkeypatch):
    """SGLang's layout on the GPU host: the top-level ``__init__`` fails (it imports the frontend
    language: IPython), the version is in ``sglang/version.py``, a parent package ``__init__`` runs
    and is imported from, another fails. The launcher is imported with the failing packages bare, is
    called with ``filter_expert=False`` (all experts local, as SGLang's ``fused_experts`` passes
    without expert parallelism) and finds SGLang's default server arguments set. ``sgl_kernel``
    does not load here: its ops imported at module level are ones that raise when called."""
    from workers import backends

    _sglang_launcher_tree(tmp_path)
    monkeypatch.setenv("MOE_TUNE_SERVER_CODE", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _forget_servers()
    try:
        backend = backends.load("sglang")
        env = backend.describe()
        assert backend.entry == "launcher" and env["kernel_version"] == "sglang 7.7.post1"
        assert env["kernel_entry"].endswith("fused_moe_triton_kernels.invoke_fused_moe_kernel")
        assert sys.modules["sglang.srt.layers.moe"].MoeRunner is object  # its __init__ ran
        backend.runner(problem(DType.BF16, 1), CONFIG).run()
        launches = backend.module.LAUNCHES
        assert [(c["filter_expert"], c["top_k"], c["config"]) for c in launches] == [
            (False, 2, CONFIG.to_dict()), (False, 1, CONFIG.to_dict())]
        assert sys.modules["sglang.srt.server_args"].get_global_server_args().model_path == "dummy"
        assert "sgl_kernel" not in sys.modules
        with pytest.raises(RuntimeError, match="sgl_kernel.sgl_per_token_quant_fp8: SGLang's compiled ops"):
            backend.module.sgl_per_token_quant_fp8(None)
        assert "sgl_kernel" in backend.check(MoEShape(E=4, N=64, K=128, topk=2, dtype=DType.FP8_W8A8))
    finally:
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))
        _forget_servers()


BROKEN_COMPILED_OPS = """
with open(__file__ + ".tries", "a") as tries:
    tries.write("x")
raise OSError("common_ops.abi3.so: undefined symbol: _ZN3c10 (a wheel built for another torch)")
"""


def test_compiled_ops_that_fail_to_load_are_tried_once_per_server_code_location(tmp_path, monkeypatch, stand_in):
    """An ``sgl_kernel`` that is there but fails to load (its wheel built for another torch): a
    backend's start asks whether it loads several times (the backend, the launcher's import, the
    server arguments' import), and a second start asks again. It is imported once per location
    it is found at: not again in the same folder, again in another (the tests switch server
    trees), and a folder where it loads still gets the package entry."""
    from workers import backends

    trees = [tmp_path / "a", tmp_path / "b"]
    for tree in trees:
        _sglang_launcher_tree(tree, BROKEN_COMPILED_OPS)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tries = [tree / "sgl_kernel" / "__init__.py.tries" for tree in trees]
    try:
        for tree in trees:
            monkeypatch.setenv("MOE_TUNE_SERVER_CODE", str(tree))
            for _ in range(2):
                _forget_servers()
                backend = backends.load("sglang")
                assert backend.entry == "launcher"
                assert "sgl_kernel" in backend.check(MoEShape(E=4, N=64, K=128, topk=2, dtype=DType.FP8_W8A8))
            sys.path.remove(str(tree))
        assert [path.read_text() for path in tries] == ["x", "x"]
    finally:
        for tree in trees:
            if str(tree) in sys.path:
                sys.path.remove(str(tree))
    monkeypatch.delenv("MOE_TUNE_SERVER_CODE")
    assert stand_in("sglang_topk_output").entry == "fused_experts"


def test_a_vllm_that_disabled_triton_is_refused_by_name(tmp_path, monkeypatch):
    """vLLM hands out a placeholder ``triton.jit`` (a plain function) where it finds no single active
    Triton GPU driver: its kernel cannot be launched, so the backend is unavailable, not every candidate
    a crash."""
    from workers import backends

    placeholder = ("def fused_moe_kernel(*args, **kwargs):  # what vLLM's placeholder jit leaves\n    pass\n"
                   "def invoke_fused_moe_triton_kernel(*args, **kwargs):\n    fused_moe_kernel[(1,)](*args)\n")
    with extracted_vllm(tmp_path, monkeypatch, placeholder):
        with pytest.raises(BackendUnavailable, match="disabled Triton"):
            backends.load("vllm")


def test_sglang_launcher_kernel_and_default_rule_under_the_interpreter():
    """SGLang's own ``invoke_fused_moe_kernel`` and ``fused_moe_kernel`` (the extracted package:
    ``MOE_TUNE_SGLANG_SOURCES``, the folder holding ``sglang/``; skipped otherwise, as in CI) on tiny
    fp16 shapes (bf16 is computed wrongly by Triton's interpreter, see the vLLM test above), in a
    subprocess, and SGLang's own ``get_default_config`` behind the ``sglang`` default rule, equal
    to moe-tune's encoding of it. Needs SGLang's import-time dependencies
    (``benchmarks/server_kernel_bench.sh`` lists them)."""
    given = os.environ.get("MOE_TUNE_SGLANG_SOURCES")
    if not given:
        pytest.skip("MOE_TUNE_SGLANG_SOURCES (the folder holding SGLang's package) not set")
    script = (
        "import json\n"
        "from workers import backends\n"
        "from workers.default_config import default_config, server_default\n"
        "from workers.problem import build_problem, rel_error\n"
        "from workers.records import Config, DType, MoEShape\n"
        "b = backends.load('sglang')\n"
        "errors = []\n"
        "for M, E in ((5, 4), (1, 16)):\n"
        "    p = build_problem(MoEShape(E=E, N=64, K=128, topk=2, dtype=DType.FP16), M, seed=3)\n"
        "    errors.append(rel_error(b.runner(p, Config(16, 32, 64, 1, 4, 3)).run(), p.reference))\n"
        "rules = []\n"
        "for dtype, block in ((DType.BF16, None), (DType.FP8_W8A8, None), (DType.FP8_W8A8, (128, 128)),\n"
        "                     (DType.INT8_W8A16, None)):\n"
        "    for M in (1, 16, 64, 512, 4096):\n"
        "        s = MoEShape(E=64, N=1536, K=2048, topk=6, dtype=dtype, block_shape=block)\n"
        "        config, source = server_default(s, M, 'sglang')\n"
        "        rules.append([config == default_config(s, M, 'sglang'), source.implementation])\n"
        "print(json.dumps({'errors': errors, 'env': b.describe(), 'rules': rules}))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "MOE_TUNE_SERVER_CODE": given, "CUDA_VISIBLE_DEVICES": ""}
    report = _run_script(script, env, skip_unavailable=True)
    assert report["env"]["kernel_entry"].endswith("fused_moe_triton_kernels.invoke_fused_moe_kernel")
    assert report["env"]["kernel_version"].startswith("sglang 0.")
    assert all(error <= ERROR_BOUNDS[DType.FP16] for error in report["errors"]), report["errors"]
    assert all(same and implementation.startswith("sglang.srt.") for same, implementation in report["rules"]), \
        report["rules"]


def _run_script(script: str, env: dict[str, str], skip_unavailable: bool = False) -> dict:
    """Run ``script`` in a fresh interpreter (a server's code is imported once per process) and
    return the JSON object its last stdout line prints; with ``skip_unavailable`` a backend whose
    code does not load there skips the test."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    if skip_unavailable and done.returncode != 0 and "BackendUnavailable" in done.stderr:
        pytest.skip(done.stderr.strip().splitlines()[-1][:300])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_worker_measures_and_names_the_server_kernel():
    script = (
        "import json\n"
        "from workers.records import Candidate, Config, DType, MoEShape\n"
        "from workers.worker import BenchmarkWorker\n"
        "w = BenchmarkWorker(kernel='vllm', timeout_s=120)\n"
        "m = w.measure(Candidate(MoEShape(4, 64, 64, 2, DType.BF16), 3, Config(16, 32, 64, 1, 4, 3)))\n"
        "print(json.dumps({'env': w.describe(), 'status': m.status.value, 'latency': m.latency_us}))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(STAND_INS / "vllm_launcher"), str(STAND_INS),
                                          os.environ.get("PYTHONPATH", "")])}
    env.pop("MOE_TUNE_SERVER_CODE", None)
    report = _run_script(script, env)
    assert report["status"] == "ok" and report["latency"] > 0
    assert report["env"]["kernel"] == "vllm" and report["env"]["kernel_version"] == "vllm 0.0.0+stand-in-launcher"
    assert report["env"]["kernel_entry"].endswith("invoke_fused_moe_triton_kernel")


# -- vLLM's own code, when its extracted sources are here -------------------------------------------

def _vllm_sources(tmp_path_factory) -> Path:
    given = os.environ.get("MOE_TUNE_VLLM_SOURCES")
    if not given:
        pytest.skip("MOE_TUNE_VLLM_SOURCES (vLLM's extracted Python files) not set")
    path = Path(given)
    if path.is_file():
        folder = tmp_path_factory.mktemp("vllm-src")
        with zipfile.ZipFile(path) as archive:
            archive.extractall(folder)
        path = folder
    return path


@pytest.mark.parametrize("dtype,block_shape,M,E", [(DType.FP16, None, 5, 4), (DType.FP16, None, 1, 16)])
def test_vllm_launcher_and_kernel_under_the_interpreter(dtype, block_shape, M, E, tmp_path_factory):
    """vLLM's ``invoke_fused_moe_triton_kernel`` and ``fused_moe_kernel`` on a tiny shape, in a
    subprocess (vLLM's import is slow and global), sorted and unsorted (vLLM's small-batch path).
    fp16 only: Triton's interpreter computes bf16 wrongly (``workers.interpreter``) and vLLM's
    kernel has no fp32 detour for it, so bf16, int8_w8a16 and fp8_w8a8 (bf16 activations and
    output) land near or past their error bounds on CPU for reasons that are not the kernel's. Needs
    vLLM's import-time dependencies installed (``benchmarks/server_kernel_bench.sh`` lists them)."""
    sources = _vllm_sources(tmp_path_factory)
    script = (
        "import json\n"
        "from workers import backends\n"
        "from workers.problem import build_problem, rel_error\n"
        "from workers.records import Config, DType, MoEShape\n"
        f"shape = MoEShape(E={E}, N=64, K=128, topk=2, dtype=DType('{dtype.value}'), block_shape={block_shape!r})\n"
        f"p = build_problem(shape, {M}, seed=3)\n"
        "b = backends.load('vllm')\n"
        "r = b.runner(p, Config(16, 32, 64, 1, 4, 3))\n"
        "print(json.dumps({'err': rel_error(r.run(), p.reference), 'env': b.describe(), 'naive': r._fixed is not None}))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "MOE_TUNE_SERVER_CODE": str(sources), "CUDA_VISIBLE_DEVICES": ""}
    report = _run_script(script, env, skip_unavailable=True)
    assert report["env"]["kernel_entry"].endswith("fused_moe.invoke_fused_moe_triton_kernel")
    assert report["env"]["kernel_version"].startswith("vllm 0.")
    assert report["naive"] == (M * 2 * 4 <= E)
    assert report["err"] <= ERROR_BOUNDS[dtype]
