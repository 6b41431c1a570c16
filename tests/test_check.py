"""``moe-tune check``: the interpreted path end to end, and bad input as exit code 2."""

from __future__ import annotations

import pytest

from tuner.cli import main


def test_interpreted_check_passes_and_prints_each_m(capfd):
    code = main(["check", "--shape", "4,32,64,2", "--dtype", "bf16,fp8_w8a8", "--dtype", "mxfp4",
                 "--batch-sizes", "3,20", "--interpret"])
    out = capfd.readouterr().out
    assert code == 0, out
    assert "all within bounds" in out
    for dtype in ("bf16", "fp8_w8a8", "mxfp4"):
        assert f"dtype={dtype}" in out
    assert sum(line.split()[:1] in (["3"], ["20"]) and " ok " in line for line in out.splitlines()) == 6


@pytest.mark.parametrize("argv, message", [
    (["--shape", "4,48,80"], "four positive integers"),
    (["--shape", "4,48,80,2", "--dtype", "mxfp4"], "multiples of 32"),
    (["--shape", "4,48,80,2", "--block-shape", "32,32"], "fp8_w8a8 only"),
    (["--shape", "4,48,80,2", "--dtype", "fp8_w8a8", "--block-shape", "64,96",
      "--config", '{"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1, '
                  '"num_warps": 4, "num_stages": 2}'], "block_k % BLOCK_SIZE_K"),
    (["--shape", "4,48,80,2", "--config", '{"BLOCK_SIZE_M": 16}'], "lacks"),
    (["--shape", "4,48,80,2", "--batch-sizes", "0"], "positive"),
    (["--shape", "4,64,64,2", "--dtype", "fp8_w8a8", "--block-shape", "48,48"], "powers of two"),
    (["--shape", "4,64,64,2", "--dtype", "fp8_w8a8", "--block-shape", "20,32"], "multiples of 16"),
    (["--shape", "4,64,64,2", "--dtype", "int4_w4a16", "--group-size", "0"],
     "argument --group-size: expected a positive size or -1 (per row), got '0'"),
    (["--model", "mixtral-8x7b"], "tiny shapes only"),
    (["--shape", "256,64,64,8"], "tiny shapes only"),
    (["--shape", "4,32,64,2", "--batch-sizes", "1,65"], "batch sizes up to 64"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capfd):
    assert main(["check", *argv, "--interpret"]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
