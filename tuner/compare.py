"""Which dtype to deploy: time every dtype of one model and layout with the kernel the named
server dispatches for it on this GPU, measure each against bf16 on the same inputs, and fill the
report's record.

Kernels (``tuner.dispatch``): dtypes the server runs with its fused-MoE Triton kernel are tuned
through the service's engine (``tuner.driver.tune``, the journal shared with ``tune``) on the
kernel ``--kernel`` resolves to (``tuner.kernel_choice``: the server's own kernel when that is the
server; moe-tune's builtin kernel otherwise, and then those numbers are not the server's). mxfp4
on Hopper runs triton_kernels' ``matmul_ogs`` in both servers: it has no config to tune and is
timed as is (``workers.backends.triton_kernels``). Kernels moe-tune cannot run (Marlin for nvfp4
on Hopper) leave the dtype without a server number. moe-tune's builtin kernel is the second
column: its tuned config for the fp4 dtypes (a search of its own on the builtin backend, one
``KernelRun`` per backend, so no fp4 candidate ever reaches a server kernel; its files, which no
server reads, are written apart in ``moe-tune-builtin/`` only on request: ``--builtin-fp4``), the
tuned config re-timed in it for the others. Recommendations rank
server-kernel numbers only.

Accuracy is measured in the same Ray session: on one pool worker (``tuner.pool``), one call per
batch size and shape (``BenchmarkWorker.relative_errors``), the problem of every dtype is built
from the same seed (the same x, routing and master weights, quantized per dtype; seed = M as the
tuner's correctness check uses) and each tuned config's output compared with the bf16 output at
the same shape; matmul_ogs (one Ray task on one GPU) is compared with matmul_ogs bf16 (gpt-oss's
SwiGLU) and checked against the fp32 reference. When the model's checkpoint is quantized
(``ModelSpec.checkpoint_grid``: gpt-oss → mxfp4, DeepSeek-V3 → block fp8, GPTQ → int4, ...), the
master weights are drawn on that format's grid (``workers.problem.build_problem``'s ``grid``), so
bf16 is the checkpoint as deployed in bf16, the checkpoint's own dtype carries only kernel error,
and every other dtype's error is against the checkpoint; the report says which reference it used.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ray

from tuner import dispatch, driver, roofline, writers
from tuner.errors import RunFailed
from tuner.kernel_choice import KernelRun
from tuner.models import ModelSpec
from tuner.plan import Plan
from tuner.pool import Done, start_pool
from tuner.progress import Progress
from tuner.ray_session import DEFAULT_CONNECT_TIMEOUT_S, ray_session
from tuner.report import (DEFAULT_MAX_REL_ERR, REFERENCE, ComparisonResults, PointResult, measured_point,
                          summarize_dtype)
from tuner.search import SearchJob
from tuner.select import Selection
from workers.backends import BUILTIN
from workers.backends.base import describe_label
from workers.default_config import default_config
from workers.failures import InputChanged, input_changed
from workers.records import Config, DType, Gemm, Level, Measurement, MoEShape, WeightGrid

DEFAULT_BUDGET_FRACTION = 0.9  # vLLM's default --gpu-memory-utilization
ACCURACY_TIMEOUT_S = 600.0
"""Limit for the accuracy pass at one batch size (every dtype's problem, reference and run)."""


@dataclass(frozen=True)
class CompareRequest:
    model: str
    layout: str
    shapes_for_device: Callable[[str], dict[DType, MoEShape]]
    """The per-GPU shape of each dtype (bf16 first) on a device name: mxfp4 padded as the servers pad there."""
    batch_sizes: list[int]
    routing: str
    plan_for_device: Callable[[str], list[SearchJob]]
    configs_out: Path
    file_format: str
    journal: Path
    servers_by_shape: dict[MoEShape, tuple[str, ...]] = field(default_factory=dict)
    """Filled by ``plan_for_device``: which servers' files each tuned shape goes to."""
    fresh: bool = False
    address: str | None = None
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    replace: bool = False
    workers: int | None = None
    interpret: bool = False
    strategy: str = "fast"
    budget_s: float | None = None
    moe_layers: int = 1
    memory_budget_bytes: int | None = None
    max_rel_err: float = DEFAULT_MAX_REL_ERR
    server: str = "vllm"
    """The server whose kernel choice per dtype is followed (``tuner.dispatch``)."""
    runs: tuple[KernelRun, ...] = (KernelRun("vllm", BUILTIN, builtin_fp4=True),)
    """The tuning runs, one per kernel backend (``tuner.kernel_choice.resolve``): the fused-MoE
    dtypes on the kernel ``--kernel`` resolves to, moe-tune's own fp4 kernel on builtin."""
    ep: int = 1
    grid: WeightGrid | None = None
    """The checkpoint's quantized format the master weights are drawn on (``ModelSpec.checkpoint_grid``)."""
    write_builtin_fp4: bool = False
    """Also write moe-tune's own fp4 kernel's configs (``<configs_out>/moe-tune-builtin/``); they
    are tuned for the second column either way."""
    reference_weights: str = "random bf16 weights"
    """Which weights the errors are measured on, in words (the report's accuracy reference)."""


def search_jobs(planned: Plan, routing: str, device_name: str,
                servers_by_shape: dict[MoEShape, tuple[str, ...]] | None = None) -> list[SearchJob]:
    """The search of ``planned`` on ``device_name``, one job per kernel shape: the server-read
    dtypes, and moe-tune's builtin kernel for the fp4 dtypes when ``planned.builtin_fp4`` (its
    configs written apart; the report's second column). ``servers_by_shape`` (if given) learns
    which servers' files each job's shape goes to."""
    jobs = planned.for_device(device_name).jobs
    if servers_by_shape is not None:
        servers_by_shape.update({job.shape: job.servers for job in jobs})
    return [SearchJob(job, routing) for job in jobs]


def accuracy_reference(spec: ModelSpec) -> tuple[WeightGrid | None, str]:
    """The grid the compare's master weights are drawn on (the checkpoint's quantized format,
    ``ModelSpec.checkpoint_grid``; None for an unquantized checkpoint) and, in words for the
    report, which weights every dtype's error is measured on."""
    grid = spec.checkpoint_grid
    if grid is not None:
        return grid, (f"weights on the {grid.label} grid of the checkpoint ({spec.name} is quantized as "
                      f"{spec.quant_format or grid.dtype.value}): the random master weights are quantized to "
                      f"{grid.label} once and every dtype runs them as deployed (bf16: dequantized), so "
                      f"{grid.dtype.value} carries only kernel error and every other dtype's error is against the "
                      "checkpoint")
    if spec.natural_dtype is None:
        return None, (f"random bf16 weights ({spec.name}'s checkpoint format, {spec.quant_format}, is not one "
                      "moe-tune runs): each dtype's error includes its own quantization of them")
    return None, (f"random {spec.natural_dtype.value} weights (the checkpoint is unquantized "
                  f"{spec.natural_dtype.value}): each dtype's error includes its own quantization of them")


def bf16_twin(shape: MoEShape) -> MoEShape:
    """The bf16 shape a dtype's error is measured against: the same E, N, K and top-k (mxfp4's
    padded N included), so both problems share x, routing and the bf16 master weights."""
    return dataclasses.replace(shape, dtype=DType.BF16, block_shape=None)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _errors_vs_bf16(shapes: dict[DType, MoEShape], configs: dict[DType, dict[int, Config]], request: CompareRequest,
                    progress: Progress) -> tuple[dict[DType, dict[int, float]], dict[int, int], tuple[int, str]]:
    """Per dtype and M the tuned config's relative error (builtin kernel) against the bf16 output
    at the same shape (``bf16_twin``: mxfp4's padded N gets a bf16 run of its own), per M the
    number of distinct experts the routing touches (for the HBM floor), and the memory of the
    device the worker runs on with where that number came from (``BenchmarkWorker.device_memory``)."""
    errors: dict[DType, dict[int, float]] = {dtype: {} for dtype in shapes}
    touched: dict[int, int] = {}
    pool = start_pool(1, BUILTIN, ACCURACY_TIMEOUT_S, progress.note)
    try:
        event = pool.call("memory", lambda actor: actor.device_memory.remote())
        if not isinstance(event, Done):
            raise RunFailed(f"the worker could not report its device's memory: {event.reason}")
        memory = event.value
        for M in request.batch_sizes:
            groups: dict[MoEShape, list[DType]] = {}
            for dtype, shape in shapes.items():
                if M in configs[dtype]:
                    groups.setdefault(bf16_twin(shape), []).append(dtype)
            for twin, dtypes in groups.items():
                at_m = {dtype: configs[dtype][M] for dtype in dtypes}
                group_shapes = {dtype: shapes[dtype] for dtype in dtypes}
                if REFERENCE not in dtypes:
                    at_m[REFERENCE], group_shapes[REFERENCE] = default_config(twin, M), twin
                event = pool.call(M, lambda actor, s=group_shapes, c=at_m, m=M: actor.relative_errors.remote(
                    s, c, m, request.routing, REFERENCE, request.grid))
                if not isinstance(event, Done):
                    raise RunFailed(f"the accuracy pass failed at M={M}: {event.reason}")
                per_dtype, touched[M] = event.value
                for dtype in dtypes:
                    errors[dtype][M] = per_dtype[dtype]
    finally:
        pool.shutdown()
    return errors, touched, memory


@ray.remote(num_gpus=1)
def _time_kernels(shapes: dict[DType, MoEShape], ogs_dtypes: list[DType], retime: dict[DType, dict[int, Config]],
                  batch_sizes: list[int], routing: str, grid: WeightGrid | None = None) -> dict:
    """On one GPU, per M: each of ``ogs_dtypes`` in triton_kernels' matmul_ogs (time; error against
    the fp32 reference with gpt-oss's SwiGLU; error against matmul_ogs bf16 at the same shape),
    and each ``retime`` config in moe-tune's builtin kernel (time); weights on ``grid`` when given. Returns ``{"ogs": {dtype: {M:
    (µs, spread, err_ref, err_bf16)}}, "builtin": {dtype: {M: µs}}, "kernel": describe() or None,
    "unavailable": why matmul_ogs has no numbers, or None}``."""
    from workers.backends.base import BackendUnavailable
    from workers.moe import MoERunner
    from workers.problem import build_problem, release_weights
    from workers.timing import time_call

    device = _device()
    result: dict = {"ogs": {d: {} for d in ogs_dtypes}, "builtin": {d: {} for d in retime}, "kernel": None,
                    "unavailable": None}
    backend = None
    if ogs_dtypes:
        try:
            from workers.backends.triton_kernels import TritonKernelsBackend

            backend = TritonKernelsBackend()
            result["kernel"] = backend.describe()
        except BackendUnavailable as exc:
            result["unavailable"] = str(exc)
    for M in batch_sizes:
        if backend is not None and result["unavailable"] is None:
            try:
                for dtype in ogs_dtypes:
                    result["ogs"][dtype][M] = _time_ogs(backend, shapes[dtype], M, routing, device, grid)
            except InputChanged:
                raise  # the run's input changed under it (workers.failures): ends the compare
            except Exception as exc:  # noqa: BLE001 - goes into the report's notes; the rest still runs
                result["unavailable"] = f"matmul_ogs failed at M={M}: {type(exc).__name__}: {exc}"
        for dtype, per_m in retime.items():
            if M in per_m:
                problem = build_problem(shapes[dtype], M, routing=routing, seed=M, device=device, grid=grid)
                runner = MoERunner(problem.x, problem.w13, problem.w2, problem.topk_weights, problem.topk_ids,
                                   per_m[M])
                result["builtin"][dtype][M] = time_call(runner.run, device).median_us
                del problem, runner
    release_weights()
    return result


def _time_ogs(backend, shape: MoEShape, M: int, routing: str, device: str,
              grid: WeightGrid | None) -> tuple[float, float, float, float]:
    """matmul_ogs on ``shape`` at batch size M: (µs, spread µs, error vs fp32 reference, error vs bf16)."""
    from workers.problem import build_problem, rel_error
    from workers.timing import time_call

    twin = build_problem(bf16_twin(shape), M, routing=routing, seed=M, device=device, activation=backend.activation,
                         grid=grid)
    bf16_out = backend.runner(twin, None).run().float()
    del twin
    problem = build_problem(shape, M, routing=routing, seed=M, device=device, activation=backend.activation,
                            grid=grid)
    runner = backend.runner(problem, None)
    out = runner.run().float()
    timing = time_call(runner.run, device)
    return timing.median_us, timing.spread_us, rel_error(out, problem.reference), rel_error(out, bf16_out)


def _server_kernel_timings(shapes: dict[DType, MoEShape], ogs_dtypes: list[DType],
                           retime: dict[DType, dict[int, Config]], request: CompareRequest) -> dict:
    """``_time_kernels`` on one GPU, bounded by ``ACCURACY_TIMEOUT_S`` per batch size: a hung kernel
    leaves those numbers out (said in the report) instead of hanging the compare."""
    if not ogs_dtypes and not retime:
        return {"ogs": {}, "builtin": {}, "kernel": None, "unavailable": None}
    limit = ACCURACY_TIMEOUT_S * len(request.batch_sizes)
    ref = _time_kernels.remote(shapes, ogs_dtypes, retime, request.batch_sizes, request.routing, request.grid)
    try:
        return ray.get(ref, timeout=limit)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        return {"ogs": {}, "builtin": {}, "kernel": None,
                "unavailable": f"the server-kernel timing did not finish within {limit:.0f} s"}
    except Exception as exc:
        changed = input_changed(exc)
        if changed is not None:
            raise RunFailed(changed) from None
        raise


def run_compare(request: CompareRequest, progress: Progress | None = None) -> ComparisonResults:
    with ray_session(request.address, request.interpret, request.workers, request.connect_timeout_s):
        return _compare_in_session(request, progress or Progress())


@dataclass
class _Tuned:
    """What the tuning runs produced for one GPU type: per dtype the result of the run that tuned
    it (its winners, measurements and worker environment, hence kernel); the files written."""

    device: str
    shapes: dict[DType, MoEShape]
    routing: str
    budget_ended: bool = False
    by_dtype: dict[DType, driver.DeviceResult] = field(default_factory=dict)
    files: list[writers.Written] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def winners(self, dtype: DType) -> dict[int, Selection]:
        """Per M the winner of ``dtype``'s shape (whole op, the compare's routing)."""
        result = self.by_dtype.get(dtype)
        if result is None:
            return {}
        return {key.M: s for key, s in result.selections.items() if key.shape == self.shapes[dtype]
                and key.gemm is Gemm.BOTH and key.routing == self.routing}


def _tune(request: CompareRequest, progress: Progress) -> list[tuple[KernelRun, driver.TuneResult]]:
    """Each of ``request.runs`` through the engine, on its own backend and only its own jobs
    (``KernelRun.takes``); one time budget for all of them."""
    results = []
    remaining = request.budget_s
    for index, run in enumerate(request.runs):
        if remaining is not None and remaining <= 0:
            progress.note(f"time budget spent: {run.kernel} run for {run.what} skipped")
            results.append((run, driver.TuneResult(budget_ended=True, budget_s=0.0)))
            continue
        tuned = driver.tune(driver.TuneRequest(
            jobs_for_device=lambda device, run=run: [job for job in request.plan_for_device(device) if run.takes(job.job)],
            write_outputs=writers.ServerFilesWriter(request.configs_out, request.servers_by_shape.__getitem__,
                                                    request.replace, request.write_builtin_fp4),
            journal_path=request.journal, fresh=request.fresh and index == 0, workers=request.workers,
            interpret=request.interpret, kernel=run.kernel, strategy=request.strategy, budget_s=remaining),
            progress)
        results.append((run, tuned))
        if remaining is not None:
            remaining -= tuned.wall_s
    return results


def _collect(runs: list[tuple[KernelRun, driver.TuneResult]], shapes_for_device: Callable[[str], dict[DType, MoEShape]],
             routing: str, server: str) -> tuple[_Tuned, dict[DType, MoEShape]]:
    """The runs' results merged for the one GPU type they ran on (RunFailed when several). A dtype
    tuned by several runs (``--format both``: each layout on its own server's kernel) is taken from
    the run on ``server``'s kernel, else from the first."""
    devices = [device for _, tuned in runs for device in tuned.devices]
    names = sorted({device.device for device in devices})
    if len(names) != 1:
        raise RunFailed(f"compare needs one GPU type; the workers are on {len(names)}: " + ", ".join(names))
    shapes = shapes_for_device(names[0])
    merged = _Tuned(names[0], shapes, routing, budget_ended=any(tuned.budget_ended for _, tuned in runs))
    for device in devices:
        merged.files += device.files
        merged.versions = merged.versions or {k: v for k, v in device.env.items() if k not in _KERNEL_KEYS}
        tuned_here = {key.shape for key in device.selections}
        for dtype, shape in shapes.items():
            earlier = merged.by_dtype.get(dtype)
            if shape in tuned_here and (earlier is None or (earlier.env.get("kernel") != server
                                                            and device.env.get("kernel") == server)):
                merged.by_dtype[dtype] = device
    return merged, shapes


_KERNEL_KEYS = ("device", *writers.KERNEL_IDENTITY_KEYS)
"""The worker-environment keys that name the device and kernel, not the software versions."""


def _screened_why(selection: Selection, measurements: list[Measurement], budget_ended: bool) -> str:
    """Why a winner chosen on a screen has no full timing: its group's full timings all failed,
    or the time budget ended before one; never a cause that did not happen."""
    c = selection.candidate
    failed = Counter(m.status.value for m in measurements if m.candidate.level is Level.FULL and not m.ok
                     and (m.candidate.shape, m.candidate.routing, m.candidate.gemm, m.candidate.M)
                     == (c.shape, c.routing, c.gemm, c.M))
    if failed:
        return "its full timings failed (" + ", ".join(f"{s} {n}" for s, n in sorted(failed.items())) + ")"
    if budget_ended:
        return "the time budget ended before a full timing"
    return "the search ended without a full timing"


def _compare_in_session(request: CompareRequest, progress: Progress) -> ComparisonResults:
    tuned, shapes = _collect(_tune(request, progress), request.shapes_for_device, request.routing, request.server)
    arch = dispatch.gpu_arch(tuned.device)
    served = {dtype: dispatch.server_kernel(request.server, dtype, arch, request.ep) for dtype in shapes}
    winners = {dtype: tuned.winners(dtype) for dtype in shapes}
    if not winners[REFERENCE]:
        raise RunFailed("bf16 produced no correct config: nothing to compare against")
    kernel_of = {dtype: result.env.get("kernel", BUILTIN) for dtype, result in tuned.by_dtype.items()}

    configs = {dtype: {M: s.candidate.config for M, s in per_m.items()} for dtype, per_m in winners.items()}
    # bf16 is the yardstick at every M a quantized dtype has; any correct bf16 config computes it alike.
    for M in {M for per_m in configs.values() for M in per_m} - set(configs[REFERENCE]):
        configs[REFERENCE][M] = default_config(shapes[REFERENCE], M)
    ogs_dtypes = [d for d, k in served.items() if k.kernel == dispatch.MATMUL_OGS]
    retime = {d: configs[d] for d, k in served.items()
              if k.kernel == dispatch.FUSED_MOE and kernel_of.get(d, BUILTIN) != BUILTIN}
    progress.phase("measuring every dtype against bf16 on the same inputs; timing the server kernels "
                   + ", ".join(f"{d.value}: {served[d].kernel}" for d in shapes))
    errors, touched, (device_memory, memory_source) = _errors_vs_bf16(shapes, configs, request, progress)
    timed = _server_kernel_timings(shapes, ogs_dtypes, retime, request)

    from workers.problem import ERROR_BOUNDS

    peaks = roofline.device_peaks(tuned.device)
    if request.memory_budget_bytes is not None:
        budget, source = request.memory_budget_bytes, "--memory-budget-gib"
    else:
        budget = int(DEFAULT_BUDGET_FRACTION * device_memory)
        source = f"{DEFAULT_BUDGET_FRACTION:.0%} of {device_memory / 2**30:.1f} GiB, {memory_source}"
    ogs_label = describe_label(timed["kernel"]) if timed["kernel"] else None
    results = ComparisonResults(
        model=request.model, layout=request.layout, device=tuned.device, versions=tuned.versions,
        routing=request.routing, moe_layers=request.moe_layers, memory_budget_bytes=budget,
        budget_ended=tuned.budget_ended, server=request.server,
        dtypes={dtype: summarize_dtype(shape, request.moe_layers) for dtype, shape in shapes.items()},
        memory_source=source, configs_folder=str(request.configs_out),
        config_files=sorted({str(written.path.relative_to(request.configs_out)) for written in tuned.files}),
        max_rel_err=request.max_rel_err, reference_weights=request.reference_weights)
    for dtype, shape in shapes.items():
        kernel = served[dtype]
        tuned_kernel = kernel_of.get(dtype, BUILTIN)
        measurements = tuned.by_dtype[dtype].measurements if dtype in tuned.by_dtype else []
        spreads = {m.candidate: (m.latency_us, m.spread_us) for m in measurements
                   if m.ok and m.candidate.level is Level.FULL}
        for M in request.batch_sizes:
            selection = winners[dtype].get(M)
            builtin_us = None
            if selection is not None and M in errors[dtype]:
                builtin_us = timed["builtin"].get(dtype, {}).get(M, selection.latency_us
                                                                 if tuned_kernel == BUILTIN else None)
            if kernel.kernel == dispatch.MATMUL_OGS:
                if M not in timed["ogs"].get(dtype, {}):
                    why = timed["unavailable"] or "not measured"
                    results.points.append(_unmeasured(dtype, M, why, builtin_us, selection))
                    continue
                latency, spread, err_ref, err_bf16 = timed["ogs"][dtype][M]
                if not err_ref <= ERROR_BOUNDS[dtype]:
                    results.points.append(_unmeasured(dtype, M, f"{ogs_label}: wrong result (rel. err vs fp32 "
                                                      f"reference {err_ref:.2e})", builtin_us, selection))
                    continue
                results.points.append(measured_point(
                    shape, M, latency, None, err_bf16, touched.get(M, shape.E), peaks, spread, kernel=ogs_label,
                    builtin_latency_us=builtin_us, note=f"rel. err vs fp32 reference {err_ref:.2e}"))
            elif kernel.kernel == dispatch.FUSED_MOE and selection is not None and M in errors[dtype]:
                is_server = tuned_kernel == request.server
                screened = selection.candidate.level is Level.SCREEN
                results.points.append(measured_point(
                    shape, M, selection.latency_us, selection.candidate.config, errors[dtype][M], touched[M], peaks,
                    _spread(spreads.get(selection.candidate), selection.latency_us),
                    kernel=describe_label(tuned.by_dtype[dtype].env), server_kernel=is_server,
                    builtin_latency_us=builtin_us,
                    screened=screened,
                    screened_why=_screened_why(selection, measurements, tuned.budget_ended) if screened else "",
                    note="" if is_server else (f"not {request.server}'s kernel: tuned and timed on the "
                                               f"{tuned_kernel} kernel backend")))
            elif kernel.kernel != dispatch.FUSED_MOE:
                results.points.append(_unmeasured(dtype, M, f"{request.server} runs {kernel.why}: moe-tune cannot "
                                                  "run it", builtin_us, selection))
    return results


def _spread(full: tuple[float, float | None] | None, latency_us: float) -> float | None:
    """The winner's full-timing spread, scaled to the latency reported (a re-timing's median)."""
    if full is None or full[1] is None or not full[0]:
        return None
    return full[1] * latency_us / full[0]


def _unmeasured(dtype: DType, M: int, why: str, builtin_us: float | None, selection) -> PointResult:
    """A dtype the server runs with a kernel moe-tune could not time: only the builtin column."""
    return PointResult(dtype=dtype, M=M, latency_us=None, config=None, rel_err_vs_bf16=None,
                       hbm_floor_fraction=None, compute_floor_fraction=None, kernel="", server_kernel=False,
                       builtin_latency_us=builtin_us,
                       builtin_config=selection.candidate.config if selection is not None else None, note=why)
