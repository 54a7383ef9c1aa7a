"""Red team on SIGHUP: a reload of a rules file caught half written (written in place, as
`cat > rules.yaml` or a config manager does) must not install the half rules; a storm of
100 HUPs in a second neither stops the run nor loses a record."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.ops.calls import call, filler, finish, header, records, send, settled, start, wait_for_text, wait_reading_stdin

if not Path("/proc/self/syscall").exists():
    pytest.skip("needs Linux's /proc/PID/syscall to see the run waiting for input", allow_module_level=True)

OLD = "acc: {log_flag: 1}\nroute:\n  - if: {method: INVITE}\n    setflag: [1]\n"
#: the new rules account INVITEs and BYEs; their first half (a valid file!) only BYEs
FULL = ("acc: {log_flag: 1}\nroute:\n  - if: {method: BYE}\n    setflag: [1]\n"
        "  - if: {method: INVITE}\n    setflag: [1]\n")
HALF = FULL[:FULL.index("  - if: {method: INVITE}")]


def methods(path: Path, call_id: str) -> list[object]:
    return sorted(str(r["method"]) for r in records(path) if r["call_id"] == call_id)


def test_a_half_written_rules_file_is_not_installed(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    settled(rules, OLD)
    proc = start(tmp_path, "-m", str(rules), "--jsonl", "records.jsonl", "--log", "none")
    err = tmp_path / "stderr"
    try:
        send(proc, header() + call("A", 1000))
        wait_reading_stdin(proc)
        with rules.open("w") as f:  # written in place: HUP'ed while half of it is there
            f.write(HALF)
            f.flush()
            os.kill(proc.pid, signal.SIGHUP)
            send(proc, filler(1003))
            wait_reading_stdin(proc)
            time.sleep(0.2)
            f.write(FULL[len(HALF):])
        t = 1004.0
        deadline = time.monotonic() + 15
        while "rules reloaded" not in err.read_text() and time.monotonic() < deadline:
            send(proc, filler(t))  # packet time goes on: safe points come
            t += 0.1
            time.sleep(0.05)
        wait_for_text(err, "notice: rules reloaded from")
        send(proc, call("B", 1100))
        wait_reading_stdin(proc)
    finally:
        assert finish(proc) == 0
    assert methods(tmp_path / "records.jsonl", "A") == ["INVITE"]
    assert methods(tmp_path / "records.jsonl", "B") == ["BYE", "INVITE"], err.read_text()
    assert "2 route rule(s)" in err.read_text()


def test_a_storm_of_hups(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    settled(rules, OLD)
    proc = start(tmp_path, "-m", str(rules), "--jsonl", "records.jsonl", "--log", "none")
    err = tmp_path / "stderr"
    stop = threading.Event()

    def storm() -> None:
        for _ in range(100):
            if stop.is_set():
                return
            os.kill(proc.pid, signal.SIGHUP)
            time.sleep(0.01)

    try:
        send(proc, header())
        wait_reading_stdin(proc)
        th = threading.Thread(target=storm)
        th.start()
        for i in range(40):
            send(proc, call(f"C{i}", 1000 + i * 3) + filler(1000 + i * 3 + 2.5))
        th.join(10)
        wait_reading_stdin(proc)
    finally:
        stop.set()
        rc = finish(proc)
    assert rc == 0, err.read_text()
    assert sorted(str(r["call_id"]) for r in records(tmp_path / "records.jsonl")) == sorted(f"C{i}" for i in range(40))
    lines = err.read_text().count("rules reloaded")
    assert 1 <= lines <= 100
    assert "Traceback" not in err.read_text()


@pytest.mark.parametrize("delay", [0.3, 0.45])
def test_a_hup_during_start_up_does_not_kill(tmp_path: Path, delay: float) -> None:
    """A HUP in the imports before the command set its handlers (logrotate, `systemctl reload`
    just after start) killed the process with SIGHUP's default action (-1). (Before the
    interpreter reaches our package, ~50 ms, nothing of ours can help: not tested.)"""
    proc = start(tmp_path, "--log", "none", "-q")
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGHUP)
    time.sleep(0.2)
    send(proc, header() + call("A", 1000))
    assert finish(proc) == 0, (tmp_path / "stderr").read_text()
