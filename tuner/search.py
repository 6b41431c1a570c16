"""Search strategies: a strategy decides what to measure, the engine (``tuner.driver``) measures it.

The split follows Kernel Tuner's strategies/runners: a strategy never compiles, times, retries
or journals anything. The engine asks ``propose()`` for work whenever its queue runs dry, feeds
every outcome (fresh or from the journal) to ``observe()``, and ends when the queue is empty,
nothing is in flight and ``propose()`` returns nothing. An adaptive strategy (screening,
successive halving, neighbour seeding) therefore proposes in rounds and decides the next round
from what it observed; the exhaustive reference proposes everything at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from workers.records import Candidate, Config, Gemm, Measurement, MoEShape


@dataclass(frozen=True)
class SearchJob:
    """One kernel shape to tune: the pruned configs to consider at each batch size."""

    shape: MoEShape
    configs_by_m: dict[int, tuple[Config, ...]]
    routing: str = "uniform"

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(self.configs_by_m)


class Strategy(ABC):
    """Proposes candidates and learns from their measurements."""

    def __init__(self, jobs: Sequence[SearchJob]) -> None:
        self.jobs = list(jobs)

    @abstractmethod
    def propose(self) -> list[Candidate]:
        """The next candidates to measure; an empty list when the strategy has nothing more to ask."""

    @abstractmethod
    def observe(self, measurement: Measurement) -> None:
        """One outcome of a proposed candidate (any status)."""

    def total_hint(self) -> int | None:
        """How many candidates the whole search will measure, when known up front (for progress/ETA)."""
        return None


class Exhaustive(Strategy):
    """Every pruned config at every batch size: the reference the faster strategies are judged by."""

    def __init__(self, jobs: Sequence[SearchJob]) -> None:
        super().__init__(jobs)
        self._proposed = False

    def _all(self) -> list[Candidate]:
        return [Candidate(shape=job.shape, M=m, config=config, gemm=Gemm.BOTH, routing=job.routing)
                for job in self.jobs for m in job.batch_sizes for config in job.configs_by_m[m]]

    def propose(self) -> list[Candidate]:
        if self._proposed:
            return []
        self._proposed = True
        return self._all()

    def observe(self, measurement: Measurement) -> None:
        """Exhaustive search does not adapt."""

    def total_hint(self) -> int:
        return sum(len(configs) for job in self.jobs for configs in job.configs_by_m.values())


STRATEGIES: dict[str, type[Strategy]] = {"exhaustive": Exhaustive}
