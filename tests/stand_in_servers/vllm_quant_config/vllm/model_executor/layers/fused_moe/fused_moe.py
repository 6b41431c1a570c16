"""Stand-in of vLLM's ``fused_experts`` (quant_config form)."""

import stand_in_moe_math as math_
import torch
from vllm.model_executor.layers.fused_moe import get_config

CALLS = []


def fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, inplace=False, activation="silu",
                  quant_config=None):
    config = get_config()
    math_.check_forced(config)
    CALLS.append({"config": dict(config), "quant_config": quant_config, "inplace": inplace})
    scale1 = quant_config.w1_scale if quant_config else None
    scale2 = quant_config.w2_scale if quant_config else None
    block = quant_config.block_shape if quant_config else None
    fp8 = quant_config is not None and quant_config.quant_dtype == torch.float8_e4m3fn
    out = math_.moe(hidden_states, math_.dequantize(w1, scale1, block), math_.dequantize(w2, scale2, block),
                    topk_weights, topk_ids, fp8, block)
    if inplace:
        hidden_states.copy_(out)
        return hidden_states
    return out
