"""The triton_kernels (matmul_ogs) backend on the CPU.

triton_kernels' Triton kernels do not run under the interpreter (its Tensor wrapper has no
storage the interpreter can copy), so the GPU path is checked here through what runs on the CPU:
the weight preparation (Hopper layouts) undone and decoded with triton_kernels' own torch
decoder, and the runner's wiring (router logits, gate/up interleave, fused SwiGLU, routed weights,
scatter-sum) with triton_kernels' own torch references of ``routing`` and ``matmul_ogs`` standing in
for the kernels. triton_kernels is found installed, at ``$MOE_TUNE_TRITON_KERNELS`` (a folder
holding the package), or in ``.server-kernels/`` of the repository (a folder of extracted server
packages, not committed); without it those tests are skipped.
"""

from __future__ import annotations

import importlib
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from workers.backends import triton_kernels as tk
from workers.default_config import default_config
from workers.problem import ERROR_BOUNDS, build_problem, rel_error
from workers.quant import QuantizedWeight, dequantize_mxfp4, quantize_weight
from workers.records import DType, MoEShape
from workers.reference import SILU, SWIGLU_OAI, activate

REPO = Path(__file__).resolve().parent.parent


def _triton_kernels():
    for folder in (os.environ.get("MOE_TUNE_TRITON_KERNELS"), REPO / ".server-kernels"):
        if folder and (Path(folder) / "triton_kernels").is_dir() and str(folder) not in sys.path:
            sys.path.append(str(folder))
    try:
        return importlib.import_module("triton_kernels")
    except ImportError:
        pytest.skip("triton_kernels not found (install it, or set MOE_TUNE_TRITON_KERNELS)")


def deinterleave_gate_up(t: torch.Tensor) -> torch.Tensor:
    """Inverse of ``tk.interleave_gate_up``."""
    E, two_n, C = t.shape
    return t.view(E, two_n // 2, 2, C).transpose(1, 2).reshape(E, two_n, C)


def unprepare_mxfp4(values: object, scales: object, rows: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``tk.prepare_mxfp4`` (layouts and padding undone): packed ``[E, rows, C//2]`` and
    scales ``[E, rows, groups]``, for checking a preparation."""
    data = values.storage.layout.unswizzle_data(values.storage.data)
    scale = scales.storage.layout.unswizzle_data(scales.storage.data)
    return (data.transpose(-2, -1)[..., :rows, :].contiguous(),
            scale.transpose(-2, -1)[..., :rows, :groups].contiguous())


def test_interleave_puts_gate_and_up_rows_of_one_column_side_by_side(rng: random.Random) -> None:
    E, N, C = rng.randint(1, 3), rng.randint(1, 9), rng.randint(1, 5)
    t = torch.randn(E, 2 * N, C)
    mixed = tk.interleave_gate_up(t)
    assert torch.equal(mixed[:, 0::2], t[:, :N]) and torch.equal(mixed[:, 1::2], t[:, N:])
    assert torch.equal(deinterleave_gate_up(mixed), t)


def test_gpt_oss_activation_clamps_gate_above_and_up_both_ways() -> None:
    gate = torch.tensor([-10.0, 0.0, 1.0, 10.0])
    up = torch.tensor([-10.0, 0.5, 10.0, 1.0])
    out = activate(gate, up, SWIGLU_OAI)
    g = torch.tensor([-10.0, 0.0, 1.0, 7.0])
    u = torch.tensor([-7.0, 0.5, 7.0, 1.0])
    assert torch.allclose(out, g * torch.sigmoid(1.702 * g) * (u + 1))
    assert torch.allclose(activate(gate, up, SILU), torch.nn.functional.silu(gate) * up)
    with pytest.raises(ValueError, match="activation"):
        activate(gate, up, "gelu")


@pytest.mark.parametrize("rows,cols", [(64, 64), (96, 160), (2 * 384, 2880)])
def test_prepared_mxfp4_weights_decode_to_the_quantized_values(rows: int, cols: int, rng: random.Random) -> None:
    """Hopper value/scale layouts undone give back the interleaved bytes, and triton_kernels' own
    decoder reads them as moe-tune's dequantizer does (nibble order, E8M0 scales, K-group padding)."""
    package = _triton_kernels()
    from triton_kernels.numerics_details.mxfp import upcast_from_mxfp_torch

    E = rng.randint(1, 2)
    weight = quantize_weight(torch.randn(E, rows, cols, dtype=torch.bfloat16), DType.MXFP4)
    data, scale = tk.interleave_gate_up(weight.data), tk.interleave_gate_up(weight.scale)
    values, scales = tk.prepare_mxfp4(QuantizedWeight(DType.MXFP4, data, scale), package)
    assert values.storage.layout.name == "HOPPER_VALUE" and scales.storage.layout.name == "HOPPER_SCALE"
    assert list(values.shape) == [E, cols, rows]  # [E, K, N] as matmul_ogs reads w
    back, back_scale = unprepare_mxfp4(values, scales, rows, cols // 32)
    assert torch.equal(back, data) and torch.equal(back_scale, scale)
    decoded = upcast_from_mxfp_torch(back, back_scale, torch.float32, axis=-1)
    expected = dequantize_mxfp4(data, scale)
    assert torch.equal(decoded, expected)


def _torch_package(package, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run OgsRunner on the CPU: torch stand-ins of ``routing`` and ``matmul_ogs`` written after
    triton_kernels' torch references (which need a GPU), with the prepared mxfp4 weight unswizzled
    and decoded by triton_kernels, and the fused activation applied as ``swiglu_fn`` does (gate =
    even columns, up = odd columns)."""
    from triton_kernels import matmul_ogs as ogs
    from triton_kernels import routing
    from triton_kernels.numerics_details.mxfp import upcast_from_mxfp_torch

    def dense(w, precision):
        if isinstance(w, torch.Tensor):  # bf16: a plain [E, K, N] tensor
            return w
        groups = w.shape[-2] // 32
        data, scale = unprepare_mxfp4(w, precision.weight_scale, w.shape[-1], groups)
        return upcast_from_mxfp_torch(data, scale, torch.float32, axis=-1).transpose(-2, -1)

    def matmul(x, w, bias, routing_data, gather_indx=None, scatter_indx=None, precision_config=None, gammas=None,
               fused_activation=None, y=None):
        # matmul_ogs's semantics (its docstring and matmul_ogs_torch): rows grouped by expert,
        # gathered from x, scaled by gammas, reduced by the fused activation, scatter-summed.
        weights, n_act = dense(w, precision_config).float(), routing_data.n_expts_act
        bounds = [0] + torch.cumsum(routing_data.expt_hist, 0).tolist()
        rows = torch.zeros(bounds[-1], weights.shape[-1])
        for e, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            idx = gather_indx.src_indx[lo:hi].long() // n_act if gather_indx is not None else torch.arange(lo, hi)
            rows[lo:hi] = x[idx].float() @ weights[e]
            if gammas is not None:
                rows[lo:hi] *= gammas[lo:hi, None].float()
        if fused_activation is not None and fused_activation.specs.fn is not None:
            assert tuple(fused_activation.fn_args) == (tk.SWIGLU_ALPHA, tk.SWIGLU_LIMIT)
            rows = activate(rows[:, 0::2], rows[:, 1::2], SWIGLU_OAI)
        if scatter_indx is not None:
            summed = torch.zeros(rows.shape[0] // n_act, rows.shape[1])
            summed.index_add_(0, scatter_indx.dst_indx.long() // n_act, rows)
            rows = summed
        y.copy_(rows.view(y.shape).to(y.dtype))
        return y

    def route(logits, n_expts_act, sm_first=False):
        # routing_torch's semantics (top-k, softmax over the chosen, rows sorted by expert), with
        # the histogram in a form the CPU supports.
        assert not sm_first
        scal, indx = torch.topk(logits.float(), n_expts_act, dim=-1)
        scal = torch.softmax(scal, dim=-1).reshape(-1)
        indx = indx.reshape(-1).int()
        topk_indx = torch.argsort(indx, stable=True)
        gate_indx = torch.argsort(topk_indx, stable=True)
        hist = torch.bincount(indx.long(), minlength=logits.shape[-1]).int()
        data = routing.RoutingData(scal[topk_indx], hist, logits.shape[-1], n_expts_act)
        return (data, routing.GatherIndx(src_indx=topk_indx.int(), dst_indx=gate_indx.int()),
                routing.ScatterIndx(src_indx=gate_indx.int(), dst_indx=topk_indx.int()))

    monkeypatch.setattr(routing, "routing", route)
    monkeypatch.setattr(ogs, "matmul_ogs", matmul)


@pytest.mark.parametrize("dtype", [DType.BF16, DType.MXFP4])
def test_runner_computes_gpt_oss_moe_from_moe_tune_inputs(dtype: DType, rng: random.Random,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    package = _triton_kernels()
    _torch_package(package, monkeypatch)
    shape = MoEShape(E=rng.choice([4, 6]), N=rng.choice([64, 96]), K=rng.choice([64, 128]), topk=2, dtype=dtype)
    seed = rng.randint(0, 99)
    problem = build_problem(shape, rng.choice([1, 5, 17]), seed=seed, activation=SWIGLU_OAI)
    backend = tk.TritonKernelsBackend()
    assert backend.activation == SWIGLU_OAI and backend.check(shape) is None
    out = backend.runner(problem, None).run()
    assert out.shape == problem.x.shape and out.dtype == problem.x.dtype
    assert rel_error(out, problem.reference) < ERROR_BOUNDS[dtype]
    silu_reference = build_problem(shape, problem.M, seed=seed, activation=SILU)
    assert rel_error(out, silu_reference.reference) > 0.1  # the activation matters: a SiLU·up run would fail


def test_backend_names_itself_and_refuses_other_dtypes() -> None:
    _triton_kernels()
    backend = tk.TritonKernelsBackend()
    described = backend.describe()
    assert described["kernel"] == "triton_kernels" and "matmul_ogs" in described["kernel_entry"]
    assert len(described["kernel_hash"]) == 16
    assert "fp8_w8a8" in backend.check(MoEShape(E=4, N=64, K=64, topk=2, dtype=DType.FP8_W8A8))
    assert "multiples of 32" in backend.check(MoEShape(E=4, N=48, K=64, topk=2, dtype=DType.MXFP4))
    with pytest.raises(ValueError):
        backend.runner(build_problem(MoEShape(E=4, N=64, K=64, topk=2, dtype=DType.NVFP4), 1), None)
    mxfp4 = MoEShape(E=4, N=64, K=64, topk=2, dtype=DType.MXFP4)
    with pytest.raises(ValueError, match="no fused-MoE config"):
        backend.runner(build_problem(mxfp4, 1), default_config(mxfp4, 1))
