"""Static cost of the builtin fp4 GEMM on Hopper, without a GPU: SASS instructions per weight byte.

    timeout 600 python3 benchmarks/fp4_sass_count.py [--dtype mxfp4|nvfp4] [--configs M16_N128_K128_w4_s3,...]

Compiles ``workers.fused_moe_kernel._fused_moe_gemm_kernel`` for sm_90 with the Triton at hand
(the NVIDIA backend and its ptxas/cuobjdump ship in Triton's wheel, no GPU or driver needed) with
the specialization the gpt-oss-120b TP1 up GEMM gets (N=5760, K=2880, 16-byte-divisible strides
and pointers, scales K-group-major as ``launch_layout`` hands them over), for the row-major packed
weights in both operand orders and, where the tile covers whole atoms, for the atom layout
(``workers.fp4_layout``, always swapped), and counts the instructions of the K loop's body (the
largest backward branch in the SASS) per packed weight byte one thread decodes per iteration,
with the opcode mix. At the HBM rate an H200 SM must consume ~21 weight bytes per clock and issues
at most 128 thread-instructions per clock, so a loop above ~6 instructions per byte cannot reach
the HBM floor whatever the occupancy: the number to drive down. It says nothing of latency
hiding, which only the GPU benchmark (``fp4_kernel_bench.py``) measures.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_CONFIGS = "M16_N64_K64_w4_s3,M16_N128_K128_w4_s3,M64_N128_K128_w4_s3,M128_N128_K64_w8_s3"
N_UP, K = 5760, 2880  # gpt-oss-120b TP1 up GEMM
INT_ARGS_DIVISIBLE_BY_16 = {"N", "K", "stride_am", "stride_be", "stride_bn", "stride_bk", "stride_cm", "stride_bse",
                            "stride_bsk"}


def parse_config(label: str) -> tuple[int, int, int, int, int]:
    match = re.fullmatch(r"M(\d+)_N(\d+)_K(\d+)_w(\d+)_s(\d+)", label)
    if not match:
        raise ValueError(f"config {label!r} is not M<bm>_N<bn>_K<bk>_w<warps>_s<stages>")
    return tuple(int(v) for v in match.groups())


def compile_gemm(dtype: str, bm: int, bn: int, bk: int, warps: int, stages: int, swap: bool, atoms: bool = False):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from workers import fused_moe_kernel as kernel
    from workers.formats import format_of
    from workers.records import DType

    fn = kernel._fused_moe_gemm_kernel
    types = {"a_ptr": "*bf16", "b_ptr": "*i32" if atoms else "*u8", "c_ptr": "*bf16", "a_scale_ptr": "*bf16", "b_scale_ptr": "*u8",
             "b_global_scale_ptr": "*fp32", "topk_weights_ptr": "*fp32", "sorted_token_ids_ptr": "*i32",
             "expert_ids_ptr": "*i32", "num_tokens_post_padded_ptr": "*i32"}
    constexprs = dict(TOP_K=4, MUL_ROUTED_WEIGHT=False, FP8_W8A8=False, FP8_BLOCK=False, INT8_W8A16=False,
                      FP4_GROUP=format_of(DType(dtype)).scale_group, INT4_W4A16=False, INT4_ZERO=8, FP8_CHANNEL=False,
                      FP4_ATOMS=atoms, EVEN_K=K % bk == 0, SWAP_AB=swap, INTERPRETER=False, COMPUTE_TYPE=tl.bfloat16,
                      BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=1,
                      stride_ak=1, stride_cn=1, stride_bsn=1)  # scales as launch_layout stores them
    if not atoms:
        constexprs["stride_bk"] = 1
    names = list(fn.arg_names)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n].startswith("*") or n in INT_ARGS_DIVISIBLE_BY_16}
    source = ASTSource(fn=fn, signature=signature, attrs=attrs,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})


def loop_body(cubin: bytes) -> list[str]:
    """Opcodes of the largest backward-branch loop in the cubin's SASS."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([str(tool), "-sass", str(path)], capture_output=True, text=True, check=True,
                              timeout=120).stdout
    instructions = []
    for line in sass.splitlines():
        match = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if match:
            instructions.append((int(match.group(1), 16), match.group(2).strip()))
    best: tuple[int, int] | None = None
    for address, text in instructions:
        target = re.search(r"BRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            if best is None or address - start > best[1] - best[0]:
                best = (start, address)
    if best is None:
        return []
    ops = []
    for address, text in instructions:
        if best[0] <= address <= best[1]:
            text = text.split(None, 1)[1] if text.startswith("@") else text
            ops.append(text.split()[0].split(".")[0])
    return ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("mxfp4", "nvfp4"), default="mxfp4")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated (default {DEFAULT_CONFIGS})")
    args = parser.parse_args(argv)
    try:
        configs = [parse_config(label) for label in args.configs.split(",")]
    except ValueError as exc:
        print(f"fp4_sass_count: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("fp4_sass_count: compiles for sm_90; unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    from workers.fp4_layout import fits_atoms

    print(f"{args.dtype} up GEMM (N={N_UP}, K={K}), Triton {triton.__version__}, sm_90; loop body per thread")
    print(f"{'config':<22} {'path':<16} {'instr/byte':>10}  top opcodes")
    for bm, bn, bk, warps, stages in configs:
        paths = [("rows, tokens-M", False, False), ("rows, swapped", True, False)]
        if fits_atoms(bn, bk):
            paths.append(("atoms (swapped)", True, True))
        for name, swap, atoms in paths:
            kernel = compile_gemm(args.dtype, bm, bn, bk, warps, stages, swap, atoms)
            ops = loop_body(kernel.asm["cubin"])
            bytes_per_thread = bn * bk / 2 / (32 * warps)
            mix = ", ".join(f"{op} {n}" for op, n in collections.Counter(ops).most_common(8))
            label = f"M{bm}_N{bn}_K{bk}_w{warps}_s{stages}"
            per_byte = f"{len(ops) / bytes_per_thread:.2f}" if ops else "no loop"
            print(f"{label:<22} {name:<16} {per_byte:>10}  {mix}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
