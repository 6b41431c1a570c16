"""A tuning plan: one job per distinct kernel shape, with the pruned candidates per batch size.

``plan`` builds it once, device-independent: the kernel shapes of models × dtypes under one
parallel layout (models that land on the same shape — E, N, K, top-k, dtype, block shape — share
one job and one output file), the batch sizes and the search space. ``Plan.for_device`` prunes it
for one GPU (pruning depends on its limits): a ``DevicePlan`` of ``Job``s, which the search
runs (``tuner.search.SearchJob`` holds the job itself).

Jobs come from models (each distinct MoE layer shape) × dtypes × servers under one parallel
layout; what lands on the same kernel shape (same E, N, K, top-k, dtype, block shape, layout)
shares one job and one output file per server. The servers differ where SGLang fuses shared
experts into the routed ones (E + shared): then each server has its own job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tuner.errors import UsageError
from tuner.models import SERVERS, ModelSpec, derive_shape, load_model, sglang_fused_shared_experts
from tuner.naming import sglang_file_name, vllm_file_name
from tuner.spaces import DeviceLimits, SearchSpace, load_space, prune
from tuner.writers import format_servers
from workers.formats import block_shape_dtypes, format_of
from workers.records import Config, DType, MoEShape

# vLLM's and SGLang's default tuning batch sizes.
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096)


@dataclass(frozen=True)
class Job:
    """One kernel shape to tune: its output file names and the candidates left per batch size.

    ``servers`` are the servers whose kernel runs this shape; a file name is None for a server
    that does not. ``sources`` names the config field behind E, N, K and top-k; ``notes`` say
    what the layout does to the kernel (expert parallelism, SGLang's shared-expert fusion).
    """

    model: str
    shape: MoEShape
    tp: int
    ep: int
    file_name: str | None  # vLLM's
    sglang_file_name: str | None
    candidates: dict[int, list[Config]]
    dropped_by_reason: dict[int, dict[str, int]]
    servers: tuple[str, ...] = SERVERS
    sources: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()

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
            "gated": shape.gated,
            "fused_shared_experts": shape.fused_shared,
            "file_name": self.file_name,
            "batch_sizes": self.batch_sizes,
            "configs_per_batch": {str(M): len(c) for M, c in self.candidates.items()},
            "tp": self.tp,
            "ep": self.ep,
            "servers": list(self.servers),
            "sglang_file_name": self.sglang_file_name,
            "sources": dict(self.sources),
            "notes": list(self.notes),
            "dropped_per_batch": {str(M): d for M, d in self.dropped_by_reason.items()},
        }


def layout_notes(spec: ModelSpec, shape: MoEShape, tp: int, ep: int, servers: tuple[str, ...],
                 fuse_shared_experts: bool) -> tuple[str, ...]:
    """What the layout and the servers' conventions do to this kernel, one line each."""
    notes = []
    if ep > 1:
        notes.append(f"expert parallelism {ep} in vLLM's TP+EP layout (--tensor-parallel-size {tp} "
                     f"--enable-expert-parallel; SGLang --tp {tp} --ep {ep}): every GPU's kernel gets all M tokens "
                     f"and computes only the pairs routed to its {shape.E - shape.fused_shared} of "
                     f"{shape.routed_experts} experts, about M*{spec.top_k}/{ep} at config key M")
    if spec.n_shared_experts and "sglang" in servers:
        fused, why = sglang_fused_shared_experts(spec, ep, fuse_shared_experts)
        if shape.fused_shared:
            notes.append(f"{why}: E={shape.E}, top-k {shape.topk}, every token also routed to a shared expert")
        elif "vllm" not in servers or fused == 0:
            notes.append(f"SGLang does not fuse shared experts here: {why}")
    if not shape.gated:
        notes.append("non-gated experts (up weight [E, N, K], no gate multiply); file name unchanged")
    if shape.dtype is DType.INT4_W4A16:
        notes += int4_kernel_notes(spec, shape)
    return tuple(notes)


def int4_kernel_notes(spec: ModelSpec, shape: MoEShape) -> list[str]:
    """Which kernel each server runs for an int4_w4a16 checkpoint, and what the file's N means.

    Facts from vLLM 0.33 (``fused_moe/oracle/int_wna16.py``: on NVIDIA GPUs the WNA16 MoE backend
    is Marlin unless ``--moe-backend triton``; ``should_moe_wna16_use_cuda``: its Triton path runs
    a CUDA kernel instead while M·topk/E <= 6 for group sizes 32/64/128) and SGLang 0.5.10
    (compressed-tensors WNA16 MoE: Marlin on CUDA, Triton on ROCm; GPTQ: Marlin; AWQ: Marlin,
    its Triton ``moe_wna16`` method when Marlin cannot take the layer or with
    ``--quantization moe_wna16``)."""
    group = "channel-wise (one scale per row)" if shape.group_size == -1 else f"group {shape.group_size} along K"
    cuda_until = (6 * shape.E) // shape.topk
    source = spec.quant_format or "a model quantized to int4"
    return [
        f"int4_w4a16 from {source}: {group}; file N={shape.N} is the intermediate size per GPU "
        f"(vLLM reads it as 2x the packed last dim of w2 [E, K, N/2] bytes; w13 is [E, {shape.up_rows}, K/2] bytes)",
        "kernels on NVIDIA GPUs: vLLM runs Marlin by default and reads this file with --moe-backend triton "
        f"(then batches up to M={cuda_until}, M*topk/E <= 6, run its moe_wna16 CUDA kernel when the group is 32/64/128); "
        "SGLang runs Marlin for compressed-tensors and GPTQ (Triton on ROCm) and reads this file for AWQ layers "
        "Marlin cannot take or with --quantization moe_wna16",
    ]


@dataclass(frozen=True)
class PlannedShape:
    """One kernel shape of the plan, the models (names) that land on it and the servers that run it,
    with the config fields behind E, N, K, top-k and the layout notes (``layout_notes``)."""

    models: tuple[str, ...]
    shape: MoEShape
    tp: int
    ep: int
    servers: tuple[str, ...] = SERVERS
    sources: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()


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
                file_name=vllm_file_name(shape, device_name) if "vllm" in planned.servers else None,
                sglang_file_name=sglang_file_name(shape, device_name) if "sglang" in planned.servers else None,
                candidates={M: r.kept for M, r in results.items()},
                dropped_by_reason={M: r.dropped_by_reason for M, r in results.items()},
                servers=planned.servers, sources=planned.sources, notes=planned.notes,
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
         block_shape: tuple[int, int] | None, batch_sizes: Sequence[int] | None, space: SearchSpace | str,
         formats: str = "both", fuse_shared_experts: bool = True) -> Plan:
    """Plan the kernel shapes of ``models`` (names, paths or specs; each distinct MoE layer shape)
    served with ``tp``/``ep`` in each of ``dtypes`` (None or empty: each model's own dtype), for
    the servers of ``formats`` ("vllm", "sglang", "both"); ``fuse_shared_experts`` False is
    SGLang's ``--disable-shared-experts-fusion``. UsageError on bad input."""
    if not models:
        raise UsageError("name at least one model")
    wanted = [DType(d) for d in dtypes] if dtypes else [None]
    if block_shape is not None and not any(d is not None and format_of(d).block_shapes for d in wanted):
        names = block_shape_dtypes()
        raise UsageError(f"--block-shape applies to {', '.join(names)}; add --dtype {names[0]}")
    servers = format_servers(formats)
    sizes = resolve_batch_sizes(batch_sizes)
    space = space if isinstance(space, SearchSpace) else load_space(space)

    by_shape: dict[MoEShape, dict] = {}
    for model in models:
        loaded = model if isinstance(model, ModelSpec) else load_model(model)
        for spec in loaded.layer_specs():
            for dtype in wanted:
                block = block_shape if dtype is not None and format_of(dtype).block_shapes else None
                for server in servers:
                    shape = derive_shape(spec, tp=tp, ep=ep, dtype=dtype, block_shape=block, server=server,
                                         fuse_shared_experts=fuse_shared_experts)
                    entry = by_shape.setdefault(shape, {"names": [], "servers": [], "specs": []})
                    if spec.name not in entry["names"]:
                        entry["names"].append(spec.name)
                        entry["specs"].append(spec)
                    if server not in entry["servers"]:
                        entry["servers"].append(server)
    planned = []
    for shape, entry in by_shape.items():
        spec, shape_servers = entry["specs"][0], tuple(entry["servers"])
        planned.append(PlannedShape(tuple(entry["names"]), shape, tp, ep, shape_servers, spec.sources,
                                    layout_notes(spec, shape, tp, ep, shape_servers, fuse_shared_experts)))
    return Plan(planned, sizes, space)


def build_plan(models: Sequence[str | ModelSpec], tp: int, ep: int, dtypes: Sequence[DType | str] | None,
               block_shape: tuple[int, int] | None, batch_sizes: Sequence[int] | None,
               space: SearchSpace | str, device_name: str, formats: str = "both",
               fuse_shared_experts: bool = True) -> DevicePlan:
    """``plan(...)`` pruned for ``device_name`` (``moe-tune plan``)."""
    if not device_name.strip():
        raise UsageError("the device name is empty")
    return plan(models, tp, ep, dtypes, block_shape, batch_sizes, space, formats,
                fuse_shared_experts).for_device(device_name)
