"""What vLLM and SGLang run for a dtype on a GPU, which config file that kernel reads, and how
they pad the per-GPU sizes for it.

moe-tune writes fused-MoE config files; a file is only worth writing when a server's kernel
reads it. The facts below are read from vLLM 0.33 (``fused_moe/oracle/mxfp4.py``,
``oracle/nvfp4.py``, ``fused_moe/config.py::_get_config_dtype_str``,
``experts/gpt_oss_triton_kernels_moe.py``) and SGLang 0.5.10 (``quantization/mxfp4.py``,
``server_args.py``, ``fused_moe_triton_config.get_config_dtype_str``):

- bf16/fp16, fp8_w8a8 and int8_w8a16 run the fused-MoE Triton kernel in both servers, which
  reads ``E=..,N=..,device_name=..[,dtype=<fp8_w8a8|int8_w8a16>].json``. int4_w4a16 (GPTQ/AWQ/
  compressed-tensors) runs Marlin by default and the fused-MoE Triton kernel, reading
  ``dtype=int4_w4a16``, where the server runs int4 MoE in Triton (``tuner.plan.int4_kernel_notes``).
- mxfp4 never reads a ``dtype=mxfp4*`` file. vLLM on Hopper (SM90) runs
  triton_kernels' ``matmul_ogs`` (backend TRITON, ahead of Marlin) and reads no config file;
  datacenter Blackwell runs FlashInfer TRT-LLM, Ampere/Ada and consumer Blackwell Marlin. vLLM's
  OCP-MX emulation (the last resort, or ``moe_backend="emulation"``) dequantizes to bf16 and looks
  up the plain no-dtype name. SGLang on Hopper runs ``matmul_ogs`` for gpt-oss at ep=1 (its
  ``triton_kernel`` runner, chosen automatically); at ep>1 it upcasts the weights to bf16 and
  runs the fused-MoE kernel, which reads the no-dtype (bf16) file. (SGLang also runs gpt-oss in
  bf16 with ``matmul_ogs`` at ep=1 when triton_kernels is installed; that choice is by model
  architecture, not dtype, and is not modelled here: vLLM reads the bf16 file either way.)
- nvfp4 never reads a ``dtype=nvfp4*`` file: vLLM runs FlashInfer/CUTLASS on Blackwell and
  Humming or Marlin (CUDA kernels, no Triton config) below; SGLang needs SM100.
- Padding (vLLM ``mxfp4_round_up_hidden_size_and_intermediate_size``, SGLang
  ``Mxfp4MoEMethod.create_weights``): with triton_kernels (Hopper) the per-GPU intermediate size
  is rounded up to a multiple of 64, the hidden size kept (gpt-oss-120b TP4: 720 → 768); Marlin
  rounds intermediate to 128 and hidden to 256, FlashInfer TRT-LLM the same; emulation to 32.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from tuner.devices import device_facts
from workers.records import DType

SERVERS = ("vllm", "sglang")
FUSED_MOE = "fused_moe"
"""The servers' fused-MoE Triton kernel (the one moe-tune's config files are for)."""
MATMUL_OGS = "matmul_ogs"
"""triton_kernels' ``matmul_ogs`` MoE (routing, gate/up GEMM with fused SwiGLU, down GEMM with
scatter); its launch choices come from triton_kernels' heuristics, not from any config file."""
SERVER_READ_DTYPES = (DType.BF16, DType.FP16, DType.FP8_W8A8, DType.INT8_W8A16, DType.INT4_W4A16)
"""Dtypes whose fused-MoE config files some server reads under a name of their own."""


class Arch(str, Enum):
    """GPU generation, as far as the servers' kernel choice depends on it."""

    AMPERE = "sm80"  # Ampere and Ada (sm86, sm89): Marlin for fp4
    HOPPER = "sm90"
    BLACKWELL = "sm100"
    BLACKWELL_CONSUMER = "sm120"
    UNKNOWN = "unknown"


def gpu_arch(device_name: str) -> Arch:
    """The generation of a GPU by the name torch reports (``NVIDIA H200``, ``NVIDIA_H100_80GB_HBM3``),
    from its compute capability in ``tuner.devices``; UNKNOWN for GPUs not listed there (and ``cpu``)."""
    facts = device_facts(device_name)
    capability = facts.compute_capability if facts is not None else None
    if capability is None:
        return Arch.UNKNOWN
    major = capability[0]
    if major == 9:
        return Arch.HOPPER
    if major == 10:
        return Arch.BLACKWELL
    if major == 12:
        return Arch.BLACKWELL_CONSUMER
    return Arch.AMPERE if major == 8 else Arch.UNKNOWN


@dataclass(frozen=True)
class ServerKernel:
    """What one server runs for one dtype on one GPU generation.

    ``kernel``: ``fused_moe``, ``matmul_ogs``, or the name of a kernel moe-tune cannot run
    (``marlin``, ``flashinfer``, ...). ``file_dtype``: the dtype part of the fused-MoE file it
    reads (bf16 where it dequantizes fp4 weights to bf16 first), None when it reads no file.
    """

    server: str
    dtype: DType
    kernel: str
    file_dtype: DType | None
    why: str

    @property
    def reads_config(self) -> bool:
        return self.file_dtype is not None


def server_kernel(server: str, dtype: DType | str, arch: Arch, ep: int = 1) -> ServerKernel:
    """The kernel ``server`` (vllm 0.33 / sglang 0.5) dispatches for ``dtype`` on ``arch``
    (module docstring for the sources). Raises ValueError for an unknown server."""
    dtype = DType(dtype)
    if server not in SERVERS:
        raise ValueError(f"unknown server {server!r}; expected one of {SERVERS}")
    if dtype is DType.INT4_W4A16:  # tuner.plan.int4_kernel_notes has the sources
        return ServerKernel(server, dtype, FUSED_MOE, dtype,
                            "fused-MoE Triton kernel where the server runs int4 MoE in Triton (vLLM: --moe-backend "
                            "triton; SGLang: AWQ layers Marlin cannot take, --quantization moe_wna16); Marlin otherwise")
    if dtype in SERVER_READ_DTYPES:
        return ServerKernel(server, dtype, FUSED_MOE, dtype, "fused-MoE Triton kernel")
    if dtype is DType.MXFP4:
        if server == "sglang" and ep > 1:
            return ServerKernel(server, dtype, FUSED_MOE, DType.BF16,
                                "ep>1: weights upcast to bf16, fused-MoE Triton kernel (bf16 file)")
        # vLLM ranks Marlin ahead of matmul_ogs on consumer Blackwell; SGLang picks triton_kernels there.
        ogs = (Arch.HOPPER,) if server == "vllm" else (Arch.HOPPER, Arch.BLACKWELL_CONSUMER)
        if arch in ogs:
            return ServerKernel(server, dtype, MATMUL_OGS, None, "triton_kernels matmul_ogs (reads no config file)")
        if arch is Arch.BLACKWELL:
            return ServerKernel(server, dtype, "flashinfer", None, "FlashInfer TRT-LLM MXFP4 MoE (no Triton config)")
        if server == "vllm" and arch in (Arch.AMPERE, Arch.BLACKWELL_CONSUMER):
            return ServerKernel(server, dtype, "marlin", None, "Marlin MXFP4 MoE (no Triton config)")
        return ServerKernel(server, dtype, "unknown", None, "an MXFP4 MoE kernel moe-tune does not know for this GPU")
    # NVFP4
    if server == "sglang":
        kernel = "flashinfer" if arch is Arch.BLACKWELL else "unsupported"
        return ServerKernel(server, dtype, kernel, None, "NVFP4 MoE on SM100 only (no Triton config)")
    if arch is Arch.BLACKWELL:
        return ServerKernel(server, dtype, "flashinfer", None, "FlashInfer NVFP4 MoE (no Triton config)")
    return ServerKernel(server, dtype, "marlin", None, "Humming if installed, else Marlin NVFP4 MoE (no Triton config)")


@dataclass(frozen=True)
class Padding:
    """Per-GPU sizes before and after the server's round-up, and the rule applied."""

    N: int
    K: int
    padded_N: int
    padded_K: int
    rule: str

    @property
    def padded(self) -> bool:
        return (self.N, self.K) != (self.padded_N, self.padded_K)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def mxfp4_padding(N: int, K: int, arch: Arch) -> Padding:
    """How vLLM 0.33 pads an MXFP4 MoE's per-GPU intermediate size ``N`` and hidden size ``K``
    for the kernel it runs on ``arch`` (SGLang pads alike on Hopper). Unknown GPUs get the OCP MX
    block alignment of vLLM's emulation (32)."""
    if arch is Arch.HOPPER:
        return Padding(N, K, _round_up(N, 64), K, "triton_kernels: N to a multiple of 64")
    if arch in (Arch.BLACKWELL, Arch.BLACKWELL_CONSUMER, Arch.AMPERE):
        return Padding(N, K, _round_up(N, 128), _round_up(K, 256), "N to a multiple of 128, K of 256")
    return Padding(N, K, _round_up(N, 32), _round_up(K, 32), "OCP MX block alignment: 32")
