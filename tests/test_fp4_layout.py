"""The fp4 atom layout (``workers.fp4_layout``) and the kernel path that reads it, under the interpreter."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated

import pytest
import torch

from tests.test_kernel import BOUNDS, make_problem, run_checked
from workers.align import TokenAligner
from workers.fp4_layout import WORD_BITS, Fp4Atoms, prepare_atoms
from workers.fused_moe_kernel import launch_moe_gemm
from workers.moe import MoERunner
from workers.problem import rel_error
from workers.quant import QuantizedWeight, decode_e2m1, quantize_weight
from workers.records import Config, DType


def _unprepare_codes(atoms: Fp4Atoms) -> torch.Tensor:
    """Codes [E, R, C] back from the atoms, by the layout's definition (the row, K and bits of
    value (c, p, e) of word 2r + h of lane 4g + q in atom (i, j)), value by value."""
    E = atoms.shape[0]
    out = torch.full((E, atoms.data.shape[1] * 16, atoms.data.shape[2] * 64), 255, dtype=torch.int64)
    words = atoms.data.to(torch.int64) & 0xFFFFFFFF
    for lane in range(32):
        g, q = divmod(lane, 4)
        for r in range(2):
            for h in range(2):
                word = words[..., 4 * lane + 2 * r + h]  # [E, i, j]
                for c in range(2):
                    for p in range(2):
                        for e in range(2):
                            code = sum(((word >> (position + 16 * e)) & 1) << bit
                                       for bit, position in zip((3, 2, 1, 0), WORD_BITS[2 * c + p]))
                            k = 32 * h + 16 * c + 8 * p + 2 * q + e
                            for i in range(words.shape[1]):
                                for j in range(words.shape[2]):
                                    out[:, 16 * i + 8 * r + g, 64 * j + k] = code[:, i, j]
    return out


@pytest.mark.parametrize("dtype, R, C", [(DType.MXFP4, 48, 96), (DType.NVFP4, 40, 80), (DType.NVFP4, 16, 64)])
def test_atoms_hold_every_code_where_the_layout_says(dtype, R, C, generator):
    weight = quantize_weight(torch.randn((2, R, C), generator=generator), dtype)
    atoms = prepare_atoms(weight)
    assert atoms.shape == (2, R, C) and atoms.data.shape == (2, -(-R // 16), -(-C // 64), 128)
    assert atoms.data.dtype == torch.int32
    codes = _unprepare_codes(atoms)
    packed = weight.data.to(torch.int64)
    assert torch.equal(codes[:, :R, :C], torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2))
    assert bool((codes[:, R:] == 0).all()) and bool((codes[:, :, C:] == 0).all())  # padding: code 0
    G = C // (32 if dtype is DType.MXFP4 else 16)
    assert atoms.scale.stride() == (atoms.scale.shape[1] * atoms.scale.shape[2], 1, atoms.scale.shape[1])
    if dtype is DType.NVFP4:
        bits = (atoms.scale[:, :R, :G].to(torch.int32) * 16 + 0x7580).to(torch.int16).view(torch.bfloat16)
        assert torch.equal(bits.double(), weight.scale.double() * 2.0 ** 117)
        assert torch.equal(atoms.global_scale, weight.global_scale.float() * 512)


def test_mxfp4_scales_move_their_exponent_to_the_global_scale():
    """E8M0 exponents above 128 (scales >= 4) are shifted per expert into a power-of-two global
    scale; the product scale × global scale is unchanged, and unrepresentable inputs are refused."""
    data = torch.zeros((2, 16, 32), dtype=torch.uint8)
    s = torch.tensor([[[120, 130]] * 16, [[127, 3]] * 16], dtype=torch.uint8)  # expert 0 max 130
    atoms = prepare_atoms(QuantizedWeight(DType.MXFP4, data, s))
    assert atoms.global_scale.tolist() == [4.0, 1.0]
    assert atoms.scale[0, 0, :2].tolist() == [118, 128] and atoms.scale[1, 0, :2].tolist() == [127, 3]
    with pytest.raises(ValueError, match="NaN"):
        prepare_atoms(QuantizedWeight(DType.MXFP4, data, torch.full((2, 16, 2), 255, dtype=torch.uint8)))
    wide = s.clone()
    wide[0, 0] = torch.tensor([254, 0])
    with pytest.raises(ValueError, match="128 binades"):
        prepare_atoms(QuantizedWeight(DType.MXFP4, data, wide))
    with pytest.raises(ValueError, match="mxfp4/nvfp4"):
        prepare_atoms(QuantizedWeight(DType.BF16, torch.zeros((1, 16, 64), dtype=torch.bfloat16)))


@pytest.mark.parametrize("dtype, M, topk, N, K, config, down", [
    (DType.MXFP4, 1, 2, 64, 96, Config(16, 64, 64, 1, 4, 2), None),       # one token; K 96 = 1.5 atoms
    (DType.MXFP4, 9, 2, 96, 160, Config(32, 32, 128, 1, 4, 2), None),     # partial K step, N 96 = 3 tiles
    (DType.NVFP4, 12, 2, 48, 80, Config(16, 32, 64, 1, 4, 2), None),      # K 80 and 48 pad to 128 and 64
    (DType.NVFP4, 20, 1, 48, 80, Config(16, 16, 64, 1, 4, 2),             # top-1, another down config
     Config(32, 64, 64, 1, 4, 2)),
])
def test_atoms_match_reference(dtype, M, topk, N, K, config, down, generator):
    """Both GEMMs from the atom layout (swapped operands), routed weights on the down GEMM, odd
    sizes and partial tiles; both formats; the same result as the row-major layout."""
    problem = make_problem(M, 4, N, K, topk, dtype, generator)
    runner = MoERunner(*problem, config, down)
    assert isinstance(runner.w13, Fp4Atoms)
    assert run_checked(problem, config, down) < BOUNDS[dtype]
    rows = MoERunner(*problem, config, down, fp4_atoms=False)
    assert isinstance(rows.w13, QuantizedWeight)
    assert rel_error(runner.run(), rows.run().float()) < 1e-2


def test_nvfp4_negative_and_zero_scales(generator):
    """A negative block scale flips its codes' signs, a zero one zeroes its codes: the same
    products, so the GEMM still matches the reference."""
    x, w13, w2, topk_weights, topk_ids = make_problem(6, 4, 64, 128, 2, DType.NVFP4, generator)
    scale = w13.scale.float()
    scale[:, ::3, 1] = 0.0
    scale[:, 1::2, 2] *= -1
    odd = QuantizedWeight(DType.NVFP4, w13.data, scale.to(torch.float8_e4m3fn), w13.global_scale)
    atoms = prepare_atoms(odd)
    packed = w13.data.to(torch.int64)
    plain = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
    codes = _unprepare_codes(atoms)[:, :128, :128]
    assert bool((codes[:, ::3, 16:32] == 0).all())
    assert torch.equal(codes[:, 1::2, 32:48], plain[:, 1::2, 32:48] ^ 8)
    problem = (x, odd, w2, topk_weights, topk_ids)
    assert run_checked(problem, Config(16, 64, 64, 1, 4, 2)) < BOUNDS[DType.NVFP4]


def test_mxfp4_atoms_with_large_scales(generator):
    """Weights with block scales >= 4 (a global exponent offset) still match the reference."""
    problem = make_problem(6, 4, 64, 128, 2, DType.MXFP4, generator)
    x, w13, w2, topk_weights, topk_ids = problem
    big = QuantizedWeight(DType.MXFP4, w13.data, (w13.scale.to(torch.int32) + 10).to(torch.uint8))
    assert int(big.scale.max()) > 128
    problem = (x, big, w2, topk_weights, topk_ids)
    assert prepare_atoms(big).global_scale.max() > 1
    assert run_checked(problem, Config(16, 64, 64, 1, 4, 2)) < BOUNDS[DType.MXFP4]


def test_configs_without_whole_atoms(generator):
    """A config whose tile does not cover whole atoms keeps the row-major layout in the runner;
    launched directly on atoms it is refused."""
    x, w13, w2, tw, ids = make_problem(4, 2, 64, 96, 1, DType.MXFP4, generator)
    assert isinstance(MoERunner(x, w13, w2, tw, ids, Config(16, 32, 32, 1, 4, 2)).w13, QuantizedWeight)
    sort = TokenAligner(4, 2, 16, "cpu").run(ids)
    out = torch.empty((4, 128), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="atom layout needs"):
        launch_moe_gemm(x, None, prepare_atoms(w13), out, sort, None, top_k=1, config=Config(16, 32, 32, 1, 4, 2))


@pytest.mark.parametrize("dtype", [DType.MXFP4, DType.NVFP4])
def test_meta_weights_prepare_by_shape(dtype, generator):
    """Compile-ahead runners hold meta tensors: the atoms get the shapes, dtypes and strides a real
    preparation gives (so the same kernel specialization), without reading values."""
    real = prepare_atoms(quantize_weight(torch.randn((2, 48, 96), generator=generator), dtype))
    meta = prepare_atoms(quantize_weight(torch.empty((2, 48, 96), device="meta"), dtype))
    for a, b in ((real.data, meta.data), (real.scale, meta.scale), (real.global_scale, meta.global_scale)):
        assert b.is_meta and (a.shape, a.stride(), a.dtype) == (b.shape, b.stride(), b.dtype)


def test_runners_on_one_weight_share_its_prepared_layouts(generator):
    """The atom preparation (and the K-group-major scale copy) runs once per weight object, not per
    runner (a tune builds a runner per candidate); the entries go when the weight is freed."""
    import gc

    from workers import moe

    x, w13, w2, tw, ids = make_problem(4, 2, 64, 128, 1, DType.NVFP4, generator)
    atoms, rows = Config(16, 64, 64, 1, 4, 2), Config(16, 32, 32, 1, 4, 2)
    first, again = MoERunner(x, w13, w2, tw, ids, atoms), MoERunner(x, w13, w2, tw, ids, Config(32, 64, 128, 1, 4, 2))
    assert isinstance(first.w13, Fp4Atoms) and first.w13 is again.w13 and first.w2 is again.w2
    plain = MoERunner(x, w13, w2, tw, ids, rows)
    assert isinstance(plain.w13, QuantizedWeight) and plain.w13 is MoERunner(x, w13, w2, tw, ids, rows).w13
    other = QuantizedWeight(w13.dtype, w13.data, (-w13.scale.float()).to(w13.scale.dtype), w13.global_scale)
    assert MoERunner(x, other, w2, tw, ids, atoms).w13 is not first.w13  # same packed data, other scales
    keys = {(id(w13), True), (id(w13), False)}
    assert keys <= set(moe._prepared)
    del first, again, plain, other, w13
    gc.collect()
    assert not keys & set(moe._prepared)
