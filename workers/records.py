"""Typed records shared by the driver (``tuner/``) and the GPU side (``workers/``).

This is the one module both sides import; it depends on nothing but the standard library so
that a Ray actor can unpickle every record without importing the driver.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


class DType(str, Enum):
    """Weight/activation formats the fused-MoE kernel runs (names as in vLLM's tuner)."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP8_W8A8 = "fp8_w8a8"
    INT8_W8A16 = "int8_w8a16"
    MXFP4 = "mxfp4"
    NVFP4 = "nvfp4"


CONFIG_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")


@dataclass(frozen=True, order=True)
class Config:
    """One launch configuration of the fused-MoE kernel; keys and meaning as vLLM's/SGLang's."""

    BLOCK_SIZE_M: int
    BLOCK_SIZE_N: int
    BLOCK_SIZE_K: int
    GROUP_SIZE_M: int
    num_warps: int
    num_stages: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        """Build from a server config entry; extra keys (e.g. ``num_ctas``) are ignored."""
        missing = [k for k in CONFIG_KEYS if k not in data]
        if missing:
            raise ValueError(f"config entry lacks {', '.join(missing)}: {data}")
        return cls(**{k: int(data[k]) for k in CONFIG_KEYS})

    @property
    def label(self) -> str:
        return (f"M{self.BLOCK_SIZE_M}_N{self.BLOCK_SIZE_N}_K{self.BLOCK_SIZE_K}"
                f"_G{self.GROUP_SIZE_M}_w{self.num_warps}_s{self.num_stages}")


@dataclass(frozen=True)
class MoEShape:
    """The shapes one GPU's fused-MoE kernel sees.

    ``w13`` is ``[E, 2N, K]`` (gate rows first, then up rows), ``w2`` is ``[E, K, N]``;
    ``N`` is the ``N`` of vLLM's config file names (intermediate size per GPU).
    """

    E: int
    N: int
    K: int
    topk: int
    dtype: DType
    block_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", DType(self.dtype))
        if self.block_shape is not None:
            object.__setattr__(self, "block_shape", tuple(int(v) for v in self.block_shape))

    @property
    def label(self) -> str:
        bs = f",block_shape=[{self.block_shape[0]},{self.block_shape[1]}]" if self.block_shape else ""
        return f"E={self.E},N={self.N},K={self.K},topk={self.topk},dtype={self.dtype.value}{bs}"


class Gemm(str, Enum):
    """Which part of the MoE a candidate times: the whole op, or one GEMM (SGLang's split)."""

    BOTH = "both"
    UP = "up"
    DOWN = "down"


class Level(str, Enum):
    """How thoroughly a candidate is timed: a cheap screen to drop clear losers, or the full timing
    that selection relies on (``workers.timing`` has the numbers). Part of the journal key."""

    SCREEN = "screen"
    FULL = "full"


class Status(str, Enum):
    OK = "ok"
    COMPILE_ERROR = "compile_error"
    OUT_OF_RESOURCES = "out_of_resources"
    WRONG_RESULT = "wrong_result"
    TIMEOUT = "timeout"
    CRASHED = "crashed"


@dataclass(frozen=True)
class Candidate:
    """One thing to measure: a config for one shape, batch size, routing and GEMM part."""

    shape: MoEShape
    M: int
    config: Config
    gemm: Gemm = Gemm.BOTH
    routing: str = "uniform"
    level: Level = Level.FULL


@dataclass
class Measurement:
    """What a worker reports for one candidate; ``latency_us`` is set only when status is ok."""

    candidate: Candidate
    status: Status
    latency_us: float | None = None
    spread_us: float | None = None
    rel_err: float | None = None
    device: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status is Status.OK
