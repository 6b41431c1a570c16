"""What one tune is asked to do, as one typed record: ``moe-tune tune`` builds it from its flags
and ``moe-tune job run`` from the job spec, and ``tuner.commands.tune`` validates and runs it.

Field names are the tune flags' (``--budget-minutes`` → ``budget_minutes``), and the defaults
here are the flags' defaults (``tuner.commands.tune.configure`` reads them from this record).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.writers import DEFAULT_OUT
from workers.records import DType


@dataclass(frozen=True)
class TuneOptions:
    model: list[str]
    """Preset names, config.json files, model folders or cached HF repo ids."""
    tp: int = 1
    ep: int = 1
    dtype: list[DType] | None = None
    """None: each model's own dtype."""
    block_shape: tuple[int, int] | None = None
    batch_sizes: list[int] | None = None
    """None: ``tuner.plan.DEFAULT_BATCH_SIZES``."""
    search_space: str = "default"
    routing: str = "uniform"
    strategy: str = "fast"
    budget_minutes: float | None = None
    baseline: list[Path] = field(default_factory=list)
    split_gemms: bool = False
    builtin_fp4: bool = False
    """Also tune moe-tune's own fp4 kernel (files no server reads, written apart)."""
    no_compile_ahead: bool = False
    compile_timeout: float = 180.0
    """Seconds."""
    kernel: str = "auto"
    """A ``workers.backends`` name, or auto: the kernel of the server each format is for
    (``tuner.kernel_choice``)."""
    server_code: Path | None = None
    """Folder with a server's extracted Python packages (``MOE_TUNE_SERVER_CODE``)."""
    server_version: str | None = None
    """Whose default config ``baseline`` falls back to (``workers.default_config.rule_for_version``)."""
    address: str | None = None
    connect_timeout: float = 60.0
    """Seconds to join ``address`` (``tuner.ray_session.DEFAULT_CONNECT_TIMEOUT_S``)."""
    workers: int | None = None
    out: str = str(DEFAULT_OUT)
    format: str = "vllm"
    replace: bool = False
    """Overwrite existing config files instead of merging into them (``tuner.writers``)."""
    disable_shared_experts_fusion: bool = False
    """SGLang layout: the server runs with SGLang's flag of that name (shared experts stay out of E)."""
    journal: str | None = None
    fresh: bool = False
    yes: bool = False
    """Confirms ``fresh`` where nothing can ask (``tuner.commands.arguments.confirm_fresh``)."""
    interpret: bool = False
    timeout: float = 300.0
    """Seconds per candidate."""
    finalists: int = 3
    json: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TuneOptions":
        """From ``moe-tune tune``'s parsed flags (``--dtype`` values become ``DType``)."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        if values["dtype"] is not None:
            values["dtype"] = [DType(d) for d in values["dtype"]]
        return cls(**values)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default, by name (the ones without: absent)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out
