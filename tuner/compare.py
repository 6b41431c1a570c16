"""Which dtype to deploy: tune every dtype of one model and layout, measure each against bf16 on
the same inputs, and fill the report's record.

Tuning goes through the service's engine (``tuner.driver.tune``) with the journal, so a compare
after a tune (or a second compare) re-measures nothing. Accuracy is then measured by one Ray task
on one GPU: per batch size it builds the problem of every dtype from the same seed (the same x,
routing and bf16 master weights, quantized per dtype; seed = M as the tuner's correctness check
uses), runs each dtype's tuned config, and reports ||out - out_bf16|| / ||out_bf16||.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray

from tuner import driver, roofline
from tuner.errors import RunFailed
from tuner.plan import build_plan
from tuner.progress import Progress
from tuner.ray_session import ray_session
from tuner.report import REFERENCE, ComparisonResults, measured_point, summarize_dtype
from tuner.search import SearchJob
from workers.default_config import default_config
from workers.records import Config, DType, Gemm, MoEShape

DEFAULT_BUDGET_FRACTION = 0.9  # vLLM's default --gpu-memory-utilization
UNKNOWN_DEVICE_MEMORY = 80 * 2**30


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
    fresh: bool = False
    address: str | None = None
    workers: int | None = None
    interpret: bool = False
    strategy: str = "fast"
    budget_s: float | None = None
    moe_layers: int = 1
    memory_budget_bytes: int | None = None


def search_jobs(models: list, tp: int, ep: int, dtypes: list[DType], batch_sizes: list[int], space, routing: str,
                device_name: str) -> list[SearchJob]:
    plan = build_plan(models, tp, ep, dtypes, None, batch_sizes, space, device_name)
    return [SearchJob.from_plan(job, routing) for job in plan.jobs]


@ray.remote(num_gpus=1)
def _errors_vs_bf16(shapes: dict[DType, MoEShape], configs: dict[DType, dict[int, Config]], batch_sizes: list[int],
                    routing: str) -> tuple[dict[DType, dict[int, float]], dict[int, int]]:
    """Per dtype and M the tuned kernel's relative error against the bf16 kernel's output, and per
    M the number of distinct experts the routing touches (for the HBM floor)."""
    import torch

    from workers.moe import fused_moe
    from workers.problem import build_problem, rel_error, release_weights

    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    errors: dict[DType, dict[int, float]] = {dtype: {} for dtype in shapes}
    touched: dict[int, int] = {}
    for M in batch_sizes:
        outputs = {}
        for dtype, shape in shapes.items():
            config = configs[dtype].get(M)
            if config is None:
                continue
            problem = build_problem(shape, M, routing=routing, seed=M, device=device)
            touched[M] = int(torch.unique(problem.topk_ids).numel())
            outputs[dtype] = fused_moe(problem.x, problem.w13, problem.w2, problem.topk_weights, problem.topk_ids,
                                       config).float()
            del problem
        for dtype, out in outputs.items():
            errors[dtype][M] = rel_error(out, outputs[REFERENCE])
    release_weights()
    return errors, touched


def run_compare(request: CompareRequest, progress: Progress | None = None) -> ComparisonResults:
    progress = progress or Progress()
    tuned = driver.tune(driver.TuneRequest(
        jobs_for_device=request.plan_for_device, write_outputs=driver.server_files_writer(request.configs_out, request.file_format),
        journal_path=request.journal, fresh=request.fresh, address=request.address, workers=request.workers,
        interpret=request.interpret, strategy=request.strategy, budget_s=request.budget_s), progress)
    if len(tuned.devices) != 1:
        raise RunFailed(f"compare needs one GPU type; the workers are on {len(tuned.devices)}: "
                        + ", ".join(d.device for d in tuned.devices))
    device = tuned.devices[0]
    winners = {dtype: {} for dtype in request.shapes}
    for key, selection in device.selections.items():
        for dtype, shape in request.shapes.items():
            if key.shape_label == shape.label and key.gemm == Gemm.BOTH.value and key.routing == request.routing:
                winners[dtype][key.M] = selection
    if not winners[REFERENCE]:
        raise RunFailed("bf16 produced no correct config: nothing to compare against")

    configs = {dtype: {M: s.candidate.config for M, s in per_m.items()} for dtype, per_m in winners.items()}
    # bf16 is the yardstick at every M a quantized dtype has; any correct bf16 config computes it alike.
    for M in {M for per_m in configs.values() for M in per_m} - set(configs[REFERENCE]):
        configs[REFERENCE][M] = default_config(request.shapes[REFERENCE], M)
    progress.note("measuring every dtype against bf16 on the same inputs")
    with ray_session(request.address, request.interpret):
        errors, touched = ray.get(_errors_vs_bf16.remote(request.shapes, configs, request.batch_sizes,
                                                         request.routing))

    peaks = roofline.device_peaks(device.device)
    budget = request.memory_budget_bytes
    if budget is None:
        budget = int(DEFAULT_BUDGET_FRACTION * (peaks.memory_bytes if peaks else UNKNOWN_DEVICE_MEMORY))
    results = ComparisonResults(
        model=request.model, layout=request.layout, device=device.device,
        versions={k: v for k, v in device.env.items() if k != "device"}, routing=request.routing,
        moe_layers=request.moe_layers, memory_budget_bytes=budget, budget_ended=tuned.budget_ended,
        dtypes={dtype: summarize_dtype(shape, request.moe_layers) for dtype, shape in request.shapes.items()})
    for dtype, shape in request.shapes.items():
        for M, selection in sorted(winners[dtype].items()):
            if M in errors[dtype]:
                results.points.append(measured_point(shape, M, selection.latency_us, selection.candidate.config,
                                                     errors[dtype][M], touched[M], peaks))
    return results
