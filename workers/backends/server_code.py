"""Where an inference server's Python code comes from, and importing just the part we run.

Two places, in this order:
- ``MOE_TUNE_SERVER_CODE`` (``--server-code DIR``): a folder holding extracted server packages
  (``DIR/vllm/…``, ``DIR/sglang/…``; e.g. the Python files of a vLLM wheel, unzipped). It is put
  first on ``sys.path`` in every process that imports a server module (the driver forwards the
  variable to its workers).
- otherwise the installed package.

A server's fused-MoE module sits under packages whose ``__init__`` imports most of the server
(vLLM's ``vllm.model_executor`` pulls its distributed runtime, ``…fused_moe/__init__`` every MoE
method). ``import_module`` first imports normally; if that fails it imports the module again with
the package the first attempt failed in registered bare (its folder on ``__path__``, its
``__init__`` not run; the top-level package too, e.g. SGLang's, which imports its frontend
language), the packages below it imported normally where they can be, so only what the fused-MoE
file itself imports is loaded. Modules the failed attempt did import stay loaded and are reused,
never imported twice (vLLM registers torch custom types and ops at import; a second import of
those modules fails). What still fails is reported
by name (``ImportError.name``) so the caller can say what to install. Extracted sources have no
package metadata; ``importlib.metadata`` is answered with the package's own ``__version__``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types
from pathlib import Path

SERVER_CODE_ENV = "MOE_TUNE_SERVER_CODE"


class ImportFailed(ImportError):
    """``module`` cannot be imported; ``missing`` is the top-level module that was not found (if any)."""

    def __init__(self, module: str, missing: str | None, detail: str) -> None:
        self.module, self.missing = module, missing
        what = f"needs the missing module {missing!r}" if missing else detail
        super().__init__(f"{module} {what} (code from {where()})")


def where() -> str:
    root = os.environ.get(SERVER_CODE_ENV)
    return f"{SERVER_CODE_ENV}={root}" if root else "the installed packages"


def use_server_code_dir() -> None:
    root = os.environ.get(SERVER_CODE_ENV)
    if root and root not in sys.path:
        if not Path(root).is_dir():
            raise ImportFailed("server code", None, f"{SERVER_CODE_ENV}={root} is not a folder")
        sys.path.insert(0, root)


VERSION_MODULES = ("version", "_version")
"""Submodules that state a package's ``__version__`` without its ``__init__`` (SGLang's ``version.py``,
setuptools-scm's ``_version.py``)."""


def _bare_top(name: str) -> types.ModuleType:
    """Register top-level package ``name`` without running its ``__init__`` (SGLang's imports its
    frontend language, which needs IPython and tqdm, neither used by the kernels); its
    ``__version__`` is read from a version submodule where it has one."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{name} is not a package", name=name)
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    package.__package__ = name
    package.__spec__ = spec  # where it lives; its loader is never run
    sys.modules[name] = package
    for submodule in VERSION_MODULES:
        try:
            found = getattr(importlib.import_module(f"{name}.{submodule}"), "__version__", None)
        except Exception:  # noqa: BLE001 - no such submodule, or one that fails: no version stated
            continue
        if found:
            package.__version__ = str(found)
            _finder.versions.setdefault(name, str(found))
            if _finder not in sys.meta_path:
                sys.meta_path.append(_finder)
            break
    return package


def _bare_parents(module: str) -> None:
    """After a failed import of ``module``: register the failed package among its parents without
    running its ``__init__`` (the one not in ``sys.modules``: the import stopped there). The parents
    below it were never tried: each is imported normally (other server modules import names from
    it, e.g. SGLang's from ``sglang.srt.layers.moe``), and registered bare where that fails too. A
    top-level package that failed is registered by ``_bare_top``."""
    parts = module.split(".")
    failed = parts[0] not in sys.modules
    top = _bare_top(parts[0]) if failed else sys.modules[parts[0]]
    path = Path(top.__path__[0])
    for depth in range(1, len(parts) - 1):
        name = ".".join(parts[:depth + 1])
        path = path / parts[depth]
        if name in sys.modules:
            continue
        if failed:
            try:
                importlib.import_module(name)
                continue
            except Exception:  # noqa: BLE001 - a package __init__ may fail in any way on a foreign host
                pass
        failed = True
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        package.__file__ = str(path / "__init__.py")
        package.__package__ = name
        sys.modules[name] = package
        setattr(sys.modules[".".join(parts[:depth])], parts[depth], package)


class _VersionOnly(importlib.metadata.Distribution):
    """The metadata of a package present as extracted files only: its name and version."""

    def __init__(self, name: str, version: str) -> None:
        self._text = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"

    def read_text(self, filename: str) -> str | None:
        return self._text if filename in ("METADATA", "PKG-INFO") else None

    def locate_file(self, path):  # noqa: ANN001 - importlib's signature
        return Path(path)


class _VersionOnlyFinder:
    """Answers ``importlib.metadata`` queries for extracted packages (see ``_provide_metadata``)."""

    def __init__(self) -> None:
        self.versions: dict[str, str] = {}

    def find_spec(self, *args, **kwargs) -> None:
        return None

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        name = context.name
        if name is None:
            return iter([_VersionOnly(n, v) for n, v in self.versions.items()])
        key = name.replace("-", "_").lower()
        return iter([_VersionOnly(n, v) for n, v in self.versions.items() if n.lower() == key])


_finder = _VersionOnlyFinder()


def _provide_metadata(top: str) -> None:
    """Extracted sources carry no ``*.dist-info``, yet servers ask ``importlib.metadata`` for their
    own version at import (vLLM's ``triton_utils`` disables Triton when that fails): answer with
    the version the package's own ``__version__`` states."""
    try:
        importlib.metadata.version(top)
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        found = getattr(importlib.import_module(top), "__version__", None)
    except Exception:  # noqa: BLE001 - the import below reports the failure
        return
    if found:
        _finder.versions[top] = str(found)
        if _finder not in sys.meta_path:
            sys.meta_path.append(_finder)


def import_module(module: str, *, bare_parents: bool = True) -> types.ModuleType:
    """Import ``module`` of a server package (see the module docstring); raises ImportFailed."""
    use_server_code_dir()
    top = module.split(".")[0]
    _provide_metadata(top)
    try:
        return importlib.import_module(module)
    except ImportError as first:
        error: ImportError = first
    except Exception as first:  # noqa: BLE001 - a package __init__ may fail in any way on a foreign host
        error = ImportError(f"{type(first).__name__}: {first}")
    if bare_parents and importlib.util.find_spec(top) is not None:
        try:
            _bare_parents(module)
            return importlib.import_module(module)
        except ImportError as second:
            error = second
        except Exception as second:  # noqa: BLE001
            error = ImportError(f"{type(second).__name__}: {second}")
    missing = getattr(error, "name", None)
    missing = missing.split(".")[0] if missing else None
    if missing == top and importlib.util.find_spec(top) is not None:
        missing = None  # the package is there; a module inside it is not
    first_line = (str(error).strip().splitlines() or [""])[0]
    raise ImportFailed(module, missing, first_line) from error


def version(package: str) -> str:
    """``package``'s version: its ``__version__`` (the code actually imported), else its metadata."""
    module = sys.modules.get(package)
    found = getattr(module, "__version__", None) if module else None
    if not found:
        try:
            found = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found = "unknown"
    return str(found)


def source_hash(*modules: types.ModuleType) -> str:
    """16 hex digits over the source files of ``modules`` (the code whose change changes a timing)."""
    digest = hashlib.sha256()
    for module in modules:
        path = getattr(module, "__file__", None)
        digest.update((module.__name__ + "\0").encode())
        if path and Path(path).is_file():
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]
