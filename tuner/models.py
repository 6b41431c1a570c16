"""From a model's Hugging Face ``config.json`` to the fused-MoE shapes one GPU runs.

Families name the same quantities differently (``num_local_experts`` / ``num_experts`` /
``n_routed_experts`` / DBRX's ``ffn_config.moe_num_experts``; ``moe_intermediate_size`` vs
``intermediate_size``; ``hidden_size`` vs DBRX's ``d_model``); multimodal models nest the text
model under ``text_config``. ``load_model`` reads any of them into a ``ModelSpec``;
``derive_shape`` shards it for a parallel layout the way vLLM and SGLang do.

Shared experts (DeepSeek, GLM-4.5, Qwen2-MoE, Llama-4) are recorded but not folded into ``E``:
vLLM runs them as a separate dense MLP, so its fused-MoE kernel and its config file names only
see the routed experts. (SGLang can fuse one shared expert into the routed tensor, E+1; that is
a different kernel shape, not tuned here.)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError
from pydantic import NonNegativeInt as Count

from tuner import dispatch
from tuner.errors import UsageError
from tuner.validation import one_line
from workers.formats import block_shape_dtypes, format_of, shape_rule_broken
from workers.records import DType, MoEShape

PRESETS_DIR = Path(__file__).parent / "presets"



@dataclass(frozen=True)
class ModelSpec:
    """The MoE layer of one model, unsharded. ``natural_dtype`` is None for quantization
    schemes the kernel does not run (AWQ, GPTQ, ...): such models need an explicit dtype."""

    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int  # per routed expert, before tensor parallelism
    num_experts: int  # routed experts only
    top_k: int
    n_shared_experts: int = 0
    natural_dtype: DType | None = DType.BF16
    block_shape: tuple[int, int] | None = None
    quant_method: str | None = None


class _Fields(BaseModel):
    """Only the fields read here; everything else in config.json is ignored."""

    model_config = ConfigDict(extra="ignore")


class _DbrxFfn(_Fields):
    moe_num_experts: Count | None = None
    moe_top_k: Count | None = None
    ffn_hidden_size: PositiveInt | None = None


class _Quantization(_Fields):
    quant_method: str | None = None
    quant_algo: str | None = None
    weight_block_size: tuple[PositiveInt, PositiveInt] | None = None


class _HFConfig(_Fields):
    """The ``config.json`` fields that describe an MoE layer, across families."""

    model_type: str | None = None
    hidden_size: PositiveInt | None = None
    d_model: PositiveInt | None = None
    n_routed_experts: Count | None = None
    num_local_experts: Count | None = None
    num_experts: Count | None = None
    num_experts_per_tok: Count | None = None
    experts_per_token: Count | None = None
    moe_intermediate_size: PositiveInt | None = None
    intermediate_size: PositiveInt | None = None
    n_shared_experts: Count | None = None
    shared_expert_intermediate_size: Count | None = None
    ffn_config: _DbrxFfn | None = None
    quantization_config: _Quantization | None = None
    torch_dtype: str | None = None
    dtype: str | None = None


def _first(*values: int | None) -> int | None:
    """The first value that is set and non-zero (0 means "no experts" in some configs)."""
    return next((v for v in values if v), None)


def _text_level(raw: dict[str, Any]) -> dict[str, Any]:
    """The dict holding the language model's MoE fields: the top level, or a nested text config
    (Llama-4, Qwen3-VL-MoE: ``text_config``; Qwen-Omni: ``thinker_config.text_config``)."""
    expert_keys = ("n_routed_experts", "num_local_experts", "num_experts", "ffn_config")
    if any(raw.get(k) for k in expert_keys):
        return raw
    for nested in (raw.get("text_config"), (raw.get("thinker_config") or {}).get("text_config")):
        if isinstance(nested, dict):
            return nested
    return raw


def _natural_dtype(quant: _Quantization | None, torch_dtype: str | None) -> tuple[DType | None, tuple[int, int] | None]:
    """The dtype a server runs the checkpoint in, and its fp8 weight block shape if any."""
    if quant is None or quant.quant_method is None:
        return (DType.FP16 if torch_dtype == "float16" else DType.BF16), None
    method = quant.quant_method.lower()
    algo = (quant.quant_algo or "").upper()
    if method == "mxfp4":
        return DType.MXFP4, None
    if method == "fp8" or (method == "modelopt" and algo == "FP8"):
        return DType.FP8_W8A8, quant.weight_block_size
    if method == "modelopt" and algo == "NVFP4":
        return DType.NVFP4, None
    return None, None


def parse_config(raw: Any, name: str, source: str) -> ModelSpec:
    """Read a parsed ``config.json`` into a ModelSpec; ``source`` names it in error messages."""
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: config.json must hold a JSON object")
    text = _text_level(raw)
    try:
        top = _HFConfig.model_validate(raw)
        fields = _HFConfig.model_validate(text) if text is not raw else top
    except ValidationError as exc:
        raise UsageError(one_line(exc, f"{source}: malformed config.json")) from None

    ffn = fields.ffn_config or _DbrxFfn()
    experts = _first(fields.n_routed_experts, fields.num_local_experts, fields.num_experts, ffn.moe_num_experts)
    top_k = _first(fields.num_experts_per_tok, fields.experts_per_token, ffn.moe_top_k)
    if experts is None or top_k is None:
        raise UsageError(f"{source}: model has no MoE layers (no expert count or top-k in config.json)")
    if top_k > experts:
        raise UsageError(f"{source}: top-k {top_k} exceeds the {experts} experts")
    intermediate = _first(fields.moe_intermediate_size, ffn.ffn_hidden_size, fields.intermediate_size)
    hidden = _first(fields.hidden_size, fields.d_model)
    if intermediate is None or hidden is None:
        missing = "intermediate size" if intermediate is None else "hidden size"
        raise UsageError(f"{source}: malformed config.json: MoE model without a {missing}")

    model_type = fields.model_type or top.model_type or "unknown"
    shared = fields.n_shared_experts
    if shared is None:
        # Qwen2-MoE has one shared expert of its own width; Llama-4's MoE layers carry one shared expert.
        shared = 1 if (fields.shared_expert_intermediate_size or model_type.startswith("llama4")) else 0
    quant = top.quantization_config or fields.quantization_config
    dtype, block = _natural_dtype(quant, fields.torch_dtype or fields.dtype or top.torch_dtype or top.dtype)
    return ModelSpec(
        name=name, model_type=model_type, hidden_size=hidden, intermediate_size=intermediate,
        num_experts=experts, top_k=top_k, n_shared_experts=shared, natural_dtype=dtype,
        block_shape=block, quant_method=quant.quant_method if quant else None,
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read ({exc})") from None


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def _hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    return home / "hub"


def _scan_hf_cache(repo_id: str) -> Path | None:
    """The cached config.json of ``repo_id`` in the hub cache layout
    (``models--org--name/snapshots/<rev>/``), preferring the revision ``refs/main`` names."""
    repo_dir = _hf_hub_cache() / f"models--{repo_id.replace('/', '--')}"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        pinned = repo_dir / "snapshots" / ref.read_text().strip() / "config.json"
        if pinned.is_file():
            return pinned
    found = sorted(repo_dir.glob("snapshots/*/config.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _cached_config(repo_id: str) -> Path | None:
    """Resolve a repo id offline. huggingface_hub (what transformers resolves through) knows
    every cache setting; without it, read the documented cache layout directly."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return _scan_hf_cache(repo_id)
    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found) if isinstance(found, str) else None


_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def load_model(ref: str) -> ModelSpec:
    """A ModelSpec from a config.json path, a folder holding one, a preset name (case-insensitive,
    see ``tuner/presets``), or a Hugging Face repo id found in the local cache (never the network)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise UsageError(f"{ref}: folder has no config.json")
        return parse_config(_read_json(config), path.resolve().name, str(config))
    if path.is_file():
        name = path.resolve().parent.name if path.stem == "config" else path.stem
        return parse_config(_read_json(path), name, str(path))
    preset = PRESETS_DIR / f"{ref.lower()}.json"
    if preset.is_file():
        return parse_config(_read_json(preset), ref.lower(), f"preset {ref.lower()}")
    if _REPO_ID.match(ref):
        cached = _cached_config(ref)
        if cached is not None:
            return parse_config(_read_json(cached), ref, f"{ref} (HF cache)")
    raise UsageError(
        f"{ref}: not a config.json, a folder with one, a Hugging Face repo in the local cache, "
        f"or a preset ({', '.join(preset_names())})"
    )


def derive_shape(spec: ModelSpec, tp: int = 1, ep: int = 1, dtype: DType | str | None = None,
                 block_shape: tuple[int, int] | list[int] | None = None, device_name: str | None = None) -> MoEShape:
    """The shape one GPU's kernel runs with ``tp`` GPUs serving the layer, ``ep`` of them
    splitting the experts (SGLang's meaning; vLLM's ``--enable-expert-parallel`` is ep == tp):
    E = experts/ep, N = intermediate/(tp/ep), K = hidden. ``dtype`` None means the model's own.
    mxfp4 sizes are padded as the servers pad them on ``device_name``'s GPU (``mxfp4_padding``).
    """
    if tp < 1 or ep < 1:
        raise UsageError(f"--tp and --ep must be at least 1 (got tp={tp}, ep={ep})")
    if tp % ep:
        raise UsageError(f"--ep {ep} must divide --tp {tp}")
    if spec.num_experts % ep:
        raise UsageError(f"{spec.name}: {spec.num_experts} experts do not split over ep={ep}")
    moe_tp = tp // ep
    if spec.intermediate_size % moe_tp:
        raise UsageError(f"{spec.name}: intermediate size {spec.intermediate_size} does not split over "
                         f"tp/ep={moe_tp}")
    E, N, K = spec.num_experts // ep, spec.intermediate_size // moe_tp, spec.hidden_size
    if spec.top_k > E:
        raise UsageError(f"{spec.name}: top-k {spec.top_k} exceeds the {E} experts one GPU holds at ep={ep}")

    if dtype is None:
        if spec.natural_dtype is None:
            raise UsageError(f"{spec.name}: quantized with {spec.quant_method!r}, which the kernel does not run; "
                             f"pass --dtype")
        resolved = spec.natural_dtype
    else:
        resolved = DType(dtype)
    if block_shape is not None:
        if not format_of(resolved).block_shapes:
            raise UsageError(f"--block-shape applies to {', '.join(block_shape_dtypes())} only, not {resolved.value}")
        block = (int(block_shape[0]), int(block_shape[1]))
        if min(block) < 1:
            raise UsageError(f"--block-shape values must be positive (got {block[0]},{block[1]})")
    else:
        # A block-quantized checkpoint (DeepSeek-V3) keeps its blocks when asked for fp8.
        block = spec.block_shape if resolved is spec.natural_dtype and format_of(resolved).block_shapes else None

    if block is not None:
        bn, bk = block
        # As vLLM's fp8 weight loader: gate/up rows split at block boundaries, and so does the
        # down projection's input once tensor parallelism cuts it.
        if N % bn or (moe_tp > 1 and N % bk):
            raise UsageError(f"{spec.name}: N={N} per GPU is not a multiple of block shape [{bn},{bk}]")
    if resolved is DType.MXFP4:  # padded as the servers pad it for the GPU's kernel
        padding = dispatch.mxfp4_padding(N, K, dispatch.gpu_arch(device_name or ""))
        N, K = padding.padded_N, padding.padded_K
    problem = shape_rule_broken(resolved, N, K)
    if problem:
        raise UsageError(f"{spec.name}: {problem} per GPU")
    return MoEShape(E=E, N=N, K=K, topk=spec.top_k, dtype=resolved, block_shape=block)

