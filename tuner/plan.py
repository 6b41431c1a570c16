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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from tuner import dispatch
from tuner.dispatch import Padding, ServerKernel
from tuner.errors import UsageError
from tuner.models import ModelSpec, derive_shape, load_model
from tuner.naming import builtin_file_name, sglang_file_name, vllm_file_name
from tuner.spaces import DeviceLimits, SearchSpace, load_space, prune
from workers.formats import block_shape_dtypes, format_of
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

    ``file_name`` / ``sglang_file_name`` are None where that server reads no file of this shape;
    ``builtin_file_name`` is set instead for moe-tune's own fp4 kernel (written apart)."""

    model: str
    shape: MoEShape
    tp: int
    ep: int
    file_name: str | None  # vLLM's
    sglang_file_name: str | None
    candidates: dict[int, list[Config]]
    dropped_by_reason: dict[int, dict[str, int]]
    builtin_file_name: str | None = None
    padding: Padding | None = None
    servers: tuple[ServerKernel, ...] = ()

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
            "builtin_file_name": self.builtin_file_name,
            "padding": _padding_json(self.padding),
            "servers": [_server_json(k) for k in self.servers],
            "dropped_per_batch": {str(M): d for M, d in self.dropped_by_reason.items()},
        }


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
    """One kernel shape of the plan and the models (names) that land on it; ``unpadded``: for
    mxfp4, the per-GPU (N, K) before the servers' padding, which depends on the GPU."""

    models: tuple[str, ...]
    shape: MoEShape
    tp: int
    ep: int
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
        if not device_name.strip():
            raise UsageError("the device name is empty")
        configs = self.space.expand()
        limits = DeviceLimits.for_device(device_name)
        arch = dispatch.gpu_arch(device_name)
        # job shape -> (models, servers reading its file, padding, builtin)
        by_shape: dict[MoEShape, tuple[list[str], list[ServerKernel], list[Padding], list[bool]]] = {}
        elsewhere: list[ServedElsewhere] = []
        for planned in self.shapes:
            shape, padding = planned.on(arch)
            kernels = tuple(dispatch.server_kernel(server, shape.dtype, arch, planned.ep)
                            for server in dispatch.SERVERS)
            targets = [(replace(shape, dtype=k.file_dtype), k) for k in kernels if k.reads_config]
            if self.builtin_fp4 and shape.dtype not in dispatch.SERVER_READ_DTYPES:
                targets.append((shape, None))
            others = tuple(k for k in kernels if not k.reads_config)
            if others:
                elsewhere += [ServedElsewhere(m, shape, planned.tp, planned.ep, padding, others)
                              for m in planned.models]
            for target, kernel in targets:
                names, servers, paddings, builtin = by_shape.setdefault(target, ([], [], [], []))
                names += [m for m in planned.models if m not in names]
                if kernel is not None and kernel not in servers:
                    servers.append(kernel)
                if padding is not None:
                    paddings.append(padding)
                builtin.append(kernel is None)
        tp, ep = (self.shapes[0].tp, self.shapes[0].ep) if self.shapes else (1, 1)
        jobs = []
        for shape, (names, servers, paddings, builtin) in by_shape.items():
            results = {M: prune(configs, shape, M, limits) for M in self.batch_sizes}
            readers = {k.server for k in servers}
            jobs.append(Job(
                model=", ".join(names), shape=shape, tp=tp, ep=ep,
                file_name=vllm_file_name(shape, device_name) if "vllm" in readers else None,
                sglang_file_name=sglang_file_name(shape, device_name) if "sglang" in readers else None,
                builtin_file_name=builtin_file_name(shape, device_name) if any(builtin) else None,
                candidates={M: r.kept for M, r in results.items()},
                dropped_by_reason={M: r.dropped_by_reason for M, r in results.items()},
                padding=paddings[0] if paddings else None, servers=tuple(servers),
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
        raise UsageError(f"batch sizes must be positive (>= 1), got {min(batch_sizes)}")
    return sorted(set(batch_sizes))


def plan(models: Sequence[str | ModelSpec], tp: int, ep: int, dtypes: Sequence[DType | str] | None,
         block_shape: tuple[int, int] | None, batch_sizes: Sequence[int] | None, space: SearchSpace | str,
         builtin_fp4: bool = False) -> Plan:
    """Plan the kernel shapes of ``models`` (names, paths or specs) served with ``tp``/``ep`` in each
    of ``dtypes`` (None or empty: each model's own dtype); ``builtin_fp4``: also moe-tune's own fp4
    kernel (``Plan.builtin_fp4``). UsageError on bad input."""
    if not models:
        raise UsageError("name at least one model")
    wanted = [DType(d) for d in dtypes] if dtypes else [None]
    if block_shape is not None and not any(d is not None and format_of(d).block_shapes for d in wanted):
        names = block_shape_dtypes()
        raise UsageError(f"--block-shape applies to {', '.join(names)}; add --dtype {names[0]}")
    sizes = resolve_batch_sizes(batch_sizes)
    space = space if isinstance(space, SearchSpace) else load_space(space)

    by_shape: dict[tuple[MoEShape, tuple[int, int] | None], list[str]] = {}
    for model in models:
        spec = model if isinstance(model, ModelSpec) else load_model(model)
        for dtype in wanted:
            block = block_shape if dtype is not None and format_of(dtype).block_shapes else None
            shape = derive_shape(spec, tp=tp, ep=ep, dtype=dtype, block_shape=block)
            unpadded = (spec.intermediate_size // (tp // ep), spec.hidden_size) if shape.dtype is DType.MXFP4 else None
            names = by_shape.setdefault((shape, unpadded), [])
            if spec.name not in names:
                names.append(spec.name)
    return Plan([PlannedShape(tuple(names), shape, tp, ep, unpadded) for (shape, unpadded), names in by_shape.items()],
                sizes, space, builtin_fp4)


def build_plan(models: Sequence[str | ModelSpec], tp: int, ep: int, dtypes: Sequence[DType | str] | None,
               block_shape: tuple[int, int] | None, batch_sizes: Sequence[int] | None,
               space: SearchSpace | str, device_name: str, builtin_fp4: bool = False) -> DevicePlan:
    """``plan(...)`` for ``device_name`` (``moe-tune plan``)."""
    if not device_name.strip():
        raise UsageError("the device name is empty")
    return plan(models, tp, ep, dtypes, block_shape, batch_sizes, space, builtin_fp4).for_device(device_name)
