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
    INT4_W4A16 = "int4_w4a16"
    MXFP4 = "mxfp4"
    NVFP4 = "nvfp4"

    @classmethod
    def parse_list(cls, text: str) -> list["DType"]:
        """``"bf16,fp8_w8a8"`` → the dtypes, each once, in the order given (blanks around a name
        ignored): the one reading of a comma-separated dtype list (``--dtype``, a job spec's
        ``dtypes`` string). ValueError naming the known dtypes, or for an empty list."""
        try:
            dtypes = [cls(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"expected dtypes from {', '.join(d.value for d in cls)}, got {text!r}") from None
        if not dtypes:
            raise ValueError("expected at least one dtype")
        return list(dict.fromkeys(dtypes))


INT4_DEFAULT_GROUP = 128
"""int4_w4a16's scale group along K when a checkpoint names none: GPTQ's and AWQ's default."""

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
        """Build from a server config entry; extra keys (e.g. ``num_ctas``) are ignored. ValueError
        when a key is missing or a value is not a positive integer (a server passes the values to
        Triton as they are: ``16.5``, ``"16"`` or ``1e400`` are no launch parameter)."""
        if not isinstance(data, dict):
            raise ValueError(f"config entry must be a JSON object, got {data!r:.60}")
        missing = [k for k in CONFIG_KEYS if k not in data]
        if missing:
            raise ValueError(f"config entry lacks {', '.join(missing)}: {data}")
        bad = {k: data[k] for k in CONFIG_KEYS
               if isinstance(data[k], bool) or not isinstance(data[k], int) or data[k] < 1}
        if bad:
            raise ValueError(f"config values must be positive integers, got {bad}")
        return cls(**{k: int(data[k]) for k in CONFIG_KEYS})

    @property
    def label(self) -> str:
        return (f"M{self.BLOCK_SIZE_M}_N{self.BLOCK_SIZE_N}_K{self.BLOCK_SIZE_K}"
                f"_G{self.GROUP_SIZE_M}_w{self.num_warps}_s{self.num_stages}")


@dataclass(frozen=True)
class MoEShape:
    """The shapes one GPU's fused-MoE kernel sees.

    ``block_shape`` is ``(bn, bk)`` for block fp8, and ``(0, group_size)`` for int4_w4a16 (the
    servers' own encoding: one scale per ``group_size`` weights along K, no N blocking; a block
    shape with a 0 is not part of file names).

    ``w13`` is ``[E, 2N, K]`` (gate rows first, then up rows), or ``[E, N, K]`` for non-gated
    experts (``gated`` False: Nemotron-H's relu² experts); ``w2`` is ``[E, K, N]``; ``N`` is the
    ``N`` of the servers' config file names (intermediate size per GPU, gated or not).

    The layout fields change the routing the kernel sees, not its weights:

    - ``ep``: expert-parallel size. The ``E - fused_shared`` routed experts here are one GPU's
      share of ``(E - fused_shared) * ep``; tokens pick top-k over all of them and only the pairs
      routed here are computed (vLLM's TP+EP layout: every GPU gets all M tokens, so about
      ``M * topk / ep`` pairs).
    - ``fused_shared``: shared experts appended after the routed ones (SGLang's shared-expert
      fusion): ``topk`` counts the extra slot that every token routes to one of them.

    ``per_channel``: fp8_w8a8 with one weight scale per output channel and per-token dynamic
    activation scales (compressed-tensors' channel strategy; SGLang names the file
    ``,per_channel_quant=True``).
    """

    E: int
    N: int
    K: int
    topk: int
    dtype: DType
    block_shape: tuple[int, int] | None = None
    gated: bool = True
    ep: int = 1
    fused_shared: int = 0
    per_channel: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", DType(self.dtype))
        if self.block_shape is not None:
            object.__setattr__(self, "block_shape", tuple(int(v) for v in self.block_shape))
        if self.per_channel and (self.dtype is not DType.FP8_W8A8 or self.block_shape is not None):
            raise ValueError("per_channel applies to fp8_w8a8 without a block shape")
        if self.ep < 1 or not 0 <= self.fused_shared < self.E:
            raise ValueError(f"bad layout: ep={self.ep}, fused_shared={self.fused_shared} of E={self.E}")

    @property
    def routed_experts(self) -> int:
        """Routed experts over all GPUs (what the router picks from)."""
        return (self.E - self.fused_shared) * self.ep

    @property
    def up_rows(self) -> int:
        """Rows of ``w13`` per expert: 2N gated (gate and up), N otherwise."""
        return 2 * self.N if self.gated else self.N

    @property
    def pairs_per_token(self) -> float:
        """Token-expert pairs this GPU's kernel computes per token, on average: the routed top-k
        spread over ``ep`` GPUs, plus the fused shared expert's slot."""
        fused_slot = 1 if self.fused_shared else 0
        return (self.topk - fused_slot) / self.ep + fused_slot

    def layout_fields(self) -> dict:
        """The layout fields that differ from the defaults (journal records and labels)."""
        fields = {}
        if not self.gated:
            fields["gated"] = False
        if self.ep != 1:
            fields["ep"] = self.ep
        if self.fused_shared:
            fields["fused_shared"] = self.fused_shared
        if self.per_channel:
            fields["per_channel"] = True
        return fields

    @property
    def group_size(self) -> int | None:
        """int4_w4a16's scale group along K (None for other dtypes)."""
        return self.block_shape[1] if self.dtype is DType.INT4_W4A16 and self.block_shape else None

    @property
    def label(self) -> str:
        bs = f",block_shape=[{self.block_shape[0]},{self.block_shape[1]}]" if self.block_shape else ""
        layout = "".join(f",{k}={v}" for k, v in self.layout_fields().items())
        return f"E={self.E},N={self.N},K={self.K},topk={self.topk},dtype={self.dtype.value}{bs}{layout}"


@dataclass(frozen=True)
class WeightGrid:
    """A quantized checkpoint's format, whose grid ``compare``'s master weights are drawn on
    (``workers.problem.build_problem``): the dtype, its block shape (fp8 ``(bn, bk)``, int4_w4a16
    ``(0, group)``) and whether fp8 weights have one scale per output channel."""

    dtype: DType
    block_shape: tuple[int, int] | None = None
    per_channel: bool = False

    @property
    def int4_group(self) -> int:
        """int4_w4a16's named group size along C (``INT4_DEFAULT_GROUP`` when not given; -1: channel-wise)."""
        return self.block_shape[1] if self.block_shape else INT4_DEFAULT_GROUP

    @property
    def label(self) -> str:
        """``mxfp4``, ``fp8_w8a8 block [128, 128]``, ``fp8_w8a8 per channel``, ``int4_w4a16 group 128``, ..."""
        if self.dtype is DType.INT4_W4A16:
            group = self.int4_group
            return f"{self.dtype.value} " + ("channel-wise" if group == -1 else f"group {group}")
        if self.block_shape:
            return f"{self.dtype.value} block [{self.block_shape[0]}, {self.block_shape[1]}]"
        if self.dtype is DType.FP8_W8A8:
            return f"{self.dtype.value} per " + ("channel" if self.per_channel else "tensor")
        return self.dtype.value


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
