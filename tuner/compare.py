"""Which dtype to deploy: tune every dtype of one model and layout, measure each against bf16 on
the same inputs, and fill the report's record.

Tuning goes through the service's engine (``tuner.driver.tune``) with the journal, so a compare
after a tune (or a second compare) re-measures nothing. Accuracy is then measured in the same Ray
session on one pool worker (``tuner.pool``), one call per batch size
(``BenchmarkWorker.relative_errors``): it builds the problem of every dtype from the same seed
(the same x, routing and bf16 master weights, quantized per dtype; seed = M as the tuner's
correctness check uses), runs each dtype's tuned config, and reports
||out - out_bf16|| / ||out_bf16||.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tuner import driver, roofline, writers
from tuner.errors import RunFailed
from tuner.plan import Plan
from tuner.pool import Done, Lost, start_pool
from tuner.progress import Progress
from tuner.ray_session import DEFAULT_CONNECT_TIMEOUT_S, ray_session
from tuner.report import DEFAULT_MAX_REL_ERR, REFERENCE, ComparisonResults, measured_point, summarize_dtype
from tuner.search import SearchJob
from workers.default_config import default_config
from workers.records import Config, DType, Gemm, Level, MoEShape

DEFAULT_BUDGET_FRACTION = 0.9  # vLLM's default --gpu-memory-utilization
ACCURACY_TIMEOUT_S = 600.0
"""Limit for the accuracy pass at one batch size (every dtype's problem, reference and run)."""


@dataclass(frozen=True)
class CompareRequest:
    model: str
    layout: str
    shapes: dict[DType, MoEShape]  # bf16 first
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


def search_jobs(planned: Plan, routing: str, device_name: str,
                servers_by_shape: dict[MoEShape, tuple[str, ...]] | None = None) -> list[SearchJob]:
    """The search of ``planned`` on ``device_name``, one job per kernel shape; ``servers_by_shape``
    (if given) learns which servers' files each job's shape goes to."""
    jobs = planned.for_device(device_name).jobs
    if servers_by_shape is not None:
        servers_by_shape.update({job.shape: job.servers for job in jobs})
    return [SearchJob(job, routing) for job in jobs]


def _errors_vs_bf16(request: CompareRequest, configs: dict[DType, dict[int, Config]],
                    progress: Progress) -> tuple[dict[DType, dict[int, float]], dict[int, int], tuple[int, str]]:
    """Per dtype and M the tuned kernel's relative error against the bf16 kernel's output, per M
    the number of distinct experts the routing touches (for the HBM floor), and the memory of the
    device the worker runs on with where that number came from (``BenchmarkWorker.device_memory``)."""
    errors: dict[DType, dict[int, float]] = {dtype: {} for dtype in request.shapes}
    touched: dict[int, int] = {}
    pool = start_pool(1, "builtin", ACCURACY_TIMEOUT_S, progress.note)
    try:
        event = pool.call("memory", lambda actor: actor.device_memory.remote())
        if not isinstance(event, Done):
            reason = event.detail if isinstance(event, Lost) else f"{type(event.error).__name__}: {event.error}"
            raise RunFailed(f"the worker could not report its device's memory: {reason.splitlines()[0]}")
        memory = event.value
        for M in request.batch_sizes:
            at_m = {dtype: per_m[M] for dtype, per_m in configs.items() if M in per_m}
            if REFERENCE not in at_m:
                continue
            event = pool.call(M, lambda actor, c=at_m, m=M: actor.relative_errors.remote(
                request.shapes, c, m, request.routing, REFERENCE))
            if not isinstance(event, Done):
                reason = event.detail if isinstance(event, Lost) else f"{type(event.error).__name__}: {event.error}"
                raise RunFailed(f"the accuracy pass failed at M={M}: {reason.splitlines()[0]}")
            per_dtype, touched[M] = event.value
            for dtype, error in per_dtype.items():
                errors[dtype][M] = error
    finally:
        pool.shutdown()
    return errors, touched, memory


def run_compare(request: CompareRequest, progress: Progress | None = None) -> ComparisonResults:
    with ray_session(request.address, request.interpret, request.workers, request.connect_timeout_s):
        return _compare_in_session(request, progress or Progress())


def _compare_in_session(request: CompareRequest, progress: Progress) -> ComparisonResults:
    tuned = driver.tune(driver.TuneRequest(
        jobs_for_device=request.plan_for_device, write_outputs=writers.server_files_writer(request.configs_out, request.servers_by_shape.__getitem__,
                                                                                   request.replace),
        journal_path=request.journal, fresh=request.fresh, workers=request.workers,
        interpret=request.interpret, strategy=request.strategy, budget_s=request.budget_s), progress)
    if len(tuned.devices) != 1:
        raise RunFailed(f"compare needs one GPU type; the workers are on {len(tuned.devices)}: "
                        + ", ".join(d.device for d in tuned.devices))
    device = tuned.devices[0]
    winners = {dtype: {} for dtype in request.shapes}
    for key, selection in device.selections.items():
        for dtype, shape in request.shapes.items():
            if key.shape == shape and key.gemm is Gemm.BOTH and key.routing == request.routing:
                winners[dtype][key.M] = selection
    if not winners[REFERENCE]:
        raise RunFailed("bf16 produced no correct config: nothing to compare against")

    configs = {dtype: {M: s.candidate.config for M, s in per_m.items()} for dtype, per_m in winners.items()}
    # bf16 is the yardstick at every M a quantized dtype has; any correct bf16 config computes it alike.
    for M in {M for per_m in configs.values() for M in per_m} - set(configs[REFERENCE]):
        configs[REFERENCE][M] = default_config(request.shapes[REFERENCE], M)
    progress.phase("measuring every dtype against bf16 on the same inputs")
    errors, touched, (device_memory, memory_source) = _errors_vs_bf16(request, configs, progress)

    peaks = roofline.device_peaks(device.device)
    if request.memory_budget_bytes is not None:
        budget, source = request.memory_budget_bytes, "--memory-budget-gib"
    else:
        budget = int(DEFAULT_BUDGET_FRACTION * device_memory)
        source = f"{DEFAULT_BUDGET_FRACTION:.0%} of {device_memory / 2**30:.1f} GiB, {memory_source}"
    results = ComparisonResults(
        model=request.model, layout=request.layout, device=device.device,
        versions={k: v for k, v in device.env.items() if k != "device"}, routing=request.routing,
        moe_layers=request.moe_layers, memory_budget_bytes=budget, budget_ended=tuned.budget_ended,
        dtypes={dtype: summarize_dtype(shape, request.moe_layers) for dtype, shape in request.shapes.items()},
        memory_source=source, configs_folder=str(request.configs_out),
        config_files=[str(written.path.relative_to(request.configs_out)) for written in device.files],
        max_rel_err=request.max_rel_err)
    spreads = {m.candidate: (m.latency_us, m.spread_us) for m in device.measurements
               if m.ok and m.candidate.level is Level.FULL}
    for dtype, shape in request.shapes.items():
        for M, selection in sorted(winners[dtype].items()):
            if M in errors[dtype]:
                results.points.append(measured_point(shape, M, selection.latency_us, selection.candidate.config,
                                                     errors[dtype][M], touched[M], peaks,
                                                     _spread(spreads.get(selection.candidate), selection.latency_us)))
    return results


def _spread(full: tuple[float, float | None] | None, latency_us: float) -> float | None:
    """The winner's full-timing spread, scaled to the latency reported (a re-timing's median)."""
    if full is None or full[1] is None or not full[0]:
        return None
    return full[1] * latency_us / full[0]
