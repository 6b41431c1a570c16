"""Scratch buffers that the runners of one problem share, so that candidates timed back to back
differ in their config only.

A runner allocates its intermediates (the up GEMM's output, the activation, the down GEMM's
rows, fp8 copies and scales, the token sort) once. When every runner allocates its own, the
candidates of one comparison read and write different device addresses, and on an H200 that
alone moved two runners of the *same* config apart by up to 2.3% in the same interleaved rounds
(vLLM 0.33's kernel, Mixtral-8x7B TP2 fp8_w8a8 at M=4096: 1777.0 vs 1737.6 µs, each runner
consistently on its side over three rounds; bf16 M=3072: 1.6%). That is more than the 1% a
tune must resolve. The worker gives every runner of one problem one ``Workspace``; runners of a
problem run one at a time (measure, re-time), so they can share buffers: a tensor asked for under
the same role, shape and dtype is the same tensor.

A runner built without a workspace (``PRIVATE``) allocates its own buffers, as any caller that
keeps two runners' outputs side by side needs. A server's whole ``fused_experts`` call
(``workers.backends.server.ServerCallRunner``) allocates inside the server's code: nothing of it
is shared.
"""

from __future__ import annotations

import torch


class Workspace:
    """Tensors by (role, shape, dtype, device); ``share=False``: a new tensor on every request."""

    def __init__(self, *, share: bool = True) -> None:
        self._share = share
        self._tensors: dict[tuple, torch.Tensor] = {}

    def empty(self, role: str, shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device | str) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype`` on ``device``; with sharing, the same
        tensor every time the same ``role``, shape, dtype and device are asked for."""
        if not self._share:
            return torch.empty(shape, dtype=dtype, device=device)
        key = (role, tuple(shape), dtype, torch.device(device))
        tensor = self._tensors.get(key)
        if tensor is None:
            tensor = self._tensors[key] = torch.empty(shape, dtype=dtype, device=device)
        return tensor

    def __len__(self) -> int:
        return len(self._tensors)


PRIVATE = Workspace(share=False)
"""The default of every runner: its own buffers."""
