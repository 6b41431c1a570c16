"""Config file names exactly as vLLM's and SGLang's fused-MoE loaders build them.

vLLM (``get_config_file_name`` in fused_moe.py)::

    E=<E>,N=<N>,device_name=<dev>[,dtype=<dtype>][,block_shape=[<bn>,<bk>]].json

``dev`` is torch's device name with spaces turned into ``_``; any name with an ``H200`` word
becomes ``NVIDIA_H200`` so the H200 variants share files; the block shape is printed
without spaces.

SGLang (``fused_moe_triton_config.get_config_file_name``), inside a ``triton_<X_Y_Z>/`` folder
named after the Triton version::

    E=<E>,N=<N>,device_name=<dev>[,dtype=<dtype>][,block_shape=[<bn>, <bk>]][_down].json

``dev`` has spaces turned into ``_`` and no family mapping; the block shape is Python's list
repr (with a space); ``_down`` names the down-projection GEMM's own configs. SGLang's
``,per_channel_quant=True`` part marks channel-wise fp8_w8a8 (per-channel weights, per-token
activations); vLLM names that variant plain ``dtype=fp8_w8a8``. ``E`` is what the server's kernel sees: under SGLang's
shared-expert fusion the routed experts plus the fused shared ones (``MoEShape.E`` already).

Which file name each server reads per dtype (vLLM 0.33 ``_get_config_dtype_str``, SGLang 0.5.10
``get_config_dtype_str``; the kernels per GPU are ``tuner.dispatch``'s):

============================  =====================================  ==========================================
dtype                         vLLM reads                             SGLang reads
============================  =====================================  ==========================================
bf16, fp16                    no dtype part                          no dtype part
fp8_w8a8 per tensor / block   ``dtype=fp8_w8a8`` (+ block shape)     ``dtype=fp8_w8a8`` (+ block shape)
fp8_w8a8 per channel          ``dtype=fp8_w8a8``                     ``dtype=fp8_w8a8,per_channel_quant=True``
int8_w8a16                    ``dtype=int8_w8a16``                   ``dtype=int8_w8a16``
int4_w4a16                    ``dtype=int4_w4a16``, no block shape   ``dtype=int4_w4a16``, no block shape
mxfp4, nvfp4                  none (no fused-MoE file)               none (no fused-MoE file)
============================  =====================================  ==========================================

int4_w4a16 files carry no block shape (the servers pass ``[0, group_size]``, and a block shape
with a 0 is left out); their ``N`` is the intermediate size per GPU, which vLLM reads as twice the
packed last dimension of the down weight (``[E, K, N/2]`` bytes, two int4 per byte). vLLM also
names ``fp8_w8a16`` (weight-only fp8 on GPUs without fp8 compute), which its Marlin kernel runs,
not the fused Triton kernel, so no tuned Triton file applies and moe-tune does not produce one.

No server reads a fused-MoE file for mxfp4/nvfp4 (``tuner.dispatch``: they run other kernels, or
dequantize to bf16 and read the no-dtype file, as vLLM's emulated OCP-MX path does). The configs
of moe-tune's own fp4 kernel are therefore written apart, in ``BUILTIN_FOLDER``, named
``...,dtype=mxfp4_w4a16`` / ``nvfp4_w4a16`` after the servers' scheme (4-bit weights, 16-bit
activations); ``vllm_file_name`` and ``sglang_file_name`` refuse them.
"""

from __future__ import annotations

from workers.records import DType, MoEShape

_DTYPE_PART = {
    DType.BF16: None,
    DType.FP16: None,
    DType.FP8_W8A8: "fp8_w8a8",
    DType.INT8_W8A16: "int8_w8a16",
    DType.INT4_W4A16: "int4_w4a16",
}
_BUILTIN_DTYPE_PART = {DType.MXFP4: "mxfp4_w4a16", DType.NVFP4: "nvfp4_w4a16"}
BUILTIN_FOLDER = "moe-tune-builtin"
"""Subfolder (of a configs folder) holding configs only moe-tune's builtin kernel reads."""


def device_name_problem(device_name: str) -> str | None:
    """Why ``device_name`` cannot name a GPU in a config file's name (one line), or None: it is
    blank, or holds a path separator or a control character (torch's GPU names hold none; a
    ``/`` would put the file in another folder)."""
    if not device_name.strip():
        return "the device name is empty"
    if "/" in device_name or "\\" in device_name or any(ord(c) < 32 or ord(c) == 127 for c in device_name):
        return (f"device name {device_name!r} holds a path separator or control character, which a config file "
                "name cannot: give the GPU's name as torch reports it, e.g. \"NVIDIA H200\"")
    return None


def device_file_name(device_name: str) -> str:
    """vLLM's file-name form of a device name: ``NVIDIA H100 80GB HBM3`` → ``NVIDIA_H100_80GB_HBM3``,
    ``NVIDIA H200 NVL`` → ``NVIDIA_H200``."""
    name = device_name.replace(" ", "_")
    return "NVIDIA_H200" if "H200" in name.split("_") else name


def _dtype_part(dtype: DType) -> str:
    dtype = DType(dtype)
    if dtype not in _DTYPE_PART:
        raise ValueError(f"no server reads a fused-MoE config file for {dtype.value}; see builtin_file_name")
    part = _DTYPE_PART[dtype]
    return f",dtype={part}" if part else ""


def _named_block(shape: MoEShape) -> tuple[int, int] | None:
    """The block shape the file name carries: none when an entry is 0 (int4_w4a16's ``[0, group]``),
    as both servers test ``all(block_shape)``."""
    return shape.block_shape if shape.block_shape and all(shape.block_shape) else None


def builtin_file_name(shape: MoEShape, device_name: str) -> str:
    """``BUILTIN_FOLDER/E=..,N=..,device_name=..,dtype=<mxfp4|nvfp4>_w4a16.json``: the configs of
    moe-tune's own fp4 kernel (vLLM's name scheme, in a folder no server looks in)."""
    part = _BUILTIN_DTYPE_PART.get(DType(shape.dtype))
    if part is None:
        raise ValueError(f"{shape.dtype.value} configs are server files; use vllm_file_name")
    return f"{BUILTIN_FOLDER}/E={shape.E},N={shape.N},device_name={device_file_name(device_name)},dtype={part}.json"


def vllm_file_name(shape: MoEShape, device_name: str) -> str:
    named = _named_block(shape)
    block = f",block_shape=[{named[0]},{named[1]}]" if named else ""
    return f"E={shape.E},N={shape.N},device_name={device_file_name(device_name)}{_dtype_part(shape.dtype)}{block}.json"


def sglang_version_folder(triton_version: str) -> str:
    """``3.4.0`` → ``triton_3_4_0``: the folder SGLang looks in for the running Triton version."""
    return f"triton_{triton_version.replace('.', '_')}"


def sglang_file_name(shape: MoEShape, device_name: str, down: bool = False) -> str:
    device = device_name.replace(" ", "_")
    named = _named_block(shape)
    block = f",block_shape=[{named[0]}, {named[1]}]" if named else ""
    channel = ",per_channel_quant=True" if shape.per_channel else ""
    suffix = "_down" if down else ""
    return f"E={shape.E},N={shape.N},device_name={device}{_dtype_part(shape.dtype)}{block}{channel}{suffix}.json"

