"""Stand-in of vLLM's ``fused_experts`` (quant_config form)."""

import stand_in_moe_math as math_
import torch

CALLS = []


def fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, inplace=False, activation="silu",
                  quant_config=None):
    quant = quant_config
    return math_.fused_experts(CALLS, {"quant_config": quant}, hidden_states, w1, w2, topk_weights, topk_ids,
                               inplace=inplace, fp8=quant is not None and quant.quant_dtype == torch.float8_e4m3fn,
                               w1_scale=quant.w1_scale if quant else None, w2_scale=quant.w2_scale if quant else None,
                               block_shape=quant.block_shape if quant else None)
