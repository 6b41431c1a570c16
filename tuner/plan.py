"""A tuning plan: one job per distinct kernel shape, with the pruned candidates per batch size.

``plan`` builds it once, device-independent: the kernel shapes of models × dtypes under one
parallel layout (models that land on the same shape — E, N, K, top-k, dtype, block shape — share
one job and one output file), the batch sizes and the search space. ``Plan.for_device`` makes it
for one GPU: a ``DevicePlan`` of ``Job``s, which the search runs
(``tuner.search.SearchJob`` holds the job itself). What a GPU changes: pruning (its limits), mxfp4's padded
sizes, and the kernel each server runs there (``tuner.dispatch``): a dtype a server runs with its
fused-MoE Triton kernel gives a job whose file that server reads; a dtype it runs with another
kernel (mxfp4 through triton_kernels' matmul_ogs on Hopper, nvfp4 through Marlin, ...) gives no
job, only an entry in ``DevicePlan.served_elsewhere``, unless moe-tune's builtin fp4 kernel is asked
for (``builtin_fp4``): then a job whose file is written apart (``naming.BUILTIN_FOLDER``).

Jobs come from models (each distinct MoE layer shape) × dtypes × servers under one parallel
layout; what lands on the same kernel shape (same E, N, K, top-k, dtype, block shape, layout)
shares one job and one output file per server. The servers differ where SGLang fuses shared
experts into the routed ones (E + shared): then each server has its own job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from tuner import dispatch
from tuner.dispatch import Padding, ServerKernel
from tuner.errors import OptionError, UsageError
from tuner.models import (SERVERS, ModelSpec, derive_shape, dtype_block_shape, load_model,
                          sglang_fused_shared_experts)
from tuner.naming import builtin_file_name, device_name_problem, sglang_file_name, vllm_file_name
from tuner.spaces import DeviceLimits, SearchSpace, load_space, prune
from tuner.writers import format_servers
from workers.formats import block_shape_dtypes
from workers.records import Config, DType, MoEShape

# vLLM's and SGLang's default tuning batch sizes.
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096)


def _padding_json(padding: Padding | None) -> dict | None:
    if padding is None:
        return None
    return {"N": padding.N, "K": padding.K, "padded_N": padding.padded_N, "padded_K": padding.padded_K,
            "rule": padding.rule}


def _server_json(kernel: ServerKernel) -> dict:
    return {"server": kernel.server, "kernel": kernel.kernel, "reads_config": kernel.reads_config, "why": kernel.why}


@dataclass(frozen=True)
class Job:
    """One kernel shape to tune: its output file names and the candidates left per batch size.

    ``servers`` are the servers whose kernel runs this shape and reads its file (``kernels``: what
    each of them dispatches, ``tuner.dispatch``); ``file_name`` / ``sglang_file_name`` are None
    where that server reads no file of this shape; ``builtin_file_name`` is set instead for
    moe-tune's own fp4 kernel (written apart). ``sources`` names the config field behind E, N, K
    and top-k; ``notes`` say what the layout does to the kernel (expert parallelism, SGLang's
    shared-expert fusion).
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
    builtin_file_name: str | None = None
    padding: Padding | None = None
    kernels: tuple[ServerKernel, ...] = ()

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
            "builtin_file_name": self.builtin_file_name,
            "padding": _padding_json(self.padding),
            "kernels": [_server_json(k) for k in self.kernels],
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
class ServedElsewhere:
    """A model and dtype that some server (``servers``: what each of them runs instead) does not
    run with a fused-MoE kernel reading a config file on this GPU: nothing to tune for it."""

    model: str
    shape: MoEShape
    tp: int
    ep: int
    padding: Padding | None
    servers: tuple[ServerKernel, ...]

    def to_json(self) -> dict:
        shape = self.shape
        return {"model": self.model, "dtype": shape.dtype.value, "E": shape.E, "N": shape.N, "K": shape.K,
                "topk": shape.topk, "tp": self.tp, "ep": self.ep, "padding": _padding_json(self.padding),
                "servers": [_server_json(k) for k in self.servers]}


@dataclass(frozen=True)
class PlannedShape:
    """One kernel shape of the plan, the models (names) that land on it and the servers that run it,
    with the config fields behind E, N, K, top-k and the layout notes (``layout_notes``);
    ``unpadded``: for mxfp4, the per-GPU (N, K) before the servers' padding, which depends on the GPU."""

    models: tuple[str, ...]
    shape: MoEShape
    tp: int
    ep: int
    servers: tuple[str, ...] = SERVERS
    sources: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    unpadded: tuple[int, int] | None = None

    def on(self, arch: dispatch.Arch) -> tuple[MoEShape, Padding | None]:
        """The shape on a GPU of ``arch`` (mxfp4 padded as the servers pad it there)."""
        if self.unpadded is None:
            return self.shape, None
        padding = dispatch.mxfp4_padding(*self.unpadded, arch)
        return replace(self.shape, N=padding.padded_N, K=padding.padded_K), padding


@dataclass(frozen=True)
class Plan:
    """The device-independent plan: shapes, batch sizes, search space."""

    shapes: list[PlannedShape]
    batch_sizes: list[int]
    space: SearchSpace
    builtin_fp4: bool = False
    """Also plan moe-tune's builtin kernel for the fp4 dtypes, whose files no server reads."""

    def for_device(self, device_name: str) -> "DevicePlan":
        """The plan for ``device_name`` (as torch names the GPU; UsageError when empty): the jobs
        whose files a server reads there (or builtin fp4 jobs), pruned for its limits."""
        problem = device_name_problem(device_name)
        if problem:
            raise UsageError(problem)
        configs = self.space.expand()
        limits = DeviceLimits.for_device(device_name)
        arch = dispatch.gpu_arch(device_name)
        # job shape -> (models, servers reading its file, padding, builtin, the planned shapes behind it)
        by_shape: dict[MoEShape, tuple[list[str], list[ServerKernel], list[Padding], list[bool],
                                       list[PlannedShape]]] = {}
        elsewhere: list[ServedElsewhere] = []
        for planned in self.shapes:
            shape, padding = planned.on(arch)
            # only the servers whose convention gives this shape (SGLang's fused shared experts)
            kernels = tuple(dispatch.server_kernel(server, shape.dtype, arch, planned.ep)
                            for server in dispatch.SERVERS if server in planned.servers)
            targets = [(replace(shape, dtype=k.file_dtype), k) for k in kernels if k.reads_config]
            if self.builtin_fp4 and shape.dtype not in dispatch.SERVER_READ_DTYPES:
                targets.append((shape, None))
            others = tuple(k for k in kernels if not k.reads_config)
            if others:
                elsewhere += [ServedElsewhere(m, shape, planned.tp, planned.ep, padding, others)
                              for m in planned.models]
            for target, kernel in targets:
                names, servers, paddings, builtin, origins = by_shape.setdefault(target, ([], [], [], [], []))
                names += [m for m in planned.models if m not in names]
                if kernel is not None and kernel not in servers:
                    servers.append(kernel)
                if padding is not None:
                    paddings.append(padding)
                builtin.append(kernel is None)
                origins.append(planned)
        tp, ep = (self.shapes[0].tp, self.shapes[0].ep) if self.shapes else (1, 1)
        jobs = []
        for shape, (names, servers, paddings, builtin, origins) in by_shape.items():
            results = {M: prune(configs, shape, M, limits) for M in self.batch_sizes}
            readers = tuple(server for server in SERVERS if server in {k.server for k in servers})
            first = origins[0]
            jobs.append(Job(
                model=", ".join(names), shape=shape, tp=tp, ep=ep,
                file_name=vllm_file_name(shape, device_name) if "vllm" in readers else None,
                sglang_file_name=sglang_file_name(shape, device_name) if "sglang" in readers else None,
                builtin_file_name=builtin_file_name(shape, device_name) if any(builtin) else None,
                candidates={M: r.kept for M, r in results.items()},
                dropped_by_reason={M: r.dropped_by_reason for M, r in results.items()},
                servers=readers, sources=first.sources, notes=first.notes,
                padding=paddings[0] if paddings else None, kernels=tuple(servers),
            ))
        return DevicePlan(device_name=device_name, space=self.space, jobs=jobs, limits=limits,
                          served_elsewhere=elsewhere)


@dataclass(frozen=True)
class DevicePlan:
    """The plan pruned for one GPU."""

    device_name: str
    space: SearchSpace
    jobs: list[Job]
    limits: DeviceLimits
    served_elsewhere: list[ServedElsewhere] = ()

    @property
    def total_candidates(self) -> int:
        return sum(len(c) for job in self.jobs for c in job.candidates.values())

    def to_json(self) -> dict:
        return {
            "jobs": [job.to_json() for job in self.jobs],
            "served_elsewhere": [entry.to_json() for entry in self.served_elsewhere],
            "device_name": self.device_name,
            "shared_memory_bytes": self.limits.shared_memory_bytes,
            "device_known": self.limits.known,
            "search_space": self.space.name,
            "space_size": self.space.size,
            "total_candidates": self.total_candidates,
        }


BUILTIN_FP4_HELP = ("also tune moe-tune's own MXFP4/NVFP4 kernel, whose configs no server reads "
                    "(written apart, to <out>/moe-tune-builtin/)")


def nothing_to_tune(plan: DevicePlan) -> str:
    """Why a plan without jobs has nothing to tune (one line, for a usage error)."""
    what = ", ".join(sorted({f"{e.model} {e.shape.dtype.value}" for e in plan.served_elsewhere})) or "nothing asked"
    return (f"nothing to tune: no server reads a fused-MoE config file for {what} (see moe-tune plan); "
            f"time it with compare, or pass --builtin-fp4 to tune moe-tune's own fp4 kernel")


def resolve_batch_sizes(batch_sizes: Sequence[int] | None, default: Sequence[int] = DEFAULT_BATCH_SIZES) -> list[int]:
    """The batch sizes to tune, the one place they are defaulted and checked: ``default`` when
    none are given; each at least 1 (UsageError otherwise); sorted, each once."""
    if not batch_sizes:
        return sorted(set(default))
    if min(batch_sizes) < 1:
        raise OptionError("batch_sizes", f"batch sizes must be positive (>= 1), got {min(batch_sizes)}", flagged=False)
    return sorted(set(batch_sizes))


def plan(models: Sequence[str | ModelSpec], tp: int, ep: int, dtypes: Sequence[DType | str] | None,
         block_shape: tuple[int, int] | None, batch_sizes: Sequence[int] | None, space: SearchSpace | str,
         formats: str = "both", fuse_shared_experts: bool = True, builtin_fp4: bool = False) -> Plan:
    """Plan the kernel shapes of ``models`` (names, paths or specs; each distinct MoE layer shape)
    served with ``tp``/``ep`` in each of ``dtypes`` (None or empty: each model's own dtype), for
    the servers of ``formats`` ("vllm", "sglang", "both"); ``fuse_shared_experts`` False is
    SGLang's ``--disable-shared-experts-fusion``; ``builtin_fp4``: also moe-tune's own fp4 kernel
    (``Plan.builtin_fp4``). UsageError on bad input."""
    if not models:
        raise UsageError("name at least one model")
    wanted = [DType(d) for d in dtypes] if dtypes else [None]
    if block_shape is not None and not any(dtype_block_shape(d, block_shape) for d in wanted):
        names = block_shape_dtypes()
        raise OptionError("block_shape", f"applies to {', '.join(names)} only: add {names[0]} to the dtypes")
    servers = format_servers(formats)
    sizes = resolve_batch_sizes(batch_sizes)
    space = space if isinstance(space, SearchSpace) else load_space(space)

    by_shape: dict[tuple[MoEShape, tuple[int, int] | None], dict] = {}
    for model in models:
        loaded = model if isinstance(model, ModelSpec) else load_model(model)
        for spec in loaded.layer_specs():
            for dtype in wanted:
                block = dtype_block_shape(dtype, block_shape)
                for server in servers:
                    shape = derive_shape(spec, tp=tp, ep=ep, dtype=dtype, block_shape=block, server=server,
                                         fuse_shared_experts=fuse_shared_experts)
                    # mxfp4's per-GPU (N, K) before padding: the padding depends on the GPU (for_device)
                    unpadded = ((spec.intermediate_size // (tp // ep), spec.hidden_size)
                                if shape.dtype is DType.MXFP4 else None)
                    entry = by_shape.setdefault((shape, unpadded), {"names": [], "servers": [], "specs": []})
                    if spec.name not in entry["names"]:
                        entry["names"].append(spec.name)
                        entry["specs"].append(spec)
                    if server not in entry["servers"]:
                        entry["servers"].append(server)
    planned = []
    for (shape, unpadded), entry in by_shape.items():
        spec, shape_servers = entry["specs"][0], tuple(entry["servers"])
        planned.append(PlannedShape(tuple(entry["names"]), shape, tp, ep, shape_servers, spec.sources,
                                    layout_notes(spec, shape, tp, ep, shape_servers, fuse_shared_experts),
                                    unpadded))
    return Plan(planned, sizes, space, builtin_fp4)


def build_plan(models: Sequence[str | ModelSpec], tp: int, ep: int, dtypes: Sequence[DType | str] | None,
               block_shape: tuple[int, int] | None, batch_sizes: Sequence[int] | None,
               space: SearchSpace | str, device_name: str, formats: str = "both",
               fuse_shared_experts: bool = True, builtin_fp4: bool = False) -> DevicePlan:
    """``plan(...)`` for ``device_name`` (``moe-tune plan``; UsageError for a device name no file
    name can hold, ``Plan.for_device``)."""
    return plan(models, tp, ep, dtypes, block_shape, batch_sizes, space, formats,
                fuse_shared_experts, builtin_fp4).for_device(device_name)
