"""Stand-in of vLLM's ``fused_experts`` before ``quant_config``: quantization by keywords."""

import stand_in_moe_math as math_

CALLS = []


def fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, inplace=False, activation="silu",
                  use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=False, use_int4_w4a16=False,
                  per_channel_quant=False, global_num_experts=-1, expert_map=None, w1_scale=None, w2_scale=None,
                  w1_zp=None, w2_zp=None, a1_scale=None, a2_scale=None, block_shape=None):
    call = {"use_fp8_w8a8": use_fp8_w8a8, "use_int8_w8a16": use_int8_w8a16, "w1_scale": w1_scale,
            "w2_scale": w2_scale, "a1_scale": a1_scale, "block_shape": block_shape}
    return math_.fused_experts(CALLS, call, hidden_states, w1, w2, topk_weights, topk_ids, inplace=inplace,
                               fp8=use_fp8_w8a8, w1_scale=w1_scale, w2_scale=w2_scale, block_shape=block_shape)
