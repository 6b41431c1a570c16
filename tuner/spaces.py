"""Search spaces as data, and pruning that never drops a config that could win.

A space file (``search_spaces/*.yaml``) maps each of the six config keys to a list of values;
the space is their product. ``prune`` then removes, per shape and batch size, only configs
that cannot compile or run correctly, or that are dominated for certain; each rule's
docstring says why it is safe. Everything it keeps still goes through the workers, which
catch whatever slips through (a compile failure costs one compile, a wrongly dropped winner
costs performance forever, so every rule errs towards keeping).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tuner.devices import device_facts, largest_shared_memory
from tuner.errors import UsageError
from tuner.validation import one_line, parse_yaml
from workers.formats import format_of, tile_rule_broken
from workers.records import CONFIG_KEYS, Config, DType, MoEShape

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"



def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class _SpaceFile(BaseModel):
    """What a space file may say. Block sizes must be powers of two (``tl.arange`` needs them)
    and at least 16 (the smallest ``tl.dot`` operand edge); warps a power of two up to 32
    (1024 threads per block)."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    BLOCK_SIZE_M: list[int] = Field(min_length=1)
    BLOCK_SIZE_N: list[int] = Field(min_length=1)
    BLOCK_SIZE_K: list[int] = Field(min_length=1)
    GROUP_SIZE_M: list[int] = Field(min_length=1)
    num_warps: list[int] = Field(min_length=1)
    num_stages: list[int] = Field(min_length=1)

    @field_validator(*CONFIG_KEYS)
    @classmethod
    def _distinct(cls, values: list[int]) -> list[int]:
        if len(set(values)) != len(values):
            raise ValueError(f"values repeat: {values}")
        return values

    @field_validator("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K")
    @classmethod
    def _block_size(cls, values: list[int]) -> list[int]:
        bad = [v for v in values if v < 16 or not _power_of_two(v)]
        if bad:
            raise ValueError(f"block sizes must be powers of two >= 16, not {bad}")
        return values

    @field_validator("num_warps")
    @classmethod
    def _warps(cls, values: list[int]) -> list[int]:
        bad = [v for v in values if v > 32 or not _power_of_two(v)]
        if bad:
            raise ValueError(f"num_warps must be a power of two <= 32, not {bad}")
        return values

    @field_validator("GROUP_SIZE_M", "num_stages")
    @classmethod
    def _positive(cls, values: list[int]) -> list[int]:
        if min(values) < 1:
            raise ValueError(f"values must be >= 1, not {values}")
        return values


@dataclass(frozen=True)
class SearchSpace:
    """A validated space: the candidate values of each config key, in file order."""

    name: str
    description: str
    values: dict[str, tuple[int, ...]]

    @property
    def size(self) -> int:
        count = 1
        for key in CONFIG_KEYS:
            count *= len(self.values[key])
        return count

    def expand(self) -> list[Config]:
        """Every config of the space, in a stable order (product over ``CONFIG_KEYS``)."""
        return [Config(*combo) for combo in itertools.product(*(self.values[k] for k in CONFIG_KEYS))]


def space_names() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space(path_or_name: str | Path) -> SearchSpace:
    """Load a space file; a bare name (``default``, ``wide``) means ``search_spaces/<name>.yaml``."""
    path = Path(path_or_name).expanduser()
    if not path.is_file() and re.fullmatch(r"[\w.-]+", str(path_or_name)):
        path = SPACES_DIR / f"{path_or_name}.yaml"
    if not path.is_file():
        raise UsageError(f"search space {str(path_or_name)!r} not found: give a YAML file or one of "
                         f"{', '.join(space_names())}")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = str(exc).replace("\n", " ")
        raise UsageError(f"{path}: cannot read search space ({reason})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a search space maps the six config keys to lists of values")
    try:
        parsed = _SpaceFile.model_validate(raw)
    except ValidationError as exc:
        raise UsageError(one_line(exc, str(path))) from None
    return SearchSpace(name=path.stem, description=parsed.description,
                       values={k: tuple(getattr(parsed, k)) for k in CONFIG_KEYS})


# --- device limits -----------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceLimits:
    """The hardware limits pruning checks against. ``known``: False for a device without facts
    (``tuner.devices``), pruned against the largest shared memory of any listed GPU, so that
    pruning removes only what no GPU can hold and the workers' compile reports the rest as out
    of resources; the plan and the tune say so."""

    name: str
    shared_memory_bytes: int
    known: bool = True

    @classmethod
    def for_device(cls, device_name: str) -> "DeviceLimits":
        """Limits for a device name as torch reports it (``NVIDIA H100 80GB HBM3``, ``NVIDIA_H200``)."""
        facts = device_facts(device_name)
        if facts is None:
            return cls(name=device_name, shared_memory_bytes=largest_shared_memory(), known=False)
        return cls(name=device_name, shared_memory_bytes=facts.shared_memory_bytes)

    @property
    def note(self) -> str | None:
        """What a user must know about these limits (None for a known GPU)."""
        if self.known:
            return None
        return (f"no facts known for '{self.name}': pruned against the largest shared memory of any listed GPU "
                f"({self.shared_memory_bytes // 1024} KiB); the workers' compile reports what does not fit")


# --- pruning -------------------------------------------------------------------------------

# Hopper's tensor-core path (wgmma) works on 64-row tiles per warp group, so a 64-row tile can
# beat a 16-row one even when each expert sees a single token (vLLM's shipped H100 fp8 configs
# pick BLOCK_SIZE_M=64 at batch 1). The BLOCK_SIZE_M cap never goes below this.
MMA_ROWS_FLOOR = 64


def shared_memory_lower_bound(config: Config, dtype: DType) -> int:
    """Bytes of shared memory the kernel needs at least, per block:

        (num_stages - 1) × (BM×BK×a_bits + BK×BN×b_bits) / 8

    with the format's activation and weight bits (``workers.formats``: a_bits 8 for fp8_w8a8, else
    16; b_bits 16, 8 or 4 for packed fp4 nibbles). Triton's software pipeliner (3.x) stages each loop load that feeds
    ``tl.dot`` in a ring of num_stages - 1 shared-memory buffers (Hopper's async wgmma path can
    hold one more); the smaller count is used so nothing that compiles is dropped. Scale tiles,
    dequantized B copies and epilogue scratch are left out for the same reason, and with
    num_stages = 1 nothing is certain to be staged, so the bound is 0.
    """
    fmt = format_of(dtype)
    a_bits, b_bits = fmt.activation_bits, fmt.tile_weight_bits
    per_stage = (config.BLOCK_SIZE_M * config.BLOCK_SIZE_K * a_bits
                 + config.BLOCK_SIZE_K * config.BLOCK_SIZE_N * b_bits) // 8
    return max(config.num_stages - 1, 0) * per_stage


def _breaks_tile_rule(config: Config, shape: MoEShape, rule: str) -> bool:
    """The format's tile rule ``rule`` (``workers.formats.tile_rule_broken``) is the first ``config``
    breaks for ``shape``: such tiles give wrong results or no kernel, not slow ones."""
    broken = tile_rule_broken(config, shape.dtype, shape.block_shape)
    return broken is not None and broken[0] == rule


def _runs_as_smaller_block_k(config: Config, shape: MoEShape) -> bool:
    """A BLOCK_SIZE_K above a block-fp8 shape's block: the servers clamp it to the block at launch
    (``workers.formats.launch_block_k``), so it times the same kernel as the config with
    BLOCK_SIZE_K = block, which the space holds. Dropped as a duplicate (under ``block_quant``)."""
    return (format_of(shape.dtype).block_shapes and shape.block_shape is not None
            and config.BLOCK_SIZE_K > min(shape.block_shape))


def _block_m_limit(block_ms: list[int], M: int) -> int:
    """The largest BLOCK_SIZE_M worth timing at batch size M.

    Tokens are routed to top-k *distinct* experts, so one expert receives at most M rows.
    Once BLOCK_SIZE_M covers that, every active expert is one row block whatever the tile:
    a larger tile keeps the grid and only adds masked rows to every block. The cap is the
    smallest space value >= max(M, MMA_ROWS_FLOOR), plus one further step kept as a margin
    (tile shape also moves register allocation and instruction choice).
    """
    ordered = sorted(set(block_ms))
    need = max(M, MMA_ROWS_FLOOR)
    covering = [i for i, v in enumerate(ordered) if v >= need]
    if not covering:
        return ordered[-1]
    return ordered[min(covering[0] + 1, len(ordered) - 1)]


def _replicated_warps(config: Config, fewest_warps: int) -> bool:
    """Fewer output elements (BM×BN) than threads (32 × num_warps): some warps hold only copies
    of others' results, so the same tile with fewer warps does the same work with less
    scheduling and register overhead (vLLM's ROCm pruning drops such tiles outright as
    unsupported). Only applied above the space's fewest warps, so every tile keeps a variant."""
    return (config.num_warps > fewest_warps
            and config.BLOCK_SIZE_M * config.BLOCK_SIZE_N < 32 * config.num_warps)


@dataclass(frozen=True)
class PruneResult:
    kept: list[Config]
    dropped_by_reason: dict[str, int]

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_reason.values())


# Reason names, in the order rules are checked; a config is counted under the first it breaks.
REASONS = ("block_quant", "fp4_group", "shared_memory", "block_m_cap", "tile_vs_warps")


def prune(configs: list[Config], shape: MoEShape, M: int, device: DeviceLimits) -> PruneResult:
    """Drop the configs of ``configs`` that cannot run correctly for ``shape`` on ``device``, or
    cannot win at batch size ``M``; keep the rest in their original order. Space-relative rules
    (the BLOCK_SIZE_M steps, the fewest warps) read the values present in ``configs``."""
    if M < 1:
        raise ValueError(f"batch size must be >= 1, got {M}")
    if not configs:
        return PruneResult([], {})
    block_m_limit = _block_m_limit([c.BLOCK_SIZE_M for c in configs], M)
    fewest_warps = min(c.num_warps for c in configs)
    rules = (
        lambda c: _breaks_tile_rule(c, shape, "block_quant") or _runs_as_smaller_block_k(c, shape),
        lambda c: _breaks_tile_rule(c, shape, "fp4_group"),
        lambda c: shared_memory_lower_bound(c, shape.dtype) > device.shared_memory_bytes,
        lambda c: c.BLOCK_SIZE_M > block_m_limit,
        lambda c: _replicated_warps(c, fewest_warps),
    )
    checks = list(zip(REASONS, rules, strict=True))
    kept: list[Config] = []
    dropped: dict[str, int] = {}
    for config in configs:
        reason = next((name for name, breaks in checks if breaks(config)), None)
        if reason is None:
            kept.append(config)
        else:
            dropped[reason] = dropped.get(reason, 0) + 1
    return PruneResult(kept, dropped)
