"""--config FILE / SIPSNIFF_CONFIG: options from YAML, the command line wins, and every mistake
is one line FILE:LINE: command.key: why with exit 2 before any work (real runs of the CLI)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import PCAPS
from tests.ops.calls import cmd, env, records

SAMPLE = PCAPS / "sample.pcap"


def run(tmp: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd(*args), cwd=tmp, env=env(**extra), capture_output=True, text=True, timeout=120)


def write(tmp: Path, text: str, name: str = "sipsniff-acc.yaml") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def test_options_come_from_the_file(tmp_path: Path) -> None:
    conf = write(tmp_path, f"""\
process:
  read-file: [{SAMPLE}]
  no_db: true
  log: from-config.log
  jsonl: records.jsonl
  workers: 0
  quiet: true
""")
    res = run(tmp_path, "--config", str(conf), "process")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # quiet: from the file
    assert len(records(tmp_path / "records.jsonl")) == 20
    assert len((tmp_path / "from-config.log").read_text().splitlines()) == 20
    assert not (tmp_path / "acc.db").exists()  # no_db: from the file


def test_command_line_wins(tmp_path: Path) -> None:
    conf = write(tmp_path, "process:\n  no-db: true\n  log: from-config.log\n  jsonl: from-config.jsonl\n  workers: 0\n")
    res = run(tmp_path, "--config", str(conf), "process", str(SAMPLE), "--log", "from-cli.log", "-q")
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "from-config.log").exists()
    assert len((tmp_path / "from-cli.log").read_text().splitlines()) == 20
    assert len(records(tmp_path / "from-config.jsonl")) == 20  # the file's other options still apply


def test_environment_names_the_file(tmp_path: Path) -> None:
    conf = write(tmp_path, "process:\n  no-db: true\n  log: none\n  jsonl: env.jsonl\n  quiet: true\n")
    res = run(tmp_path, "process", str(SAMPLE), SIPSNIFF_CONFIG=str(conf))
    assert res.returncode == 0, res.stderr
    assert len(records(tmp_path / "env.jsonl")) == 20


def test_group_commands(tmp_path: Path) -> None:
    """A group's subcommands nest: spool: {status: {spool: PATH}}."""
    conf = write(tmp_path, "spool:\n  status:\n    spool: elsewhere.spool\n")
    res = run(tmp_path, "--config", str(conf), "spool", "status")
    assert res.returncode == 2
    assert "elsewhere.spool" in res.stderr


@pytest.mark.parametrize(("text", "expected"), [
    ("process:\n  no-db: true\n  wrkers: 2\n", "{f}:3: process.wrkers: not an option of `process` (did you mean workers?)"),
    ("process:\n  workers: two\n", "{f}:2: process.workers: expected a whole number, not str 'two'"),
    ("process:\n  workers: '2'\n", "{f}:2: process.workers: expected a whole number, not str '2'"),
    ("process:\n  no-db: 1\n", "{f}:2: process.no-db: expected true or false, not int 1"),
    ("process:\n  log: [a, b]\n", "{f}:2: process.log: expected one value, not a list"),
    ("process:\n  drain-timeout: yes\n", "{f}:2: process.drain-timeout: expected a number, not bool True"),
    ("procss:\n  log: none\n", "{f}:1: procss: not a command (did you mean process?)"),
    ("process: [1]\n", "{f}:1: process: expected the options of `process` as a mapping (key: value)"),
    ("- process\n", "{f}:1: the config file must be a mapping of commands"),
    ("process:\n  log: none\n  log: x\n", "{f}:3: process.log: given twice (line 2 too)"),
    ("process: {log: none\n", "{f}:2: not valid YAML"),
    ("process:\n  db_url: a\n  db-url: b\n", "{f}:3: process.db-url: given twice"),
    ("messages:\n  format: xml\n", "{f}:2: messages.format: 'xml' is not one of jsonl, table"),
], ids=["unknown-key", "not-int", "quoted-int", "not-bool", "list", "yes-is-not-a-number", "unknown-command",
        "not-mapping", "top-list", "duplicate", "bad-yaml", "twice", "choice"])
def test_mistakes_are_one_line_before_any_work(tmp_path: Path, text: str, expected: str) -> None:
    conf = write(tmp_path, text)
    res = run(tmp_path, "--config", str(conf), "process", str(SAMPLE), "--no-db", "--jsonl", "out.jsonl")
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: " + expected.format(f=conf)), lines[0]
    assert not (tmp_path / "out.jsonl").exists()  # nothing was started


def test_unreadable_file(tmp_path: Path) -> None:
    res = run(tmp_path, "--config", str(tmp_path / "missing.yaml"), "process", str(SAMPLE))
    assert res.returncode == 2
    assert res.stderr == f"error: {tmp_path / 'missing.yaml'}: cannot read the config file: No such file or directory\n"


def test_bounded_like_rules(tmp_path: Path) -> None:
    """A billion-laughs file is refused by the rules loader's alias bound, in one line."""
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))
    conf = write(tmp_path, laughs)
    res = run(tmp_path, "--config", str(conf), "process", str(SAMPLE))
    assert res.returncode == 2
    assert len(res.stderr.splitlines()) == 1 and "more than" in res.stderr, res.stderr
