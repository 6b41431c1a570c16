"""From a model's Hugging Face ``config.json`` to the fused-MoE shapes one GPU runs.

Families name the same quantities differently: the expert count (``n_routed_experts`` /
``num_local_experts`` / ``num_experts`` / ``moe_num_experts`` / DBRX's ``ffn_config``), top-k
(``num_experts_per_tok``, Gemma 4's ``top_k_experts``, Hunyuan's per-layer ``moe_topk`` list, ...),
the expert width (``moe_intermediate_size``, Hy3's ``expert_hidden_dim``; ``intermediate_size``
only for families without a separate expert width) and the width the experts run on
(``hidden_size``, DBRX's ``d_model``, Nemotron-H's ``moe_latent_size``); multimodal models nest
the text model (``text_config``, ``thinker_config.text_config``, ``llm_config``, ...). The field
tables below list every name read. A config carrying a MoE size field outside them is refused
(one line, exit 2) rather than read from a dense field. ``load_model`` reads any of them into a
``ModelSpec`` that records which field each of E, N, K, top-k came from; ``derive_shape`` shards
it for a parallel layout and a server's conventions.

Shared experts (DeepSeek, GLM-4.5, Qwen2-MoE, Llama-4) are recorded, not folded into ``E``:
vLLM runs them as a separate dense MLP. SGLang appends them to the routed experts for some
architectures (``sglang_fused_shared_experts``): its kernel then sees E + shared and top-k + 1.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError

from tuner import dispatch
from tuner.errors import OptionError, UsageError
from tuner.validation import one_line, parse_json
from workers.formats import block_shape_broken, block_shape_dtypes, format_of, shape_rule_broken
from workers.records import INT4_DEFAULT_GROUP, DType, MoEShape, WeightGrid

PRESETS_DIR = Path(__file__).parent / "presets"



@dataclass(frozen=True)
class ModelSpec:
    """The MoE layer of one model, unsharded. ``natural_dtype`` is None for quantization
    schemes the kernel does not run (AWQ, GPTQ, ...): such models need an explicit dtype.

    ``hidden_size`` is the width the experts run on (K): the model's hidden size, or the latent
    width of models that project to ``moe_latent_size`` before the experts (Nemotron-H).
    ``sources`` names the config field each of E, N, K and top-k came from. ``other_layers``
    holds the specs of MoE layers whose shape differs from this (the first) one, for configs
    with per-layer lists (Hunyuan: ``moe_topk``, ``moe_intermediate_size``).
    """

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
    architecture: str | None = None
    per_channel: bool = False
    quant_format: str | None = field(default=None, compare=False)
    sources: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    other_layers: tuple["ModelSpec", ...] = ()

    def layer_specs(self) -> list["ModelSpec"]:
        """One spec per distinct MoE layer shape (a server needs one config file for each)."""
        return [replace(self, other_layers=()), *self.other_layers]

    @property
    def checkpoint_grid(self) -> WeightGrid | None:
        """The quantized format the checkpoint stores its expert weights in (the natural dtype with
        its block shape, group size or per-channel scales), or None for an unquantized (bf16/fp16)
        checkpoint and for schemes moe-tune does not run."""
        if self.natural_dtype in (None, DType.BF16, DType.FP16):
            return None
        block = tuple(self.block_shape) if self.block_shape else None
        return WeightGrid(self.natural_dtype, block, self.per_channel)

    def source(self, quantity: str) -> str:
        """The config field ``quantity`` ("E", "N", "K", "top-k") was read from."""
        return dict(self.sources).get(quantity, "?")


class _QuantArgs(BaseModel):
    """compressed-tensors' ``weights`` / ``input_activations`` of one config group."""

    model_config = ConfigDict(extra="ignore")
    num_bits: int | None = None
    type: str | None = None
    strategy: str | None = None
    group_size: int | None = None
    block_structure: tuple[PositiveInt, PositiveInt] | None = None
    symmetric: bool | None = None
    dynamic: bool | str | None = None


class _ConfigGroup(BaseModel):
    model_config = ConfigDict(extra="ignore")
    targets: list[str] = []
    weights: _QuantArgs | None = None
    input_activations: _QuantArgs | None = None


class _Quantization(BaseModel):
    model_config = ConfigDict(extra="ignore")
    quant_method: str | None = None
    quant_algo: str | None = None
    weight_block_size: tuple[PositiveInt, PositiveInt] | None = None
    format: str | None = None
    config_groups: dict[str, _ConfigGroup] | None = None
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    zero_point: bool | None = None


# Where each quantity lives, across families, in the order tried (first set and non-zero wins).
# A dotted name is a nested key. Facts from the families' published config.json files and the
# servers' model code: Gemma 4 ``top_k_experts``, Hunyuan ``moe_topk`` (a per-layer list), Step3 /
# XVERSE ``moe_top_k``, ERNIE-4.5 ``moe_k``/``moe_num_experts``, DBRX ``ffn_config.*``, Tencent
# Hy3 ``expert_hidden_dim`` (its ``intermediate_size`` is the dense first layer's width),
# Nemotron-H ``moe_latent_size``.
EXPERT_FIELDS = ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts",
                 "ffn_config.moe_num_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "experts_per_token", "top_k_experts", "moe_topk", "moe_top_k", "moe_k",
                "ffn_config.moe_top_k")
EXPERT_WIDTH_FIELDS = ("moe_intermediate_size", "expert_hidden_dim", "expert_intermediate_size",
                       "ffn_config.ffn_hidden_size")
DENSE_WIDTH_FIELD = "intermediate_size"  # the expert width of families without a separate one (Mixtral, Jamba)
HIDDEN_FIELDS = ("hidden_size", "d_model")
LATENT_FIELD = "moe_latent_size"
SHARED_FIELDS = ("n_shared_experts", "num_shared_experts", "num_shared_expert", "moe_num_shared_experts")
KNOWN_MOE_FIELDS = frozenset({
    *EXPERT_FIELDS, *TOP_K_FIELDS, *EXPERT_WIDTH_FIELDS, LATENT_FIELD, *SHARED_FIELDS,
    # Fields that say where MoE layers are or how the router scores, not the kernel's shape.
    "shared_expert_intermediate_size", "moe_shared_expert_intermediate_size", "num_expert_group",
    "moe_layer_freq", "moe_layer_start_index", "moe_layer_end_index", "first_k_dense_replace",
    "expert_layer_offset", "expert_layer_period", "interleave_moe_layer_step", "decoder_sparse_step",
    "norm_topk_prob", "topk_group", "topk_method", "n_group", "routed_scaling_factor", "moe_jitter_eps",
    "moe_loss_weight", "router_aux_loss_coef", "router_jitter_noise", "output_router_logits",
    "use_mixed_mlp_moe", "enable_moe_block", "moe_router_topk_scaling_factor", "moe_use_aux_free",
    "num_nextn_predict_layers", "mlp_only_layers",
})
_SIZE_LIKE = re.compile(r"size|dim|width|hidden|intermediate|ffn|top_?k|_k$|^k_|num|^n_|count|experts$")
_MOE_LIKE = re.compile(r"expert|moe")
NESTING_KEYS = ("text_config", "thinker_config", "language_config", "llm_config", "language_model_config",
                "text_model_config")
"""Keys multimodal models nest their language model under (Llama-4, Qwen3-VL, Gemma 4: ``text_config``;
Qwen-Omni: ``thinker_config.text_config``; InternVL/DeepSeek-VL2: ``llm_config``/``language_config``)."""

# Families whose routed experts are not gated: one up projection [E, N, K] and an activation
# without the multiply (vLLM's nemotron_h.py builds its FusedMoE with ``activation_without_mul``).
NON_GATED_MODEL_TYPES = frozenset({"nemotron_h"})


def _get(level: dict[str, Any], dotted: str) -> Any:
    value: Any = level
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _has_experts(level: dict[str, Any]) -> bool:
    return any(_get(level, key) for key in EXPERT_FIELDS)


def _text_level(raw: dict[str, Any], path: str = "", depth: int = 0) -> tuple[dict[str, Any], str]:
    """The dict holding the language model's MoE fields and its key path (``""`` or ``"text_config."``):
    the top level, else the first nested config (``NESTING_KEYS`` first) that holds an expert count."""
    if _has_experts(raw) or depth == 3:
        return raw, path
    nested = [k for k in NESTING_KEYS if isinstance(raw.get(k), dict)]
    nested += [k for k, v in raw.items() if isinstance(v, dict) and k not in nested and k != "quantization_config"]
    for key in nested:
        level, found = _text_level(raw[key], f"{path}{key}.", depth + 1)
        if _has_experts(level):
            return level, found
    return raw, path


def _per_layer(value: Any, field_name: str, source: str) -> list[int] | None:
    """A count or size as a list of per-layer values (one entry for a scalar; 0 marks a layer
    without experts in per-layer lists); None if unset."""
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise UsageError(f"{source}: malformed config.json: {field_name} must be a non-negative integer or a list "
                         f"of them, got {json.dumps(value)[:80]}")
    return values


def _pick(level: dict[str, Any], names: tuple[str, ...], prefix: str, source: str
          ) -> tuple[list[int] | None, str | None]:
    """The first of ``names`` that is set and non-zero in ``level``, with its field path."""
    for name in names:
        values = _per_layer(_get(level, name), prefix + name, source)
        if values and any(values):
            return values, prefix + name
    return None, None


def _refuse_unknown_moe_fields(level: dict[str, Any], prefix: str, source: str) -> None:
    """Refuse a config whose MoE layer is described by a field this module does not read: guessing
    from a dense field instead would give a silently wrong shape."""
    for key, value in level.items():
        lowered = key.lower()
        if key in KNOWN_MOE_FIELDS or not _MOE_LIKE.search(lowered) or not _SIZE_LIKE.search(lowered):
            continue
        if isinstance(value, bool) or not (isinstance(value, int) or
                                           (isinstance(value, list) and value and
                                            all(isinstance(v, int) and not isinstance(v, bool) for v in value))):
            continue
        raise UsageError(f"{source}: MoE field {prefix}{key}={json.dumps(value)[:40]} is not understood; "
                         f"refusing to guess E, N or top-k from other fields (known: "
                         f"{', '.join(EXPERT_FIELDS + TOP_K_FIELDS + EXPERT_WIDTH_FIELDS)})")


def _natural_dtype(quant: _Quantization | None, torch_dtype: str | None
                   ) -> tuple[DType | None, tuple[int, int] | None, str | None, bool]:
    """The dtype a server runs the checkpoint in, its block shape (fp8 ``[bn, bk]``, int4
    ``[0, group]``) and the checkpoint's format in words (None for unquantized checkpoints).

    int4_w4a16: GPTQ (``bits`` 4), AWQ (``bits`` 4, zero points) and compressed-tensors
    ``pack-quantized`` 4-bit int weights without input quantization; the group size from the
    checkpoint (GPTQ/AWQ default 128; -1, one group per row, is the whole K and is refused by
    ``derive_shape`` unless it divides). fp8_w8a8 per channel (the last value True):
    compressed-tensors 8-bit float weights with the channel strategy and per-token dynamic
    activations (GLM-4.x FP8 and others). Schemes the kernel does not run give None, among them
    weight-only fp8 (vLLM's ``fp8_w8a16``, a Marlin kernel).
    """
    if quant is None or quant.quant_method is None:
        return (DType.FP16 if torch_dtype == "float16" else DType.BF16), None, None, False
    method = quant.quant_method.lower()
    algo = (quant.quant_algo or "").upper()
    if method == "mxfp4":
        return DType.MXFP4, None, "mxfp4", False
    if method == "fp8" or (method == "modelopt" and algo == "FP8"):
        return DType.FP8_W8A8, quant.weight_block_size, method, False
    if method == "modelopt" and algo == "NVFP4":
        return DType.NVFP4, None, "modelopt NVFP4", False
    if method in ("gptq", "awq") and quant.bits == 4:
        group = quant.group_size if quant.group_size not in (None, 0) else INT4_DEFAULT_GROUP
        zero_points = "zero points" if (method == "awq" and quant.zero_point is not False) or quant.sym is False \
            else "symmetric"
        return DType.INT4_W4A16, (0, group), f"{method} int4 ({zero_points})", False
    if method == "compressed-tensors" and quant.config_groups:
        groups = [g for g in quant.config_groups.values() if g.weights is not None]
        weights = groups[0].weights if groups else None
        activations = groups[0].input_activations if groups else None
        if weights and weights.num_bits == 4 and (weights.type or "int") == "int" and activations is None:
            group = weights.group_size if weights.strategy == "group" and weights.group_size else -1
            symmetric = "symmetric" if weights.symmetric is not False else "zero points"
            name = f"compressed-tensors {quant.format or ''} int4 ({symmetric})".replace("  ", " ")
            return DType.INT4_W4A16, (0, group), name, False
        if weights and weights.num_bits == 8 and weights.type == "float" and weights.strategy == "block" \
                and weights.block_structure and activations is not None:
            return DType.FP8_W8A8, weights.block_structure, "compressed-tensors fp8 block", False
        if weights and weights.num_bits == 8 and weights.type == "float" and weights.strategy == "tensor" \
                and activations is not None and activations.strategy == "tensor":
            return DType.FP8_W8A8, None, "compressed-tensors fp8 per-tensor", False
        if weights and weights.num_bits == 8 and weights.type == "float" and weights.strategy == "channel" \
                and activations is not None and activations.strategy == "token":
            return DType.FP8_W8A8, None, "compressed-tensors fp8 per-channel weights, per-token activations", True
        if weights and weights.num_bits == 8 and weights.type == "float" and activations is None:
            return None, None, "compressed-tensors weight-only fp8 (vLLM's fp8_w8a16, a Marlin kernel)", False
    return None, None, method, False


def _layers(fields: dict[str, tuple[list[int], str]], source: str) -> list[dict[str, int]]:
    """Per-layer values of list-valued fields zipped into one dict per layer (scalars repeat);
    lists of different lengths cannot be matched up."""
    lengths = {len(v) for v, _ in fields.values() if len(v) > 1}
    if len(lengths) > 1:
        named = ", ".join(f"{name} ({len(v)})" for v, name in fields.values() if len(v) > 1)
        raise UsageError(f"{source}: per-layer lists of different lengths: {named}")
    count = lengths.pop() if lengths else 1
    return [{q: (v[i] if len(v) > 1 else v[0]) for q, (v, _) in fields.items()} for i in range(count)]


def parse_config(raw: Any, name: str, source: str) -> ModelSpec:
    """Read a parsed ``config.json`` into a ModelSpec; ``source`` names it in error messages.

    Raises UsageError (one line) for a config without MoE layers, with malformed values, or with a
    MoE field this module does not understand.
    """
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: config.json must hold a JSON object")
    level, prefix = _text_level(raw)
    experts, experts_from = _pick(level, EXPERT_FIELDS, prefix, source)
    top_k, top_k_from = _pick(level, TOP_K_FIELDS, prefix, source)
    if experts is None or top_k is None:
        raise UsageError(f"{source}: model has no MoE layers (no expert count or top-k in config.json)")
    _refuse_unknown_moe_fields(level, prefix, source)
    width, width_from = _pick(level, EXPERT_WIDTH_FIELDS, prefix, source)
    if width is None:
        width, width_from = _pick(level, (DENSE_WIDTH_FIELD,), prefix, source)
    latent, latent_from = _pick(level, (LATENT_FIELD,), prefix, source)
    hidden, hidden_from = latent, latent_from
    if hidden is None:
        hidden, hidden_from = _pick(level, HIDDEN_FIELDS, prefix, source)
    if width is None or hidden is None:
        missing = "intermediate size" if width is None else "hidden size"
        raise UsageError(f"{source}: malformed config.json: MoE model without a {missing}")
    if len(hidden) > 1:
        raise UsageError(f"{source}: malformed config.json: {hidden_from} must be one integer")

    model_type = str(level.get("model_type") or raw.get("model_type") or "unknown")
    if model_type in NON_GATED_MODEL_TYPES and level.get("mlp_hidden_act", "relu2") != "relu2":
        raise UsageError(f"{source}: non-gated experts with mlp_hidden_act={level['mlp_hidden_act']!r}: the kernel "
                         f"runs relu2 (Nemotron-H's) only")
    shared_values, _ = _pick(level, SHARED_FIELDS, prefix, source)
    if shared_values is None:
        # Qwen2-MoE has one shared expert of its own width; Llama-4's MoE layers carry one shared expert.
        shared_values = [1 if (level.get("shared_expert_intermediate_size") or model_type.startswith("llama4"))
                         else 0]
    try:
        quant_raw = raw.get("quantization_config") or level.get("quantization_config")
        quant = _Quantization.model_validate(quant_raw) if quant_raw is not None else None
    except ValidationError as exc:
        raise UsageError(one_line(exc, f"{source}: malformed config.json")) from None
    torch_dtype = level.get("torch_dtype") or level.get("dtype") or raw.get("torch_dtype") or raw.get("dtype")
    dtype, block, quant_format, per_channel = _natural_dtype(quant, torch_dtype if isinstance(torch_dtype, str) else None)
    if dtype is DType.INT4_W4A16 and block is not None and block[1] != -1 and block[1] < 1:
        raise UsageError(f"{source}: malformed config.json: {quant_format} group size {block[1]}: expected a "
                         "positive size or -1 (one group per row)")
    architectures = raw.get("architectures") or level.get("architectures")
    architecture = str(architectures[0]) if isinstance(architectures, list) and architectures else None

    per_layer = _layers({"E": (experts, experts_from), "N": (width, width_from), "top-k": (top_k, top_k_from),
                         "shared": (shared_values, "shared")}, source)
    sources = (("E", experts_from), ("N", width_from), ("K", hidden_from), ("top-k", top_k_from))
    layers_of: dict[ModelSpec, list[int]] = {}
    for index, layer in enumerate(per_layer):
        if not layer["E"] or not layer["top-k"]:
            continue  # a dense layer in a per-layer list
        if layer["top-k"] > layer["E"]:
            raise UsageError(f"{source}: top-k {layer['top-k']} exceeds the {layer['E']} experts")
        spec = ModelSpec(
            name=name, model_type=model_type, hidden_size=hidden[0], intermediate_size=layer["N"],
            num_experts=layer["E"], top_k=layer["top-k"], n_shared_experts=layer["shared"], natural_dtype=dtype,
            block_shape=block, quant_method=quant.quant_method if quant else None, architecture=architecture,
            quant_format=quant_format, per_channel=per_channel, sources=sources,
        )
        layers_of.setdefault(spec, []).append(index)
    if not layers_of:
        raise UsageError(f"{source}: model has no MoE layers (every layer's expert count or top-k is 0)")
    specs = list(layers_of)
    if len(specs) > 1:  # name each shape by the layers that have it
        specs = [replace(s, name=f"{name} layers {_ranges(layers_of[s])}") for s in specs]
    return replace(specs[0], other_layers=tuple(specs[1:]))


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] → "0-2,5"."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)


def _read_json(path: Path) -> Any:
    try:
        return parse_json(path.read_text(encoding="utf-8"))
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


SERVERS = ("vllm", "sglang")

# SGLang's shared-expert fusion (sglang/srt/models/deepseek_v2.py, glm4_moe.py, glm4_moe_lite.py,
# glm4v_moe.py, ``determine_num_fused_shared_experts``, SGLang 0.5.10): on by default, off with
# ``--disable-shared-experts-fusion``, and off on its own under expert parallelism on NVIDIA GPUs,
# with DeepEP/MORI all-to-all, for W4AFP8 checkpoints and below compute capability 8.0.
# Per architecture: the config values it must have (None: any non-zero shared count).
_SGLANG_FUSION_RULES: dict[str, tuple[int | None, int | None]] = {
    # architecture: (routed experts, shared experts)
    "DeepseekV3ForCausalLM": (256, 1),
    "GlmMoeDsaForCausalLM": (256, 1),
    "Glm4MoeLiteForCausalLM": (None, 1),
    "Glm4MoeForCausalLM": (None, None),
    "Glm4vMoeForConditionalGeneration": (None, None),
}


def sglang_fused_shared_experts(spec: ModelSpec, ep: int = 1, enabled: bool = True) -> tuple[int, str]:
    """How many shared experts SGLang appends to the routed ones for ``spec`` (0 or the model's
    shared count), and why, in one phrase. ``enabled`` False is SGLang's
    ``--disable-shared-experts-fusion``; ``ep`` > 1 turns fusion off on NVIDIA GPUs."""
    rule = _SGLANG_FUSION_RULES.get(spec.architecture or "")
    if not spec.n_shared_experts:
        return 0, "no shared experts"
    if rule is None:
        return 0, f"SGLang fuses shared experts only for {', '.join(_SGLANG_FUSION_RULES)}"
    routed, shared = rule
    if (routed is not None and spec.num_experts != routed) or (shared is not None and spec.n_shared_experts != shared):
        wanted = " and ".join(f"{n} {what}" for n, what in ((routed, "routed"), (shared, "shared")) if n is not None)
        return 0, f"SGLang fuses {spec.architecture} only with {wanted} experts"
    if not enabled:
        return 0, "--disable-shared-experts-fusion"
    if ep > 1:
        return 0, "SGLang turns fusion off under expert parallelism on NVIDIA GPUs"
    return spec.n_shared_experts, (f"SGLang fuses {spec.n_shared_experts} shared expert(s) into the routed ones "
                                   f"(--disable-shared-experts-fusion turns it off)")


def dtype_block_shape(dtype: DType | None, block_shape: tuple[int, int] | None) -> tuple[int, int] | None:
    """``block_shape`` for a ``dtype`` whose weights take one (block-quantized fp8), else None; None
    for ``dtype`` None (the model's own: ``derive_shape`` takes the checkpoint's block)."""
    return block_shape if dtype is not None and format_of(dtype).block_shapes else None


def derive_shape(spec: ModelSpec, tp: int = 1, ep: int = 1, dtype: DType | str | None = None,
                 block_shape: tuple[int, int] | list[int] | None = None, *, server: str = "vllm",
                 fuse_shared_experts: bool = True, device_name: str | None = None) -> MoEShape:
    """The shape one GPU's kernel runs with ``tp`` GPUs serving the layer, ``ep`` of them
    splitting the experts (SGLang's meaning; vLLM's ``--enable-expert-parallel`` is ep == tp):
    E = experts/ep, N = intermediate/(tp/ep), K = hidden. ``dtype`` None means the model's own.
    ``server`` "sglang" adds the shared experts SGLang fuses (``sglang_fused_shared_experts``;
    ``fuse_shared_experts`` False is its ``--disable-shared-experts-fusion``); vLLM never fuses.
    mxfp4 sizes are padded as the servers pad them on ``device_name``'s GPU (``mxfp4_padding``).
    """
    if tp < 1 or ep < 1:
        raise OptionError("tp", f"--tp and --ep must be at least 1 (got tp={tp}, ep={ep})", flagged=False)
    if server not in SERVERS:
        raise ValueError(f"unknown server {server!r}")
    if tp % ep:
        raise OptionError("ep", f"{ep} must divide --tp {tp}")
    if spec.num_experts % ep:
        raise OptionError("ep", f"{spec.name}: {spec.num_experts} experts do not split over ep={ep}", flagged=False)
    moe_tp = tp // ep
    if spec.intermediate_size % moe_tp:
        raise OptionError("tp", f"{spec.name}: intermediate size {spec.intermediate_size} does not split over "
                                f"tp/ep={moe_tp}", flagged=False)
    E, N, K = spec.num_experts // ep, spec.intermediate_size // moe_tp, spec.hidden_size
    if spec.top_k > spec.num_experts:
        raise UsageError(f"{spec.name}: top-k {spec.top_k} exceeds the {spec.num_experts} experts")
    fused = sglang_fused_shared_experts(spec, ep, fuse_shared_experts)[0] if server == "sglang" else 0

    if dtype is None:
        if spec.natural_dtype is None:
            raise UsageError(f"{spec.name}: quantized with {spec.quant_format or spec.quant_method!r}, which the "
                             f"kernel does not run; pass --dtype")
        resolved = spec.natural_dtype
    else:
        resolved = DType(dtype)
    if block_shape is not None:
        if not format_of(resolved).block_shapes:
            raise OptionError("block_shape", f"applies to {', '.join(block_shape_dtypes())} only, not {resolved.value}")
        block = (int(block_shape[0]), int(block_shape[1]))
        problem = block_shape_broken(block)
        if problem:
            raise OptionError("block_shape", problem)
    elif resolved is DType.INT4_W4A16:
        # The checkpoint's group size; GPTQ/AWQ's default for a model quantized another way.
        group = spec.block_shape[1] if spec.natural_dtype is DType.INT4_W4A16 and spec.block_shape else \
            INT4_DEFAULT_GROUP
        if group != -1 and (K % group or N % group):  # -1: one group per row (channel-wise)
            raise UsageError(f"{spec.name}: int4_w4a16 needs K and N per GPU multiples of its group size {group} "
                             f"(K={K}, N={N})")
        block = (0, group)
    else:
        # A block-quantized checkpoint (DeepSeek-V3) keeps its blocks when asked for fp8.
        block = spec.block_shape if resolved is spec.natural_dtype and format_of(resolved).block_shapes else None
        problem = block_shape_broken(block) if block is not None else None
        if problem:
            raise UsageError(f"{spec.name}: the checkpoint's fp8 weight block: {problem}")

    if block is not None and resolved is DType.FP8_W8A8:
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
    # A per-channel fp8 checkpoint keeps its scheme when asked for fp8 without a block shape.
    per_channel = spec.per_channel and resolved is DType.FP8_W8A8 and block is None
    return MoEShape(E=E + fused, N=N, K=K, topk=spec.top_k + (1 if fused else 0), dtype=resolved, block_shape=block,
                    gated=spec.model_type not in NON_GATED_MODEL_TYPES, ep=ep, fused_shared=fused,
                    per_channel=per_channel)
