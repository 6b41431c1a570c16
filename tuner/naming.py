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
``,per_channel_quant=True`` part marks channel-wise w8a8 checkpoints, which none of the dtypes
tuned here are, so it never appears.

Both servers put no dtype part on bf16/fp16 files. No server reads a fused-MoE file for
mxfp4/nvfp4 (``tuner.dispatch``: they run other kernels, or dequantize to bf16 and read the
no-dtype file). The configs of moe-tune's own fp4 kernel are therefore written apart, in
``BUILTIN_FOLDER``, named ``...,dtype=mxfp4_w4a16`` / ``nvfp4_w4a16`` after the servers' scheme
(4-bit weights, 16-bit activations); ``vllm_file_name`` and ``sglang_file_name`` refuse them.
"""

from __future__ import annotations

from workers.records import DType, MoEShape

_DTYPE_PART = {
    DType.BF16: None,
    DType.FP16: None,
    DType.FP8_W8A8: "fp8_w8a8",
    DType.INT8_W8A16: "int8_w8a16",
}
_BUILTIN_DTYPE_PART = {DType.MXFP4: "mxfp4_w4a16", DType.NVFP4: "nvfp4_w4a16"}
BUILTIN_FOLDER = "moe-tune-builtin"
"""Subfolder (of a configs folder) holding configs only moe-tune's builtin kernel reads."""


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


def builtin_file_name(shape: MoEShape, device_name: str) -> str:
    """``BUILTIN_FOLDER/E=..,N=..,device_name=..,dtype=<mxfp4|nvfp4>_w4a16.json``: the configs of
    moe-tune's own fp4 kernel (vLLM's name scheme, in a folder no server looks in)."""
    part = _BUILTIN_DTYPE_PART.get(DType(shape.dtype))
    if part is None:
        raise ValueError(f"{shape.dtype.value} configs are server files; use vllm_file_name")
    return f"{BUILTIN_FOLDER}/E={shape.E},N={shape.N},device_name={device_file_name(device_name)},dtype={part}.json"


def vllm_file_name(shape: MoEShape, device_name: str) -> str:
    block = f",block_shape=[{shape.block_shape[0]},{shape.block_shape[1]}]" if shape.block_shape else ""
    return f"E={shape.E},N={shape.N},device_name={device_file_name(device_name)}{_dtype_part(shape.dtype)}{block}.json"


def sglang_version_folder(triton_version: str) -> str:
    """``3.4.0`` → ``triton_3_4_0``: the folder SGLang looks in for the running Triton version."""
    return f"triton_{triton_version.replace('.', '_')}"


def sglang_file_name(shape: MoEShape, device_name: str, down: bool = False) -> str:
    device = device_name.replace(" ", "_")
    block = f",block_shape=[{shape.block_shape[0]}, {shape.block_shape[1]}]" if shape.block_shape else ""
    suffix = "_down" if down else ""
    return f"E={shape.E},N={shape.N},device_name={device}{_dtype_part(shape.dtype)}{block}{suffix}.json"
