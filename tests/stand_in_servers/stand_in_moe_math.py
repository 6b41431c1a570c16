"""The MoE both stand-ins compute: fp32, weights dequantized, no activation quantization."""

import torch

CONFIG_KEYS = {"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages"}


def check_forced(config):
    if config is None or set(config) != CONFIG_KEYS:
        raise RuntimeError(f"stand-in fused_experts called without a forced config: {config!r}")


def dequantize(w, scale, block_shape):
    w = w.float()
    if scale is None:
        return w
    if block_shape is not None:
        bn, bk = block_shape
        full = scale.repeat_interleave(bn, dim=1).repeat_interleave(bk, dim=2)
        return w * full[:, : w.shape[1], : w.shape[2]]
    if scale.dim() == 1:
        return w * scale[:, None, None]
    return w * scale[:, :, None]


def moe(x, w1, w2, topk_weights, topk_ids):
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    n = w2.shape[2]
    xf = x.float()
    for e in range(w1.shape[0]):
        rows, slots = (topk_ids == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        h = xf[rows] @ w1[e].T
        act = torch.nn.functional.silu(h[:, :n]) * h[:, n:]
        out.index_add_(0, rows, (act @ w2[e].T) * topk_weights[rows, slots, None].float())
    return out.to(x.dtype)
