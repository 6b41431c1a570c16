"""Quantizers against hand-computed spec vectors and exact round-trip properties."""

from __future__ import annotations

import math

import pytest
import torch

from workers.quant import (
    E2M1_VALUES,
    FP8_DTYPE,
    QuantizedWeight,
    decode_e2m1,
    dequantize_fp8_activation,
    dequantize_mxfp4,
    dequantize_nvfp4,
    e8m0_to_float,
    encode_e2m1,
    quantize_fp8_activation,
    quantize_mxfp4,
    quantize_nvfp4,
    quantize_weight,
)
from workers.records import DType

@pytest.fixture
def gen(generator: torch.Generator) -> torch.Generator:
    return generator


def randn(gen: torch.Generator, *size: int) -> torch.Tensor:
    return torch.randn(size, generator=gen)


# ---------------------------------------------------------------- E2M1 codes

E2M1_SPEC = [
    # exact grid points
    (0.0, 0x0), (0.5, 0x1), (1.0, 0x2), (1.5, 0x3), (2.0, 0x4), (3.0, 0x5), (4.0, 0x6), (6.0, 0x7),
    (-0.5, 0x9), (-1.0, 0xA), (-1.5, 0xB), (-2.0, 0xC), (-3.0, 0xD), (-4.0, 0xE), (-6.0, 0xF),
    # ties go to the even code
    (0.25, 0x0), (0.75, 0x2), (1.25, 0x2), (1.75, 0x4), (2.5, 0x4), (3.5, 0x6), (5.0, 0x6),
    (-0.75, 0xA), (-2.5, 0xC), (-5.0, 0xE),
    # just off a tie: nearest
    (0.2501, 0x1), (0.7499, 0x1), (2.5001, 0x5), (4.9999, 0x6), (5.0001, 0x7),
    # saturation
    (6.5, 0x7), (100.0, 0x7), (1e30, 0x7), (math.inf, 0x7), (-7.0, 0xF), (-math.inf, 0xF),
    # small negatives keep the sign
    (-0.1, 0x8),
]


@pytest.mark.parametrize("value,code", E2M1_SPEC)
def test_e2m1_encodes_spec_vectors(value: float, code: int) -> None:
    assert encode_e2m1(torch.tensor([value])).item() == code


def test_e2m1_decodes_every_code() -> None:
    expected = list(E2M1_VALUES) + [-v for v in E2M1_VALUES]
    assert decode_e2m1(torch.arange(16, dtype=torch.uint8)).tolist() == expected


def test_e2m1_is_nearest_on_random_values(gen: torch.Generator) -> None:
    x = randn(gen, 4096) * 3
    decoded = decode_e2m1(encode_e2m1(x))
    grid = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))
    best = (x[:, None] - grid).abs().min(dim=1).values
    assert torch.equal((x - decoded).abs(), best)


# ---------------------------------------------------------------- mxfp4

def _mx_block(values: list[float]) -> torch.Tensor:
    return torch.tensor(values + [0.0] * (32 - len(values)))


def test_mxfp4_packs_low_nibble_first() -> None:
    # amax 6 -> scale 2^0 (code 127); codes 1.0->2, -0.5->9, 6->7, 0->0, 3->5, -4->0xE
    packed, scales = quantize_mxfp4(_mx_block([1.0, -0.5, 6.0, 0.0, 3.0, -4.0]))
    assert scales.tolist() == [127]
    assert packed[:3].tolist() == [0x92, 0x07, 0xE5]
    assert packed[3:].tolist() == [0] * 13


def test_mxfp4_dequantizes_hand_bytes() -> None:
    packed = torch.tensor([[0x92, 0x07] + [0] * 14], dtype=torch.uint8)
    def scale(code: int) -> torch.Tensor:
        return torch.tensor([[code]], dtype=torch.uint8)

    assert dequantize_mxfp4(packed, scale(128))[0, :4].tolist() == [2.0, -1.0, 12.0, 0.0]
    assert dequantize_mxfp4(packed, scale(125))[0, :4].tolist() == [0.25, -0.125, 1.5, 0.0]
    assert torch.isnan(dequantize_mxfp4(packed, scale(0xFF))).all()
    assert dequantize_mxfp4(packed, scale(128), torch.bfloat16).dtype == torch.bfloat16


def test_e8m0_decodes_every_code() -> None:
    decoded = e8m0_to_float(torch.arange(256, dtype=torch.int32).to(torch.uint8))
    assert [decoded[c].item() for c in range(255)] == [math.ldexp(1.0, c - 127) for c in range(255)]
    assert math.isnan(decoded[255].item())


@pytest.mark.parametrize("e", [-120, -20, -3, -1, 0, 1, 5, 30, 120])
def test_mxfp4_block_max_of_exactly_six_times_two_to_e_gets_scale_two_to_e(e: int) -> None:
    block = _mx_block([math.ldexp(6.0, e), math.ldexp(-3.0, e), math.ldexp(0.5, e)])
    packed, scales = quantize_mxfp4(block)
    assert scales.item() == 127 + e
    assert packed[:2].tolist() == [0xD7, 0x01]  # 6 -> 7, -3 -> 0xD, 0.5 -> 1
    assert torch.equal(dequantize_mxfp4(packed, scales), block)


@pytest.mark.parametrize("e", [-5, 0, 7])
def test_mxfp4_scale_rule_floor_log2_minus_two(e: int) -> None:
    # max in [4·2^e, 8·2^e) -> 2^e; the part above 6·2^e saturates to 6·2^e
    for top, expected_code in [(4.0, 0x6), (5.9, 0x7), (7.99, 0x7)]:
        packed, scales = quantize_mxfp4(_mx_block([math.ldexp(top, e)]))
        assert scales.item() == 127 + e
        assert packed[0].item() & 0xF == expected_code
    packed, scales = quantize_mxfp4(_mx_block([math.ldexp(3.99, e)]))
    assert scales.item() == 127 + e - 1


def test_mxfp4_all_zero_block_gets_smallest_scale() -> None:
    packed, scales = quantize_mxfp4(torch.zeros(2, 64))
    assert scales.tolist() == [[0, 0], [0, 0]]
    assert packed.eq(0).all()
    assert dequantize_mxfp4(packed, scales).eq(0).all()


def test_mxfp4_exponent_is_clamped_to_e8m0_range() -> None:
    tiny = _mx_block([math.ldexp(1.0, -140)])  # fp32 subnormal, below 2^-127 · 0.25
    _, scales = quantize_mxfp4(tiny)
    assert scales.item() == 0
    huge = _mx_block([3e38])
    packed, scales = quantize_mxfp4(huge)
    assert scales.item() == 127 + 125  # 3e38 = 1.76 · 2^127 -> floor(log2) - 2 = 125
    assert dequantize_mxfp4(packed, scales)[0].item() == math.ldexp(6.0, 125)


def test_mxfp4_non_finite_block_gets_nan_scale() -> None:
    w = torch.ones(3, 32)
    w[1, 4] = math.nan
    w[2, 0] = math.inf
    packed, scales = quantize_mxfp4(w)
    assert scales[:, 0].tolist() == [125, 0xFF, 0xFF]
    out = dequantize_mxfp4(packed, scales)
    assert out[0].eq(1.0).all() and out[1:].isnan().all()


def test_mxfp4_round_trip_is_nearest_grid_point(gen: torch.Generator) -> None:
    w = randn(gen, 6, 4, 64) * torch.logspace(-3, 3, 6)[:, None, None]
    packed, scales = quantize_mxfp4(w)
    assert packed.shape == (6, 4, 32) and scales.shape == (6, 4, 2) and packed.dtype == scales.dtype == torch.uint8
    out = dequantize_mxfp4(packed, scales)
    scale = e8m0_to_float(scales).repeat_interleave(32, dim=-1)
    grid = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))
    best = (w[..., None] - grid * scale[..., None]).abs().min(dim=-1).values
    assert torch.allclose((w - out).abs(), best, rtol=1e-6, atol=0)
    assert (w - out).norm() / w.norm() < 0.15


def test_mxfp4_rejects_ragged_last_dim() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.ones(4, 48))


# ---------------------------------------------------------------- nvfp4

def test_nvfp4_hand_vectors() -> None:
    # Matrix amax 5.25 = 2688 · 2^-9, so every scale below is exact: global 2^-9; row 0's block
    # scale 5.25 / 6 / 2^-9 = 448 (effective 0.875); row 1's 2.625 / 6 / 2^-9 = 224 (effective 0.4375).
    w = torch.zeros(3, 16)
    w[0, :4] = 0.875 * torch.tensor([6.0, -1.5, 0.25, 5.0])
    w[1, :2] = 0.4375 * torch.tensor([6.0, 2.0])
    packed, scales, global_scale = quantize_nvfp4(w)  # row 2 is all zero: block scale 0
    assert global_scale.item() == 2**-9
    assert scales.dtype == FP8_DTYPE and scales.float()[:, 0].tolist() == [448.0, 224.0, 0.0]
    assert packed[0, :2].tolist() == [0xB7, 0x60]  # 6 -> 7, -1.5 -> 0xB, 0.25 -> 0 and 5 -> 6 (ties to even)
    assert packed[1, 0].item() == 0x47              # 6 -> 7, 2 -> 4
    out = dequantize_nvfp4(packed, scales, global_scale)
    assert out[0, :4].tolist() == [5.25, -1.3125, 0.0, 3.5]
    assert out[1, :2].tolist() == [2.625, 0.875]
    assert out[2].eq(0).all()


def test_nvfp4_round_trip_is_nearest_grid_point(gen: torch.Generator) -> None:
    w = randn(gen, 3, 8, 64) * torch.tensor([1e-3, 1.0, 50.0])[:, None, None]
    packed, scales, global_scale = quantize_nvfp4(w)
    assert packed.shape == (3, 8, 32) and scales.shape == (3, 8, 4) and global_scale.shape == (3,)
    assert torch.allclose(global_scale, w.abs().amax(dim=(1, 2)) / 2688)
    expected_block = (w.reshape(3, 8, 4, 16).abs().amax(-1) / 6 / global_scale[:, None, None]).to(FP8_DTYPE)
    assert torch.equal(scales.float(), expected_block.float())
    out = dequantize_nvfp4(packed, scales, global_scale)
    effective = (scales.float() * global_scale[:, None, None]).repeat_interleave(16, dim=-1)
    grid = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))
    best = (w[..., None] - grid * effective[..., None]).abs().min(dim=-1).values
    assert torch.allclose((w - out).abs(), best, rtol=1e-5, atol=1e-12)
    assert (w - out).norm() / w.norm() < 0.13


# ---------------------------------------------------------------- fp8 weights and activations

def _fp8_error_ok(w: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> bool:
    """Within half an E4M3 step: 2^-4 relative for normals, 2^-10 · scale in the subnormal range."""
    return bool(((w - out).abs() <= torch.maximum(w.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)).all())


def test_fp8_per_tensor_weight(gen: torch.Generator) -> None:
    w = randn(gen, 3, 40, 72) * torch.tensor([0.01, 1.0, 300.0])[:, None, None]
    q = quantize_weight(w, DType.FP8_W8A8)
    assert q.data.dtype == FP8_DTYPE and q.scale.shape == (3,) and q.block_shape is None
    assert torch.allclose(q.scale, w.abs().amax(dim=(1, 2)) / 448)
    assert q.data.float().abs().amax(dim=(1, 2)).tolist() == [448.0] * 3
    assert _fp8_error_ok(w, q.dequantize(), q.scale[:, None, None])


def test_fp8_block_weight_with_partial_blocks(gen: torch.Generator) -> None:
    E, R, C, bn, bk = 2, 40, 70, 16, 32
    w = randn(gen, E, R, C)
    w[1, 32:, 64:] *= 100  # a hot partial corner block must not leak into its neighbours
    q = quantize_weight(w, DType.FP8_W8A8, block_shape=(bn, bk))
    assert q.scale.shape == (E, 3, 3) and q.block_shape == (bn, bk)
    for e in range(E):
        for i in range(3):
            for j in range(3):
                block = w[e, i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
                assert q.scale[e, i, j].item() == pytest.approx(block.abs().max().item() / 448, rel=1e-6)
    expanded = q.scale.repeat_interleave(bn, 1)[:, :R].repeat_interleave(bk, 2)[:, :, :C]
    assert _fp8_error_ok(w, q.dequantize(), expanded)


def test_fp8_activation_per_tensor_dynamic_and_static(gen: torch.Generator) -> None:
    x = (randn(gen, 5, 70) * 4).bfloat16()
    x_fp8, scale = quantize_fp8_activation(x, None)
    assert x_fp8.dtype == FP8_DTYPE and x_fp8.shape == (5, 70) and scale.shape == (1,)
    assert scale.item() == pytest.approx(x.float().abs().max().item() / 448, rel=1e-6)
    assert _fp8_error_ok(x.float(), dequantize_fp8_activation(x_fp8, scale, None), scale)
    static = torch.tensor([0.25])
    x_fp8, scale = quantize_fp8_activation(torch.tensor([[1.0, -200.0, 0.3]]), None, static_scale=static)
    assert scale.tolist() == [0.25]
    assert x_fp8.float().tolist() == [[4.0, -448.0, 1.25]]  # -800 saturates; 1.2 rounds to 1.25


def test_fp8_activation_per_token_groups_with_partial_group(gen: torch.Generator) -> None:
    x = randn(gen, 4, 70).bfloat16()
    x[2, 64:] *= 50
    x_fp8, scale = quantize_fp8_activation(x, 32)
    assert scale.shape == (4, 3) and x_fp8.shape == (4, 70)
    groups = [x.float()[:, g * 32:(g + 1) * 32].abs().amax(dim=1) / 448 for g in range(3)]
    assert torch.allclose(scale, torch.stack(groups, dim=1))
    out = dequantize_fp8_activation(x_fp8, scale, 32)
    assert _fp8_error_ok(x.float(), out, scale.repeat_interleave(32, dim=1)[:, :70])
    with pytest.raises(ValueError):
        quantize_fp8_activation(x, 32, static_scale=torch.tensor([1.0]))


def test_fp8_all_zero_input_stays_finite() -> None:
    x_fp8, scale = quantize_fp8_activation(torch.zeros(2, 64), 32)
    assert torch.isfinite(scale).all() and (scale > 0).all() and x_fp8.float().eq(0).all()
    q = quantize_weight(torch.zeros(1, 16, 64), DType.FP8_W8A8)
    assert q.dequantize().eq(0).all()


# ---------------------------------------------------------------- int8 w8a16

def test_int8_per_channel_hand_vector() -> None:
    # Row amaxes 127 and 127 · 2^-7 give exact scales 1 and 2^-7.
    w = torch.tensor([[[127.0, 63.5, -0.5, 1.5, 2.5, -127.0], [0.5, 0.25, -0.2, 0.0, 0.125, 0.9921875]]])
    q = quantize_weight(w, DType.INT8_W8A16)
    assert q.data.dtype == torch.int8 and q.scale.shape == (1, 2)
    assert q.scale[0].tolist() == [1.0, 2**-7]
    assert q.data[0, 0].tolist() == [127, 64, 0, 2, 2, -127]  # halves round to even
    assert q.data[0, 1].tolist() == [64, 32, -26, 0, 16, 127]


def test_int8_round_trip(gen: torch.Generator) -> None:
    w = randn(gen, 2, 24, 40) * torch.logspace(-2, 2, 24)[None, :, None]
    q = quantize_weight(w, DType.INT8_W8A16)
    scale = w.abs().amax(dim=2) / 127
    assert torch.allclose(q.scale, scale)
    assert ((q.dequantize() - w).abs() <= scale[..., None] / 2 * (1 + 1e-5)).all()


# ---------------------------------------------------------------- QuantizedWeight over every dtype

ALL_FORMATS = [
    (DType.BF16, None, torch.bfloat16, None, 4e-3),
    (DType.FP16, None, torch.float16, None, 5e-4),
    (DType.FP8_W8A8, None, FP8_DTYPE, (3,), 4e-2),
    (DType.FP8_W8A8, (32, 64), FP8_DTYPE, (3, 2, 2), 4e-2),
    (DType.INT8_W8A16, None, torch.int8, (3, 48), 1e-2),
    (DType.MXFP4, None, torch.uint8, (3, 48, 4), 0.15),
    (DType.NVFP4, None, torch.uint8, (3, 48, 8), 0.13),
]


@pytest.mark.parametrize("dtype,block_shape,data_dtype,scale_shape,max_rel_err", ALL_FORMATS)
def test_quantized_weight_layout_and_round_trip(gen: torch.Generator, dtype: DType, block_shape, data_dtype,
                                                scale_shape, max_rel_err: float) -> None:
    w = randn(gen, 3, 48, 128) * 0.05
    q = quantize_weight(w, dtype, block_shape)
    packed = dtype in (DType.MXFP4, DType.NVFP4)
    assert isinstance(q, QuantizedWeight) and q.dtype is dtype and q.shape == (3, 48, 128)
    assert q.data.dtype == data_dtype and q.data.shape == (3, 48, 64 if packed else 128)
    assert (q.scale is None if scale_shape is None else tuple(q.scale.shape) == scale_shape)
    assert (q.global_scale is not None) == (dtype is DType.NVFP4)
    out = q.dequantize()
    assert out.dtype == torch.float32 and out.shape == w.shape
    assert torch.equal(out[1], q.dequantize_expert(1))
    assert (out - w).norm() / w.norm() < max_rel_err


def test_quantize_weight_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="fp8_w8a8 only"):
        quantize_weight(torch.ones(1, 4, 32), DType.INT8_W8A16, block_shape=(128, 128))
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_weight(torch.ones(1, 4, 48), DType.MXFP4)
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_weight(torch.ones(1, 4, 40), DType.NVFP4)
    with pytest.raises(ValueError, match=r"\[E, R, C\]"):
        quantize_weight(torch.ones(4, 32), DType.FP8_W8A8)
