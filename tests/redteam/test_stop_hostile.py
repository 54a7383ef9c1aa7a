"""Red team on stopping with --state: `tcpdump -w - | sipsniff-acc process - --state FILE` in
a quiet spell. The run loop takes a stop only at a frame's end (so calls are saved whole),
but a pipe with nothing to read yields no frame: a SIGTERM then waits for the next packet
(for ever, in silence), and a second SIGTERM exits at once without saving the state: every
open call is lost. Live sources are not affected the same way (an Idle every 100 ms is a
safe point), but a second signal within that 100 ms loses the state too.

Fixed (S11): stopping.waiting_on marks the source's next() (nothing in flight there), the
handler raises right there, and processrun saves in its ``except Stopped`` (-j 0) or the
round loop's stop path (-j N)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.ops.calls import finish, header, invite, send, start, wait_reading_stdin


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_in_a_quiet_pipe_stops_and_saves(tmp_path: Path, workers: int) -> None:
    proc = start(tmp_path, "--log", "none", "-q", "--state", "st", workers=workers)
    try:
        send(proc, header() + b"".join(invite(f"c{i}", 1000 + i * 0.001) for i in range(100)))
        wait_reading_stdin(proc)
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(5)
        except subprocess.TimeoutExpired:
            rc = None
    finally:
        if proc.poll() is None:
            finish(proc)
    assert rc == 143, "still running 5 s after SIGTERM, waiting for a packet"
    saved = [tmp_path / "st"] if not workers else [tmp_path / f"st.{k}" for k in range(workers)]
    assert sum(f.stat().st_size for f in saved if f.exists()) > 1000, "the open calls were not saved"
    time.sleep(0)
