"""A tuning plan: one job per distinct kernel shape, with the pruned candidates per batch size.

``plan`` builds it once, device-independent: the kernel shapes of models × dtypes under one
parallel layout (models that land on the same shape — E, N, K, top-k, dtype, block shape — share
one job and one output file), the batch sizes and the search space. ``Plan.for_device`` prunes it
for one GPU (pruning depends on its limits): a ``DevicePlan`` of ``Job``s, which the search
runs (``tuner.search.SearchJob`` holds the job itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tuner.errors import UsageError
from tuner.models import ModelSpec, derive_shape, load_model
from tuner.naming import sglang_file_name, vllm_file_name
from tuner.spaces import DeviceLimits, SearchSpace, load_space, prune
from workers.formats import block_shape_dtypes, format_of
from workers.records import Config, DType, MoEShape

# vLLM's and SGLang's default tuning batch sizes.
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096)


@dataclass(frozen=True)
class Job:
    """One kernel shape to tune: its output file names and the candidates left per batch size."""

    model: str
    shape: MoEShape
    tp: int
    ep: int
    file_name: str  # vLLM's
    sglang_file_name: str
    candidates: dict[int, list[Config]]
    dropped_by_reason: dict[int, dict[str, int]]

    @property
    def batch_sizes(self) -> list[int]:
        return list(self.candidates)

    def to_json(self) -> dict:
        shape = self.shape
        return {
            "model": self.model,
            "dtype": shape.dtype.value,
            "E": shape.E,
            "N": shape.N,
            "K": shape.K,
            "topk": shape.topk,
            "block_shape": list(shape.block_shape) if shape.block_shape else None,
            "file_name": self.file_name,
            "batch_sizes": self.batch_sizes,
            "configs_per_batch": {str(M): len(c) for M, c in self.candidates.items()},
            "tp": self.tp,
            "ep": self.ep,
            "sglang_file_name": self.sglang_file_name,
            "dropped_per_batch": {str(M): d for M, d in self.dropped_by_reason.items()},
        }


@dataclass(frozen=True)
class PlannedShape:
    """One kernel shape of the plan and the models (names) that land on it."""

    models: tuple[str, ...]
    shape: MoEShape
    tp: int
    ep: int


@dataclass(frozen=True)
class Plan:
    """The device-independent plan: shapes, batch sizes, search space."""

    shapes: list[PlannedShape]
    batch_sizes: list[int]
    space: SearchSpace

    def for_device(self, device_name: str) -> "DevicePlan":
        """The plan pruned for ``device_name`` (as torch names the GPU; UsageError when empty)."""
        if not device_name.strip():
            raise UsageError("the device name is empty")
        configs = self.space.expand()
        limits = DeviceLimits.for_device(device_name)
        jobs = []
        for planned in self.shapes:
            shape = planned.shape
            results = {M: prune(configs, shape, M, limits) for M in self.batch_sizes}
            jobs.append(Job(
                model=", ".join(planned.models), shape=shape, tp=planned.tp, ep=planned.ep,
                file_name=vllm_file_name(shape, device_name),
                sglang_file_name=sglang_file_name(shape, device_name),
                candidates={M: r.kept for M, r in results.items()},
                dropped_by_reason={M: r.dropped_by_reason for M, r in results.items()},
            ))
        return DevicePlan(device_name=device_name, space=self.space, jobs=jobs, limits=limits)


@dataclass(frozen=True)
class DevicePlan:
    """The plan pruned for one GPU."""

    device_name: str
    space: SearchSpace
    jobs: list[Job]
    limits: DeviceLimits

    @property
    def total_candidates(self) -> int:
        return sum(len(c) for job in self.jobs for c in job.candidates.values())

    def to_json(self) -> dict:
        return {
            "jobs": [job.to_json() for job in self.jobs],
            "device_name": self.device_name,
            "shared_memory_bytes": self.limits.shared_memory_bytes,
            "device_known": self.limits.known,
            "search_space": self.space.name,
            "space_size": self.space.size,
            "total_candidates": self.total_candidates,
        }


def resolve_batch_sizes(batch_sizes: Sequence[int] | None, default: Sequence[int] = DEFAULT_BATCH_SIZES) -> list[int]:
    """The batch sizes to tune, the one place they are defaulted and checked: ``default`` when
    none are given; each at least 1 (UsageError otherwise); sorted, each once."""
    if not batch_sizes:
        return sorted(set(default))
    if min(batch_sizes) < 1:
        raise UsageError(f"batch sizes must be positive (>= 1), got {min(batch_sizes)}")
    return sorted(set(batch_sizes))


def plan(models: Sequence[str | ModelSpec], tp: int, ep: int, dtypes: Sequence[DType | str] | None,
         block_shape: tuple[int, int] | None, batch_sizes: Sequence[int] | None, space: SearchSpace | str) -> Plan:
    """Plan the kernel shapes of ``models`` (names, paths or specs) served with ``tp``/``ep`` in each
    of ``dtypes`` (None or empty: each model's own dtype). UsageError on bad input."""
    if not models:
        raise UsageError("name at least one model")
    wanted = [DType(d) for d in dtypes] if dtypes else [None]
    if block_shape is not None and not any(d is not None and format_of(d).block_shapes for d in wanted):
        names = block_shape_dtypes()
        raise UsageError(f"--block-shape applies to {', '.join(names)}; add --dtype {names[0]}")
    sizes = resolve_batch_sizes(batch_sizes)
    space = space if isinstance(space, SearchSpace) else load_space(space)

    by_shape: dict[MoEShape, list[str]] = {}
    for model in models:
        spec = model if isinstance(model, ModelSpec) else load_model(model)
        for dtype in wanted:
            block = block_shape if dtype is not None and format_of(dtype).block_shapes else None
            shape = derive_shape(spec, tp=tp, ep=ep, dtype=dtype, block_shape=block)
            names = by_shape.setdefault(shape, [])
            if spec.name not in names:
                names.append(spec.name)
    return Plan([PlannedShape(tuple(names), shape, tp, ep) for shape, names in by_shape.items()], sizes, space)


def build_plan(models: Sequence[str | ModelSpec], tp: int, ep: int, dtypes: Sequence[DType | str] | None,
               block_shape: tuple[int, int] | None, batch_sizes: Sequence[int] | None,
               space: SearchSpace | str, device_name: str) -> DevicePlan:
    """``plan(...)`` pruned for ``device_name`` (``moe-tune plan``)."""
    if not device_name.strip():
        raise UsageError("the device name is empty")
    return plan(models, tp, ep, dtypes, block_shape, batch_sizes, space).for_device(device_name)
