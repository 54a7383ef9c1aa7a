"""SIGHUP: rules.yaml reloaded mid-run (records before/after follow the old/new rules, open
transactions keep their flags), an invalid file refused in one line with the old rules kept,
and log files reopened after logrotate's rename. Real `process -` runs fed through a pipe."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest

from tests.ops.calls import (
    settled, answer, call, filler, finish, header, invite, records, send, start, wait_for_text, wait_reading_stdin,
)

if not Path("/proc/self/syscall").exists():
    pytest.skip("needs Linux's /proc/PID/syscall to see the run waiting for input", allow_module_level=True)

OLD = """\
acc: {log_flag: 1}
route:
  - if: {method: INVITE}
    setflag: [1]
"""
NEW = """\
acc: {log_flag: 1}
route:
  - if: {method: BYE}
    setflag: [1]
"""
INVALID = """\
acc: {log_flag: 1}
route:
  - if: {method: INVITE}
    setflag: [1]
    setflags: [2]
"""
NEEDS_RESTART = """\
acc: {log_flag: 1}
limits: {max_dialogs: 1000}
route:
  - if: {method: INVITE}
    setflag: [1]
"""


def accounted(path: Path) -> set[tuple[object, object]]:
    return {(r["call_id"], r["method"]) for r in records(path)}


def hup(proc_pid: int) -> None:
    os.kill(proc_pid, signal.SIGHUP)


@pytest.mark.parametrize("workers", [0, 2])
def test_sighup_reloads_rules(tmp_path: Path, workers: int) -> None:
    rules = tmp_path / "rules.yaml"
    settled(rules, OLD)
    proc = start(tmp_path, "-m", str(rules), "--jsonl", "records.jsonl", "--log", "none", workers=workers)
    err = tmp_path / "stderr"
    try:
        send(proc, header() + call("A", 1000) + invite("C", 1003.5))  # C: open across the reload
        wait_reading_stdin(proc)
        settled(rules, NEW)
        hup(proc.pid)
        send(proc, filler(1004))  # packet time goes on: the run's next safe point acts on the HUP
        wait_for_text(err, "notice: rules reloaded from")
        send(proc, answer("C", 1005) + call("B", 1006))
        wait_reading_stdin(proc)

        settled(rules, INVALID)
        hup(proc.pid)
        send(proc, filler(1010))
        text = wait_for_text(err, "rules reload refused:")
        send(proc, call("D", 1011))
        wait_reading_stdin(proc)

        settled(rules, NEEDS_RESTART)
        hup(proc.pid)
        send(proc, filler(1015))
        text = wait_for_text(err, "rules reload refused:", count=2)
        send(proc, call("E", 1016))
    finally:
        status = finish(proc)
    assert status == 0, err.read_text()
    refused = [ln for ln in text.splitlines() if "rules reload refused" in ln]
    assert refused[0].startswith(f"alarm: rules reload refused: {rules}:5: route.0.setflags: ")
    assert "; keeping the rules loaded at " in refused[0]
    assert refused[1].startswith(f"alarm: rules reload refused: {rules}: limits changed: these need a restart")
    got = accounted(tmp_path / "records.jsonl")
    assert got == {
        ("A", "INVITE"),  # old rules: INVITEs flagged, BYEs not
        ("C", "INVITE"),  # INVITE seen under the old rules, answered under the new: keeps its flag
        ("B", "BYE"),  # new rules: BYEs flagged, INVITEs not
        ("D", "BYE"),  # the invalid file was refused: still the new rules
        ("E", "BYE"),  # a file needing a restart was refused too
    }, sorted(got)  # type: ignore[type-var]


def test_sighup_reopens_the_log(tmp_path: Path) -> None:
    """logrotate: rename, then HUP; lines before go to the renamed file, lines after to a new
    file at the same path (0600); nothing lost, nothing twice."""
    rules = tmp_path / "rules.yaml"
    settled(rules, OLD)
    log, jsonl = tmp_path / "acc.log", tmp_path / "records.jsonl"
    proc = start(tmp_path, "-m", str(rules), "--log", str(log), "--jsonl", str(jsonl))
    try:
        send(proc, header() + call("A", 1000) + call("B", 1003))
        wait_reading_stdin(proc)
        log.rename(tmp_path / "acc.log.1")
        jsonl.rename(tmp_path / "records.jsonl.1")
        hup(proc.pid)
        send(proc, filler(1006) + call("C", 1007))
        wait_reading_stdin(proc)
    finally:
        status = finish(proc)
    assert status == 0, (tmp_path / "stderr").read_text()
    before = (tmp_path / "acc.log.1").read_text().splitlines()
    after = log.read_text().splitlines()
    assert [("call_id=A" in ln, "call_id=B" in ln) for ln in before] == [(True, False), (False, True)], before
    assert len(after) == 1 and "call_id=C" in after[0], after
    assert accounted(tmp_path / "records.jsonl.1") == {("A", "INVITE"), ("B", "INVITE")}
    assert accounted(jsonl) == {("C", "INVITE")}
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE(jsonl.stat().st_mode) == 0o600
