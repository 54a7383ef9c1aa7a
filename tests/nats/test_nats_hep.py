"""A HEP sensor on the bus: ``capture --hep-listen … --publish …`` takes HEPv3 (as Kamailio's
siptrace sends it) and a worker accounts it: the same records as an offline run of the
capture the packets came from, each naming the HEP capture agent."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sipsniff_acc.events import Counters, Datagram
from sipsniff_acc.pipeline import CaptureStage
from sipsniff_acc.sources import CaptureReader, open_captures
from tests.nats.natsserver import HOST, NatsServer, free_port, make_stream, nats_server  # noqa: F401 - fixture

hep = pytest.importorskip("sipsniff_acc.sources.hep")
ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "pcaps" / "sample.pcap"
WAIT = 180.0


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sipsniff_acc", *args]


def sip_of(path: Path) -> list[Datagram]:
    stage = CaptureStage(Counters())
    out = [d for f in open_captures([CaptureReader(str(path))], []) for d in stage.feed(f) if isinstance(d, Datagram)]
    return out + [d for d in stage.finish() if isinstance(d, Datagram)]


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_hep_sensor_to_worker(tmp_path: Path, nats_server: NatsServer) -> None:
    offline = tmp_path / "offline.jsonl"
    p = subprocess.run(cli("process", str(SAMPLE), "--no-db", "--log", "none", "--jsonl", str(offline), "-q"),
                       capture_output=True, timeout=WAIT, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    want = records(offline)
    assert want

    asyncio.run(make_stream(nats_server.url, 2))  # as a sensor would: the worker checks it at start
    port = free_port()
    sensor = subprocess.Popen(cli("capture", "--hep-listen", f"udp://{HOST}:{port}", "--hep-password", "k3y",
                                  "--publish", nats_server.url, "--partitions", "2", "--sensor-id", "hep1"),
                              stderr=subprocess.PIPE)
    out = tmp_path / "worker.jsonl"
    worker = subprocess.Popen(cli("process", "--consume", nats_server.url, "--partitions", "0-1",
                                  "--state", str(tmp_path / "w.state"), "--no-db", "--log", "none",
                                  "--jsonl", str(out)), stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        deadline = time.monotonic() + WAIT
        assert sensor.stderr is not None
        assert sensor.stderr.readline().startswith(b"listening on"), "the sensor did not start"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for d in sip_of(SAMPLE):
                s.sendto(hep.encode(d.ts, d.transport, d.src, d.sport, d.dst, d.dport, d.payload, agent_id=2001,
                                    password=b"k3y"), (HOST, port))
                s.sendto(hep.encode(d.ts, d.transport, d.src, d.sport, d.dst, d.dport, b"INVITE x",
                                    agent_id=66, password=b"wrong"), (HOST, port))  # never gets in
                time.sleep(0.002)
        while time.monotonic() < deadline and (not out.exists() or len(records(out)) < len(want)):
            time.sleep(0.2)
        time.sleep(1.5)  # anything extra would land now
    finally:
        for proc in (sensor, worker):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (sensor, worker):
            try:
                proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
    got = records(out)
    assert all(r.get("capture_agent") == "2001" for r in got), got[:2]
    strip = lambda rs: sorted(json.dumps({k: v for k, v in r.items() if k != "capture_agent"}, sort_keys=True)
                              for r in rs)  # noqa: E731
    assert strip(got) == strip(want)
