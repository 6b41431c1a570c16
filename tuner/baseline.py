"""The configs a server runs today, which a tune has to beat (``--baseline DIR``).

A platform team ships new configs only if they are at least as fast as what the server already
uses: vLLM's shipped JSONs, last night's output, or no file at all. Per batch size, the config a
server would take from each baseline folder (the file for the shape and GPU, vLLM's nearest-M
lookup) and the server's default config (the default rule of the server version in use, per
server: ``rules``, see ``workers.default_config``: what it runs with no file) join the search as candidates that are
always fully timed and always among the finalists re-timed back to back (``tuner.select``). So
the file written is never slower than the baseline beyond that re-timing's noise, and the run
summary states the ratio at every batch size, at no extra GPU time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tuner.errors import OptionError, about
from tuner.writers import lookup, read_config_folder, server_file
from workers.default_config import VLLM, server_default
from workers.records import Config, MoEShape


@dataclass(frozen=True)
class Baseline:
    """The config files of the baseline folders, read once before any GPU work."""

    folders: tuple[Path, ...]
    files: tuple[dict[str, dict[int, Config]], ...]
    rules: Mapping[str, str] = field(default_factory=lambda: {"vllm": VLLM})
    """Per server (``vllm``, ``sglang``) the default rule it runs where a file is missing
    (``tuner.kernel_choice.default_rule``)."""

    @classmethod
    def load(cls, folders: list[Path], rules: Mapping[str, str] | None = None) -> "Baseline":
        files = []
        for index, folder in enumerate(folders):
            with about("baseline", index):
                found = read_config_folder(folder)  # UsageError for a missing folder or a bad file
            if not found:
                raise OptionError("baseline", f"{folder}: no MoE config files (E=*.json) in it", index=index)
            files.append(found)
        return cls(tuple(folders), tuple(files), dict(rules or {"vllm": VLLM}))

    def configs_for(self, shape: MoEShape, device_name: str, batch_sizes: list[int],
                    triton_version: str | None = None,
                    servers: tuple[str, ...] | None = None) -> dict[int, tuple[Config, ...]]:
        """Per batch size, the distinct configs the baseline folders give a server for ``shape``
        on ``device_name``, and the default config of each of ``servers`` (the servers that read
        the file written for ``shape``; default: every server in ``rules``) by its rule; empty when
        no folder was given. SGLang folders are searched from the ``triton_version`` folder on
        (``tuner.writers.server_file``)."""
        rules = [rule for server, rule in self.rules.items() if servers is None or server in servers]
        out: dict[int, tuple[Config, ...]] = {}
        for M in batch_sizes:
            configs = []
            for files in self.files:
                found = server_file(files, shape, device_name, triton_version)
                if found:
                    configs.append(lookup(found[1], M))
            if self.files:  # what the servers run once the file is gone (or where none was shipped)
                configs += [server_default(shape, M, rule)[0] for rule in rules]
            if configs:
                out[M] = tuple(dict.fromkeys(configs))
        return out
