"""The config a server falls back to when no tuned file exists for a shape: the baseline every
tuned config is judged against (``moe-tune bench``, ``tune --baseline``).

Each server version has its own rule (``RULES``; each a ``Rule``: moe-tune's encoding and, where the
server has one, its own function, how to import it and how to call it):

- ``vllm`` — vLLM's batch-aware ``get_default_config`` (vLLM PR #34846, February 2026; the rule
  of vLLM 0.33). Without block quantization (bf16, fp16, fp8 per-tensor, int8 per-channel):
  BLOCK_SIZE_M 16 for M ≤ 32, 32 for M ≤ 96, 64 for M ≤ 512, else 128; BLOCK_SIZE_N 64 for
  M ≤ 64, else 128; BLOCK_SIZE_K 128 for fp8_w8a8 or M ≤ 64, else 64; GROUP_SIZE_M 16 when
  M // E (tokens per expert) > 128, else 1; 4 warps for M ≤ 128, else 8; 4 stages for M ≤ 32,
  else 3. Block fp8 ``[bn, bk]``: BLOCK_SIZE_M 16 for M ≤ 64, else 64; BLOCK_SIZE_N 64 when
  M ≤ 8 and bn is a multiple of 64, else bn; BLOCK_SIZE_K bk; GROUP_SIZE_M 1 for M ≤ 16, else
  32; 4 warps; 4 stages for M ≤ 4 (with the 64-wide N tile), else 3. (CUDA; vLLM uses 2 stages
  on ROCm.)
- ``vllm-pre-34846`` — the rule before that PR: block fp8 takes BLOCK_SIZE_M 64, N = bn,
  K = bk, GROUP_SIZE_M 32; otherwise M ≤ E takes 16/32/64 with GROUP_SIZE_M 1, larger M
  64/64/32 with GROUP_SIZE_M 8. No ``num_warps``/``num_stages`` (Triton's launch defaults: 4, 3).
- ``sglang`` — SGLang's ``get_default_config`` (0.5.x): fp8 per-tensor 128/256/128,
  GROUP_SIZE_M 32, 8 warps, 4 stages, or for M ≤ E 64/128/128, GROUP_SIZE_M 1, 4 warps,
  4 stages; block fp8 64/bn/bk, GROUP_SIZE_M 32, 4 warps, 3 stages; otherwise as
  ``vllm-pre-34846`` (no warps/stages: Triton's defaults).

- int4_w4a16 (block shape ``[0, group]``, the servers' GPTQ/AWQ Triton kernel): under both vLLM
  rules (the wna16 branch of ``get_default_config``, unchanged by PR #34846, completed by
  ``get_moe_wna16_block_config`` for the Triton kernel) BLOCK_SIZE_M 16 up to 20 tokens, 32 up to
  40, else 64; GROUP_SIZE_M 1; BLOCK_SIZE_N 32 and BLOCK_SIZE_K 64 for a single token, else 64
  and 32. SGLang's ``get_default_config`` has no int4 branch: its non-fp8 rule above applies.

Where a rule sets no ``num_warps``/``num_stages``, Triton's launch defaults apply on the GPU
(4 warps, 3 stages); they are written out here so the baseline is a complete, timeable config.

These are moe-tune's encodings of the servers' rules, written from the rules above and tested
against values read from each version's source. When the server's own code imports
(``workers.backends.server_code``), ``server_default`` calls the server's ``get_default_config``
instead, so the baseline is exactly what that installed version does (except int4_w4a16 under
vLLM, whose function there may pick the tile of its CUDA wna16 kernel, not of the Triton kernel
tuned here: the encoding serves). Weight-only group-quantized int8 (``block_shape`` with
int8_w8a16) runs the servers' GPTQ/AWQ kernel, which this project does not run for int8: refused
rather than guessed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from workers.records import Config, DType, MoEShape

TRITON_DEFAULT_WARPS = 4
TRITON_DEFAULT_STAGES = 3
VLLM = "vllm"
VLLM_PRE_34846 = "vllm-pre-34846"
SGLANG = "sglang"
VLLM_BATCH_AWARE_VERIFIED = (0, 33)
"""The oldest vLLM release whose ``get_default_config`` was read for the ``vllm`` rule. vLLM
releases between PR #34846 (2026-02-18) and it are not mapped by number: name the rule."""


def _config(m: int, n: int, k: int, group: int, warps: int = TRITON_DEFAULT_WARPS,
            stages: int = TRITON_DEFAULT_STAGES) -> Config:
    return Config(BLOCK_SIZE_M=m, BLOCK_SIZE_N=n, BLOCK_SIZE_K=k, GROUP_SIZE_M=group, num_warps=warps,
                  num_stages=stages)


def _check(shape: MoEShape, M: int) -> None:
    if M < 1:
        raise ValueError(f"batch size must be >= 1, got {M}")
    if shape.block_shape is not None and shape.dtype not in (DType.FP8_W8A8, DType.INT4_W4A16):
        raise ValueError(f"no default config for block-quantized {shape.dtype.value} "
                         "(the servers route it to their GPTQ/AWQ kernel)")


def _vllm_wna16(shape: MoEShape, M: int) -> Config:
    """int4_w4a16 under either vLLM rule: ``get_default_config``'s wna16 branch (BLOCK_SIZE_M,
    GROUP_SIZE_M) and ``get_moe_wna16_block_config``'s Triton tile (BLOCK_SIZE_N, BLOCK_SIZE_K)."""
    block_n, block_k = (32, 64) if M == 1 else (64, 32)
    return _config(16 if M <= 20 else 32 if M <= 40 else 64, block_n, block_k, 1)


def _vllm(shape: MoEShape, M: int) -> Config:
    if shape.dtype is DType.INT4_W4A16:
        return _vllm_wna16(shape, M)
    if shape.block_shape is not None:
        block_n, block_k = shape.block_shape
        small_n = M <= 8 and block_n % 64 == 0
        return _config(16 if M <= 64 else 64, 64 if small_n else block_n, block_k, 1 if M <= 16 else 32,
                       4, 4 if small_n and M <= 4 else 3)
    block_m = 16 if M <= 32 else 32 if M <= 96 else 64 if M <= 512 else 128
    block_k = 128 if shape.dtype is DType.FP8_W8A8 or M <= 64 else 64
    return _config(block_m, 64 if M <= 64 else 128, block_k, 16 if M // max(shape.E, 1) > 128 else 1,
                   4 if M <= 128 else 8, 4 if M <= 32 else 3)


def _vllm_pre_34846(shape: MoEShape, M: int) -> Config:
    if shape.dtype is DType.INT4_W4A16:
        return _vllm_wna16(shape, M)
    if shape.block_shape is not None:
        return _config(64, shape.block_shape[0], shape.block_shape[1], 32)
    return _config(16, 32, 64, 1) if M <= shape.E else _config(64, 64, 32, 8)


def _sglang(shape: MoEShape, M: int) -> Config:
    if shape.dtype is DType.FP8_W8A8:
        if shape.block_shape is not None:
            return _config(64, shape.block_shape[0], shape.block_shape[1], 32, 4, 3)
        return _config(64, 128, 128, 1, 4, 4) if M <= shape.E else _config(128, 256, 128, 32, 8, 4)
    return _config(16, 32, 64, 1) if M <= shape.E else _config(64, 64, 32, 8)


def _import_vllm(module_name: str) -> ModuleType:
    from workers.backends import server_code

    return server_code.import_module(module_name)


def _import_sglang(module_name: str) -> ModuleType:
    from workers.backends.sglang import ensure_server_args, import_code

    module = import_code(module_name)  # its imports need sgl_kernel on CUDA
    ensure_server_args()  # its get_default_config reads the server's arguments
    return module


def _call_vllm(function: Callable, shape: MoEShape, M: int, dtype: str | None, block: list[int] | None) -> dict:
    return function(M, shape.E, shape.N, shape.K, shape.topk, dtype, block)


def _call_sglang(function: Callable, shape: MoEShape, M: int, dtype: str | None, block: list[int] | None) -> dict:
    return function(M, shape.E, shape.N, shape.K, shape.topk, dtype, False, block)  # False: not Marlin


@dataclass(frozen=True)
class ServerFunction:
    """A server's own ``get_default_config``: where it lives, how it is imported and called."""

    module: str
    package: str
    """The distribution whose version names the implementation (``server_code.version``)."""
    load: Callable[[str], ModuleType]
    call: Callable[[Callable, MoEShape, int, str | None, list[int] | None], dict]
    """``call(function, shape, M, dtype, block_shape)``: the function's raw config dict."""
    int4: bool = True
    """Whether it serves int4_w4a16 (vLLM's may pick its CUDA wna16 kernel's tile: the encoding serves)."""
    oldest_release: tuple[int, int] | None = None
    """Releases before this (major, minor) are not used: their function may be another rule."""


@dataclass(frozen=True)
class Rule:
    """One server version's fallback rule: moe-tune's encoding, and the server's own function where
    it has one (None: only the encoding)."""

    name: str
    encoding: Callable[[MoEShape, int], Config]
    server: ServerFunction | None = None


_RULES = {rule.name: rule for rule in (
    Rule(VLLM, _vllm, ServerFunction("vllm.model_executor.layers.fused_moe.fused_moe", "vllm", _import_vllm,
                                     _call_vllm, int4=False, oldest_release=VLLM_BATCH_AWARE_VERIFIED)),
    Rule(VLLM_PRE_34846, _vllm_pre_34846),
    Rule(SGLANG, _sglang, ServerFunction("sglang.srt.layers.moe.fused_moe_triton.fused_moe_triton_config", "sglang",
                                         _import_sglang, _call_sglang)),
)}
RULES = tuple(_RULES)


def _rule(name: str) -> Rule:
    if name not in _RULES:
        raise ValueError(f"unknown default rule {name!r}; expected one of {', '.join(RULES)}")
    return _RULES[name]


def default_config(shape: MoEShape, M: int, rule: str = VLLM) -> Config:
    """moe-tune's encoding of ``rule``'s fallback config for ``M`` tokens of ``shape``."""
    encoding = _rule(rule).encoding
    _check(shape, M)
    return encoding(shape, M)


def rule_for_version(server_version: str) -> str:
    """The rule of ``server_version``: a rule name, or ``vllm==X.Y[.Z]`` / ``sglang==X``.

    Raises ValueError (starting with ``server_version``) for a vLLM release this project cannot
    place (after PR #34846's merge date, before the oldest release whose rule was read)."""
    if server_version in RULES:
        return server_version
    match = re.fullmatch(r"(vllm|sglang)==(\d+)\.(\d+)(?:\.\S*)?", server_version.strip())
    if not match:
        raise ValueError(f"{server_version!r}: expected one of {', '.join(RULES)}, "
                         "vllm==X.Y.Z or sglang==X.Y.Z")
    server, major, minor = match.group(1), int(match.group(2)), int(match.group(3))
    if server == "sglang":
        return SGLANG
    if (major, minor) >= VLLM_BATCH_AWARE_VERIFIED:
        return VLLM
    raise ValueError(f"{server_version}: which default rule vLLM {major}.{minor} applies is not "
                     f"recorded here; pass --server-version {VLLM} (PR #34846, February 2026, and later) "
                     f"or {VLLM_PRE_34846}")


@dataclass(frozen=True)
class DefaultSource:
    """Where a baseline's default configs come from: ``rule`` and, when the server's own
    ``get_default_config`` is called, its module and version (else ``"moe-tune encoding"``)."""

    rule: str
    implementation: str

    @property
    def label(self) -> str:
        return f"{self.rule} default rule ({self.implementation})"


def server_default(shape: MoEShape, M: int, rule: str) -> tuple[Config, DefaultSource]:
    """``rule``'s config, from the server's own ``get_default_config`` when its code imports here and
    is of that rule (installed package or ``MOE_TUNE_SERVER_CODE``), else from the encoding."""
    server = _rule(rule).server
    serves = server is not None and (server.int4 or shape.dtype is not DType.INT4_W4A16)
    own = _server_function(rule) if serves else None
    if own is not None:
        function, implementation = own
        try:
            return _call_server(server, function, shape, M), DefaultSource(rule, implementation)
        except Exception:  # noqa: BLE001 - e.g. SGLang's rule reads server args that are not set here
            pass
    return default_config(shape, M, rule), DefaultSource(rule, "moe-tune encoding")


_found: dict[str, tuple | None] = {}


def _server_function(rule: str) -> tuple | None:
    """(``get_default_config``, its label) of ``rule``'s server where its code imports here and its
    release is one of the rule's, else None (looked up once per process: ``_found``)."""
    if rule not in _found:
        _found[rule] = _find_server_function(_RULES[rule].server)
    return _found[rule]


def _find_server_function(server: ServerFunction) -> tuple | None:
    from workers.backends import server_code

    try:
        module = server.load(server.module)
        version = server_code.version(server.package)
        function = module.get_default_config
    except Exception:  # noqa: BLE001 - not importable here: the encoding serves
        return None
    if server.oldest_release is not None and _release(version) < server.oldest_release:
        return None  # an older release: its function may be another rule
    return function, f"{server.module}.get_default_config, {server.package} {version}"


def _release(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _call_server(server: ServerFunction, function: Callable, shape: MoEShape, M: int) -> Config:
    dtype = {DType.FP8_W8A8: "fp8_w8a8", DType.INT8_W8A16: "int8_w8a16",
             DType.INT4_W4A16: "int4_w4a16"}.get(shape.dtype)
    block = list(shape.block_shape) if shape.block_shape else None
    raw = server.call(function, shape, M, dtype, block)
    return Config.from_dict({"num_warps": TRITON_DEFAULT_WARPS, "num_stages": TRITON_DEFAULT_STAGES, **raw})
