"""Format facts and device facts: one definition each, read the same way by every consumer."""

from __future__ import annotations

import itertools
import math

import pytest

from tuner import cost_model, roofline
from tuner.devices import KNOWN_DEVICES, device_facts
from tuner.spaces import DeviceLimits
from workers.formats import FORMATS, TILE_RULES, format_of, tile_rule_broken
from workers.records import Config, DType, MoEShape


@pytest.mark.parametrize("reported,listed", [
    ("NVIDIA H100 80GB HBM3", "H100 80GB HBM3"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA_H200", "H200"),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"), ("NVIDIA A100-PCIE-40GB", "A100 PCIE 40GB"),
    ("NVIDIA GH200 480GB", "GH200"), ("NVIDIA A100-SXM4-80GB", "A100 SXM4 80GB"), ("NVIDIA A10", "A10"),
    ("NVIDIA A10G", "A10G"), ("NVIDIA L40S", "L40S"), ("NVIDIA GeForce RTX 4090", "4090"),
])
def test_a_reported_name_finds_its_own_entry(reported: str, listed: str) -> None:
    assert device_facts(reported).name == listed


def test_every_listed_gpu_has_a_compute_capability() -> None:
    """The servers choose fp4 kernels by it (``tuner.dispatch``): no listed GPU may lack one."""
    for facts in KNOWN_DEVICES:
        assert facts.compute_capability is not None and 7 <= facts.compute_capability[0] <= 12, facts.name
    assert device_facts("NVIDIA B300").compute_capability == (10, 3)


def test_an_unknown_gpu_gets_no_facts_and_every_consumer_says_so() -> None:
    name = "Some Future GPU"
    assert device_facts(name) is None and roofline.device_peaks(name) is None
    limits = DeviceLimits.for_device(name)
    assert not limits.known and name in limits.note
    assert limits.shared_memory_bytes == max(f.shared_memory_bytes for f in KNOWN_DEVICES)
    assert DeviceLimits.for_device("NVIDIA H200").note is None
    assert roofline.device_peaks("NVIDIA GH200 480GB") is None  # listed, but its peaks are not


def test_the_cost_model_reference_gpu_is_a_listed_one() -> None:
    facts = device_facts(cost_model.REFERENCE_GPU)
    assert (cost_model.SMS, cost_model.SHARED_MEMORY) == (facts.sms, facts.shared_memory_bytes)


def test_weight_bytes_count_data_and_every_scale() -> None:
    E, rows, cols = 3, 64, 128
    elements = E * rows * cols
    expected = {
        (DType.BF16, None): 2 * elements,
        (DType.FP8_W8A8, None): elements + 4 * E,
        (DType.FP8_W8A8, (32, 48)): elements + 4 * E * 2 * math.ceil(128 / 48),
        (DType.INT8_W8A16, None): elements + 4 * E * rows,
        (DType.MXFP4, None): elements // 2 + elements // 32,
        (DType.NVFP4, None): elements // 2 + elements // 16 + 4 * E,
        (DType.INT4_W4A16, (0, 32)): elements // 2 + 2 * E * rows * math.ceil(cols / 32),
        (DType.INT4_W4A16, (0, -1)): elements // 2 + 2 * E * rows,
    }
    for (dtype, block), size in expected.items():
        assert format_of(dtype).weight_bytes(E, rows, cols, block) == size, (dtype, block)
    shape = MoEShape(E=E, N=rows, K=cols, topk=2, dtype=DType.MXFP4)
    assert roofline.weight_bytes(shape) == (format_of(DType.MXFP4).weight_bytes(E, 2 * rows, cols)
                                            + format_of(DType.MXFP4).weight_bytes(E, cols, rows))


def test_tile_rules_name_the_first_broken_rule() -> None:
    sizes = [8, 16, 32, 64, 128]
    for dtype, (bm, bn, bk) in itertools.product(FORMATS, itertools.product(sizes, repeat=3)):
        config = Config(bm, bn, bk, 1, 4, 2)
        block = (64, 96) if format_of(dtype).block_shapes else None
        launched_bk = min(bk, 64) if block else bk  # the servers clamp BLOCK_SIZE_K to the block's smaller side
        broken = tile_rule_broken(config, dtype, block)
        if min(bm, bn, launched_bk) < 16:
            assert broken[0] == "tile_min"
        elif block and 96 % launched_bk:  # any BLOCK_SIZE_N: weight scales are read per column
            assert broken[0] == "block_quant"
        elif format_of(dtype).scale_group and bk % format_of(dtype).scale_group:
            assert broken[0] == "fp4_group"
        else:
            assert broken is None
        assert broken is None or broken[0] in TILE_RULES


def test_a_near_name_gets_only_the_family_facts() -> None:
    """The issue's case: "A100 80GB PCIe" is no 40 GB A100; an unlisted variant of a family gets
    the family's shared memory and nothing that differs between variants."""
    assert device_facts("NVIDIA A100 80GB PCIe").sms == 108
    assert roofline.device_peaks("NVIDIA A100 80GB PCIe").hbm_bytes_per_s == 1.935e12
    variant = device_facts("NVIDIA A100 96GB Future")
    assert variant.name == "A100" and variant.shared_memory_bytes == 163 * 1024
    assert (variant.sms, variant.hbm_bytes_per_s, roofline.device_peaks("NVIDIA A100 96GB Future")) == (None, None, None)
    assert device_facts("NVIDIA H100 96GB Future").sms is None
