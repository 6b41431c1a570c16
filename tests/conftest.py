"""Suite-wide setup: the Triton interpreter, and one seed for every random test input.

TRITON_INTERPRET is read when Triton's language module is first imported, so it is set here,
before any test module imports the kernels.

Seeds: every random input comes from the ``seed`` fixture (or ``rng`` / ``generator`` built on
it), never from ``os.urandom`` or an unseeded generator, so a failing run repeats exactly. The
base seed is ``MOE_TUNE_TEST_SEED`` (an integer, default 0); each test's own seed is a hash of the
base seed and the test's id, so adding or reordering tests changes no other test's inputs. The
base seed is printed in the session header and, with the test's seed, under every failure:
``MOE_TUNE_TEST_SEED=<n> python -m pytest <test id>`` reruns it on the same inputs. Python's
``random`` and torch's global generator are seeded from the test's seed as well, for code that
draws from them without a generator of its own.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
from pathlib import Path

import pytest

os.environ["TRITON_INTERPRET"] = "1"

SEED_VARIABLE = "MOE_TUNE_TEST_SEED"
STAND_IN_SERVERS = Path(__file__).parent / "stand_in_servers"
"""One folder per call form of vLLM's and SGLang's code (tests/stand_in_servers/README.md)."""


def _base_seed() -> int:
    text = os.environ.get(SEED_VARIABLE, "0")
    try:
        return int(text)
    except ValueError:
        raise pytest.UsageError(f"{SEED_VARIABLE} must be an integer, got {text!r}") from None


BASE_SEED = _base_seed()


def test_seed(nodeid: str) -> int:
    """The seed (31 bits: ``seed + 1`` is still a valid torch seed) of the test ``nodeid``
    under the base seed."""
    digest = hashlib.sha256(f"{BASE_SEED}\0{nodeid}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


test_seed.__test__ = False  # a helper, not a test


def pytest_report_header(config: pytest.Config) -> str:
    return f"{SEED_VARIABLE}={BASE_SEED}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed:
        report.sections.append(("seed", f"{SEED_VARIABLE}={BASE_SEED} (this test's seed {test_seed(item.nodeid)}): "
                                        f"set it to rerun on the same inputs"))
    return report


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """This test's seed (see the module docstring)."""
    return test_seed(request.node.nodeid)


@pytest.fixture(autouse=True)
def _seed_global_generators(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture
def rng(seed: int) -> random.Random:
    return random.Random(seed)


@pytest.fixture
def generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


@pytest.fixture
def moe_tune(capsys):
    """Run ``moe-tune`` in-process: ``moe_tune(*argv)`` returns (exit code, stdout, stderr)."""
    from tuner import cli

    def run(*argv: str):
        rc = cli.main(list(argv))
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    return run


@pytest.fixture
def servers(monkeypatch):
    """``servers(*forms)``: exactly these stand-ins (``tests/stand_in_servers/<form>``) importable in
    this process; every other server missing. Undone, stand-ins and their versions forgotten, at the end."""
    from workers import backends
    from workers.backends import server_code

    def use(*forms: str) -> None:
        for name in [n for n in sys.modules if n.split(".")[0] in ("vllm", "sglang", "sgl_kernel")]:
            monkeypatch.delitem(sys.modules, name)
        backends._loaded.clear()
        server_code._finder.versions.clear()  # a server loaded before must not answer importlib.metadata
        monkeypatch.syspath_prepend(str(STAND_IN_SERVERS))
        for form in forms:
            monkeypatch.syspath_prepend(str(STAND_IN_SERVERS / form))
        present = {form.split("_")[0] for form in forms}
        for server in {"vllm", "sglang"} - present:
            monkeypatch.setitem(sys.modules, server, None)

    monkeypatch.delenv("MOE_TUNE_SERVER_CODE", raising=False)
    yield use
    monkeypatch.undo()  # sys.path and the modules set aside come back first
    for name in [n for n in sys.modules if n.split(".")[0] in ("vllm", "sglang", "sgl_kernel", "stand_in_moe_math")]:
        del sys.modules[name]  # stand-ins imported here must not serve later tests
    backends._loaded.clear()
    server_code._finder.versions.clear()  # nor their version, answered to importlib.metadata
