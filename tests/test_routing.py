"""Routing specs: distinct experts per token, the intended load distribution, captured files."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from workers.records import DType, MoEShape
from workers.routing import RoutingFileChanged, check_file, make_routing, parse_routing, pin_file

def seeded(seed: int, offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed + offset)


def _check_valid(weights: torch.Tensor, ids: torch.Tensor, M: int, E: int, topk: int) -> None:
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (M, topk)
    assert ids.min() >= 0 and ids.max() < E
    ordered = ids.sort(dim=1).values
    assert not (ordered[:, 1:] == ordered[:, :-1]).any(), "an expert repeats within a token"
    assert (weights > 0).all()
    assert torch.allclose(weights.sum(dim=1), torch.ones(M))


@pytest.mark.parametrize("spec", ["uniform", "zipf:1.2"])
@pytest.mark.parametrize("M,E,topk", [(1, 4, 4), (37, 8, 2), (300, 16, 6)])
def test_synthetic_routing_is_valid_and_repeatable(seed: int, spec: str, M: int, E: int, topk: int) -> None:
    weights, ids = make_routing(spec, M, E, topk, seeded(seed), "cpu")
    _check_valid(weights, ids, M, E, topk)
    again = make_routing(spec, M, E, topk, seeded(seed), "cpu")
    assert torch.equal(weights, again[0]) and torch.equal(ids, again[1])
    if M * topk > E:
        other = make_routing(spec, M, E, topk, seeded(seed, 1), "cpu")
        assert not torch.equal(ids, other[1])


def test_uniform_load_is_flat(seed: int) -> None:
    M, E, topk = 4000, 8, 2
    _, ids = make_routing("uniform", M, E, topk, seeded(seed), "cpu")
    counts = torch.bincount(ids.flatten().long(), minlength=E).float()
    expected = M * topk / E  # 1000, std ~ 29
    assert ((counts - expected).abs() < 150).all(), f"{counts.tolist()}"


def test_zipf_load_follows_the_power_law(seed: int) -> None:
    M, E, alpha = 20000, 8, 1.5
    _, ids = make_routing(f"zipf:{alpha}", M, E, 1, seeded(seed), "cpu")
    freq = torch.bincount(ids.flatten().long(), minlength=E).float() / M
    popularity = torch.arange(1, E + 1, dtype=torch.float32) ** -alpha
    expected = popularity / popularity.sum()
    assert torch.allclose(freq, expected, atol=0.015), f"{freq.tolist()} vs {expected.tolist()}"
    _, ids4 = make_routing(f"zipf:{alpha}", 2000, E, 4, seeded(seed), "cpu")
    counts = torch.bincount(ids4.flatten().long(), minlength=E)
    assert counts[0] > 1800 and counts[0] > 3 * counts[E - 1]  # the hottest expert is nearly always chosen


def test_zipf_zero_is_uniform(seed: int) -> None:
    assert all(torch.equal(a, b) for a, b in zip(make_routing("zipf:0", 50, 8, 3, seeded(seed), "cpu"),
                                                   make_routing("uniform", 50, 8, 3, seeded(seed), "cpu")))


@pytest.mark.parametrize("suffix", [".pt", ".npy"])
def test_file_routing_replays_captured_rows(seed: int, tmp_path, suffix: str) -> None:
    rows, E, topk = 10, 6, 2
    captured = torch.stack([torch.randperm(E, generator=seeded(seed, r))[:topk] for r in range(rows)])
    path = tmp_path / f"ids{suffix}"
    if suffix == ".pt":
        torch.save(captured.to(torch.int32), path)
    else:
        np.save(path, captured.numpy().astype(np.int64))
    weights, ids = make_routing(f"file:{path}", 25, E, topk, seeded(seed), "cpu")
    _check_valid(weights, ids, 25, E, topk)
    as_rows = [tuple(r) for r in captured.tolist()]
    used = [tuple(r) for r in ids.tolist()]
    assert all(r in as_rows for r in used)
    assert sorted(used[:rows]) == sorted(as_rows)  # the first `rows` tokens take every row once, then cycle
    assert used[rows:2 * rows] == used[:rows]


def _bad_file(tmp_path, content) -> str:
    path = tmp_path / "bad.npy"
    np.save(path, content, allow_pickle=True)
    return f"file:{path}"


@pytest.mark.parametrize("content,message", [
    (np.array([0, 1, 2]), r"expected topk_ids \[rows, 2\]"),
    (np.zeros((4, 3), dtype=np.int64), r"expected topk_ids \[rows, 2\]"),
    (np.zeros((0, 2), dtype=np.int64), r"expected topk_ids \[rows, 2\]"),
    (np.array([[0, 8]]), r"in \[0, 8\)"),
    (np.array([[-1, 2]]), r"in \[0, 8\)"),
    (np.array([[3, 3]]), "same expert twice"),
    (np.array([[0.0, 1.0]]), "must be integers"),
    (np.array([[{"a": 1}, 2]], dtype=object), "unreadable"),
])
def test_file_routing_rejects_bad_files(seed: int, tmp_path, content, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_routing(_bad_file(tmp_path, content), 4, 8, 2, seeded(seed), "cpu")


def test_file_routing_rejects_missing_and_non_tensor_files(seed: int, tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        make_routing(f"file:{tmp_path / 'none.pt'}", 4, 8, 2, seeded(seed), "cpu")
    path = tmp_path / "dict.pt"
    torch.save({"ids": torch.zeros(4, 2)}, path)
    with pytest.raises(ValueError, match="one tensor"):
        make_routing(f"file:{path}", 4, 8, 2, seeded(seed), "cpu")


@pytest.mark.parametrize("spec", ["", "uniform:1", "zipf", "zipf:", "zipf:abc", "zipf:-1", "zipf:nan", "zipf:inf",
                                  "file:", "file:ids.txt", "random"])
def test_bad_specs_raise_value_error(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_routing(spec)


def test_spec_round_trips_to_canonical_string() -> None:
    assert str(parse_routing("zipf:1.50")) == "zipf:1.5"
    assert str(parse_routing("uniform")) == "uniform"
    assert str(parse_routing("file:a:b.npy")) == "file:a:b.npy"


def test_routing_rejects_impossible_sizes(seed: int) -> None:
    with pytest.raises(ValueError, match="top-k <= routed experts"):
        make_routing("uniform", 4, 2, 3, seeded(seed), "cpu")
    with pytest.raises(ValueError, match="M >= 1"):
        make_routing("uniform", 0, 8, 2, seeded(seed), "cpu")


def test_a_pinned_file_routing_changes_with_the_content(tmp_path) -> None:
    """The journal keys on the routing spec: a file's spec carries its content's digest, so ids
    fixed in place are measured again, never answered from timings of the old content."""
    path = tmp_path / "ids.pt"
    torch.save(torch.tensor([[0, 1], [2, 3]]), path)
    first = pin_file(f"file:{path}")
    assert first == pin_file(f"file:{path}")
    assert first == f"file:{path.resolve()}#sha256:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
    torch.save(torch.tensor([[1, 0], [3, 2]]), path)
    second = pin_file(f"file:{path}")
    assert second != first
    parsed = parse_routing(second)
    assert parsed.path == str(path.resolve()) and str(parsed) == second
    weights, ids = make_routing(second, 4, 4, 2, torch.Generator().manual_seed(0), "cpu")
    assert ids.shape == (4, 2)
    with pytest.raises(ValueError, match="no such file"):
        pin_file(f"file:{tmp_path / 'missing.pt'}")


def test_a_file_routing_is_checked_against_each_shape_before_any_work(tmp_path) -> None:
    """Ids out of range or the wrong top-k for a shape are bad input (exit 2, one line), found
    before Ray starts, not by every candidate in the workers."""
    from tuner.cli import main

    path = tmp_path / "ids.pt"
    torch.save(torch.tensor([[0, 7], [2, 3]]), path)  # expert 7 of the tiny model's 4
    argv = ["tune", "--model", "tests/fixtures/tiny-moe.json", "--batch-sizes", "1", "--interpret",
            "--search-space", "tests/fixtures/tune-space.yaml", "--out", str(tmp_path / "out"),
            "--routing", f"file:{path}"]
    assert main(argv) == 2
    assert not (tmp_path / "out").exists()
    (tmp_path / "configs").mkdir()
    for command in (["bench", "--configs", str(tmp_path / "configs")],
                    ["compare", "--dtypes", "bf16", "--out", str(tmp_path / "compare"),
                     "--configs-out", str(tmp_path / "compare-configs")]):
        assert main([*command, "--model", "tests/fixtures/tiny-moe.json", "--batch-sizes", "1", "--interpret",
                     "--routing", f"file:{path}"]) == 2, command
    assert not (tmp_path / "compare").exists()
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        check_file(pin_file(f"file:{path}"), MoEShape(4, 64, 64, 2, "bf16"))
    torch.save(torch.tensor([[0, 1, 2]]), path)  # top-3 for a top-2 model
    with pytest.raises(ValueError, match=r"\[rows, 2\]"):
        check_file(f"file:{path}", MoEShape(4, 64, 64, 2, "bf16"))


def test_a_pinned_file_changed_since_is_refused_wherever_it_is_loaded(tmp_path, capsys, monkeypatch) -> None:
    """A pinned spec (``file:<path>#sha256:<digest>``) names one content: pinning it again (a resumed
    run, a job spec) and every load in a worker check the file against the digest, so ids changed in
    place are never timed under the old content's journal key."""
    from tuner.cli import main
    from workers.failures import InputChanged
    from workers.records import Candidate, Config
    from workers.worker import BenchmarkWorker

    path = tmp_path / "ids.pt"
    torch.save(torch.tensor([[0, 1], [2, 3]]), path)
    pinned = pin_file(f"file:{path}")
    assert pin_file(pinned) == pinned
    torch.save(torch.tensor([[1, 0], [3, 2]]), path)
    shape = MoEShape(4, 64, 64, 2, "bf16")
    for load in (lambda: pin_file(pinned), lambda: check_file(pinned, shape),
                 lambda: make_routing(pinned, 4, 4, 2, seeded(0), "cpu")):
        with pytest.raises(RoutingFileChanged, match=f"routing file {path.resolve()} changed since it was pinned"):
            load()
    assert pin_file(f"file:{path}") != pinned  # an unpinned spec takes the new content, under a new key

    argv = ["tune", "--model", "tests/fixtures/tiny-moe.json", "--batch-sizes", "1", "--interpret", "--dry-run",
            "--search-space", "tests/fixtures/tune-space.yaml", "--out", str(tmp_path / "out"), "--routing", pinned]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "changed since it was pinned" in err[0], err

    # mid-run: the worker lets it out of measure (nobody's status), and the pool ends the run on it
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    worker = BenchmarkWorker(timeout_s=60)
    with pytest.raises(InputChanged, match="changed since it was pinned"):
        worker.measure(Candidate(shape, 1, Config(16, 32, 32, 1, 4, 2), routing=pinned))


@pytest.mark.timeout(600)
def test_a_routing_file_changed_during_a_run_ends_it_naming_the_file(tmp_path, monkeypatch, capsys) -> None:
    """The file changes after the command pinned it (between validation and the workers' first
    problem): the run ends with exit 1 and one line naming the file, and no timing of the new
    content is journalled under the old content's key."""
    from tune_helpers import run_tune, tune_argv
    from tuner.commands import tune
    from tuner.journal import JOURNAL_NAME

    path = tmp_path / "ids.pt"
    torch.save(torch.tensor([[0, 1], [2, 3], [1, 3]]), path)
    started = tune.tune_in_session

    def change_then_tune(*args, **kwargs):
        torch.save(torch.tensor([[3, 2], [1, 0], [0, 2]]), path)
        return started(*args, **kwargs)

    monkeypatch.setattr(tune, "tune_in_session", change_then_tune)
    code, _ = run_tune(tune_argv(tmp_path / "out", "--routing", f"file:{path}"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moe-tune:")]
    assert code == 1 and any(f"routing file {path.resolve()} changed since it was pinned" in line for line in err), err
    journal = tmp_path / "out" / JOURNAL_NAME
    assert not journal.exists() or journal.read_text().strip() == ""


class _Payload:
    """A pickle that would create a file when loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".pt", ".npy"])
def test_an_unloadable_routing_file_is_one_plain_line_and_runs_no_pickle(tmp_path, suffix) -> None:
    """torch's and NumPy's refusals run over lines, carry terminal escapes and suggest loading the
    file unsafely; a routing file's refusal is one plain line saying what the file must be."""
    marker = tmp_path / "ran"
    pickled = tmp_path / f"pickled{suffix}"
    if suffix == ".pt":
        torch.save(_Payload(str(marker)), pickled)
    else:
        np.save(pickled, np.array([_Payload(str(marker))], dtype=object), allow_pickle=True)
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"hello")
    shape = MoEShape(E=4, N=64, K=64, topk=2, dtype=DType.BF16)
    for path in (pickled, garbage):
        with pytest.raises(ValueError) as refused:
            check_file(f"file:{path}", shape)
        line = str(refused.value)
        assert "\n" not in line and "\x1b" not in line and "trust" not in line, line
        assert "is unreadable: not a " in line and "never loaded" in line, line
    assert not marker.exists()
