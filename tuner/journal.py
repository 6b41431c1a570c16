"""The append-only journal of measurements: the tuning cache and the resume point in one file.

Each line is one orjson record, written and fsynced as its result arrives, so a driver killed at
any instant (SIGKILL included) loses at most the line it was writing; a torn last line is cut off
when the journal is opened again. A record is found again by its key, a SHA-256 over everything
that changes a timing: the worker environment (kernel source hash, Triton and torch versions,
device name, kernel flavour) and the candidate (shape with dtype and block shape, routing, M,
GEMM part, timing level, config). Same key, never measured twice.

Two kinds of records: ``measure`` (one candidate's final outcome, failures included, so a config
that crashed twice is not tried again on resume) and ``retime`` (the back-to-back re-timing of one
group of finalists, keyed by the finalists' keys, so a resumed run chooses as the first one did).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Union

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from tuner import signals
from workers.records import CONFIG_KEYS, Candidate, Config, DType, Gemm, Level, Measurement, MoEShape, Status

FORMAT_VERSION = 1
JOURNAL_NAME = ".moe-tune-journal.jsonl"


class JournalBusy(Exception):
    """Another live run holds the journal."""


def _try_lock(fd: int) -> bool:
    """Take the journal lock on ``fd`` (an exclusive ``flock``) without waiting; False when
    another open file holds it (a live moe-tune run: the lock dies with its process)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _busy(path: Path) -> JournalBusy:
    return JournalBusy(f"journal {path} is in use by another moe-tune run")


def check_not_busy(path: Path) -> None:
    """``JournalBusy`` (one line) when a live run holds the journal at ``path``: its lock is tried
    without waiting and released at once, so bad input is refused before any work starts.
    ``Journal`` takes the same lock for the run (the real guard: a run may start in between). A
    missing file, or one that is not a regular file (``not_a_journal`` refuses it), is not busy."""
    resolved = Path(path).resolve()
    if not resolved.is_file():
        return
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK)  # flock needs no write access
    except OSError:
        return  # an unreadable or vanished file: the run's own open says why
    try:
        if not _try_lock(fd):
            raise _busy(resolved)
    finally:
        os.close(fd)  # releases the lock taken


@dataclass(frozen=True)
class WorkerEnv:
    """What a worker is (``BenchmarkWorker.describe``: device name, torch and Triton versions,
    kernel flavour and source hash), frozen so it can key a device group and a journal lookup."""

    fields: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, described: Mapping[str, str]) -> "WorkerEnv":
        return cls(tuple(sorted(described.items())))

    def as_dict(self) -> dict[str, str]:
        return dict(self.fields)

    def get(self, name: str, default: str = "") -> str:
        return dict(self.fields).get(name, default)

    @property
    def device(self) -> str:
        return self.get("device")


def candidate_to_dict(candidate: Candidate) -> dict:
    shape = candidate.shape
    return {
        "shape": {"E": shape.E, "N": shape.N, "K": shape.K, "topk": shape.topk, "dtype": shape.dtype.value,
                  "block_shape": list(shape.block_shape) if shape.block_shape else None,
                  **shape.layout_fields()},
        "M": candidate.M,
        "config": candidate.config.to_dict(),
        "gemm": candidate.gemm.value,
        "routing": candidate.routing,
        "level": candidate.level.value,
    }


def candidate_from_dict(data: dict) -> Candidate:
    return Candidate(shape=MoEShape(**data["shape"]), M=int(data["M"]), config=Config.from_dict(data["config"]),
                     gemm=Gemm(data["gemm"]), routing=data["routing"], level=Level(data["level"]))


def _digest(obj: object) -> str:
    return hashlib.sha256(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)).hexdigest()


def measurement_key(environment: dict[str, str], candidate: Candidate) -> str:
    """The journal key of one candidate measured in one worker environment (``BenchmarkWorker.describe``)."""
    return _digest({"env": environment, "candidate": candidate_to_dict(candidate)})


def retime_key(finalist_keys: Iterable[str]) -> str:
    return _digest({"retime": sorted(finalist_keys)})


def measurement_to_record(key: str, measurement: Measurement, attempts: int) -> dict:
    return {
        "v": FORMAT_VERSION, "kind": "measure", "key": key, "time": time.time(),
        "candidate": candidate_to_dict(measurement.candidate), "status": measurement.status.value,
        "latency_us": measurement.latency_us, "spread_us": measurement.spread_us, "rel_err": measurement.rel_err,
        "device": measurement.device, "versions": measurement.versions, "message": measurement.message,
        "attempts": attempts,
    }


def retime_to_record(key: str, finalist_keys: list[str], latencies_us: list[float]) -> dict:
    return {"v": FORMAT_VERSION, "kind": "retime", "key": key, "time": time.time(), "finalists": finalist_keys,
            "latency_us": latencies_us}


PositiveInt = Annotated[int, Field(ge=1)]
PositiveTime = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""A latency or spread in µs as a journal line must hold it (a hand-edited -1 or 0 would win the selection)."""


class _Strict(BaseModel):
    """A journal record's part, validated strictly as the JSON of a line holds it (the dict orjson
    made of it: one parse). Strict validation of Python objects takes an enum only as a member and
    a tuple only as a tuple, where JSON can only hold the value and an array; the fields of those
    two types alone are marked ``_AS_JSON`` and take them so (a value, an array), nothing looser."""

    model_config = ConfigDict(strict=True, extra="ignore")


_AS_JSON = Field(strict=False)
"""An enum's value or a tuple's array, as JSON spells them (see ``_Strict``): their items stay strict."""


class _ShapeRecord(_Strict):
    E: PositiveInt
    N: PositiveInt
    K: PositiveInt
    topk: PositiveInt
    dtype: Annotated[DType, _AS_JSON]
    block_shape: Annotated[tuple[PositiveInt, PositiveInt], _AS_JSON] | None


class _CandidateRecord(_Strict):
    shape: _ShapeRecord
    M: PositiveInt
    config: dict[Literal[CONFIG_KEYS], PositiveInt] = Field(min_length=len(CONFIG_KEYS))  # type: ignore[valid-type]
    gemm: Annotated[Gemm, _AS_JSON]
    routing: str
    level: Annotated[Level, _AS_JSON]


class _MeasureRecord(_Strict):
    v: Literal[FORMAT_VERSION]
    kind: Literal["measure"]
    key: str
    candidate: _CandidateRecord
    status: Annotated[Status, _AS_JSON]
    latency_us: PositiveTime | None
    spread_us: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None
    rel_err: Annotated[float, Field(ge=0)] | None
    device: str
    versions: dict[str, str]
    message: str

    @model_validator(mode="after")
    def _ok_has_latency(self) -> "_MeasureRecord":
        if self.status is Status.OK and (self.latency_us is None or self.latency_us <= 0):
            raise ValueError("an ok measurement needs a positive latency_us")
        return self


class _RetimeRecord(_Strict):
    v: Literal[FORMAT_VERSION]
    kind: Literal["retime"]
    key: str
    finalists: list[str] = Field(min_length=1)
    latency_us: list[PositiveTime]

    @model_validator(mode="after")
    def _one_latency_per_finalist(self) -> "_RetimeRecord":
        if len(self.latency_us) != len(self.finalists) or len(set(self.finalists)) != len(self.finalists):
            raise ValueError("a re-timing needs one latency per distinct finalist")
        return self


_RECORD = TypeAdapter(Annotated[Union[_MeasureRecord, _RetimeRecord], Field(discriminator="kind")])
"""What a journal line must be to be used: the fields ``record_to_measurement`` and the re-timing
reuse read, with their types and values (a hand-edited or foreign line that is valid JSON but not
this is skipped like an unreadable one)."""


def record_to_measurement(record: dict) -> Measurement:
    return Measurement(candidate=candidate_from_dict(record["candidate"]), status=Status(record["status"]),
                       latency_us=record["latency_us"], spread_us=record["spread_us"], rel_err=record["rel_err"],
                       device=record["device"], versions=dict(record["versions"]), message=record["message"])


def not_a_journal(path: Path) -> str | None:
    """Why the existing path ``path`` cannot be a moe-tune journal (one line), or None: it is one
    (its first complete line is a record this module writes, however hostile the lines after it),
    it is empty or holds only a torn first record (an unterminated line that starts as a record
    does and is no whole JSON value: any other unterminated line is a file's, which opening would
    cut), or it does not exist. A run appends to its
    journal, so a file given as one by mistake (a ``config.json``) would be corrupted; a folder or
    a FIFO is no file at all (and is never opened here: reading a FIFO would block)."""
    if path.exists() and not path.is_file():
        return "exists and is not a file"
    try:
        with open(path, "rb") as handle:
            lines = iter(lambda: handle.readline(1 << 20), b"")
            first = next((line for line in lines if line.strip()), b"")
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    try:
        record = orjson.loads(first)
    except orjson.JSONDecodeError:
        if not first.endswith(b"\n") and (not first or first.startswith(b'{"v"')):
            return None  # nothing, or a record (``{"v": ...``) torn by a killed run: opening the journal cuts it
        record = None
    if isinstance(record, dict) and "v" in record and record.get("kind") in ("measure", "retime"):
        return None
    return ("not a moe-tune journal (its first line is no journal record) and a run appends to its journal; "
            "give a new file or an earlier run's journal")


def count_measurements(path: Path, work: set[tuple[MoEShape, str, int]]) -> int:
    """How many ``measure`` records of the journal at ``path`` belong to ``work`` — (shape, routing,
    batch size) triples, on any device and software stack — without opening it for writing (a
    missing file counts 0; unreadable lines are skipped as ``Journal`` skips them)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return 0
    count = 0
    for line in data.splitlines():
        try:
            record = orjson.loads(line)
            if record.get("kind") != "measure":
                continue
            candidate = candidate_from_dict(record["candidate"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            continue
        count += (candidate.shape, candidate.routing, candidate.M) in work
    return count


class Journal:
    """An open journal: ``get`` looks a key up, ``append`` adds a record durably.

    Holds an exclusive ``flock`` while open: two drivers appending to one journal would each
    believe they own the queue, and the lock dies with its process, so a killed driver never
    leaves a stale lock behind.

    A journal this object created (file and folders) that is still empty at ``close`` is removed
    again: a run that ended before any measurement (no GPU, workers that never started) leaves
    nothing behind.
    """

    def __init__(self, path: Path, fresh: bool = False) -> None:
        # Resolved: in ``out/../given`` with no ``out`` yet, ``given`` does not "exist" lexically, and an
        # empty folder the user made there would be removed as one this journal created.
        self.path = Path(path).resolve()
        self._created_folders = [p for p in self.path.parents if not p.exists()]  # deepest first
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._created = not self.path.exists()
        self.set_aside: Path | None = None
        self._handle = open(self.path, "a+b")
        if not _try_lock(self._handle.fileno()):
            self._handle.close()
            raise _busy(self.path)
        if fresh and self.path.stat().st_size > 0:
            self.set_aside = self.path.with_name(f"{self.path.name}.{time.strftime('%Y%m%d-%H%M%S')}.old")
            os.replace(self.path, self.set_aside)
            old = self._handle
            self._handle = open(self.path, "a+b")
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            old.close()
        self.records: dict[str, dict] = {}
        self.unreadable_lines = 0
        self.invalid_records = 0
        self._load()

    @property
    def skipped_lines(self) -> int:
        return self.unreadable_lines + self.invalid_records

    def warning(self) -> str | None:
        """One line saying how many lines were skipped and why, or None when none were."""
        if not self.skipped_lines:
            return None
        return (f"journal {self.path}: skipped {self.skipped_lines} line(s) ({self.unreadable_lines} unreadable, "
                f"{self.invalid_records} with wrong fields); their candidates are measured again")

    def _load(self) -> None:
        self._handle.seek(0)
        data = self._handle.read()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            # A torn last line (the writer died mid-record): cut it so the next append starts clean.
            self._handle.truncate(complete)
            os.fsync(self._handle.fileno())
        for line in data[:complete].splitlines():
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                self.unreadable_lines += 1
                continue
            try:
                _RECORD.validate_python(record)
            except ValidationError:
                self.invalid_records += 1
                continue
            self.records[record["key"]] = record

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def measurement(self, env: WorkerEnv, candidate: Candidate) -> Measurement | None:
        """The journaled outcome of ``candidate`` in ``env``, or None if it was never measured there."""
        record = self.get(measurement_key(env.as_dict(), candidate))
        if record is None or record.get("kind") != "measure":
            return None
        try:
            measurement = record_to_measurement(record)
        except (KeyError, TypeError, ValueError):
            return None
        # A line whose key is not its own candidate's (hand-edited or copied): never reuse it as this
        # candidate's outcome, whose config or shape it would carry into the selection.
        return measurement if measurement.candidate == candidate else None

    def record_measurement(self, env: WorkerEnv, measurement: Measurement, attempts: int) -> None:
        self.append(measurement_to_record(measurement_key(env.as_dict(), measurement.candidate), measurement,
                                          attempts))

    def retime(self, env: WorkerEnv, finalists: Iterable[Candidate]) -> list[float] | None:
        """The journaled back-to-back latencies (µs) of one group of finalists in ``env``, in the
        order of ``finalists`` (the key ignores order; the record names each latency's finalist), or
        None if that group was never re-timed there or the record is not of these finalists."""
        keys = [measurement_key(env.as_dict(), c) for c in finalists]
        record = self.get(retime_key(keys))
        if record is None or record.get("kind") != "retime":
            return None
        latencies = dict(zip(record["finalists"], record["latency_us"]))
        if sorted(latencies) != sorted(keys):
            return None
        return [float(latencies[key]) for key in keys]

    def record_retime(self, env: WorkerEnv, finalists: list[Candidate], latencies_us: list[float]) -> None:
        keys = [measurement_key(env.as_dict(), c) for c in finalists]
        self.append(retime_to_record(retime_key(keys), keys, latencies_us))

    def append(self, record: dict) -> None:
        """Write one record durably; a SIGTERM arriving meanwhile waits until the line is on disk."""
        with signals.deferred():
            self._handle.seek(0, os.SEEK_END)
            self._handle.write(orjson.dumps(record) + b"\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self.records[record["key"]] = record

    def measured(self) -> int:
        """Measurement records held (reused ones included): what a resumed run will not redo."""
        return sum(1 for r in self.records.values() if r.get("kind") == "measure")

    @property
    def started(self) -> bool:
        """False while the journal is one this object created and nothing was recorded in it yet:
        ``close`` then removes it again, as if it had never been. Asked while the journal is open."""
        return not (self._created and self.set_aside is None and os.fstat(self._handle.fileno()).st_size == 0)

    def holds(self) -> str:
        """What a rerun finds here, as the clause a resume hint starts with: ``N measurements are in
        the journal PATH``, or, for a journal not started (``started``), that nothing was measured
        and no journal was started at PATH (so no message names a file that does not exist)."""
        if not self.started:
            return f"nothing was measured and the journal {self.path} was not started"
        return f"{self.measured()} measurements are in the journal {self.path}"

    def resume_hint(self) -> str:
        """``holds`` and what to do: run the same command again to resume (or, with nothing
        started, to start over)."""
        return f"{self.holds()}; run the same command again to {'resume' if self.started else 'start over'}"

    def close(self) -> None:
        if self._handle.closed:
            return
        try:
            if not self.started:
                self.path.unlink(missing_ok=True)  # still holding the lock: no other run writes to it
                for folder in self._created_folders:
                    folder.rmdir()
        except OSError:
            pass  # a folder something else wrote into meanwhile stays
        finally:
            self._handle.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
