"""The command line as a user meets it (typer's CliRunner and real subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sipsniff_acc.cli import app
from tests.conftest import PCAPS, our_messages

runner = CliRunner()


@pytest.mark.parametrize("command", list(app.registered_commands))
def test_every_command_has_help(command) -> None:  # type: ignore[no-untyped-def]
    assert command.callback.__doc__, f"{command.callback.__name__} has no help"
    name = command.name or command.callback.__name__
    res = runner.invoke(app, [name, "--help"])
    assert res.exit_code == 0 and "Usage" in res.output


def test_table_format_has_header_and_one_row_per_message() -> None:
    res = runner.invoke(app, ["messages", "--format", "table", "-q", "-j", "0", str(PCAPS / "vlan.pcap")])
    lines = res.stdout.splitlines()
    assert res.exit_code == 0 and lines[0].startswith("time") and len(lines) == 7
    assert "INVITE" in lines[1] and "vlan-call@golden" in lines[1]


def test_workers_give_the_same_output_as_one_process(tmp_path: Path) -> None:
    outs = []
    for j in ("0", "2"):
        res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "messages", "-q", "-j", j,
                              str(PCAPS / "sample.pcap"), str(PCAPS / "garbage.pcap"), str(PCAPS / "frag6_outoforder.pcap")],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        outs.append(res.stdout)
    assert outs[0] == outs[1] and outs[0].count("\n") > 60


def test_stats_file_counts_match_summary(tmp_path: Path) -> None:
    rows, res = our_messages(PCAPS / "garbage.pcap", args=("--stats", str(tmp_path / "s.json"), "-j", "2"))
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["sip_messages"] == len(rows) == 7
    assert f"{stats['sip_messages']} SIP messages" in res.stderr
    assert stats["anomalies"]["sip_bad_start_line"] == 1


def test_missing_file_is_a_usage_error() -> None:
    res = runner.invoke(app, ["messages", "/nonexistent.pcap"])
    assert res.exit_code == 2 and "no such file" in res.output


def test_output_to_file_and_broken_pipe(tmp_path: Path) -> None:
    out = tmp_path / "m.jsonl"
    res = runner.invoke(app, ["messages", "-q", "-o", str(out), str(PCAPS / "sample.pcap")])
    assert res.exit_code == 0 and len(out.read_text().splitlines()) == 60
    p = subprocess.run(f"{sys.executable} -m sipsniff_acc messages -q {PCAPS / 'sample.pcap'} | head -1",
                       shell=True, capture_output=True, text=True, timeout=60)
    assert p.stdout.count("\n") == 1 and "Traceback" not in p.stderr


def test_progress_bar_forced_on_keeps_output_identical() -> None:
    outs = []
    for flag in ("--progress", "--no-progress"):
        res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "messages", "-q", flag, str(PCAPS / "sample.pcap")],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        outs.append(res.stdout)
    assert outs[0] == outs[1] and outs[0].count("\n") == 60
