"""A rough latency model of the fused-MoE GEMMs, used only to decide what to measure first.

The fast search (``tuner.search.Fast``) measures the top of this ordering and then walks from
the best measured config to its neighbours, so the model needs to rank, not to predict: put
good tiles near the top for each batch size. It models, per GEMM (rows of the output R, reduction
length K, for every active expert):

- routing: with uniform top-k routing, E·(1 − (1 − topk/E)^M) experts are active, each with
  M·topk/active rows; a tile of BLOCK_SIZE_M rows wastes the padding of each expert's last tile;
- work: FLOPs of the padded rows, at a tensor-core rate that drops for tiles under 64 rows
  (Hopper's wgmma works on 64-row warp-group tiles; smaller tiles fall back to mma.sync), for
  tiles that reuse loaded operands little, and for tiles with too many accumulators per thread;
- traffic: each expert's weights are read once per group of GROUP_SIZE_M row tiles (the
  swizzle keeps a weight tile in L2 while that many row tiles use it), activations once per
  column tile;
- parallelism: the bandwidth a grid reaches grows with the bytes it keeps in flight
  (programs × stages × tile bytes, Little's law against ~40 KB per SM), and a grid that is not a
  whole number of waves idles the rest of its last wave.

The GPU is a fixed reference (``REFERENCE_GPU``'s SMs and shared memory from ``tuner.devices``;
achieved, not datasheet, rates of ~4 TB/s and ~700 TFLOP/s bf16): only the ranking matters, and it
is nearly insensitive to their scale. Bits per element and the fp8 tensor-core path come from the
format (``workers.formats``).
"""

from __future__ import annotations

import math

from tuner.devices import device_facts
from workers.formats import format_of
from workers.records import Config, Gemm, MoEShape

REFERENCE_GPU = "NVIDIA H200"
_REFERENCE = device_facts(REFERENCE_GPU)
SMS = _REFERENCE.sms
SHARED_MEMORY = _REFERENCE.shared_memory_bytes
BANDWIDTH = 4.0e12
"""Achieved HBM bandwidth (bytes/s) of the model's GPU."""
DENSE_FLOPS = 7.0e14
"""Achieved bf16 tensor-core rate (FLOP/s) of the model's GPU."""
FP8_DOT_SPEEDUP = 2.0
"""Tensor-core rate of an fp8 dot relative to bf16."""
BYTES_IN_FLIGHT_PER_SM = 40 * 1024
MAX_WARPS_PER_SM = 64


def _tile_rate(config: Config) -> float:
    """Fraction of the tensor-core peak a tile can reach: rows under 64 lose the wgmma path;
    a tile reuses each loaded element about BM·BN/(BM+BN) times (below ~64 the shared-memory
    operand traffic limits it); over 128 fp32 accumulators per thread spill registers."""
    bm, bn = config.BLOCK_SIZE_M, config.BLOCK_SIZE_N
    rows = min(1.0, bm / 64) ** 0.5
    reuse = min(1.0, (bm * bn / (bm + bn)) / 64)
    accumulators = bm * bn / (32 * config.num_warps)
    registers = min(1.0, 128 / accumulators)
    return rows * reuse * registers


def gemm_seconds(shape: MoEShape, M: int, config: Config, rows_out: int, reduction: int) -> float:
    """Modelled time of one grouped GEMM: output ``rows_out`` wide, reducing over ``reduction``."""
    bm, bn, bk = config.BLOCK_SIZE_M, config.BLOCK_SIZE_N, config.BLOCK_SIZE_K
    fmt = format_of(shape.dtype)
    a_bits, b_bits = fmt.activation_bits, fmt.weight_bits
    pairs = shape.pairs_per_token  # topk, or its share on this GPU under expert parallelism
    active = shape.E * (1.0 - (1.0 - min(1.0, pairs / shape.E)) ** M)
    rows_per_expert = M * pairs / active
    row_tiles = active * math.ceil(rows_per_expert / bm)
    col_tiles = math.ceil(rows_out / bn)
    programs = row_tiles * col_tiles

    flops = 2.0 * row_tiles * bm * col_tiles * bn * reduction
    compute_s = flops / (DENSE_FLOPS * (FP8_DOT_SPEEDUP if fmt.fp8_dot else 1.0) * _tile_rate(config))

    tiles_per_expert = row_tiles / active
    weight_reads = math.ceil(tiles_per_expert / min(config.GROUP_SIZE_M, tiles_per_expert))
    weight_bytes = active * rows_out * reduction * b_bits / 8 * weight_reads
    act_bytes = M * pairs * reduction * a_bits / 8 * col_tiles
    stage_bytes = (bm * bk * a_bits + bk * bn * b_bits) / 8
    in_flight = programs * stage_bytes * max(config.num_stages - 1, 1)
    coverage = min(1.0, programs / SMS)  # an SM without a program pulls no bytes
    reached = min(1.0, in_flight / (SMS * BYTES_IN_FLIGHT_PER_SM)) * (0.5 + 0.5 * coverage)
    memory_s = (weight_bytes + act_bytes) / (BANDWIDTH * reached)

    per_sm = max(1, min(SHARED_MEMORY // max(stage_bytes * max(config.num_stages - 1, 1), 1),
                        MAX_WARPS_PER_SM // config.num_warps))
    slots = SMS * per_sm
    waves = math.ceil(programs / slots)
    wave_use = programs / (waves * slots)
    busy = min(1.0, programs / SMS)
    return max(compute_s / max(wave_use, busy), memory_s)


def predict_seconds(shape: MoEShape, M: int, config: Config, gemm: Gemm = Gemm.BOTH) -> float:
    """Modelled time of the part of the MoE ``gemm`` names (both GEMMs, or one)."""
    up = gemm_seconds(shape, M, config, shape.up_rows, shape.K) if gemm is not Gemm.DOWN else 0.0
    down = gemm_seconds(shape, M, config, shape.K, shape.N) if gemm is not Gemm.UP else 0.0
    return up + down
