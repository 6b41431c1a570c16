"""Stand-in of SGLang's ``MoeRunnerConfig`` (recent releases)."""

from dataclasses import dataclass


@dataclass
class MoeRunnerConfig:
    inplace: bool = True
