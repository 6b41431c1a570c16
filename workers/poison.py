"""The ``poison`` fault (``workers.faults``): a genuine illegal memory access on the GPU.

A one-program Triton kernel stores to address 0 (the buffer's own address minus itself), which
no CUDA allocation ever maps, so the launch fails with "an illegal memory access was
encountered" and the CUDA context of the process is poisoned: every later CUDA call in it fails
too. The worker must classify it, end its process and be restarted, and the engine must retry
the candidate on another worker and quarantine it (``tuner.pool`` / ``tuner.driver``).

Without a CUDA device (the CPU tests: the Triton interpreter would run the store in numpy and
crash the process in an unrelated way) the fault raises the error text CUDA would produce,
marked as simulated, so the classification → restart → retry → quarantine path is still run.

Test-only: imported only when a fault plan asks for ``poison``. The kernel is made with
``triton.jit(...)`` rather than the decorator so this file stays out of the kernel source hash
(``workers.backends.builtin.kernel_source_hash``), which covers the kernels that are timed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

CUDA_ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"


def _store_out_of_bounds(ptr, offset):
    tl.store(ptr + offset, 1.0)


def poison_context() -> None:
    """Launch the out-of-bounds store and wait for it: raises the CUDA error (RuntimeError)."""
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(f"{CUDA_ILLEGAL_ADDRESS} (simulated: no CUDA device; on a GPU this fault "
                           "stores out of bounds for real)")
    buffer = torch.zeros(1, dtype=torch.float32, device="cuda")
    to_null = -(buffer.data_ptr() // buffer.element_size())
    triton.jit(_store_out_of_bounds)[(1,)](buffer, to_null)
    torch.cuda.synchronize()
    raise RuntimeError(f"the out-of-bounds store to address 0 did not fault ({torch.cuda.get_device_name()})")
