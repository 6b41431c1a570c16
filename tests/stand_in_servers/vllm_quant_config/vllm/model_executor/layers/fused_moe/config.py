"""Stand-in of vLLM's quant-config builders (recent releases)."""

from dataclasses import dataclass

import torch


@dataclass
class FusedMoEQuantConfig:
    quant_dtype: object
    w1_scale: object
    w2_scale: object
    a1_scale: object = None
    a2_scale: object = None
    block_shape: object = None


def fp8_w8a8_moe_quant_config(w1_scale, w2_scale, a1_scale=None, a2_scale=None, per_act_token_quant=False,
                              per_out_ch_quant=False, block_shape=None):
    return FusedMoEQuantConfig(torch.float8_e4m3fn, w1_scale, w2_scale, a1_scale, a2_scale, block_shape)


def int8_w8a16_moe_quant_config(w1_scale, w2_scale, w1_zp, w2_zp, block_shape=None):
    return FusedMoEQuantConfig(torch.int8, w1_scale, w2_scale, block_shape=block_shape)
