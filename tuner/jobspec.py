"""The job spec: one YAML file that says everything a nightly tuning run does.

A platform team keeps this file in a ConfigMap and submits ``moe-tune job run job.yaml`` with
``ray job submit`` (see docker/README.md). It is validated at the edge (pydantic, unknown keys
refused) so a typo fails in seconds with one line, not hours into a GPU run. Relative paths are
taken from the working directory, as the same values given as ``moe-tune tune`` flags would be.

The spec expands into tune runs (one per parallel layout and routing; each run covers every
model and dtype) and, when a gate is given, bench checks of the fresh configs against a
reference folder (one per model, layout, dtype and routing).

The servers' file names carry no routing, so a job with several routings writes each routing's
run to its own subfolder of ``output.dir`` (``routing=uniform``, ``routing=zipf-1.2``, …; see
``routing_folder``) and gates each under its own routing; a one-routing job writes to
``output.dir`` itself.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, field_validator

from tuner.errors import UsageError
from tuner.options import TuneOptions
from tuner.plan import resolve_batch_sizes
from tuner.search import STRATEGIES
from tuner.validation import one_line
from workers.records import DType
from workers.routing import parse_routing


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Layout(_Strict):
    """GPUs per MoE layer as the server runs it: ``tp`` tensor-parallel size, ``ep`` expert-parallel
    size dividing it (``tp: 2, ep: 2`` is vLLM's expert parallelism on 2 GPUs)."""

    tp: PositiveInt = 1
    ep: PositiveInt = 1

    @field_validator("ep")
    @classmethod
    def _ep_divides_tp(cls, ep: int, info) -> int:
        tp = info.data.get("tp", 1)
        if tp % ep:
            raise ValueError(f"ep={ep} must divide tp={tp}")
        return ep

    @property
    def label(self) -> str:
        return f"tp={self.tp}" + (f",ep={self.ep}" if self.ep > 1 else "")


class Output(_Strict):
    dir: Path = Path("configs_out")
    format: Literal["vllm", "sglang", "both"] = "vllm"


class Gate(_Strict):
    """Fail the job when a fresh config is slower than the reference folder's at any batch size
    by more than the ratio (reference latency / fresh latency < ``fail_if_slower``)."""

    reference: Path
    fail_if_slower: float = Field(0.98, gt=0.0, le=1.0)
    batch_sizes: list[PositiveInt] | None = None  # default: the job's batch sizes
    rounds: PositiveInt = 20  # interleaved timing rounds per batch size


class JobSpec(_Strict):
    name: str = "moe-tune-job"
    models: list[str] = Field(min_length=1)
    dtypes: list[DType] = Field(min_length=1)
    block_shape: tuple[PositiveInt, PositiveInt] | None = None
    layouts: list[Layout] = Field(default_factory=lambda: [Layout()], min_length=1)
    batch_sizes: list[PositiveInt] | None = None
    routing: list[str] = Field(default_factory=lambda: ["uniform"], min_length=1)
    search_space: Path | None = None
    strategy: str | None = None
    budget_minutes: PositiveFloat | None = None  # per tune run: a nightly job must end before the next one
    baseline: list[Path] = Field(default_factory=list)  # config folders the new configs are timed against
    output: Output = Output()
    journal: Path | None = None
    address: str | None = None
    workers: PositiveInt | None = None
    interpret: bool = False
    gate: Gate | None = None

    @field_validator("models", "routing")
    @classmethod
    def _no_blank_entries(cls, values: list[str]) -> list[str]:
        if any(not v.strip() for v in values):
            raise ValueError("entries must not be empty")
        return values

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str | None) -> str | None:
        if value is not None and value not in STRATEGIES:
            raise ValueError(f"unknown strategy {value!r}; expected one of {', '.join(sorted(STRATEGIES))}")
        return value


@dataclass(frozen=True)
class TuneRun:
    """One ``moe-tune tune`` invocation of the job."""

    layout: Layout
    routing: str
    options: TuneOptions

    @property
    def out(self) -> Path:
        """Where this run writes its files."""
        return Path(self.options.out)

    @property
    def label(self) -> str:
        return f"{self.layout.label} routing={self.routing}"


@dataclass(frozen=True)
class GateCheck:
    """One bench comparison of the job's fresh configs against the gate's reference folder."""

    model: str
    layout: Layout
    dtype: DType
    routing: str
    fresh: Path  # the folder the tune run of this routing wrote

    @property
    def label(self) -> str:
        return f"{self.model} {self.layout.label} {self.dtype.value} routing={self.routing}"


def routing_folder(routing: str) -> str:
    """A file-system-safe folder name for a routing spec, equal for equal routings (``zipf:1.2``
    and ``zipf:1.20``) and distinct otherwise: ``routing=uniform``, ``routing=zipf-1.2``,
    ``routing=file-<stem>-<8 hex digits of the path>``. Raises ValueError for a bad spec."""
    parsed = parse_routing(routing)
    if parsed.kind == "file":
        name = f"file-{Path(parsed.path).stem}-{hashlib.sha256(parsed.path.encode()).hexdigest()[:8]}"
    elif parsed.kind == "zipf":
        name = f"zipf-{parsed.alpha:g}"
    else:
        name = parsed.kind
    return "routing=" + re.sub(r"[^A-Za-z0-9._+-]", "-", name)


def output_dir(spec: JobSpec, routing: str) -> Path:
    """Where the tune run of ``routing`` writes: ``output.dir``, or its routing subfolder when
    the job has several routings."""
    return spec.output.dir if len(spec.routing) == 1 else spec.output.dir / routing_folder(routing)


def load_job_spec(path: Path) -> JobSpec:
    """Read and validate a job file; every problem is a one-line UsageError naming the file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read job spec: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UsageError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a job spec is a YAML mapping (models, dtypes, ...)")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise UsageError(one_line(exc, str(path))) from None


def tune_runs(spec: JobSpec) -> list[TuneRun]:
    """The tune runs, in order: layouts outermost, then routings; each the ``TuneOptions`` that
    ``moe-tune tune`` would build from the same values given as flags."""
    common = dict(
        model=list(spec.models), dtype=list(spec.dtypes), block_shape=spec.block_shape,
        batch_sizes=resolve_batch_sizes(spec.batch_sizes) if spec.batch_sizes else None,
        baseline=list(spec.baseline), out=str(spec.output.dir), format=spec.output.format, address=spec.address,
        workers=spec.workers, interpret=spec.interpret, budget_minutes=spec.budget_minutes,
        journal=str(spec.journal) if spec.journal else None)
    if spec.search_space:
        common["search_space"] = str(spec.search_space)
    if spec.strategy:
        common["strategy"] = spec.strategy
    return [TuneRun(layout, routing, TuneOptions(tp=layout.tp, ep=layout.ep, routing=routing,
                                                 **{**common, "out": str(output_dir(spec, routing))}))
            for layout in spec.layouts for routing in spec.routing]


def gate_checks(spec: JobSpec) -> list[GateCheck]:
    if spec.gate is None:
        return []
    return [GateCheck(model, layout, dtype, routing, output_dir(spec, routing))
            for model in spec.models for layout in spec.layouts for dtype in spec.dtypes for routing in spec.routing]
