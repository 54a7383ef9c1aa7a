"""Feeding a capture to `sipsniff-acc process -` a piece at a time, so a test can break a
backend (stop its server, kill us) in the middle of a run."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol


def pcap_chunks(path: Path, n: int) -> list[bytes]:
    """The pcap's global header + its records cut into n pieces on record boundaries."""
    data = path.read_bytes()
    order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    offsets, pos = [], 24
    while pos + 16 <= len(data):
        offsets.append(pos)
        pos += 16 + struct.unpack_from(order + "I", data, pos + 8)[0]
    cuts = [offsets[len(offsets) * i // n] for i in range(1, n)]
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def wait_for(cond, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def streaming(tmp: Path, url: str | None, rules_file: Path) -> subprocess.Popen[bytes]:
    """`process -` reading the test's pipe; url None: no database (RADIUS/Diameter only)."""
    db = ["--db-url", url] if url else ["--no-db"]
    return subprocess.Popen(
        [sys.executable, "-m", "sipsniff_acc", "process", "-", "--rules", str(rules_file), *db,
         "--log", "none", "--spool", str(tmp / "spool"), "--drain-timeout", "60"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=open(tmp / "stderr", "wb"), cwd=tmp)  # noqa: SIM115


def feed(proc: subprocess.Popen[bytes], chunks: list[bytes], pause: float) -> None:
    assert proc.stdin is not None
    for c in chunks:
        proc.stdin.write(c)
        proc.stdin.flush()
        time.sleep(pause)


class Restartable(Protocol):
    def stop(self) -> None: ...

    def start(self) -> None: ...


def run_through_outage(tmp: Path, capture: Path, rules_file: Path, server: Restartable, arrived: Callable[[], int],
                       url: str | None = None) -> str:
    """Stream ``capture`` to `process -`; once records have arrived at ``server``, stop it, feed on,
    restart it, feed the rest. The run must end well; its stderr is returned."""
    chunks = pcap_chunks(capture, 10)
    proc = streaming(tmp, url, rules_file)
    feed(proc, chunks[:3], 0.6)
    wait_for(lambda: arrived() > 0)
    server.stop()  # the outage: records wait in the spool
    feed(proc, chunks[3:7], 0.6)
    server.start()
    feed(proc, chunks[7:], 0.3)
    assert proc.stdin is not None
    proc.stdin.close()
    err_file = tmp / "stderr"
    assert proc.wait(180) == 0, err_file.read_text()
    err = err_file.read_text()
    assert "backend down" in err and "backend back after" in err
    return err
