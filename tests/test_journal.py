"""The journal: durable appends, keys that change with everything that changes a timing,
survival of a torn last line, --fresh keeping the old file aside, one run at a time."""

from __future__ import annotations

import random

import orjson
import pytest

from tuner.journal import (Journal, JournalBusy, candidate_from_dict, candidate_to_dict, measurement_key,
                           measurement_to_record, record_to_measurement, retime_key)
from workers.records import Candidate, Config, DType, Gemm, Measurement, MoEShape, Status

ENV = {"device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "kernel": "builtin", "kernel_hash": "abc"}


def random_candidate(rng: random.Random) -> Candidate:
    dtype = rng.choice(list(DType))
    block = (128, 128) if dtype is DType.FP8_W8A8 and rng.random() < 0.5 else None
    shape = MoEShape(E=rng.choice([8, 64, 128]), N=rng.choice([256, 7168]), K=rng.choice([2880, 4096]),
                     topk=rng.choice([2, 4, 8]), dtype=dtype, block_shape=block)
    config = Config(*(rng.choice(v) for v in ([16, 64, 128], [32, 128], [64, 128], [1, 16], [4, 8], [2, 3, 4])))
    return Candidate(shape, rng.choice([1, 64, 4096]), config, rng.choice(list(Gemm)),
                     rng.choice(["uniform", "zipf:1.2"]))


def random_measurement(rng: random.Random, status: Status = Status.OK) -> Measurement:
    ok = status is Status.OK
    return Measurement(random_candidate(rng), status, latency_us=rng.uniform(10, 5000) if ok else None,
                       spread_us=rng.uniform(0, 5) if ok else None, rel_err=rng.uniform(0, 1e-2),
                       device=ENV["device"], versions={"torch": "2.11.0", "triton": "3.6.0"},
                       message="" if ok else "boom")


def test_records_round_trip_and_survive_reopening(tmp_path, rng):
    path = tmp_path / "j.jsonl"
    written = [random_measurement(rng, rng.choice(list(Status))) for _ in range(20)]
    with Journal(path) as journal:
        for m in written:
            journal.append(measurement_to_record(measurement_key(ENV, m.candidate), m, attempts=1))
    with Journal(path) as journal:
        for m in written:
            record = journal.get(measurement_key(ENV, m.candidate))
            assert record is not None
            assert record_to_measurement(record) == m


def test_key_changes_with_every_field_that_changes_a_timing(rng):
    candidate = random_candidate(rng)
    base = measurement_key(ENV, candidate)
    assert measurement_key(dict(reversed(list(ENV.items()))), candidate) == base, "key must not depend on dict order"
    assert candidate_from_dict(candidate_to_dict(candidate)) == candidate
    for field in ENV:
        assert measurement_key({**ENV, field: ENV[field] + "x"}, candidate) != base, field
    data = candidate_to_dict(candidate)
    variants = [
        {**data, "M": data["M"] + 1},
        {**data, "gemm": "up" if data["gemm"] != "up" else "down"},
        {**data, "routing": data["routing"] + "x"},
        {**data, "config": {**data["config"], "num_stages": data["config"]["num_stages"] + 1}},
        {**data, "shape": {**data["shape"], "E": data["shape"]["E"] + 1}},
        {**data, "shape": {**data["shape"], "dtype": "fp16" if data["shape"]["dtype"] != "fp16" else "bf16",
                           "block_shape": None}},
        {**data, "shape": {**data["shape"], "block_shape": [64, 64]}},
    ]
    for variant in variants:
        assert measurement_key(ENV, candidate_from_dict(variant)) != base, variant


def test_torn_last_line_is_cut_and_appends_continue(tmp_path, rng):
    path = tmp_path / "j.jsonl"
    first, second, third = (random_measurement(rng) for _ in range(3))
    with Journal(path) as journal:
        for m in (first, second):
            journal.append(measurement_to_record(measurement_key(ENV, m.candidate), m, attempts=1))
    whole = path.read_bytes()
    cut = rng.randrange(whole.rindex(b"\n", 0, len(whole) - 1) + 2, len(whole) - 1)
    path.write_bytes(whole[:cut])  # the driver died while writing the second record
    with Journal(path) as journal:
        assert journal.get(measurement_key(ENV, first.candidate)) is not None
        assert journal.get(measurement_key(ENV, second.candidate)) is None
        journal.append(measurement_to_record(measurement_key(ENV, third.candidate), third, attempts=1))
    lines = path.read_bytes().splitlines()
    assert len(lines) == 2 and all(orjson.loads(line) for line in lines)


def test_a_corrupt_line_is_skipped_not_fatal(tmp_path, rng):
    path = tmp_path / "j.jsonl"
    m = random_measurement(rng)
    path.write_bytes(b"{not json\n" + orjson.dumps(measurement_to_record(measurement_key(ENV, m.candidate), m, 1))
                     + b"\n")
    with Journal(path) as journal:
        assert journal.skipped_lines == 1
        assert journal.get(measurement_key(ENV, m.candidate)) is not None


def test_fresh_sets_the_old_journal_aside(tmp_path, rng):
    path = tmp_path / "j.jsonl"
    m = random_measurement(rng)
    key = measurement_key(ENV, m.candidate)
    with Journal(path) as journal:
        journal.append(measurement_to_record(key, m, 1))
    old = path.read_bytes()
    with Journal(path, fresh=True) as journal:
        assert journal.get(key) is None
        assert journal.set_aside is not None and journal.set_aside.read_bytes() == old
    assert path.read_bytes() == b""


def test_one_run_at_a_time(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal(path):
        with pytest.raises(JournalBusy):
            Journal(path)
    Journal(path).close()  # the lock goes with the first run


def test_retime_key_ignores_finalist_order(rng):
    keys = [f"{rng.getrandbits(64):x}" for _ in range(4)]
    assert retime_key(keys) == retime_key(reversed(keys))
    assert retime_key(keys) != retime_key(keys[:3])
