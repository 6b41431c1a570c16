"""What every stand-in server shares, so that each stand-in module holds only its server's call form.

- ``override_config`` / ``get_config``: the servers' pair that forces one config for the calls
  inside the ``with`` (each stand-in re-exports it where its server has it).
- ``fused_experts``: what each stand-in ``fused_experts`` does once its own signature is read:
  refuse an unforced config, record the call, compute, and write in place when asked.
- The MoE every stand-in computes: fp32 GEMMs on dequantized weights; for fp8_w8a8 the activations
  are quantized as the servers' Triton path does (dynamic e4m3: one scale per tensor, or per token
  and K group of the weight block), both the input and the SwiGLU output, after the gate/up output
  is stored in the activation dtype. ``launch`` is one GEMM of the servers' per-GEMM launchers.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F

CONFIG_KEYS = {"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages"}
E4M3_MAX = 448.0


_config = None


@contextmanager
def override_config(config):
    global _config
    previous, _config = _config, config
    try:
        yield
    finally:
        _config = previous


def get_config():
    return _config


def check_forced(config):
    if config is None or set(config) != CONFIG_KEYS:
        raise RuntimeError(f"stand-in fused_experts called without a forced config: {config!r}")


def fused_experts(calls, call, hidden_states, w1, w2, topk_weights, topk_ids, *, inplace, fp8, w1_scale, w2_scale,
                  block_shape):
    """A server's ``fused_experts`` once its call form is read: refuses to run unless a config is
    forced, appends ``call`` (what that server was given) with the forced config and ``inplace`` to
    ``calls``, and returns the MoE (written into ``hidden_states`` when ``inplace``)."""
    check_forced(_config)
    calls.append({"config": dict(_config), "inplace": inplace, **call})
    out = moe(hidden_states, dequantize(w1, w1_scale, block_shape), dequantize(w2, w2_scale, block_shape),
              topk_weights, topk_ids, fp8, block_shape)
    if inplace:
        hidden_states.copy_(out)
        return hidden_states
    return out


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


def fp8_activation(a, group_k):
    """``a [T, C]`` through dynamic e4m3 quantization and back (fp32)."""
    a = a.float()
    if group_k is None:
        scale = a.abs().amax().clamp_min(1e-12) / E4M3_MAX
        return (a / scale).to(torch.float8_e4m3fn).float() * scale
    T, C = a.shape
    groups = F.pad(a, (0, (-C) % group_k)).view(T, -1, group_k)
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    return ((groups / scale).to(torch.float8_e4m3fn).float() * scale).view(T, -1)[:, :C]


def moe(x, w1, w2, topk_weights, topk_ids, fp8=False, block_shape=None):
    group_k = block_shape[1] if fp8 and block_shape else None
    M, topk = topk_ids.shape
    n = w2.shape[2]
    xf = fp8_activation(x, group_k) if fp8 else x.float()
    act = torch.zeros(M, topk, n, dtype=torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        rows, slots = (topk_ids == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        h = xf[rows] @ w1[e].T
        if fp8:
            h = h.to(x.dtype).float()
        act[rows, slots] = F.silu(h[:, :n]) * h[:, n:]
    if fp8:
        act = fp8_activation(act.view(M * topk, n).to(x.dtype), group_k).view(M, topk, n)
    out = torch.zeros(M, w2.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        rows, slots = (topk_ids == e).nonzero(as_tuple=True)
        if rows.numel():
            out.index_add_(0, rows, (act[rows, slots] @ w2[e].T) * topk_weights[rows, slots, None].float())
    return out.to(x.dtype)


def launch(A, A_scale, B, B_scale, C, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded,
           mul_routed_weight, top_k, config, block_shape):
    """One GEMM as the servers' per-GEMM launchers compute it: ``C[pair] = A[pair // top_k] @ B[e]^T``
    for the rows the sort assigned to expert ``e`` (× the pair's routing weight when asked)."""
    check_forced(config)
    a = A.float()
    if A_scale is not None:
        a = a * (A_scale.repeat_interleave(block_shape[1], dim=1)[:, : a.shape[1]] if A_scale.dim() == 2
                 else A_scale)
    b = dequantize(B, B_scale, block_shape)
    c = C.view(-1, C.shape[-1])
    weights = topk_weights.reshape(-1).float()
    if sorted_token_ids is None:  # one block per (token, expert) pair, unsorted
        assignments = [(pair, int(e)) for pair, e in enumerate(expert_ids.tolist())]
    else:
        block_m = config["BLOCK_SIZE_M"]
        used = int(num_tokens_post_padded[0])
        assignments = [(int(row), int(expert_ids[i // block_m]))
                       for i, row in enumerate(sorted_token_ids[:used].tolist()) if row < c.shape[0]]
    for pair, e in assignments:
        value = a[pair // top_k] @ b[e].T
        if mul_routed_weight:
            value = value * weights[pair]
        c[pair] = value.to(C.dtype)
