"""Records out within 1 s, always (issue 11): a reader on a pipe, a file and an SQLite database
see a record while the source is still open and silent, not when the input ends."""

from __future__ import annotations

import os
import select
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sipsniff_acc.emitters.spool import DurableSpool, SpooledEmitter
from sipsniff_acc.emitters.sql import SqlEmitter
from sipsniff_acc.events import Counters, Idle
from sipsniff_acc.processrun import run
from tests.builders import pcap_bytes
from tests.flows import Call, answered_call
from tests.service.test_service_loop import frames_of, rules


def _read_line(fd: int, within: float) -> bytes:
    """Bytes from a pipe until a newline, or what came within ``within`` seconds."""
    got = b""
    deadline = time.monotonic() + within
    while b"\n" not in got:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        got += chunk
    return got


def test_a_reader_on_a_pipe_sees_the_acc_line_while_the_input_is_still_open(tmp_path: Path) -> None:
    """`process -r -` with stdin held open (a real pipe, as `tcpdump -w - |`), ACC lines to a
    stdout pipe and JSON lines to a file: both visible ≤ 1 s after the deciding packet."""
    msgs = answered_call(Call(call_id="piped", ftag="p-tag"), t=1000.0)[:7]  # up to the 200 OK upstream
    data = pcap_bytes([(f.ts, f.data) for f in frames_of(msgs)])
    jsonl = tmp_path / "r.jsonl"
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text('proxy: {addresses: ["10.0.0.10:5060"]}\nacc: {log_flag: 1}\n'
                          'route:\n  - if: {method: INVITE}\n    setflag: [1]\n')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # the pipe is block-buffered
    proc = subprocess.Popen(
        [sys.executable, "-m", "sipsniff_acc", "process", "-r", "-", "--no-db", "--log", "-", "--jsonl", str(jsonl),
         "-m", str(rules_file), "-q", "-j", "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(data)
        proc.stdin.flush()
        sent = time.monotonic()
        line = _read_line(proc.stdout.fileno(), 10.0)
        seen = time.monotonic() - sent
        assert b"ACC: transaction answered" in line and b"call_id=piped" in line, line
        assert proc.poll() is None  # still running: stdin is open
        for _ in range(100):  # flushed right after the log line: give it the few ms
            if b'"call_id":"piped"' in jsonl.read_bytes():
                break
            time.sleep(0.01)
        assert b'"call_id":"piped"' in jsonl.read_bytes()
        assert seen < 5.0  # interpreter start included; the flush itself is immediate
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(30)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else b""


def test_the_spool_delivers_to_sqlite_on_a_timer_while_the_source_is_silent(tmp_path: Path) -> None:
    """The row of the last record of a burst is in the database while the live source only
    says Idle: it does not wait for the next record."""
    db = tmp_path / "acc.db"
    r = rules()
    backend = SqlEmitter(f"sqlite:///{db}", r)  # type: ignore[arg-type]
    spooled = SpooledEmitter(backend, DurableSpool(tmp_path / "spool"))
    msgs = answered_call(Call(call_id="rowed", ftag="r-tag"), t=1000.0)[:7]
    rows_while_silent: list[int] = []
    waited: list[float] = []

    def source() -> Iterator[Any]:
        yield from frames_of(msgs)
        decided = time.monotonic()
        ts = 1002.1
        for _ in range(30):  # 3 s of heartbeats, 0.1 s apart, as a live source in silence
            time.sleep(0.1)
            ts += 0.1
            yield Idle(ts)
            with sqlite3.connect(db) as c:
                n = c.execute("SELECT count(*) FROM acc WHERE callid = 'rowed'").fetchone()[0]
            if n:
                rows_while_silent.append(n)
                waited.append(time.monotonic() - decided)
                break

    run(source(), r, [spooled], Counters())
    spooled.close()
    assert rows_while_silent == [1]
    assert waited[0] <= 1.0
