"""A real ``nats-server -js`` on loopback for the scale-out tests: a temp store directory, a
port the OS chose on 127.0.13.1, stopped by its PID. ``stop()``/``start()`` simulate an
outage (the store survives, as a real server's would)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_program
from tests.servers import stop_process

HOST = "127.0.13.1"
START_TIMEOUT = 30.0


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class NatsServer:
    def __init__(self) -> None:
        self.binary = require_program("nats-server")
        self.dir = Path(tempfile.mkdtemp(prefix="sipsniff-nats-"))
        self.port = free_port()
        self.url = f"nats://{HOST}:{self.port}"
        self.log = self.dir / "log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-js", "-a", HOST, "-p", str(self.port),
                                          "-sd", str(self.dir / "store")], stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log.read_text(errors='replace')[-1500:]}")
            if "Server is ready" in self.log.read_text(errors="replace"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"nats-server not ready within {START_TIMEOUT} s")

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM)
        # the log's "ready" line must be a new one at the next start
        self.log.write_text("")


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    server = NatsServer()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


async def make_stream(url: str, partitions: int) -> None:
    """The stream as a sensor makes it (a worker checks it at start)."""
    import nats

    from sipsniff_acc.sources.nats import ensure_stream
    nc = await nats.connect(url)
    try:
        await ensure_stream(nc.jetstream(), "sip", partitions, "--publish")
    finally:
        await nc.close()


def wait_for_lines(out: Path, n: int, timeout: float) -> None:
    """Until a worker's JSON-lines file holds ``n`` lines (bounded), then a second for any extra."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < n):
        time.sleep(0.2)
    time.sleep(1)
