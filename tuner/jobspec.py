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
import types
import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

import annotated_types
import yaml
from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from tuner.errors import UsageError
from tuner.options import TuneOptions
from tuner.plan import resolve_batch_sizes
from tuner.ray_session import DEFAULT_CONNECT_TIMEOUT_S
from tuner.search import STRATEGIES
from tuner.validation import one_line, parse_yaml
from tuner.writers import DEFAULT_OUT
from workers.formats import block_shape_broken
from workers.records import DType
from workers.routing import parse_routing

FinitePositive = Annotated[float, annotated_types.Gt(0), AllowInfNan(False)]
"""A duration or budget: above 0 and finite (``.inf`` is no number of minutes), as the flags take it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Layout(_Strict):
    """GPUs per MoE layer as the server runs it: ``tp`` tensor-parallel size, ``ep`` expert-parallel
    size dividing it (``tp: 2, ep: 2`` is vLLM's expert parallelism on 2 GPUs)."""

    tp: PositiveInt = Field(1, description="tensor-parallel size: GPUs serving one MoE layer")
    ep: PositiveInt = Field(1, description="expert-parallel size, dividing tp (tp: 2, ep: 2 is vLLM's "
                                           "--enable-expert-parallel on 2 GPUs)")

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
    dir: Path = Field(DEFAULT_OUT, description="folder for the config files (vLLM's VLLM_TUNED_CONFIG_FOLDER)")
    format: Literal["vllm", "sglang", "both"] = Field(
        "vllm", description="file layout: vLLM's E=..,N=..,device_name=...json files, SGLang's "
                            "triton_X_Y_Z/ folder with _down files, or both")


class Gate(_Strict):
    """Fail the job when a fresh config is slower than the reference folder's at any batch size
    beyond ``fail_if_slower`` (a speed fraction: its time ratio, fresh time / reference time, above
    ``1 / fail_if_slower``; ``tuner.bench``), timed on the kernel the fresh configs were tuned on."""

    reference: Path = Field(description="config folder in production; must exist (an empty folder gates "
                                        "against the server's default config)")
    fail_if_slower: float = Field(0.98, gt=0.0, le=1.0,
                                  description="speed fraction: fail where a new config's time ratio (new time / "
                                              "reference time) is above 1/fail_if_slower at any M (0.98: more than "
                                              "~2% slower)")
    batch_sizes: list[PositiveInt] | None = Field(None, description="batch sizes gated (default: the job's)")
    rounds: PositiveInt = Field(20, description="interleaved timing rounds per batch size")


class JobSpec(_Strict):
    """One YAML file: everything a (nightly) tuning job does."""

    name: str = Field("moe-tune-job", description="shown in the job's log lines")
    models: list[str] = Field(min_length=1, description="preset names, config.json paths, model folders or cached "
                                                        "HF repo ids")
    dtypes: list[DType] | None = Field(None, min_length=1,
                                       description="kernel dtypes, a list or one comma-separated string (as tune's "
                                                   "--dtype; default: each model's own, as tune)")
    block_shape: tuple[PositiveInt, PositiveInt] | None = Field(
        None, description="[bn, bk] weight block shape for block-quantized fp8_w8a8, two multiples of 16")
    layouts: list[Layout] = Field(default_factory=lambda: [Layout()], min_length=1,
                                  description="parallel layouts; one tune run per layout and routing")
    batch_sizes: list[PositiveInt] | None = Field(None, description="default: vLLM's 18 batch sizes")
    routing: list[str] = Field(default_factory=lambda: ["uniform"], min_length=1,
                               description='"uniform", "zipf:<alpha>" (skewed) or "file:<path>" (captured top-k ids, .pt or .npy)')
    search_space: Path | None = Field(None, description="a search space name (default, wide, smoke) or YAML "
                                                        "file (default: the built-in default space)")
    strategy: str | None = Field(None, description="tune's --strategy: fast (the default) or exhaustive")
    kernel: str = Field("auto", description="tune's --kernel: auto (each output layout's server's own kernel where "
                                            "its code imports here, else builtin with a warning), builtin, vllm or "
                                            "sglang; the gate benches on the kernel each run tuned on")
    server_version: str | None = Field(
        None, description="tune's --server-version: whose default config baseline folders and the gate fall back "
                          "to where a folder has no file: vllm, vllm-pre-34846, sglang, or vllm==X.Y.Z / "
                          "sglang==X.Y.Z (default: the tuned server's version, else the installed vLLM's, else "
                          "vLLM's newest rule)")
    budget_minutes: FinitePositive | None = Field(
        None, description="per tune run: stop searching and write the best found so far")
    baseline: list[Path] = Field(default_factory=list, description="config folders (e.g. vLLM's shipped JSONs) "
                                                                   "timed against the winners; must exist")
    output: Output = Field(Output(), description="where the config files go")
    journal: Path | None = Field(None, description="the resume point (default: <output.dir>/"
                                                   ".moe-tune-journal.jsonl); measurements are keyed by "
                                                   "kernel, Triton, torch and GPU")
    address: str | None = Field(None, description='Ray cluster to join ("auto" inside a Ray job; default: '
                                                  "RAY_ADDRESS, else a Ray started here)")
    connect_timeout: FinitePositive = Field(DEFAULT_CONNECT_TIMEOUT_S, description="seconds to join address before "
                                                                          "the job fails with one line")
    workers: PositiveInt | None = Field(None, description="use at most this many GPU workers")
    interpret: bool = Field(False, description="no GPU: Triton interpreter on CPU workers (tiny shapes only, "
                                               "for trying a spec out)")
    gate: Gate | None = Field(None, description="optional regression gate run after every tune succeeded")

    @field_validator("models", "routing")
    @classmethod
    def _no_blank_entries(cls, values: list[str]) -> list[str]:
        if any(not v.strip() for v in values):
            raise ValueError("entries must not be empty")
        return values

    @field_validator("dtypes", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        """``"bf16,fp8_w8a8"`` as ``[bf16, fp8_w8a8]``, read as ``--dtype`` reads it (``DType.parse_list``)."""
        return DType.parse_list(value) if isinstance(value, str) else value

    @field_validator("block_shape")
    @classmethod
    def _kernel_block(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        problem = block_shape_broken(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str | None) -> str | None:
        if value is not None and value not in STRATEGIES:
            raise ValueError(f"unknown strategy {value!r}; expected one of {', '.join(sorted(STRATEGIES))}")
        return value

    @field_validator("kernel")
    @classmethod
    def _known_kernel(cls, value: str) -> str:
        from tuner.kernel_choice import refusal

        reason = refusal(value)
        if reason:
            raise ValueError(f"{value}: {reason}")
        return value

    def relative_to(self, folder: Path) -> "JobSpec":
        """The spec with its relative paths taken from ``folder`` (the spec file's): every path
        field, ``file:`` routings, and models and search spaces that name a file there (a preset,
        a cached HF repo id or a built-in space name is left as it is)."""

        def rebase(path: Path) -> Path:
            path = path.expanduser()
            return path if path.is_absolute() else folder / path

        def named_or_file(value: str) -> str:
            candidate = rebase(Path(value))
            return str(candidate) if candidate.exists() else value

        space = self.search_space
        if space is not None and (rebase(space).is_file() or not re.fullmatch(r"[\w.-]+", str(space))):
            space = rebase(space)  # a file here, or a path; a bare name is a built-in space
        routing = [f"file:{rebase(Path(r[len('file:'):]))}" if r.startswith("file:") else r for r in self.routing]
        gate = self.gate.model_copy(update={"reference": rebase(self.gate.reference)}) if self.gate else None
        return self.model_copy(update={
            "models": [named_or_file(m) for m in self.models], "search_space": space, "routing": routing,
            "baseline": [rebase(b) for b in self.baseline], "journal": rebase(self.journal) if self.journal else None,
            "output": self.output.model_copy(update={"dir": rebase(self.output.dir)}), "gate": gate})


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last
    silently: ``{tp: 1, tp: 2}`` would tune tp=2 without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_job_spec(path: Path) -> JobSpec:
    """Read and validate a job file; every problem is a one-line UsageError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read job spec: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: cannot read job spec: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = parse_yaml(text, _UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UsageError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a job spec is a YAML mapping (models, dtypes, ...)")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise UsageError(one_line(exc, str(path))) from None
    return spec.relative_to(path.resolve().parent)


def tune_runs(spec: JobSpec) -> list[TuneRun]:
    """The tune runs, in order: layouts outermost, then routings; each the ``TuneOptions`` that
    ``moe-tune tune`` would build from the same values given as flags."""
    common = dict(
        model=list(spec.models), dtype=list(spec.dtypes) if spec.dtypes else None, block_shape=spec.block_shape,
        batch_sizes=resolve_batch_sizes(spec.batch_sizes) if spec.batch_sizes else None,
        baseline=list(spec.baseline), out=str(spec.output.dir), format=spec.output.format, address=spec.address,
        connect_timeout=spec.connect_timeout,
        workers=spec.workers, interpret=spec.interpret, budget_minutes=spec.budget_minutes,
        journal=str(spec.journal) if spec.journal else None, kernel=spec.kernel, server_version=spec.server_version)
    if spec.search_space:
        common["search_space"] = str(spec.search_space)
    if spec.strategy:
        common["strategy"] = spec.strategy
    return [TuneRun(layout, routing, TuneOptions(tp=layout.tp, ep=layout.ep, routing=routing,
                                                 **{**common, "out": str(output_dir(spec, routing))}))
            for layout in spec.layouts for routing in spec.routing]


def gate_checks(spec: JobSpec, dtypes: dict[str, list[DType]]) -> list[GateCheck]:
    """The bench checks of a spec with a gate; ``dtypes``: each model's dtypes (the spec's, or the
    model's own when the spec names none)."""
    if spec.gate is None:
        return []
    return [GateCheck(model, layout, dtype, routing, output_dir(spec, routing))
            for model in spec.models for layout in spec.layouts for dtype in dtypes[model] for routing in spec.routing]


# --- the key reference (docs/job-spec.md is this function's output) ---------------------------

_BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", "≥"), (annotated_types.Lt, "lt", "<"),
           (annotated_types.Le, "le", "≤"))


def _bounds_text(metadata) -> str:
    return "".join(f" {sign} {getattr(m, attr)}" for m in metadata for kind, attr, sign in _BOUNDS if isinstance(m, kind))


def _type_text(annotation) -> str:
    """A field's type in the words a YAML author needs (no ``|``: the reference is a Markdown table)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_text(args[0]) + _bounds_text(args[1:])
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        return " or ".join(_type_text(a) for a in kept) + (" or null" if len(kept) < len(args) else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is list:
        return f"list of {_type_text(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(_type_text(a) for a in args) + "]"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "one of " + ", ".join(str(m.value) for m in annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return {Path: "path", str: "string", int: "int", float: "number", bool: "true or false"}.get(annotation,
                                                                                                str(annotation))


def _default_text(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, list):
        value = [v.model_dump() if isinstance(v, BaseModel) else v for v in value]
    return "null" if value is None else yaml.safe_dump(
        value.value if isinstance(value, Enum) else str(value) if isinstance(value, Path) else value,
        default_flow_style=True).strip().removesuffix("...").strip()


def _rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        kind = _type_text(field.annotation) + _bounds_text(field.metadata)
        rows.append(f"| `{key}` | {kind} | {_default_text(field)} | {field.description} |")
        nested = [a for a in (field.annotation, *typing.get_args(field.annotation))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        for args in typing.get_args(field.annotation):
            nested += [a for a in typing.get_args(args) if isinstance(a, type) and issubclass(a, BaseModel)]
        for sub in dict.fromkeys(nested):
            rows += _rows(sub, f"{key}[].") if typing.get_origin(field.annotation) is list else _rows(sub, f"{key}.")
    return rows


def reference_markdown() -> str:
    """The job spec's keys as a Markdown page, generated from the pydantic schema above
    (``moe-tune job keys`` prints it; docs/job-spec.md is a copy a test keeps equal)."""
    return "\n".join([
        "# Job spec keys",
        "",
        "Generated from `tuner/jobspec.py` (`moe-tune job keys`); do not edit by hand.",
        "",
        "A job spec is one YAML mapping; unknown keys are refused. Relative paths (models and search "
        "spaces that name a file, `file:` routings, `baseline`, `output.dir`, `journal`, "
        "`gate.reference`) are taken from the folder the spec file is in. `moe-tune job validate "
        "JOB.yaml` runs every check `moe-tune job run` makes before it starts (exit 0, or 2 with one "
        "line naming the key).",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
        *_rows(JobSpec),
        "",
    ])
