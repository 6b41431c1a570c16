"""Server file names, atomic writes, reading both layouts back, and vLLM's nearest-batch lookup."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tuner.errors import UsageError
from tuner.spaces import load_space
from tuner.writers import (FileConflict, builtin_file_name, check_existing, device_file_name, lookup,
                           probe_writable, read_config_folder, sglang_file_name, vllm_file_name, write_sglang,
                           write_vllm)
from workers.records import Config, DType, MoEShape

MIXTRAL_TP2 = dict(E=8, N=7168, K=4096, topk=2)


def _random_configs(rng: random.Random, batch_sizes) -> dict[int, Config]:
    space = load_space("default").expand()
    return {M: rng.choice(space) for M in batch_sizes}


@pytest.mark.parametrize("device,expected", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA_H100_80GB_HBM3"),
    ("NVIDIA H200", "NVIDIA_H200"),
    ("NVIDIA H200 NVL", "NVIDIA_H200"),
    ("NVIDIA_H200_141GB", "NVIDIA_H200"),
    ("NVIDIA GH200 480GB", "NVIDIA_GH200_480GB"),  # not an H200 word: kept as is, like vLLM
    ("NVIDIA A100-SXM4-80GB", "NVIDIA_A100-SXM4-80GB"),
])
def test_device_file_name(device, expected):
    assert device_file_name(device) == expected


@pytest.mark.parametrize("dtype,block,expected", [
    (DType.BF16, None, "E=8,N=7168,device_name=NVIDIA_H200.json"),
    (DType.FP16, None, "E=8,N=7168,device_name=NVIDIA_H200.json"),
    (DType.FP8_W8A8, None, "E=8,N=7168,device_name=NVIDIA_H200,dtype=fp8_w8a8.json"),
    (DType.FP8_W8A8, (128, 128), "E=8,N=7168,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"),
    (DType.INT8_W8A16, None, "E=8,N=7168,device_name=NVIDIA_H200,dtype=int8_w8a16.json"),
])
def test_vllm_file_names(dtype, block, expected):
    shape = MoEShape(**MIXTRAL_TP2, dtype=dtype, block_shape=block)
    assert vllm_file_name(shape, "NVIDIA H200 NVL") == expected


@pytest.mark.parametrize("dtype", [DType.MXFP4, DType.NVFP4])
def test_fp4_configs_have_no_server_file_name_only_a_builtin_one_apart(dtype):
    """No vLLM or SGLang version reads a dtype=mxfp4*/nvfp4* fused-MoE file: those names are refused,
    and moe-tune's own fp4 kernel configs go to a folder no server looks in."""
    shape = MoEShape(**MIXTRAL_TP2, dtype=dtype)
    for name in (vllm_file_name, sglang_file_name):
        with pytest.raises(ValueError, match="no server reads"):
            name(shape, "NVIDIA H200")
    assert (builtin_file_name(shape, "NVIDIA H200 NVL")
            == f"moe-tune-builtin/E=8,N=7168,device_name=NVIDIA_H200,dtype={dtype.value}_w4a16.json")
    with pytest.raises(ValueError):
        builtin_file_name(MoEShape(**MIXTRAL_TP2, dtype=DType.BF16), "NVIDIA H200")


def test_sglang_file_names():
    block = MoEShape(E=256, N=256, K=7168, topk=8, dtype=DType.FP8_W8A8, block_shape=(128, 128))
    assert (sglang_file_name(block, "NVIDIA H20")
            == "E=256,N=256,device_name=NVIDIA_H20,dtype=fp8_w8a8,block_shape=[128, 128].json")
    assert (sglang_file_name(block, "NVIDIA H20", down=True)
            == "E=256,N=256,device_name=NVIDIA_H20,dtype=fp8_w8a8,block_shape=[128, 128]_down.json")
    plain = MoEShape(**MIXTRAL_TP2, dtype=DType.BF16)
    # SGLang maps no device family: an H200 NVL keeps its own name.
    assert sglang_file_name(plain, "NVIDIA H200 NVL") == "E=8,N=7168,device_name=NVIDIA_H200_NVL.json"


def _load_like_vllm(path) -> dict[int, dict]:
    data = json.loads(path.read_text())
    data.pop("triton_version", None)
    return {int(k): v for k, v in data.items()}


def test_vllm_write_read_lookup(tmp_path, rng):
    shape = MoEShape(**MIXTRAL_TP2, dtype=DType.FP8_W8A8)
    configs = _random_configs(rng, rng.sample([1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024], 8))
    path = write_vllm(tmp_path, shape, "NVIDIA H200", configs, "3.4.0").path
    assert path == tmp_path / "E=8,N=7168,device_name=NVIDIA_H200,dtype=fp8_w8a8.json"

    raw = json.loads(path.read_text())
    assert raw["triton_version"] == "3.4.0"
    batch_keys = [k for k in raw if k != "triton_version"]
    assert batch_keys == [str(M) for M in sorted(configs)]
    assert {M: Config.from_dict(v) for M, v in _load_like_vllm(path).items()} == configs

    read = read_config_folder(tmp_path)
    assert read == {path.name: configs}
    as_written = dict(sorted(configs.items()))  # ascending, so ties go to the smaller batch size
    for M in range(1, 1500, 7):
        assert lookup(read[path.name], M) == lookup(as_written, M)


def test_sglang_layout_and_down_file(tmp_path, rng):
    shape = MoEShape(E=256, N=256, K=7168, topk=8, dtype=DType.FP8_W8A8, block_shape=(128, 128))
    up = _random_configs(rng, [1, 64, 4096])
    down = {M: Config(c.BLOCK_SIZE_M, 128, 64, 1, 4, 3) for M, c in up.items()}
    paths = [w.path for w in write_sglang(tmp_path, shape, "NVIDIA H200", up, down, "3.4.0")]
    folder = tmp_path / "triton_3_4_0"
    assert paths == [folder / sglang_file_name(shape, "NVIDIA H200"),
                     folder / sglang_file_name(shape, "NVIDIA H200", down=True)]
    for path in paths:
        assert all(key.isdigit() for key in json.loads(path.read_text()))  # SGLang int()s every key

    read = read_config_folder(tmp_path)
    assert read == {f"triton_3_4_0/{paths[0].name}": up, f"triton_3_4_0/{paths[1].name}": down}
    assert [w.path for w in write_sglang(tmp_path, shape, "NVIDIA H200", up, None, "3.5.1")] == [
        tmp_path / "triton_3_5_1" / paths[0].name]


def test_sglang_down_configs_must_match_up(tmp_path):
    shape = MoEShape(**MIXTRAL_TP2, dtype=DType.BF16)
    up = {1: Config(16, 64, 64, 1, 4, 2), 8: Config(32, 64, 64, 1, 4, 2)}
    with pytest.raises(ValueError, match="BLOCK_SIZE_M"):
        write_sglang(tmp_path, shape, "NVIDIA H200", up, {1: up[1], 8: Config(64, 64, 64, 1, 4, 2)}, "3.4.0")
    with pytest.raises(ValueError, match="same batch sizes"):
        write_sglang(tmp_path, shape, "NVIDIA H200", up, {1: up[1]}, "3.4.0")
    assert not (tmp_path / "triton_3_4_0").exists()


def test_reads_vllm_shipped_style_files(tmp_path):
    # vLLM's shipped JSONs: some lead with triton_version, ROCm ones carry extra keys.
    (tmp_path / "E=8,N=7168,device_name=AMD_Instinct_MI300X.json").write_text(json.dumps({
        "triton_version": "3.2.0",
        "1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1,
              "num_warps": 4, "num_stages": 2, "waves_per_eu": 0, "matrix_instr_nonkdim": 16, "kpack": 2},
    }))
    (tmp_path / "README").write_text("not a config")
    # another kernel's file (vLLM 0.33 ships AMD FlyDSL tiles like this): not the Triton kernel's, skipped
    (tmp_path / "E=384,N=256,device_name=AMD_Instinct_MI350X,dtype=int4_w4a16,backend=flydsl.json").write_text(
        json.dumps({"1": {"tile_m": 16, "tile_n": 64, "tile_k": 512}}))
    block = "E=8,N=7168,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"
    (tmp_path / block).write_text(json.dumps({"1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128,
                                                   "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 3}}))
    assert read_config_folder(tmp_path) == {
        "E=8,N=7168,device_name=AMD_Instinct_MI300X.json": {1: Config(16, 64, 128, 1, 4, 2)},
        block: {1: Config(16, 128, 128, 1, 4, 3)}}


@pytest.mark.parametrize("content,message", [
    ("{", "cannot read"),
    ('{"1": {"BLOCK_SIZE_M": 16}}', "lacks"),
    ('{"big": {}}', "'big'"),
    ("[]", "maps batch sizes"),
])
def test_malformed_config_files(tmp_path, content, message):
    (tmp_path / "E=8,N=64,device_name=X.json").write_text(content)
    with pytest.raises(UsageError, match=message) as info:
        read_config_folder(tmp_path)
    assert "\n" not in str(info.value)


def test_read_needs_a_folder(tmp_path):
    with pytest.raises(UsageError, match="not a folder"):
        read_config_folder(tmp_path / "missing")


def test_lookup_picks_nearest_batch_first_on_ties(rng):
    keys = rng.sample(range(1, 5000), 12)
    configs = _random_configs(rng, keys)
    for M in [rng.randint(1, 6000) for _ in range(200)]:
        chosen = lookup(configs, M)
        best = min(abs(k - M) for k in keys)
        first_nearest = next(k for k in keys if abs(k - M) == best)  # dict order, as vLLM iterates
        assert chosen == configs[first_nearest], M
    ordered = {2: Config(16, 32, 64, 1, 4, 2), 4: Config(32, 32, 64, 1, 4, 2)}
    assert lookup(ordered, 3) == ordered[2]
    with pytest.raises(ValueError):
        lookup({}, 3)


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch, rng, failing):
    shape = MoEShape(**MIXTRAL_TP2, dtype=DType.BF16)
    old = write_vllm(tmp_path, shape, "NVIDIA H200", _random_configs(rng, [1, 2]), "3.4.0").path
    before = old.read_text()

    def boom(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="disk gone"):
        write_vllm(tmp_path, shape, "NVIDIA H200", _random_configs(rng, [1, 2, 4]), "3.4.0")
    monkeypatch.undo()
    assert old.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [old.name]


KERNEL = {"device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.4.0", "kernel": "builtin", "kernel_hash": "abc"}


@pytest.mark.parametrize("layout", ["vllm", "sglang"])
def test_existing_entries_are_kept_only_for_the_same_kernel_and_triton(tmp_path, rng, layout):
    """Re-tuning M=8 into a file holding M=1,4 keeps 1 and 4 (same kernel and Triton); another
    kernel, another Triton or a file of unknown origin is refused unless replace is set."""
    shape = MoEShape(**MIXTRAL_TP2, dtype=DType.BF16)
    first, second = _random_configs(rng, [1, 4]), _random_configs(rng, [8])

    def write(configs, kernel=KERNEL, replace=False, triton="3.4.0"):
        if layout == "vllm":
            return [write_vllm(tmp_path, shape, "NVIDIA H200", configs, triton, kernel, replace)]
        return write_sglang(tmp_path, shape, "NVIDIA H200", configs, None, triton, kernel, replace)

    def read():
        return next(iter(read_config_folder(tmp_path).values()))

    assert [w.action for w in write(first)] == ["created"]
    (merged,) = write(second)
    assert merged.action == "merged" and merged.kept == (1, 4)
    assert read() == {**first, **second}
    assert [w.action for w in write({**first, **second})] == ["updated"]  # every old entry re-tuned: nothing lost

    before = merged.path.read_bytes()
    for other in ({**KERNEL, "kernel_hash": "def"}, {**KERNEL, "kernel": "vllm"}, None):
        with pytest.raises(FileConflict, match="batch sizes 1,4"):
            write(_random_configs(rng, [16]), kernel=other)
        with pytest.raises(FileConflict):
            check_existing(tmp_path, shape, "NVIDIA H200", {16}, other or {}, "3.4.0", (layout,))
    assert merged.path.read_bytes() == before
    check_existing(tmp_path, shape, "NVIDIA H200", {16}, KERNEL, "3.4.0", (layout,))
    if layout == "vllm":  # SGLang's folder carries the version: another Triton is another file
        with pytest.raises(FileConflict, match="triton"):
            write(_random_configs(rng, [16]), triton="3.5.0")
    (replaced,) = write({16: first[1]}, kernel={**KERNEL, "kernel_hash": "def"}, replace=True)
    assert replaced.action == "replaced" and read() == {16: first[1]}


def test_a_kept_entry_keeps_its_down_config(tmp_path, rng):
    shape = MoEShape(**MIXTRAL_TP2, dtype=DType.BF16)
    up = {1: Config(16, 64, 64, 1, 4, 2), 4: Config(32, 64, 64, 1, 4, 2)}
    down = {1: Config(16, 128, 64, 1, 4, 3), 4: Config(32, 128, 64, 1, 4, 3)}
    write_sglang(tmp_path, shape, "NVIDIA H200", up, down, "3.4.0", KERNEL)
    new = {8: Config(64, 64, 64, 1, 4, 2)}
    written = write_sglang(tmp_path, shape, "NVIDIA H200", new, None, "3.4.0", KERNEL)
    files = read_config_folder(tmp_path)
    assert [w.action for w in written] == ["merged", "merged"]
    up_name, down_name = (f"triton_3_4_0/{w.path.name}" for w in written)
    assert files[up_name] == {**up, **new}
    assert files[down_name] == {**down, **new}  # no down config of its own: SGLang runs the up config


def test_files_are_readable_by_others_under_the_umask(tmp_path, rng):
    shape = MoEShape(**MIXTRAL_TP2, dtype=DType.BF16)
    old = os.umask(0o022)
    try:
        path = write_vllm(tmp_path, shape, "NVIDIA H200", _random_configs(rng, [1]), "3.4.0", KERNEL).path
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        path = write_vllm(tmp_path, shape, "NVIDIA H200", _random_configs(rng, [1]), "3.4.0", KERNEL).path
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_an_unwritable_folder_is_found_by_the_probe(tmp_path):
    probe_writable(tmp_path / "new" / "folder", "out")
    assert not (tmp_path / "new").exists()  # the probe leaves nothing behind
    (tmp_path / "there").mkdir()
    probe_writable(tmp_path / "there", "out")
    assert (tmp_path / "there").is_dir() and not list((tmp_path / "there").iterdir())
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file" / "sub", Path("/proc/moe-tune-out")):
        with pytest.raises(UsageError, match="cannot write there"):
            probe_writable(bad, "out")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(UsageError, match="--out .*locked: cannot write there"):
            probe_writable(locked, "out")


def test_the_probe_never_removes_a_folder_it_did_not_create(tmp_path: Path) -> None:
    """``out/../given`` with no ``out``: ``given`` exists (empty, the user's); the probe leaves it."""

    (tmp_path / "given").mkdir()
    probe_writable(tmp_path / "out" / ".." / "given", "out")
    assert (tmp_path / "given").is_dir() and not (tmp_path / "out").exists()
