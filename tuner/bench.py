"""Are these configs worth shipping? Time the server version's default config (its rule:
``workers.default_config``) and each config folder's choice for one shape, per batch size, back
to back on one GPU in one kernel backend, and gate on the result.

All variants of one batch size are timed in the same worker process, interleaved round by round
(``BenchmarkWorker.retime``), so clock drift and neighbours hit them alike; each is first run
once and checked against the fp32 reference, so a folder whose config fails or computes wrong
on this GPU is reported as such, never timed as a winner. Variants that resolve to the same
config share one timing (so an identical config always compares as exactly 1.00x).

Ratios are times, as ``tune`` reports against its baseline (one convention, ``ratio_convention``):
a variant's latency ÷ the reference's latency, below 1 faster than the reference.

A folder with no file for the shape falls back to the default rule, as the server would, and the
result says so; the result names the rule and where its configs came from (the server's own
``get_default_config`` or moe-tune's encoding), and the kernel every number was timed in. The
gate (``fail_if_slower``, a speed fraction in (0, 1], e.g. 0.98): every ``--configs`` folder's
time ratio must stay at or below ``1 / fail_if_slower`` at every batch size where the reference
ran (0.98: at most ~2% slower); a folder config that fails where the reference ran is a
regression too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tuner.errors import RunFailed, UsageError
from tuner.pool import Done, Lost, WorkerPool, start_pool
from tuner.ray_session import DEFAULT_CONNECT_TIMEOUT_S, ray_session
from tuner.writers import lookup, read_config_folder, server_file
from workers.backends import BUILTIN
from workers.backends.base import describe_label
from workers.default_config import VLLM, server_default
from workers.records import Candidate, Config, MoEShape, Status

HEURISTIC = "default"
RETIME_ROUNDS = 20


def ratio_convention(reference: str) -> str:
    """What a time ratio against ``reference`` (what the ratio's denominator timed: ``bench``'s
    reference, ``tune``'s baseline) means, as the reports print it: time ÷ its time, below 1 faster."""
    return f"time / {reference} time (below 1: faster than the {reference})"


RATIO_CONVENTION = ratio_convention("reference")
"""What every ratio ``bench`` prints means (``tune``'s against its baseline: ``ratio_convention``)."""


def max_time_ratio(fail_if_slower: float) -> float:
    """The largest time ratio the gate accepts: ``1 / fail_if_slower`` (0.98 → 1.0204)."""
    return 1.0 / fail_if_slower


ConfigFiles = Mapping[str, Mapping[int, Config]]
"""A config folder's files as ``read_config_folder`` reads them (file name → M → config)."""


@dataclass(frozen=True)
class Variant:
    """A config source: a folder of server files, or (``folder`` None) the server's default rule.
    ``files``: the folder's files, read once when the variant is made (``variants_for``)."""

    label: str
    folder: Path | None
    files: ConfigFiles = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def is_heuristic(self) -> bool:
        return self.folder is None


@dataclass
class Cell:
    """One variant at one batch size."""

    config: Config
    source: str  # the file the config came from, or the default rule's label
    fell_back: bool = False  # the config is the default rule's
    status: Status = Status.OK
    latency_us: float | None = None
    message: str = ""


@dataclass
class BenchResult:
    shape: MoEShape
    routing: str
    device: str
    versions: dict[str, str]
    variants: list[Variant]
    reference: Variant
    default_rule: str = VLLM
    rows: dict[int, dict[str, Cell]] = field(default_factory=dict)

    def ratio(self, label: str, M: int) -> float | None:
        """This variant's latency / the reference's latency (< 1: faster than the reference;
        ``RATIO_CONVENTION``); None where either has no timing."""
        cell, ref = self.rows[M][label], self.rows[M][self.reference.label]
        if cell.latency_us is None or ref.latency_us is None:
            return None
        return cell.latency_us / ref.latency_us

    @property
    def gated(self) -> list[Variant]:
        return [v for v in self.variants if not v.is_heuristic and v != self.reference]

    def regressions(self, fail_if_slower: float) -> list[str]:
        """One line per (folder, M) that fails the gate."""
        found = []
        limit = max_time_ratio(fail_if_slower)
        for M, cells in self.rows.items():
            if cells[self.reference.label].latency_us is None:
                continue  # nothing to compare with
            for variant in self.gated:
                cell, ratio = cells[variant.label], self.ratio(variant.label, M)
                if cell.status is not Status.OK:
                    found.append(f"{variant.label} at M={M}: {cell.status.value} ({cell.config.label})")
                elif ratio is not None and ratio > limit:
                    found.append(f"{variant.label} at M={M}: {ratio:.3f}x the reference's time (above {limit:.3f} "
                                 f"= 1/{fail_if_slower:g})")
        return found

    def to_json(self, fail_if_slower: float | None) -> dict:
        data = {
            "shape": self.shape.label, "routing": self.routing, "device": self.device, "versions": self.versions,
            "reference": self.reference.label, "default_rule": self.default_rule, "ratio": RATIO_CONVENTION,
            "variants": [{"label": v.label, "folder": str(v.folder) if v.folder else None} for v in self.variants],
            "rows": [{"M": M, "results": {label: {
                "latency_us": cell.latency_us, "status": cell.status.value, "config": cell.config.to_dict(),
                "source": cell.source, "vs_reference": self.ratio(label, M), "message": cell.message}
                for label, cell in cells.items()}} for M, cells in self.rows.items()],
        }
        if fail_if_slower is not None:
            regressions = self.regressions(fail_if_slower)
            data["gate"] = {"fail_if_slower": fail_if_slower,
                            "max_time_ratio": round(max_time_ratio(fail_if_slower), 4),
                            "passed": not regressions, "regressions": regressions}
        return data


def variants_for(config_dirs: list[Path], reference: Path | None,
                 read: Callable[[Path], ConfigFiles] = read_config_folder) -> tuple[list[Variant], Variant]:
    """The heuristic, each folder once, and the reference folder if it is not among them; each
    folder's files read here, once (``read``: ``read_config_folder``, or a caller's reader that
    reads a folder once for several calls, ``FolderReader``). UsageError (one line) for a path that
    is not a folder or a file that cannot be read: a command calls this before Ray starts."""
    heuristic = Variant(HEURISTIC, None)
    folders: list[Path] = []
    for folder in [*config_dirs, *([reference] if reference else [])]:
        if not folder.is_dir():
            raise UsageError(f"{folder}: not a folder of config files")
        if folder.resolve() not in [f.resolve() for f in folders]:
            folders.append(folder)
    labels = _short_labels(folders)
    variants = [heuristic] + [Variant(label, folder, read(folder)) for label, folder in zip(labels, folders)]
    ref = heuristic if reference is None else next(v for v in variants if v.folder and
                                                   v.folder.resolve() == reference.resolve())
    return variants, ref


def _short_labels(folders: list[Path]) -> list[str]:
    """Folder names, or longer path tails where names repeat; never the heuristic's label."""
    for depth in range(1, 1 + max((len(f.resolve().parts) for f in folders), default=1)):
        labels = ["/".join(f.resolve().parts[-depth:]) for f in folders]
        if len(set(labels)) == len(labels) and HEURISTIC not in labels:
            return labels
    return [str(f.resolve()) for f in folders]


class FolderReader:
    """``read_config_folder`` that reads each folder once (by resolved path), for a command that
    makes variants many times over the same folders (a job's gate: one bench per check)."""

    def __init__(self) -> None:
        self._read: dict[Path, ConfigFiles] = {}

    def __call__(self, folder: Path) -> ConfigFiles:
        key = Path(folder).resolve()
        if key not in self._read:
            self._read[key] = read_config_folder(folder)
        return self._read[key]


def resolve_config(variant: Variant, shape: MoEShape, device: str, triton_version: str, M: int,
                   rule: str = VLLM) -> tuple[Config, str, bool]:
    """The config a server would use from this source at batch size M, where it came from, and
    whether it is the default rule's: vLLM's file for the shape, else SGLang's (this Triton
    version's folder first), else the ``rule`` default."""
    files = variant.files
    found = None if variant.is_heuristic or not files else server_file(files, shape, device, triton_version)
    if found is None:
        config, source = server_default(shape, M, rule)
        return config, source.label, True
    name, configs = found
    return lookup(configs, M), f"{variant.folder}/{name}", False


@contextmanager
def bench_pool(timeout_s: float = 300.0, kernel: str = BUILTIN) -> Iterator[WorkerPool]:
    """One BenchmarkWorker actor (``tuner.pool``) timing ``kernel`` inside an open ``ray_session``:
    a candidate that kills it is recorded as crashed and the pool brings the actor back for the next one."""
    pool = start_pool(1, kernel, timeout_s, lambda text: print(f"bench: {text}", file=sys.stderr))
    try:
        yield pool
    finally:
        pool.shutdown()


def bench_on(pool: WorkerPool, shape: MoEShape, variants: list[Variant], reference: Variant,
             batch_sizes: list[int], routing: str = "uniform", rounds: int = RETIME_ROUNDS,
             rule: str = VLLM) -> BenchResult:
    """Bench one shape on an existing pool (a job's gate benches many shapes on one worker);
    ``rule``: the default rule the ``default`` variant and folders without a file fall back to.
    The folders' files are the variants' (read once, by ``variants_for``)."""
    env = pool.slots[0].env
    device = env["device"]
    result = BenchResult(shape, routing, device, {k: v for k, v in env.items() if k != "device"}, variants, reference,
                         rule)
    for M in batch_sizes:
        cells = {v.label: Cell(*resolve_config(v, shape, device, env["triton"], M, rule)) for v in variants}
        _time_batch(pool, shape, routing, M, cells, rounds)
        result.rows[M] = cells
    return result


def run_bench(shapes: list[MoEShape], variants: list[Variant], reference: Variant, batch_sizes: list[int],
              routing: str = "uniform", rounds: int = RETIME_ROUNDS, address: str | None = None,
              interpret: bool = False, kernel: str = BUILTIN, rule: str = VLLM,
              connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> list[BenchResult]:
    """Bench each of ``shapes`` (e.g. one per dtype) in turn on one worker of one Ray session, on
    the folders' files the variants hold (``variants_for`` read them before Ray starts)."""
    with ray_session(address, interpret, workers=1, connect_timeout_s=connect_timeout_s), \
            bench_pool(kernel=kernel) as pool:
        return [bench_on(pool, shape, variants, reference, batch_sizes, routing, rounds, rule) for shape in shapes]


def _time_batch(pool: WorkerPool, shape: MoEShape, routing: str, M: int, cells: dict[str, Cell],
                rounds: int) -> None:
    """Check each distinct config once, then time the correct ones interleaved."""
    distinct = list(dict.fromkeys(cell.config for cell in cells.values()))
    outcome: dict[Config, tuple[Status, str]] = {}
    for config in distinct:
        candidate = Candidate(shape, M, config, routing=routing)
        event = pool.call(candidate, lambda actor, c=candidate: actor.measure.remote(c))
        if isinstance(event, Done):
            outcome[config] = (event.value.status, event.value.message)
        elif isinstance(event, Lost):
            outcome[config] = (event.cause, f"the worker process died on this config ({event.detail})")
        else:
            outcome[config] = (Status.CRASHED, f"worker call failed: {event.reason}")
    correct = [c for c in distinct if outcome[c][0] is Status.OK]
    latencies = {}
    if correct:
        finalists = [Candidate(shape, M, c, routing=routing) for c in correct]
        event = pool.call(finalists, lambda actor: actor.retime.remote(finalists, rounds))
        if not isinstance(event, Done):
            raise RunFailed(f"the GPU worker failed while re-timing at M={M}: {event.reason}")
        latencies = dict(zip(correct, event.value))
    for cell in cells.values():
        cell.status, cell.message = outcome[cell.config]
        cell.latency_us = latencies.get(cell.config)


def format_table(result: BenchResult, fail_if_slower: float | None) -> str:
    labels = [v.label for v in result.variants]
    v = result.versions
    lines = [f"bench {result.shape.label} routing={result.routing} on {result.device}",
             f"kernel: {describe_label(v)}; default: the {result.default_rule} rule",
             f"reference: {result.reference.label}" + (
                 f"; gate: fail where a folder's time ratio is above {max_time_ratio(fail_if_slower):.3f} "
                 f"(= 1/{fail_if_slower:g})" if fail_if_slower is not None else "")]
    header = [f"{'M':>6}"] + [f"{label + ' µs':>24}" for label in labels]
    lines.append("  ".join(header))
    fell_back = False
    for M, cells in result.rows.items():
        row = [f"{M:>6}"]
        for label in labels:
            cell = cells[label]
            mark = "*" if cell.fell_back and label != HEURISTIC else ""
            fell_back |= bool(mark)
            if cell.latency_us is None:
                text = cell.status.value + mark
            else:
                ratio = result.ratio(label, M)
                text = f"{cell.latency_us:.1f}{mark}" + (f" ({ratio:.2f}x)" if ratio is not None else "")
            row.append(f"{text:>24}")
        lines.append("  ".join(row))
    if fell_back:
        lines.append(f"* no file for this shape in that folder: the server would use its default ({result.default_rule} rule)")
    lines.append(f"(x) = {RATIO_CONVENTION}")
    for label in labels:
        sources = sorted({cells[label].source for cells in result.rows.values()})
        lines.append(f"{label}: {', '.join(sources)}")
    if fail_if_slower is not None:
        regressions = result.regressions(fail_if_slower)
        lines.append("gate: PASS" if not regressions else "gate: FAIL\n  " + "\n  ".join(regressions))
    return "\n".join(lines)
