"""Write tuned configs in the layouts vLLM and SGLang load unchanged, and read them back.

vLLM: ``<folder>/<vllm_file_name>`` (point ``VLLM_TUNED_CONFIG_FOLDER`` at the folder), holding
``{"triton_version": "X.Y.Z", "<M>": {six keys}, ...}``; vLLM's loader pops ``triton_version``
and turns the other keys into ints.
SGLang: ``<folder>/triton_<X_Y_Z>/<sglang_file_name>`` (``<folder>`` is the ``configs`` folder
under ``SGLANG_MOE_CONFIG_DIR``), holding only ``{"<M>": {six keys}, ...}``: SGLang's loader
int()s every key, so a ``triton_version`` key would break it; the folder carries the version.
moe-tune's builtin fp4 kernel (no server reads an mxfp4/nvfp4 fused-MoE file, ``tuner.dispatch``):
``<folder>/moe-tune-builtin/<builtin_file_name>`` in vLLM's file format, whatever the layout asked.

Every write is atomic (temp file in the same folder, fsync, ``os.replace``): a run killed at
any instant leaves the old file or the new one, never half of one. Files are created with mode
0666 minus the umask (0644 under the usual 022), so a server running as another user reads them.

Never destroying good data: a file that already exists is merged into. Its entries for batch
sizes not tuned now are kept when they were tuned for the same kernel (backend, entry
point, version and source hash) and Triton version, as the provenance file
``.moe-tune-files.json`` beside the files records for each file this tool wrote; otherwise
(another kernel, another Triton version, or a file this tool did not write) the write is refused
(``FileConflict``) unless ``replace`` is set. ``check_existing`` asks the same question before
any tuning starts. Entries for the batch sizes tuned now always take the new configs.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tuner import select as selection
from tuner.errors import OptionError, UsageError
from tuner.dispatch import SERVER_READ_DTYPES
from tuner.models import SERVERS
from tuner.naming import (BUILTIN_FOLDER, builtin_file_name, device_file_name, sglang_file_name,
                          sglang_version_folder, vllm_file_name)
from tuner.validation import parse_json
from workers.records import Config, Gemm, MoEShape

__all__ = [
    "device_file_name", "vllm_file_name", "sglang_file_name", "builtin_file_name", "write_vllm", "write_sglang",
    "read_config_folder", "lookup", "atomic_write_text", "OutputWriter", "FORMATS",
    "probe_writable", "check_existing", "FileConflict", "Written", "PROVENANCE_NAME", "vllm_path", "sglang_paths",
    "DEFAULT_OUT", "format_servers", "ServerFilesWriter",
]

TRITON_VERSION_KEY = "triton_version"
PROVENANCE_NAME = ".moe-tune-files.json"
DEFAULT_OUT = Path("moe-tune-out")
"""Where ``tune`` and ``compare`` write config files (and their journal) unless told otherwise:
a folder of its own in the working directory, never one holding committed results."""
KERNEL_IDENTITY_KEYS = ("kernel", "kernel_entry", "kernel_hash", "kernel_version")
"""The worker-environment keys (``BenchmarkWorker.describe``) that name the kernel a file was tuned for."""


class FileConflict(Exception):
    """An existing config file holds entries this write would lose and that were tuned for another
    kernel or Triton version (or by something else); ``replace`` overrides."""


@dataclass(frozen=True)
class Written:
    """One config file written: ``action`` is ``created``, ``updated`` (every batch size of the file
    that was there was tuned again), ``merged`` (``kept``: the batch sizes kept from it) or
    ``replaced`` (``--replace``: its other entries were dropped)."""

    path: Path
    action: str
    kept: tuple[int, ...] = ()


def _umask() -> int:
    """The process umask, read without changing it (Linux ``/proc``), else by a set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def probe_writable(folder: str | Path, option: str) -> None:
    """Create ``folder`` (and its parents) if needed, then create, write, fsync, rename and remove
    a probe file in it, as a real write would; an ``OptionError`` about ``option`` (the command's
    option naming the folder: ``out``, ``journal``) with one line when any step fails.
    Folders the probe created are removed again: it leaves nothing behind (the run creates them
    when it writes). Run before Ray starts, so an unwritable output is found in seconds, not
    after the tune."""
    path = Path(folder)
    tmp_name = None
    # Resolved: in ``out/../given`` with no ``out`` yet, ``given`` does not "exist" lexically, and an
    # empty folder the user made there would be removed as one the probe created.
    resolved = path.resolve()
    created = [p for p in (resolved, *resolved.parents) if not p.exists()]
    try:
        resolved.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".moe-tune-probe.", dir=resolved)
        with os.fdopen(fd, "wb") as handle:
            handle.write(b"probe\n")
            handle.flush()
            os.fsync(handle.fileno())
        renamed = tmp_name + ".renamed"
        os.replace(tmp_name, renamed)
        tmp_name = renamed
        os.unlink(renamed)
        tmp_name = None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OptionError(option, f"{path}: cannot write there ({reason})") from None
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        for made in created:  # deepest first
            try:
                made.rmdir()
            except OSError:
                pass


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers only ever see the old or the complete new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a server user must read the file
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


def _identity(kernel: dict[str, str] | None, triton_version: str) -> dict[str, str] | None:
    if kernel is None:
        return None
    return {**{k: kernel[k] for k in KERNEL_IDENTITY_KEYS if k in kernel}, "triton": triton_version}


def _read_text(path: Path) -> str:
    """The UTF-8 text of the regular file ``path``; OSError for anything else found under a config
    file's name (reading a FIFO would block the command forever; a folder cannot be read)."""
    if not path.is_file():
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return path.read_text(encoding="utf-8")


def _provenance_root(path: Path) -> Path:
    """The output folder a file belongs to (SGLang files sit one level down, in ``triton_*/``)."""
    return path.parent.parent if path.parent.name.startswith("triton_") else path.parent


def _read_provenance(root: Path) -> dict[str, dict]:
    try:
        data = parse_json(_read_text(root / PROVENANCE_NAME))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else {}


def _record_provenance(path: Path, identity: dict[str, str] | None) -> None:
    root = _provenance_root(path)
    files = _read_provenance(root)
    name = path.relative_to(root).as_posix()
    if identity is None:
        if files.pop(name, None) is None:
            return  # nothing recorded, nothing to forget
    else:
        files[name] = {**identity, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(root / PROVENANCE_NAME, json.dumps({"files": files}, indent=2, sort_keys=True) + "\n")


def _existing(path: Path) -> tuple[dict[str, dict], str | None] | None:
    """The entries (batch size → raw entry) and ``triton_version`` of the file at ``path``; None
    when there is no file; ``FileConflict`` when it is not a config file."""
    if not path.exists():
        return None
    try:
        raw = parse_json(_read_text(path))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        version = raw.pop(TRITON_VERSION_KEY, None)
        return {str(int(k)): v for k, v in raw.items()}, version
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FileConflict(f"{path} exists but is not a readable config file ({exc}); move it away or pass --replace") \
            from None


def _plan(path: Path, batch_sizes: set[int], identity: dict[str, str] | None, vllm_layout: bool,
          replace: bool) -> tuple[dict[str, dict], str]:
    """The existing entries to keep and the action (``Written.action``)."""
    found = _existing(path)
    if found is None:
        return {}, "created"
    entries, version = found
    others = {k: v for k, v in entries.items() if int(k) not in batch_sizes}
    if not others:
        return {}, "updated"
    if replace:
        return {}, "replaced"
    recorded = _read_provenance(_provenance_root(path)).get(path.relative_to(_provenance_root(path)).as_posix())
    reasons = []
    if identity is None or recorded is None:
        reasons.append("this tool has no record of the kernel it was tuned for")
    else:
        differing = [k for k in (*KERNEL_IDENTITY_KEYS, "triton") if recorded.get(k) != identity.get(k)]
        if differing:
            reasons.append("it was tuned for another " + "/".join(differing)
                           + f" ({', '.join(f'{k}={recorded.get(k)}' for k in differing)})")
    if vllm_layout and identity is not None and version != identity["triton"]:
        reasons.append(f"its triton_version is {version}, not {identity['triton']}")
    if reasons:
        kept = ",".join(sorted(others, key=int))
        raise FileConflict(f"{path} holds configs for batch sizes {kept} that this run does not re-tune, and "
                           f"{reasons[0]}; pass --replace to overwrite it, or choose another --out")
    return others, "merged"


def _merged(new: dict[int, Config], kept: dict[str, dict]) -> dict[str, dict]:
    entries = {**kept, **_entries(new)}
    return {k: entries[k] for k in sorted(entries, key=int)}


def vllm_path(folder: str | Path, shape: MoEShape, device_name: str) -> Path:
    """Where ``write_vllm`` puts the file of ``shape`` on ``device_name``: vLLM's file for a
    server-read dtype; for the fp4 dtypes moe-tune's builtin-kernel file, apart."""
    if shape.dtype not in SERVER_READ_DTYPES:
        return Path(folder) / builtin_file_name(shape, device_name)
    return Path(folder) / vllm_file_name(shape, device_name)


def _layouts(shape: MoEShape, layouts: tuple[str, ...]) -> tuple[str, ...]:
    """The layouts a shape's configs are written in: the builtin fp4 kernel's only in vLLM's format."""
    return layouts if shape.dtype in SERVER_READ_DTYPES else ("vllm",)


def sglang_paths(folder: str | Path, shape: MoEShape, device_name: str, triton_version: str) -> tuple[Path, Path]:
    """Where ``write_sglang`` puts SGLang's file of ``shape`` and its ``_down`` file."""
    target = Path(folder) / sglang_version_folder(triton_version)
    return target / sglang_file_name(shape, device_name), target / sglang_file_name(shape, device_name, down=True)


def check_existing(folder: str | Path, shape: MoEShape, device_name: str, batch_sizes: set[int],
                   kernel: dict[str, str], triton_version: str, formats: tuple[str, ...],
                   replace: bool = False) -> None:
    """``FileConflict`` when writing ``batch_sizes`` of ``shape`` in ``formats`` (``vllm``,
    ``sglang``) would be refused (see the module's rule); run before tuning starts."""
    identity = _identity(kernel, triton_version)
    if "vllm" in formats:
        _plan(vllm_path(folder, shape, device_name), batch_sizes, identity, True, replace)
    if "sglang" in formats:
        for path in sglang_paths(folder, shape, device_name, triton_version):
            _plan(path, batch_sizes, identity, False, replace)


def write_vllm(folder: str | Path, shape: MoEShape, device_name: str, configs: dict[int, Config],
               triton_version: str, kernel: dict[str, str] | None = None, replace: bool = False) -> Written:
    """Write (or merge into) one vLLM config file (for the fp4 dtypes: moe-tune's builtin-kernel file
    in ``moe-tune-builtin/``); batch sizes ascending after the ``triton_version`` key, as vLLM's own
    tuner writes them. ``kernel``: the worker environment
    the configs were tuned in (its ``KERNEL_IDENTITY_KEYS``); ``FileConflict`` as the module says."""
    path = vllm_path(folder, shape, device_name)
    identity = _identity(kernel, triton_version)
    kept, action = _plan(path, set(configs), identity, True, replace)
    atomic_write_text(path, _dump({TRITON_VERSION_KEY: triton_version, **_merged(configs, kept)}))
    _record_provenance(path, identity)
    return Written(path, action, tuple(sorted(int(k) for k in kept)))


def write_sglang(folder: str | Path, shape: MoEShape, device_name: str, up_configs: dict[int, Config],
                 down_configs: dict[int, Config] | None, triton_version: str, kernel: dict[str, str] | None = None,
                 replace: bool = False) -> list[Written]:
    """Write (or merge into) SGLang's file, plus the ``_down`` file when the down GEMM has its own
    configs or one exists already (batch sizes without a down config then get their up config there,
    which is what SGLang runs for the down GEMM without a ``_down`` file).

    SGLang aligns tokens once, with the up config's BLOCK_SIZE_M, and runs both GEMMs on that
    alignment, so a down config must match the up config's batch sizes and BLOCK_SIZE_M.
    """
    if down_configs is not None:
        if set(down_configs) != set(up_configs):
            raise ValueError("up and down configs must cover the same batch sizes")
        mismatched = sorted(M for M in up_configs
                            if up_configs[M].BLOCK_SIZE_M != down_configs[M].BLOCK_SIZE_M)
        if mismatched:
            raise ValueError(f"down configs must keep the up configs' BLOCK_SIZE_M (batch sizes {mismatched})")
    up_path, down_path = sglang_paths(folder, shape, device_name, triton_version)
    identity = _identity(kernel, triton_version)
    kept_up, up_action = _plan(up_path, set(up_configs), identity, False, replace)
    files = [(up_path, _merged(up_configs, kept_up), up_action, kept_up)]
    if down_configs is not None or down_path.exists():
        kept_down, down_action = _plan(down_path, set(up_configs), identity, False, replace)
        kept_down = {**{k: v for k, v in kept_up.items()}, **kept_down}  # a kept up entry without a down one runs up's
        files.append((down_path, _merged(down_configs or up_configs, kept_down), down_action, kept_down))
    written = []
    for path, entries, action, kept in files:
        atomic_write_text(path, _dump(entries))
        _record_provenance(path, identity)
        written.append(Written(path, action, tuple(sorted(int(k) for k in kept))))
    return written


def _read_config_file(path: Path) -> dict[int, Config]:
    try:
        raw = parse_json(_read_text(path))
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
    ``triton_X_Y_Z/<file name>``, moe-tune's builtin fp4 files by ``moe-tune-builtin/<file name>``.
    Files of other kernels (names with fields no Triton lookup uses, ``_names_triton_configs``) are
    skipped; extra keys in an entry (``num_ctas``, ``USE_TMA``, ROCm's ``waves_per_eu``) are ignored."""
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"{root}: not a folder")
    files = (sorted(root.glob("E=*.json")) + sorted(root.glob("triton_*/E=*.json"))
             + sorted(root.glob(f"{BUILTIN_FOLDER}/E=*.json")))
    return {p.relative_to(root).as_posix(): _read_config_file(p) for p in files if _names_triton_configs(p.name)}


TRITON_FILE_FIELDS = frozenset({"E", "N", "device_name", "dtype", "block_shape", "per_channel_quant"})
"""The fields of the file names the servers' fused-MoE Triton kernels look up (vLLM's
``get_config_file_name``; SGLang's adds ``per_channel_quant``)."""


def _names_triton_configs(file_name: str) -> bool:
    """Whether a file name is one the servers' fused-MoE Triton kernels look up: files that name
    other fields are another kernel's (vLLM 0.33 ships e.g. ``…,dtype=int4_w4a16,backend=flydsl.json``
    for AMD's FlyDSL kernel, with tile keys of its own) and are left alone."""
    stem = file_name.removesuffix(".json").removesuffix("_down")
    return set(re.findall(r"(?:^|,)([A-Za-z_]+)=", stem)) <= TRITON_FILE_FIELDS


def _version_key(folder_file: str) -> tuple[int, ...]:
    """``triton_3_10_0/E=...json`` → (3, 10, 0): SGLang's folders compare by version number."""
    folder = folder_file.split("/", 1)[0].removeprefix("triton_")
    return tuple(int(part) if part.isdigit() else -1 for part in folder.split("_"))


def server_file(files: dict[str, dict[int, Config]], shape: MoEShape, device_name: str,
                triton_version: str | None = None, server: str | None = None) -> tuple[str, dict[int, Config]] | None:
    """The file of ``files`` (``read_config_folder``'s result) a server would load for ``shape``
    on ``device_name``: vLLM's, else SGLang's in the running Triton version's folder, else SGLang's
    other version folders newest first by version number (``triton_3_10_0`` before
    ``triton_3_9_0``), as SGLang falls back; None when there is none (the server falls back to
    its heuristic). ``server`` ("vllm" or "sglang") keeps to that server's own lookup (vLLM's flat
    file only; SGLang's folders only). For the fp4 dtypes, whose files no server reads, moe-tune's
    builtin-kernel file."""
    if shape.dtype not in SERVER_READ_DTYPES:
        name = builtin_file_name(shape, device_name)
        return (name, files[name]) if files.get(name) else None
    sglang_name = sglang_file_name(shape, device_name)
    preferred = [vllm_file_name(shape, device_name)] if server != "sglang" else []
    if triton_version and server != "vllm":
        preferred.append(f"{sglang_version_folder(triton_version)}/{sglang_name}")
    others = (sorted((k for k in files if k.endswith("/" + sglang_name)), key=_version_key, reverse=True)
              if server != "vllm" else [])
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
OutputWriter = Callable[[str, dict[str, str], dict[selection.GroupKey, selection.Selection], SplitChoices],
                        list[Written]]
"""Writes the winners of one device group (device name, worker environment, whole-op selections,
split up/down choices); returns what it wrote. ``check(device, env, {shape: batch sizes})``, when
the writer has it, refuses (``FileConflict``) before tuning what writing would refuse after."""


FORMATS = ("vllm", "sglang", "both")


def format_servers(formats: str) -> tuple[str, ...]:
    """``--format`` → the servers whose files are planned and written."""
    if formats not in FORMATS:
        raise ValueError(f"unknown format {formats!r}; expected one of {FORMATS}")
    return SERVERS if formats == "both" else (formats,)


class ServerFilesWriter:
    """Writes a device group's winners in the layouts of the servers that run each shape
    (``servers_of``: "vllm" and/or "sglang", from the plan: a shape with SGLang's fused shared
    experts is SGLang's alone) under ``out``. vLLM applies one config to both GEMMs: its file
    holds the whole-op winner per M. SGLang's file holds the up GEMM's config and its ``_down``
    file the down GEMM's where the split search chose a pair (batch sizes without a pair keep the
    whole-op winner for both); the fp4 dtypes' winners, configs of moe-tune's own kernel that no
    server reads, go apart in vLLM's format only (``_layouts``), and only with ``builtin_fp4``
    (``compare`` tunes them for its report and writes them only when asked). Existing files are
    merged into, or refused, as the module says; ``replace`` overwrites them instead."""

    def __init__(self, out: Path, servers_of: Callable[[MoEShape], tuple[str, ...]], replace: bool = False,
                 builtin_fp4: bool = True) -> None:
        self.out, self.servers_of, self.replace, self.builtin_fp4 = Path(out), servers_of, replace, builtin_fp4

    def writes(self, shape: MoEShape) -> bool:
        """Whether ``shape``'s winners are written: every server-read dtype; the fp4 dtypes (moe-tune's
        own kernel) only with ``builtin_fp4``."""
        return self.builtin_fp4 or shape.dtype in SERVER_READ_DTYPES

    def check(self, device: str, env: dict[str, str], batch_sizes: dict[MoEShape, set[int]]) -> None:
        """``FileConflict`` now for what writing these batch sizes would refuse later."""
        for shape, sizes in batch_sizes.items():
            if not self.writes(shape):
                continue
            check_existing(self.out, shape, device, sizes, env, env["triton"], _layouts(shape, self.servers_of(shape)),
                           self.replace)

    def __call__(self, device: str, env: dict[str, str], chosen: dict[selection.GroupKey, selection.Selection],
                 split: SplitChoices) -> list[Written]:
        written: list[Written] = []
        for (shape, routing, gemm), per_m in selection.by_shape(chosen).items():
            if gemm is not Gemm.BOTH or not self.writes(shape):
                continue
            configs = {M: s.candidate.config for M, s in per_m.items()}
            layouts = _layouts(shape, self.servers_of(shape))
            if "vllm" in layouts:
                written.append(write_vllm(self.out, shape, device, configs, env["triton"], env, self.replace))
            if "sglang" in layouts:
                pairs = split.get((shape, routing), {})
                up = {M: pairs[M].up if M in pairs else c for M, c in configs.items()}
                down = {M: pairs[M].down if M in pairs else c for M, c in configs.items()} if pairs else None
                written += write_sglang(self.out, shape, device, up, down, env["triton"], env, self.replace)
        return written


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


def partial_file_warnings(paths: list[Path], expected: tuple[int, ...]) -> list[str]:
    """One-line warnings for the config files at ``paths`` that lack some of the ``expected`` batch
    sizes (the servers' tuning grid), one line per set of batch sizes held (files tuned together
    share a line): which batch sizes they hold, how many of the grid's they lack, and which of
    their configs the servers' nearest-key lookup (``lookup``) then runs for every batch size
    (``key_coverage``). Empty when every file is complete."""
    groups: dict[tuple[int, ...], list[Path]] = {}
    for path in paths:
        keys = tuple(sorted(_read_config_file(path)))
        if set(expected) - set(keys):
            groups.setdefault(keys, []).append(path)
    return [_partial_line(group, keys, expected) for keys, group in groups.items()]


def _partial_line(paths: list[Path], keys: tuple[int, ...], expected: tuple[int, ...]) -> str:
    missing = sorted(set(expected) - set(keys))
    spans = ", ".join(f"M {first}-{last} runs the M={key} config" if last is not None and last != first else
                      f"M {first} runs the M={key} config" if last is not None else
                      f"M {first} and above run the M={key} config"
                      for key, first, last in key_coverage(keys))
    names = ", ".join(f"{path.parent.name}/{path.name}" if path.parent.name.startswith("triton_") or
                      path.parent.name == BUILTIN_FOLDER else path.name for path in paths)
    one = len(paths) == 1
    shown = ", ".join(map(str, missing[:4])) + (f", ... {missing[-1]}" if len(missing) > 4 else "")
    return (f"{names} {'is' if one else 'are'} partial: {'it has' if one else 'they have'} configs for "
            f"M={','.join(map(str, keys))} only, none for {len(missing)} of the {len(expected)} batch sizes servers "
            f"are tuned for ({shown}); the servers take the nearest batch size's config instead ({spans}). Tune "
            "without --batch-sizes for a complete file")
