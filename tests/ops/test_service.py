"""service.py's pieces on their own: alarms (rate limit, journald priority prefix), drop
start/stop alarms from CaptureGap reports, and which rules changes a reload refuses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sipsniff_acc import service
from sipsniff_acc.events import CaptureGap, Frame, Idle
from sipsniff_acc.rules import parse_rules
from sipsniff_acc.service import Alarms, GapWatch, ServiceControl, fixed_changes


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_alarms_are_rate_limited_per_kind() -> None:
    lines: list[str] = []
    clock = Clock()
    say = Alarms(lines.append, clock, interval=10)
    say.journald = False
    assert say("backend down", kind="db")
    clock.now = 1
    assert not say("backend down", kind="db")
    assert not say("backend down", kind="db")
    assert say("syslog target gone", kind="syslog")  # another kind is not held back
    clock.now = 12
    assert say("backend down", kind="db")
    assert lines == ["alarm: backend down\n", "alarm: syslog target gone\n",
                     "alarm: backend down (2 more like this in the last 12 s)\n"]
    assert say("reload refused", kind="reload", limited=False) and say("reload refused", kind="reload", limited=False)


def test_alarm_escapes_and_notice() -> None:
    lines: list[str] = []
    say = Alarms(lines.append)
    say.journald = False
    say("evil\nalarm: forged", level=service.NOTICE)
    assert lines == ["notice: evil\\nalarm: forged\n"]


def test_journald_priority_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under systemd (JOURNAL_STREAM names our stderr) a line starts with <4>: journald files it
    as a warning; a JOURNAL_STREAM naming another stream (inherited) is ignored."""
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    lines: list[str] = []
    Alarms(lines.append)("capture drops on eth1")
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    Alarms(lines.append)("capture drops on eth1")
    assert lines == ["<4>alarm: capture drops on eth1\n", "alarm: capture drops on eth1\n"]


def test_drops_start_and_stop_alarms() -> None:
    lines: list[str] = []
    say = Alarms(lines.append)
    say.journald = False
    watch = GapWatch(say, quiet=10)
    stream = [Frame(100.0, 1, b"", 1), CaptureGap(101.0, "eth1", 50), CaptureGap(102.0, "eth1", 25, "queue"),
              Idle(105.0), Frame(111.0, 1, b"", 2), Idle(112.5), Idle(113.0)]
    assert list(watch.watch(stream)) == stream  # passed through untouched
    assert watch.gaps == {"eth1": 2}
    assert watch.dropped == {("eth1", "kernel"): 50, ("eth1", "queue"): 25}
    assert len(lines) == 2, lines
    assert lines[0].startswith("alarm: capture drops on eth1: 50 packet(s) lost (kernel)")
    assert lines[1].startswith("notice: capture drops on eth1 stopped: 75 packet(s) lost from ")
    assert not watch.losing


BASE = "acc: {log_flag: 1, db_flag: 1}\nroute:\n  - if: {method: INVITE}\n    setflag: [1]\n"


@pytest.mark.parametrize(("new", "refused"), [
    ("acc: {log_flag: 1, db_flag: 1, log_extra: 'u=$fU'}\nroute: []\n", []),
    ("acc: {log_flag: 2, db_flag: 1}\nroute: []\n", []),
    ("acc: {log_flag: 1, db_flag: 1, db_table_acc: acc2}\n", ["acc.db_table_acc"]),
    ("acc: {log_flag: 1, db_flag: 1, db_extra: 'u=$fU'}\n", ["acc.db_extra"]),
    ("proxy: {addresses: [10.0.0.10]}\ntm: {fr_timer: 10}\nacc: {log_flag: 1, db_flag: 1}\n", []),
    ("acc: {log_flag: 1, db_flag: 1, multi_leg_info: 'a=$avp(x)'}\n", ["acc.multi_leg_info"]),
    ("profile: openser-1.2\nacc: {log_flag: 1, db_flag: 1}\n", ["profile"]),
    ("acc: {log_flag: 1, db_flag: 1}\nlimits: {max_dialogs: 10}\n", ["limits"]),
    ("acc: {log_flag: 1, db_flag: 1}\nroute:\n  - acc_rad_request: x\n",
     ["acc_rad_request/acc_diam_request (a RADIUS or Diameter output)"]),
])
def test_what_a_reload_may_change(new: str, refused: list[str]) -> None:
    assert fixed_changes(parse_rules(BASE), parse_rules(new)) == refused


def test_no_hup_no_work(tmp_path: Path) -> None:
    """pending_rules() without a SIGHUP reads nothing (the per-tick call is one compare)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(BASE)
    control = ServiceControl(rules, parse_rules(BASE), say=Alarms(lambda _l: None))
    rules.unlink()
    assert control.pending_rules() is None
    assert not control.reloads


def test_alarm_stream_prefixes_for_journald(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The spooled backends' own alarm lines: unchanged on a terminal, with <4>/<5> under journald."""
    plain = service.AlarmStream()
    plain.journald = False
    print("alarm: db backend down (refused); 3 record(s) kept", file=plain)  # type: ignore[arg-type]
    journal = service.AlarmStream()
    journal.journald = True
    journal.write("alarm: db backend down\nnote: db backend back after 2.0 s; deliver")
    journal.write("ing the spooled records\n")
    assert capsys.readouterr().err == ("alarm: db backend down (refused); 3 record(s) kept\n"
                                       "<4>alarm: db backend down\n"
                                       "<5>note: db backend back after 2.0 s; delivering the spooled records\n")
    assert plain.sent == 1 and journal.sent == 2


def test_reopen_failure_keeps_the_old_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The log's directory renamed away (the new path cannot be created): one alarm, and the
    lines keep going to the file already open; nothing is lost."""
    from sipsniff_acc import stopping

    (tmp_path / "logs").mkdir()
    f = service.ReopenableFile(tmp_path / "logs" / "acc.log", "a")
    f.write("one\n")
    (tmp_path / "logs").rename(tmp_path / "moved")
    stopping._hup(1, None)  # what SIGHUP's handler does  # noqa: SLF001
    f.write("two\n")
    f.close()
    assert (tmp_path / "moved" / "acc.log").read_text() == "one\ntwo\n"
    assert f.reopened == 0
    assert "alarm: cannot reopen " in capsys.readouterr().err
