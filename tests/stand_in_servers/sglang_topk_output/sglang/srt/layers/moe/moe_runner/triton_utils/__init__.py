"""Stand-in of SGLang's triton_utils: ``override_config`` and the ``topk_output`` form of ``fused_experts``."""

from contextlib import contextmanager

import stand_in_moe_math as math_

_config = None
CALLS = []


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


def fused_experts(hidden_states, w1, w2, topk_output, moe_runner_config, b1=None, b2=None, use_fp8_w8a8=False,
                  use_int8_w8a8=False, use_int8_w8a16=False, use_int4_w4a16=False, per_channel_quant=False,
                  w1_scale=None, w2_scale=None, w1_zp=None, w2_zp=None, a1_scale=None, a2_scale=None,
                  block_shape=None):
    math_.check_forced(get_config())
    topk_weights, topk_ids, _ = topk_output
    CALLS.append({"config": dict(get_config()), "use_fp8_w8a8": use_fp8_w8a8, "use_int8_w8a16": use_int8_w8a16,
                  "w1_scale": w1_scale, "w2_scale": w2_scale, "a1_scale": a1_scale, "block_shape": block_shape, "inplace": moe_runner_config.inplace})
    return math_.moe(hidden_states, math_.dequantize(w1, w1_scale, block_shape),
                     math_.dequantize(w2, w2_scale, block_shape), topk_weights, topk_ids, use_fp8_w8a8, block_shape)
