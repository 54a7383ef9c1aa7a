"""Pieces of a capture for feeding ``sipsniff-acc process -`` through a pipe, a call at a time.

Single-leg calls (no proxy in sight: every request is a server transaction) between
10.3.0.1 and 10.3.0.2, built from ``tests/builders``; ``filler`` is a non-SIP datagram that
only moves packet time on (the run's timers and its SIGHUP check run every 50 ms of it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from tests.builders import ether, ip4_udp, pcap_bytes, sip_request, sip_response

REPO = Path(__file__).resolve().parents[2]
UAC, UAS = "10.3.0.1", "10.3.0.2"


def _frame(ts: float, payload: bytes, src: str, dst: str) -> bytes:
    """One pcap record (header + Ethernet/IPv4/UDP frame), without the file header."""
    return pcap_bytes([(ts, ether(ip4_udp(payload, src, dst)))])[24:]


def header() -> bytes:
    return pcap_bytes([])


def invite(call: str, t: float) -> bytes:
    return _frame(t, sip_request("INVITE", call_id=call, branch=f"z9hG4bK-{call}-i", from_tag=f"f-{call}"), UAC, UAS)


def answer(call: str, t: float) -> bytes:
    """200 OK to the INVITE, then the ACK."""
    ok = sip_response(200, call_id=call, branch=f"z9hG4bK-{call}-i", from_tag=f"f-{call}", to_tag=f"t-{call}")
    ack = sip_request("ACK", call_id=call, branch=f"z9hG4bK-{call}-a", from_tag=f"f-{call}", to_tag=f"t-{call}")
    return _frame(t, ok, UAS, UAC) + _frame(t + 0.01, ack, UAC, UAS)


def hangup(call: str, t: float) -> bytes:
    """BYE from the caller and its 200."""
    bye = sip_request("BYE", call_id=call, cseq=2, branch=f"z9hG4bK-{call}-b", from_tag=f"f-{call}", to_tag=f"t-{call}")
    ok = sip_response(200, call_id=call, cseq=2, cseq_method="BYE", branch=f"z9hG4bK-{call}-b", from_tag=f"f-{call}",
                      to_tag=f"t-{call}")
    return _frame(t, bye, UAC, UAS) + _frame(t + 0.01, ok, UAS, UAC)


def call(name: str, t: float) -> bytes:
    """A whole call: INVITE, 200, ACK at t..t+1, BYE and 200 at t+2."""
    return invite(name, t) + answer(name, t + 1) + hangup(name, t + 2)


def filler(t: float) -> bytes:
    """A datagram that is not SIP: packet time goes on, nothing is accounted."""
    return _frame(t, b"\x80\x00" + bytes(30), "10.3.0.9", "10.3.0.8")


def cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sipsniff_acc", *args]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def start(tmp: Path, *args: str, workers: int = 0) -> subprocess.Popen[bytes]:
    """`process -` reading our pipe, JSON lines and stderr to files in ``tmp``, no database."""
    return subprocess.Popen(cmd("process", "-", "--no-db", "-j", str(workers), *args), cwd=tmp, env=env(),
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=(tmp / "stderr").open("wb"))


def send(proc: subprocess.Popen[bytes], data: bytes) -> None:
    stdin: IO[bytes] | None = proc.stdin
    assert stdin is not None
    stdin.write(data)
    stdin.flush()


def wait_for_text(path: Path, text: str, timeout: float = 20.0, count: int = 1) -> str:
    """The file's content once ``text`` appears in it ``count`` times (bounded wait)."""
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if content.count(text) >= count:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not seen {count} time(s) in {path} within {timeout} s: {content[-2000:]!r}")


def finish(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_reading_stdin(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Until the run has taken everything we sent: its main thread is blocked in read(0, ...)
    on the empty pipe (seen twice in a row in /proc/PID/syscall), so every frame before
    was processed."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode})")
        try:
            call = Path(f"/proc/{proc.pid}/syscall").read_text().split()
        except OSError:
            call = []
        seen = seen + 1 if call[:2] == ["0", "0x0"] else 0
        if seen >= 3:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not come back to reading its input within {timeout} s")


def settled(path: Path, text: str) -> None:
    """Write a rules file as an operator does before a SIGHUP: some time before it (its mtime
    set 5 s back), so the reload does not wait for the file to settle (service.SETTLE)."""
    path.write_text(text)
    past = time.time() - 5
    os.utime(path, (past, past))
