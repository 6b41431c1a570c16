"""``builtin``: moe-tune's own fused-MoE kernel (``workers.moe.MoERunner``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from workers.backends import BUILTIN
from workers.backends.base import KernelBackend, MoEInputs
from workers.records import Config, DType, MoEShape
from workers.workspace import PRIVATE, Workspace

WORKERS_DIR = Path(__file__).resolve().parent.parent
JIT_DECORATOR = b"@triton" + b".jit"  # spelled in two parts so this file does not match itself
TIMED_PATH_SOURCES = ("moe.py", "fp4_layout.py", "quant.py", "problem.py", "routing.py", "timing.py")
"""Besides every ``workers/*.py`` that defines a Triton kernel (a jit decorator): the launcher, the fp4
weight layout it prepares, the quantization it calls, the inputs it is timed on and the timing method. Their hash is part of
every journal key, so editing any of them invalidates old measurements instead of reusing them."""


def kernel_source_hash() -> str:
    """16 hex digits over the sources that decide the builtin kernel's timings (see above)."""
    digest = hashlib.sha256()
    for path in sorted(WORKERS_DIR.glob("*.py")):
        text = path.read_bytes()
        if path.name in TIMED_PATH_SOURCES or JIT_DECORATOR in text:
            digest.update(path.name.encode() + b"\0" + text + b"\0")
    return digest.hexdigest()[:16]


class BuiltinBackend(KernelBackend):
    name = BUILTIN
    splits = True
    compiles_ahead = True

    def describe(self) -> dict[str, str]:
        return {"kernel": self.name, "kernel_entry": "workers.moe.MoERunner", "kernel_version": "moe-tune",
                "kernel_hash": kernel_source_hash()}

    def check(self, shape: MoEShape) -> str | None:
        return None if isinstance(shape.dtype, DType) else f"unknown dtype {shape.dtype!r}"

    def validate(self, config: Config, shape: MoEShape) -> None:
        from workers.fused_moe_kernel import validate_config

        validate_config(config, shape.dtype, shape.block_shape)

    def runner(self, inputs: MoEInputs, config: Config, down_config: Config | None = None, *,
               workspace: Workspace = PRIVATE):
        from workers.moe import MoERunner

        return MoERunner(inputs.x, inputs.w13, inputs.w2, inputs.topk_weights, inputs.topk_ids, config,
                         down_config, workspace=workspace)
