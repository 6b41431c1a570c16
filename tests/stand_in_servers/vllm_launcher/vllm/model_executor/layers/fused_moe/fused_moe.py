"""Stand-in of vLLM's fused_moe module without compiled ops: the per-GEMM launcher
``invoke_fused_moe_triton_kernel`` (vLLM 0.33's signature) and ``_prepare_expert_assignment``,
whose sort is a compiled op in vLLM and raises here."""

import stand_in_moe_math as math_
import torch

LAUNCHES = []


def moe_align_block_size(*args, **kwargs):
    raise RuntimeError("stand-in: the token sort is a compiled op, not available here")


def _prepare_expert_assignment(topk_ids, config, num_tokens, top_k_num, global_num_experts, expert_map, *,
                               use_int8_w8a16=False, use_int4_w4a16=False, block_shape=None,
                               ignore_invalid_experts=False, weights_host_resident=False):
    if num_tokens * top_k_num * 4 <= global_num_experts:
        return None, topk_ids.view(-1), torch.full((1,), topk_ids.numel() * config["BLOCK_SIZE_M"],
                                                   dtype=torch.int32, device=topk_ids.device)
    return moe_align_block_size(topk_ids, config["BLOCK_SIZE_M"], global_num_experts, expert_map)


def invoke_fused_moe_triton_kernel(A, B, C, A_scale, B_scale, topk_weights, sorted_token_ids, expert_ids,
                                   num_tokens_post_padded, mul_routed_weight, top_k, config, compute_type,
                                   use_fp8_w8a8, use_int8_w8a8, use_int8_w8a16, use_int4_w4a16,
                                   per_channel_quant, block_shape=None, B_bias=None):
    assert C.dim() == 3, "vLLM's launcher reads C.stride(1) and C.stride(2)"
    LAUNCHES.append({"config": dict(config), "naive": sorted_token_ids is None, "use_fp8_w8a8": use_fp8_w8a8,
                     "a_dtype": A.dtype, "top_k": top_k, "block_shape": block_shape})
    math_.launch(A, A_scale, B, B_scale, C, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded,
                 mul_routed_weight, top_k, config, block_shape)
