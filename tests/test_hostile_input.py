"""Hostile and broken input files, through the CLI as a user meets them: each is one line on
stderr and exit code 2 before any work starts, never a traceback (no GPU, no Ray: every case is
refused while the command checks its input)."""

from __future__ import annotations

from pathlib import Path

import pytest

import tuner.cli as cli

FIXTURES = Path(__file__).parent / "fixtures"
TINY = str(FIXTURES / "tiny-moe.json")
SPACE = str(FIXTURES / "tune-space.yaml")
DEEP = 100_000  # far past Python's recursion limit


def _refused(argv: list[str], capsys, *needles: str) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moe-tune: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def test_files_nested_too_deeply_to_parse_are_bad_input(tmp_path: Path, capsys) -> None:
    """``[[[[…`` in any file the commands read (model config, config folder, --config, search
    space, job spec) is refused like other unparsable text, not a RecursionError traceback."""
    deep_json = "[" * DEEP + "]" * DEEP
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(deep_json)
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "E=4,N=64,device_name=cpu.json").write_text('{"1": ' + deep_json + "}")
    (tmp_path / "space.yaml").write_text("BLOCK_SIZE_M: " + "[" * 5000 + "]" * 5000 + "\n")
    (tmp_path / "job.yaml").write_text("models: " + "[" * 5000 + "]" * 5000 + "\n")
    (tmp_path / "config.json").write_text(deep_json)

    _refused(["plan", "--model", str(tmp_path / "model"), "--device-name", "NVIDIA H200"], capsys, "nested too deeply")
    _refused(["plan", "--model", TINY, "--device-name", "cpu", "--search-space", str(tmp_path / "space.yaml")],
             capsys, "space.yaml", "nested too deeply")
    _refused(["job", "validate", str(tmp_path / "job.yaml")], capsys, "job.yaml", "nested too deeply")
    _refused(["check", "--shape", "4,64,64,2", "--interpret", "--batch-sizes", "1", "--config",
              str(tmp_path / "config.json")], capsys, "--config", "nested too deeply")
    _refused(["tune", "--model", TINY, "--search-space", SPACE, "--batch-sizes", "1", "--device-name", "cpu",
              "--dry-run", "--out", str(tmp_path / "out"), "--baseline", str(folder)], capsys, "nested too deeply")


def test_a_job_spec_that_is_not_utf8_text_is_bad_input(tmp_path: Path, capsys) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_bytes(b"\xff\xfemodels: [x]\n")
    _refused(["job", "validate", str(spec)], capsys, str(spec), "not UTF-8")


@pytest.mark.parametrize("name", ["../../etc/x", "NVIDIA H200/x", "NVIDIA\tH200", "  "])
def test_a_device_name_no_file_name_can_hold_is_bad_input(tmp_path: Path, name: str, capsys) -> None:
    """``--device-name`` becomes part of a file name: a ``/`` would put the file elsewhere."""
    _refused(["plan", "--model", TINY, "--device-name", name], capsys, "device name")
    _refused(["tune", "--model", TINY, "--dry-run", "--device-name", name, "--batch-sizes", "1", "--out",
              str(tmp_path / "out")], capsys, "device name")
    assert not (tmp_path / "out").exists()


GOOD_CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1, "num_warps": 4,
               "num_stages": 2}


@pytest.mark.parametrize("value", ["1e400", "2.5", '"2"', "true", "0", "-2", "null"])
def test_a_config_value_no_server_can_launch_is_bad_input(tmp_path: Path, value: str, capsys) -> None:
    """A config file's or ``--config``'s value that is not a positive integer (a server hands it to
    Triton as it is) is refused naming it, not truncated (2.5 → 2) nor an OverflowError traceback."""
    text = '{"1": {' + ", ".join(f'"{k}": {value if k == "num_stages" else v}' for k, v in GOOD_CONFIG.items()) + "}}"
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "E=4,N=64,device_name=cpu.json").write_text(text)
    _refused(["bench", "--model", TINY, "--interpret", "--batch-sizes", "1", "--configs", str(folder)], capsys,
             "E=4,N=64,device_name=cpu.json", "positive integers")
    _refused(["check", "--shape", "4,64,64,2", "--interpret", "--batch-sizes", "1", "--config", text[6:-1]], capsys,
             "--config", "positive integers")


@pytest.mark.parametrize("flag", ["--timeout", "--budget-minutes", "--compile-timeout", "--connect-timeout"])
@pytest.mark.parametrize("value", ["inf", "nan", "0"])
def test_a_duration_that_is_no_number_of_seconds_is_bad_input(tmp_path: Path, flag: str, value: str, capsys) -> None:
    _refused(["tune", "--model", TINY, "--dry-run", "--device-name", "cpu", "--out", str(tmp_path), flag, value],
             capsys, f"argument {flag}: expected a positive number")


@pytest.mark.parametrize("command", [
    ["tune", "--model", TINY, "--dry-run", "--device-name", "cpu", "--out", ""],
    ["tune", "--model", TINY, "--dry-run", "--device-name", "cpu", "--journal", ""],
    ["tune", "--model", TINY, "--dry-run", "--device-name", "cpu", "--baseline", ""],
    ["tune", "--model", TINY, "--dry-run", "--device-name", "cpu", "--server-code", ""],
    ["plan", "--model", "", "--device-name", "cpu"],
    ["plan", "--model", TINY, "--device-name", "cpu", "--search-space", " "],
    ["bench", "--model", TINY, "--interpret", "--configs", ""],
    ["compare", "--model", TINY, "--interpret", "--out", ""],
])
def test_an_empty_path_is_bad_input_not_the_current_folder(command: list[str], capsys, monkeypatch,
                                                           tmp_path: Path) -> None:
    """``--out "$OUT"`` with ``OUT`` unset: refused, not a run writing into the current folder."""
    monkeypatch.chdir(tmp_path)
    _refused(command, capsys, "expected a name or path, got an empty string")
    assert list(tmp_path.iterdir()) == []


def test_a_fifo_under_a_config_file_name_is_refused_not_read_forever(tmp_path: Path, capsys) -> None:
    """A FIFO (or any non-regular file) named like a config file in a folder a command reads."""
    import os
    import threading

    folder = tmp_path / "configs"
    folder.mkdir()
    os.mkfifo(folder / "E=4,N=64,device_name=cpu.json")
    # Without the check the read blocks until a writer comes: this opener ends such a hang.
    unblock = threading.Timer(20, lambda: open(folder / "E=4,N=64,device_name=cpu.json", "w").close())
    unblock.daemon = True
    unblock.start()
    try:
        _refused(["bench", "--model", TINY, "--interpret", "--batch-sizes", "1", "--configs", str(folder)], capsys,
                 "not a regular file")
    finally:
        unblock.cancel()


@pytest.mark.parametrize("command", ["tune", "compare"])
def test_a_file_that_is_no_journal_is_refused_not_appended_to(tmp_path: Path, command: str, capsys,
                                                              monkeypatch) -> None:
    """``--journal config.json`` by mistake: a run appends to its journal, which would corrupt the
    file; an earlier run's journal (even with hostile lines after its first) and an empty file pass."""
    monkeypatch.chdir(tmp_path)  # compare's default --configs-out is relative
    victim = tmp_path / "config.json"
    victim.write_text(Path(TINY).read_text())
    before = victim.read_bytes()
    argv = [command, "--model", TINY, "--interpret", "--batch-sizes", "1", "--search-space", SPACE,
            "--out", str(tmp_path / "out"), "--journal", str(victim)]
    if command == "tune":
        argv.append("--dry-run")
    _refused(argv, capsys, f"--journal {victim}: not a moe-tune journal")
    assert victim.read_bytes() == before
    folder = tmp_path / "a-folder"
    folder.mkdir()
    argv[argv.index(str(victim))] = str(folder)
    _refused(argv, capsys, f"--journal {folder}: exists and is not a file")


def test_not_a_journal_tells_journals_from_other_files(tmp_path: Path) -> None:
    import os

    from tuner.journal import not_a_journal

    cases = {"missing": None, "empty": b"", "torn": b'{"v": 1, "kind": "meas',
             "journal": b'\n{"v": 1, "kind": "retime", "key": "k"}\n[1, 2]\n{oops\n',
             "config": b'{"hidden_size": 64}\n', "unterminated": b'{"hidden_size": 64}', "text": b"hello\n", "unterminated text": b"hello",
             "list": b"[1, 2]\n"}
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
    verdicts = {name: not_a_journal(tmp_path / name) is None for name in cases}
    assert verdicts == {"missing": True, "empty": True, "torn": True, "journal": True, "config": False,
                        "unterminated": False, "text": False, "unterminated text": False, "list": False}
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")  # would block a reader: refused without being opened
    assert not_a_journal(tmp_path / "folder") == not_a_journal(tmp_path / "fifo") == "exists and is not a file"
