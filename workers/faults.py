"""Test-only fault injection for the BenchmarkWorker.

The fault-isolation tests must show that a candidate which raises, kills its process or hangs
cannot spoil a run, and that the files written equal a clean run's. Wall-clock timing under the
interpreter is noise, so this hook can also replace a measured latency by a deterministic function
of the candidate; the kernel still runs and is still checked against the reference.

Active only when the environment variable ``MOE_TUNE_FAULTS`` names a JSON file (the driver
forwards the variable to its workers); production runs never set it. The file::

    {"deterministic_latency": true,
     "faults": [{"config": "<Config.label>", "M": 4, "action": "raise" | "kill" | "hang"}]}

``M`` is optional (absent: every batch size).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

from workers.records import Candidate

ENV_VAR = "MOE_TUNE_FAULTS"
ACTIONS = ("raise", "kill", "hang")
KILL_EXIT_CODE = 86


class InjectedFault(RuntimeError):
    """The exception a ``raise`` fault throws where the kernel would run."""


@dataclass(frozen=True)
class FaultPlan:
    deterministic_latency: bool = False
    actions: dict[tuple[str, int | None], str] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str) -> "FaultPlan":
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        actions: dict[tuple[str, int | None], str] = {}
        for entry in data.get("faults", []):
            if entry["action"] not in ACTIONS:
                raise ValueError(f"unknown fault action {entry['action']!r}; expected one of {ACTIONS}")
            m = entry.get("M")
            actions[(entry["config"], None if m is None else int(m))] = entry["action"]
        return cls(deterministic_latency=bool(data.get("deterministic_latency", False)), actions=actions)

    def action_for(self, candidate: Candidate) -> str | None:
        label = candidate.config.label
        return self.actions.get((label, candidate.M)) or self.actions.get((label, None))

    def inject(self, candidate: Candidate) -> None:
        """Misbehave as planned for this candidate; return normally when no fault is planned."""
        action = self.action_for(candidate)
        if action == "raise":
            raise InjectedFault(f"injected fault for {candidate.config.label} at M={candidate.M}")
        if action == "kill":
            print(f"moe-tune fault injection: killing worker on {candidate.config.label}", file=sys.stderr,
                  flush=True)
            os._exit(KILL_EXIT_CODE)
        if action == "hang":
            while True:
                time.sleep(3600)

    def latency_us(self, candidate: Candidate) -> float | None:
        """A fixed latency in [100, 200) µs derived from the candidate, or None to keep the measured one."""
        if not self.deterministic_latency:
            return None
        text = f"{candidate.config.label}|{candidate.M}|{candidate.gemm.value}|{candidate.shape.label}"
        digest = int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)
        return 100.0 + (digest % 1_000_000) / 10_000.0


@functools.cache
def active_plan() -> FaultPlan | None:
    """The plan named by ``MOE_TUNE_FAULTS`` (read once per process), or None."""
    path = os.environ.get(ENV_VAR)
    return FaultPlan.from_file(path) if path else None
