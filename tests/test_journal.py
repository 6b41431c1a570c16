"""The journal: durable appends, keys that change with everything that changes a timing,
survival of a torn last line, --fresh keeping the old file aside, one run at a time."""

from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import fields, replace
from enum import Enum
from pathlib import Path

import orjson
import pytest

from tuner.journal import (Journal, JournalBusy, WorkerEnv, candidate_from_dict, candidate_to_dict, check_not_busy,
                           measurement_key, measurement_to_record, record_to_measurement, retime_key, retime_to_record)
from workers.records import CONFIG_KEYS, Candidate, Config, DType, Gemm, Measurement, MoEShape, Status

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


def _other(value: object, rng: random.Random) -> object:
    """A different valid value of one record field."""
    if isinstance(value, Enum):
        return rng.choice([member for member in type(value) if member is not value])
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2 or 1
    if isinstance(value, str):
        return rng.choice([r for r in ("uniform", "zipf:1.2", "zipf:0.8", "file:ids.pt") if r != value])
    raise AssertionError(f"no variant for {value!r}")


def _variants(candidate: Candidate, rng: random.Random) -> dict[str, Candidate]:
    """One candidate per field of the candidate, its shape and its config, differing in that field
    alone. Fields are enumerated from the records, so a field added later is varied too."""
    shape, config = candidate.shape, candidate.config
    variants: dict[str, Candidate] = {}
    for f in fields(Candidate):
        if f.name not in ("shape", "config"):
            variants[f.name] = replace(candidate, **{f.name: _other(getattr(candidate, f.name), rng)})
    for f in fields(MoEShape):
        value = getattr(shape, f.name)
        if f.name == "block_shape":
            if shape.dtype is not DType.FP8_W8A8:
                continue  # only block fp8 has one
            if shape.per_channel:
                continue  # per-channel fp8 has none
            varied = replace(shape, block_shape=rng.choice([b for b in (None, (128, 128), (64, 128)) if b != value]))
        elif f.name == "dtype":  # the block shape and per-channel scales belong to fp8: another dtype drops them
            other = _other(value, rng)
            fp8 = other is DType.FP8_W8A8
            varied = replace(shape, dtype=other, block_shape=shape.block_shape if fp8 else None,
                             per_channel=shape.per_channel and fp8)
        elif f.name == "per_channel":
            if shape.dtype is not DType.FP8_W8A8 or shape.block_shape is not None:
                continue  # only fp8 without blocks has per-channel scales
            varied = replace(shape, per_channel=not value)
        else:
            varied = replace(shape, **{f.name: _other(value, rng)})
        variants[f"shape.{f.name}"] = replace(candidate, shape=varied)
    for f in fields(Config):
        variants[f"config.{f.name}"] = replace(candidate, config=replace(config, **{f.name: getattr(config, f.name) * 2}))
    return variants


def test_key_changes_with_every_field_that_changes_a_timing(rng):
    candidate = random_candidate(rng)
    base = measurement_key(ENV, candidate)
    assert measurement_key(dict(reversed(list(ENV.items()))), candidate) == base, "key must not depend on dict order"
    assert measurement_key(dict(ENV), replace(candidate)) == base, "key must be a function of the values"
    env = {**ENV, "kernel_version": "vllm 0.33.0", "fault_plan": "0123456789abcdef"}
    for field in env:  # the worker environment: device, versions, kernel (backend), its source hash, fault plan
        assert measurement_key({**env, field: env[field] + "x"}, candidate) != measurement_key(env, candidate), field
        assert measurement_key({k: v for k, v in env.items() if k != field}, candidate) != \
            measurement_key(env, candidate), field
    block_fp8 = replace(candidate, shape=replace(candidate.shape, dtype=DType.FP8_W8A8, block_shape=(128, 128),
                                                 per_channel=False))
    tensor_fp8 = replace(candidate, shape=replace(candidate.shape, dtype=DType.FP8_W8A8, block_shape=None))
    varied: set[str] = set()
    for original in (candidate, block_fp8, tensor_fp8):
        assert candidate_from_dict(candidate_to_dict(original)) == original
        for name, variant in _variants(original, rng).items():
            varied.add(name.rpartition(".")[2])
            assert variant != original, name
            assert measurement_key(ENV, variant) != measurement_key(ENV, original), name
            assert candidate_from_dict(candidate_to_dict(variant)) == variant, name
    assert varied == {"E", "N", "K", "topk", "dtype", "block_shape", "gated", "ep", "fused_shared", "per_channel",
                      "routing", "level", "M", "gemm", *CONFIG_KEYS}


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


def test_a_journal_held_by_a_live_run_is_found_without_taking_it(tmp_path):
    """``check_not_busy`` (what the commands ask before Ray starts) tries the run's own lock and
    lets it go at once: refused while another process's run holds it, and never in the way of
    the run that takes it next."""
    path = tmp_path / "j.jsonl"
    check_not_busy(path)  # no file yet: nothing holds it (and nothing is created)
    assert not path.exists()
    path.touch()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_JOURNAL, str(path)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(JournalBusy, match="in use by another moe-tune run"):
            check_not_busy(path)
    finally:
        holder.kill()
        holder.wait(30)
    check_not_busy(path)  # the lock died with its process
    with Journal(path):  # and the check did not keep it
        with pytest.raises(JournalBusy):
            check_not_busy(path)


HOLD_JOURNAL = """
import sys, time
from tuner.journal import Journal
journal = Journal(sys.argv[1])
print("held", flush=True)
time.sleep(300)
"""


def test_a_journal_not_started_is_not_named_as_holding_measurements(tmp_path, rng):
    """A run that ends before its first record (SIGTERM, every worker lost) removes the journal it
    created: its hint says nothing was measured, never "0 measurements are in" a missing file."""
    path = tmp_path / "out" / "j.jsonl"
    with Journal(path) as journal:
        assert not journal.started
        assert journal.holds() == f"nothing was measured and the journal {path} was not started"
        assert journal.resume_hint().endswith("run the same command again to start over")
        m = random_measurement(rng)
        journal.append(measurement_to_record(measurement_key(ENV, m.candidate), m, attempts=1))
        assert journal.started
        assert journal.resume_hint() == (f"1 measurements are in the journal {path}; run the same command again "
                                         "to resume")
    with Journal(path) as journal:  # reopened: its record is what a rerun reuses
        assert journal.started and journal.holds().startswith("1 measurements are in the journal")


def test_retime_key_ignores_finalist_order(rng):
    keys = [f"{rng.getrandbits(64):x}" for _ in range(4)]
    assert retime_key(keys) == retime_key(reversed(keys))
    assert retime_key(keys) != retime_key(keys[:3])


def test_a_journal_created_for_nothing_is_removed_with_its_folders(tmp_path, rng):
    """A run that ends before its first measurement (no GPU, workers that never start) leaves no
    empty journal and no folder behind; a journal with a record, or one that was there, stays."""
    path = tmp_path / "out" / "deeper" / "j.jsonl"
    with Journal(path):
        assert path.exists()  # held (and locked) while the run is open
    assert not (tmp_path / "out").exists()

    with Journal(path) as journal:
        m = random_measurement(rng)
        journal.append(measurement_to_record(measurement_key(ENV, m.candidate), m, attempts=1))
    assert path.stat().st_size > 0
    with Journal(path):  # reopened: its measurements stay
        pass
    assert path.stat().st_size > 0

    existing = tmp_path / "given.jsonl"
    existing.touch()
    with Journal(existing):  # an empty file the user made is theirs
        pass
    assert existing.exists()
    (tmp_path / "folder").mkdir()
    with Journal(tmp_path / "folder" / "j.jsonl"):
        pass
    assert (tmp_path / "folder").is_dir() and not (tmp_path / "folder" / "j.jsonl").exists()


def test_a_hand_edited_line_is_never_reused_as_another_candidates_outcome(tmp_path, rng):
    """A line whose key is a real candidate's but whose content is not (an edited config, a shape
    copied from elsewhere, a latency of 0 or below) is not handed back: its config would be written."""
    env = WorkerEnv.of(ENV)
    measured = [random_measurement(rng) for _ in range(4)]
    records = [measurement_to_record(measurement_key(ENV, m.candidate), m, 1) for m in measured]
    records[0]["candidate"]["config"]["BLOCK_SIZE_M"] = 3
    records[1]["candidate"]["shape"]["E"] *= 2
    records[2]["latency_us"] = -1.0
    (tmp_path / "j.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    with Journal(tmp_path / "j.jsonl") as journal:
        assert [journal.measurement(env, m.candidate) for m in measured[:3]] == [None] * 3
        assert journal.measurement(env, measured[3].candidate) == measured[3]


def test_a_retiming_is_handed_back_per_finalist_or_not_at_all(tmp_path, rng):
    """Latencies come back in the order the finalists are asked in (the key ignores order); a
    record with a latency missing, one not above 0, or other finalists is not used."""
    env = WorkerEnv.of(ENV)
    finalists = list(dict.fromkeys(random_candidate(rng) for _ in range(3)))
    keys = [measurement_key(ENV, c) for c in finalists]
    latencies = [rng.uniform(10, 100) for _ in finalists]
    path = tmp_path / "j.jsonl"
    with Journal(path) as journal:
        journal.append(retime_to_record(retime_key(keys), keys[::-1], latencies[::-1]))
    with Journal(path) as journal:
        assert journal.retime(env, finalists) == latencies
        assert journal.retime(env, finalists[::-1]) == latencies[::-1]
    # Malformed records are counted invalid when read (their candidates re-timed); a well-formed one
    # of other finalists under this key (hand-edited) is read but not used for these.
    for bad, invalid in (({"latency_us": latencies[:-1]}, 1), ({"latency_us": [0.0, *latencies[1:]]}, 1),
                         ({"latency_us": [-5.0, *latencies[1:]]}, 1), ({"finalists": [keys[0]] * len(keys)}, 1),
                         ({"finalists": [keys[0], keys[1], "f" * 64]}, 0)):
        path.write_bytes(orjson.dumps({**retime_to_record(retime_key(keys), keys, latencies), **bad}) + b"\n")
        with Journal(path) as journal:
            assert journal.retime(env, finalists) is None, bad
            assert journal.invalid_records == invalid, bad


def test_a_journal_never_removes_a_folder_it_did_not_create(tmp_path) -> None:
    (tmp_path / "given").mkdir()
    with Journal(tmp_path / "out" / ".." / "given" / "j.jsonl"):
        pass
    assert (tmp_path / "given").is_dir() and not (tmp_path / "out").exists()


HOSTILE_VALUES = [None, True, False, 0, 1, -1, 4, 128, 1.0, 0.5, 5.0, 1e308, 2**62, "", "4", "fp8_w8a8", "FP8_W8A8",
                  "ok", "measure", "retime", "both", "full", "uniform", [], [1], [128, 128], [128, 128, 1],
                  ["128", 128], [128.0, 128], [True, 1], {}, {"BLOCK_SIZE_M": 16}]
"""JSON values put in place of each part of a journal record: other types, the values of other
fields, the spellings of an enum's member, arrays of the wrong length and item type."""


def _paths(value: object, path: tuple = ()):
    """Every part of a decoded JSON value, as a path of keys and indices (the whole value first)."""
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield from _paths(item, (*path, key))


def _with(record: dict, path: tuple, value: object, delete: bool = False) -> object:
    """``record`` with the part at ``path`` replaced by ``value`` (or deleted)."""
    if not path:
        return value
    record = orjson.loads(orjson.dumps(record))
    parent = record
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return record


def test_a_line_is_used_exactly_when_strict_json_validation_takes_it(tmp_path, rng):
    """The journal decodes each line once (orjson) and validates the decoded record; what it uses,
    skips as invalid and skips as unreadable is what validating the line's JSON strictly against
    the same record models decides, for every part of a measure and a retime record replaced by
    hostile values or left out."""
    from pydantic import ValidationError

    from tuner.journal import _RECORD

    ok = random_measurement(rng)
    failed = random_measurement(rng, Status.CRASHED)
    block = replace(ok, candidate=replace(ok.candidate, shape=MoEShape(8, 64, 128, 2, DType.FP8_W8A8, (128, 128))))
    records = [measurement_to_record("m", m, 1) for m in (ok, failed, block)]
    records.append(retime_to_record("r", ["a", "b"], [1.5, 2.0]))
    lines = []
    for record in records:
        for path in _paths(record):
            lines += [orjson.dumps(_with(record, path, value)) for value in HOSTILE_VALUES]
            if path:
                lines.append(orjson.dumps(_with(record, path, None, delete=True)))
    lines += [b'{"v": 1.0, "kind": "retime", "key": "r", "finalists": ["a"], "latency_us": [1]}',
              b'{"v": 1, "kind": "retime", "key": "r", "finalists": ["a"], "latency_us": [1e999]}',
              b"{torn", b"\xff\xfe", b"[1, 2, 3]", b"null"]
    keyed, used, invalid, unreadable = [], set(), 0, 0
    for index, line in enumerate(lines):
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            unreadable += 1
            keyed.append(line)
            continue
        if isinstance(record, dict) and isinstance(record.get("key"), str):  # its own key: which lines were used
            record["key"] = f"{index}:{record['key']}"
            line = orjson.dumps(record)
        keyed.append(line)
        try:
            used.add(_RECORD.validate_json(line, strict=True).key)
        except ValidationError:
            invalid += 1
    assert used and invalid and unreadable
    path = tmp_path / "j.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in keyed))
    with Journal(path) as journal:
        assert set(journal.records) == used
        assert (journal.invalid_records, journal.unreadable_lines) == (invalid, unreadable)
