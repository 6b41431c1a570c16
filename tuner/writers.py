"""Write tuned configs in the layouts vLLM and SGLang load unchanged, and read them back.

vLLM: ``<folder>/<vllm_file_name>`` (point ``VLLM_TUNED_CONFIG_FOLDER`` at the folder), holding
``{"triton_version": "X.Y.Z", "<M>": {six keys}, ...}``; vLLM's loader pops ``triton_version``
and turns the other keys into ints.
SGLang: ``<folder>/triton_<X_Y_Z>/<sglang_file_name>`` (``<folder>`` is the ``configs`` folder
under ``SGLANG_MOE_CONFIG_DIR``), holding only ``{"<M>": {six keys}, ...}``: SGLang's loader
int()s every key, so a ``triton_version`` key would break it; the folder carries the version.

Every write is atomic (temp file in the same folder, fsync, ``os.replace``): a run killed at
any instant leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from tuner import select as selection
from tuner.errors import UsageError
from tuner.models import SERVERS
from tuner.naming import device_file_name, sglang_file_name, sglang_version_folder, vllm_file_name
from workers.records import Config, Gemm, MoEShape

__all__ = [
    "device_file_name", "vllm_file_name", "sglang_file_name", "write_vllm", "write_sglang",
    "read_config_folder", "lookup", "atomic_write_text", "server_files_writer", "OutputWriter", "FORMATS", "format_servers",
]

TRITON_VERSION_KEY = "triton_version"


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers only ever see the old or the complete new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _entries(configs: dict[int, Config]) -> dict[str, dict[str, int]]:
    if not configs:
        raise ValueError("no configs to write")
    return {str(M): configs[M].to_dict() for M in sorted(configs)}


def _dump(data: dict) -> str:
    return json.dumps(data, indent=4) + "\n"


def write_vllm(folder: str | Path, shape: MoEShape, device_name: str, configs: dict[int, Config],
               triton_version: str) -> Path:
    """Write one vLLM config file; batch sizes ascending after the ``triton_version`` key,
    as vLLM's own tuner writes them."""
    path = Path(folder) / vllm_file_name(shape, device_name)
    atomic_write_text(path, _dump({TRITON_VERSION_KEY: triton_version, **_entries(configs)}))
    return path


def write_sglang(folder: str | Path, shape: MoEShape, device_name: str, up_configs: dict[int, Config],
                 down_configs: dict[int, Config] | None, triton_version: str) -> list[Path]:
    """Write SGLang's file, plus the ``_down`` file when the down GEMM has its own configs.

    SGLang aligns tokens once, with the up config's BLOCK_SIZE_M, and runs both GEMMs on that
    alignment, so a down config must match the up config's batch sizes and BLOCK_SIZE_M.
    """
    target = Path(folder) / sglang_version_folder(triton_version)
    files = [(sglang_file_name(shape, device_name), up_configs)]
    if down_configs is not None:
        if set(down_configs) != set(up_configs):
            raise ValueError("up and down configs must cover the same batch sizes")
        mismatched = sorted(M for M in up_configs
                            if up_configs[M].BLOCK_SIZE_M != down_configs[M].BLOCK_SIZE_M)
        if mismatched:
            raise ValueError(f"down configs must keep the up configs' BLOCK_SIZE_M (batch sizes {mismatched})")
        files.append((sglang_file_name(shape, device_name, down=True), down_configs))
    paths = []
    for name, configs in files:
        path = target / name
        atomic_write_text(path, _dump(_entries(configs)))
        paths.append(path)
    return paths


def _read_config_file(path: Path) -> dict[int, Config]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read config file ({exc})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a config file maps batch sizes to configs")
    raw.pop(TRITON_VERSION_KEY, None)
    configs = {}
    for key, entry in raw.items():
        try:
            configs[int(key)] = Config.from_dict(entry)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{path}: entry {key!r}: {exc}") from None
    return configs


def read_config_folder(path: str | Path) -> dict[str, dict[int, Config]]:
    """Every MoE config file under ``path``: vLLM's flat layout (e.g. the JSONs shipped inside
    the vllm package) keyed by file name, SGLang's ``triton_*/`` folders keyed by
    ``triton_X_Y_Z/<file name>``. Extra keys in an entry (``num_ctas``, ``USE_TMA``, ROCm's
    ``waves_per_eu``) are ignored."""
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"{root}: not a folder")
    files = sorted(root.glob("E=*.json")) + sorted(root.glob("triton_*/E=*.json"))
    return {p.relative_to(root).as_posix(): _read_config_file(p) for p in files}


def _version_key(folder_file: str) -> tuple[int, ...]:
    """``triton_3_10_0/E=...json`` → (3, 10, 0): SGLang's folders compare by version number."""
    folder = folder_file.split("/", 1)[0].removeprefix("triton_")
    return tuple(int(part) if part.isdigit() else -1 for part in folder.split("_"))


def server_file(files: dict[str, dict[int, Config]], shape: MoEShape, device_name: str,
                triton_version: str | None = None) -> tuple[str, dict[int, Config]] | None:
    """The file of ``files`` (``read_config_folder``'s result) a server would load for ``shape``
    on ``device_name``: vLLM's, else SGLang's in the running Triton version's folder, else SGLang's
    other version folders newest first by version number (``triton_3_10_0`` before
    ``triton_3_9_0``), as SGLang falls back; None when there is none (the server falls back to
    its heuristic)."""
    sglang_name = sglang_file_name(shape, device_name)
    preferred = [vllm_file_name(shape, device_name)]
    if triton_version:
        preferred.append(f"{sglang_version_folder(triton_version)}/{sglang_name}")
    others = sorted((k for k in files if k.endswith("/" + sglang_name)), key=_version_key, reverse=True)
    for name in [*preferred, *others]:
        if files.get(name):
            return name, files[name]
    return None


def lookup(configs: dict[int, Config], M: int) -> Config:
    """The config a server uses at batch size M: the key with the smallest |key - M|, ties
    going to the key met first, exactly as vLLM and SGLang pick (files list keys ascending,
    so the smaller one)."""
    if not configs:
        raise ValueError("no configs to look up")
    return configs[min(configs, key=lambda key: abs(key - M))]


SplitChoices = dict[tuple[MoEShape, str], dict[int, selection.SplitChoice]]
OutputWriter = Callable[[str, dict[str, str], dict[selection.GroupKey, selection.Selection], SplitChoices], list[Path]]
"""Writes the winners of one device group (device name, worker environment, whole-op selections,
split up/down choices); returns the paths."""


FORMATS = ("vllm", "sglang", "both")


def format_servers(formats: str) -> tuple[str, ...]:
    """``--format`` → the servers whose files are planned and written."""
    if formats not in FORMATS:
        raise ValueError(f"unknown format {formats!r}; expected one of {FORMATS}")
    return SERVERS if formats == "both" else (formats,)


def server_files_writer(out: Path, servers_of: Callable[[MoEShape], tuple[str, ...]]) -> OutputWriter:
    """Writes a device group's winners in the layouts of the servers that run each shape
    (``servers_of``: "vllm" and/or "sglang", from the plan: a shape with SGLang's fused shared
    experts is SGLang's alone) under ``out``. vLLM applies one config to both GEMMs: its file
    holds the whole-op winner per M. SGLang's file holds the up GEMM's config and its ``_down``
    file the down GEMM's where the split search chose a pair (batch sizes without a pair keep the
    whole-op winner for both)."""

    def write(device: str, env: dict[str, str], chosen: dict[selection.GroupKey, selection.Selection],
              split: SplitChoices) -> list[Path]:
        paths: list[Path] = []
        for (shape, routing, gemm), per_m in selection.by_shape(chosen).items():
            if gemm is not Gemm.BOTH:
                continue
            configs = {M: s.candidate.config for M, s in per_m.items()}
            servers = servers_of(shape)
            if "vllm" in servers:
                paths.append(write_vllm(out, shape, device, configs, env["triton"]))
            if "sglang" in servers:
                pairs = split.get((shape, routing), {})
                up = {M: pairs[M].up if M in pairs else c for M, c in configs.items()}
                down = {M: pairs[M].down if M in pairs else c for M, c in configs.items()} if pairs else None
                paths += write_sglang(out, shape, device, up, down, env["triton"])
        return paths
    return write


def key_coverage(keys: list[int] | set[int]) -> list[tuple[int, int, int | None]]:
    """Which batch sizes each key of a config file serves under the servers' nearest-key lookup
    (``lookup``): ``(key, first M, last M)`` ascending, the last key's range open (None)."""
    ordered = sorted(set(keys))
    if not ordered:
        raise ValueError("no keys")
    spans = []
    for i, key in enumerate(ordered):
        first = 1 if i == 0 else (ordered[i - 1] + key) // 2 + 1  # a tie goes to the smaller key
        last = (key + ordered[i + 1]) // 2 if i + 1 < len(ordered) else None
        spans.append((key, first, last))
    return spans


def partial_file_warning(path: Path, expected: tuple[int, ...]) -> str | None:
    """A one-line warning when the config file at ``path`` lacks some of the ``expected`` batch
    sizes (the servers' tuning grid): the server then uses the nearest key for them, and the line
    says which key serves which range. None for a complete file."""
    configs = _read_config_file(path)
    missing = sorted(set(expected) - set(configs))
    if not missing:
        return None
    spans = ", ".join(f"{key}: M {first}-{last if last is not None else 'up'}"
                      for key, first, last in key_coverage(configs))
    name = f"{path.parent.name}/{path.name}" if path.parent.name.startswith("triton_") else path.name
    return (f"{name} holds {len(configs)} batch size(s), not {', '.join(map(str, missing[:6]))}"
            f"{'...' if len(missing) > 6 else ''}: the server uses the nearest key for every other batch size "
            f"({spans})")
