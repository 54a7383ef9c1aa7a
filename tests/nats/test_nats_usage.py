"""The bus's user mistakes (one line, exit 2, before any work) and the bus format's bounds."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sipsniff_acc.events import Transport
from sipsniff_acc.sources.nats import BadMessage, decode_batch, encode_batch, parse_partitions, NatsUsageError
from tests.nats.natsserver import NatsServer, free_port, make_stream, nats_server, wait_for_lines  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "pcaps" / "sample.pcap"


def run(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sipsniff_acc", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def one_line(p: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def test_unreachable_nats_is_one_line_at_start(tmp_path: Path) -> None:
    dead = f"nats://127.0.13.1:{free_port()}"  # nobody listens there
    p = run("capture", "-r", str(SAMPLE), "--publish", dead)
    assert p.returncode == 2 and "NATS not reachable" in one_line(p)
    p = run("process", "--consume", dead, "--partitions", "0-3", "--state", str(tmp_path / "s"), "--log", "none",
            "--spool", str(tmp_path / "spool"), "--db-url", f"sqlite:///{tmp_path}/acc.db", cwd=tmp_path)
    assert p.returncode == 2 and "NATS not reachable" in one_line(p)
    assert not (tmp_path / "acc.db").exists()  # checked before the outputs were opened


@pytest.mark.parametrize(("args", "says"), [
    (["--consume", "nats://127.0.13.1:4222"], "go together"),
    (["--consume", "nats://127.0.13.1:4222", "--partitions", "0-3"], "needs --state"),
    (["--consume", "http://x:1", "--partitions", "0-3", "--state", "s"], "not a nats://HOST:PORT"),
    (["--consume", "nats://127.0.13.1:4222", "--partitions", "3-1", "--state", "s"], "partitions"),
    (["--consume", "nats://127.0.13.1:4222", "--partitions", "0-3", "--state", "s", "-j", "2"], "one process"),
    (["--consume", "nats://127.0.13.1:4222", "--partitions", "0", "--state", "s", "--stream", "a.b"], "--stream"),
    (["--consume", "nats://127.0.13.1:4222", "--partitions", "0", "--state", "s", str(SAMPLE)], "no capture files"),
    (["--consume", "nats://127.0.13.1:4222", "--partitions", "0", "--state", "s", "--duration", "1"], "--duration"),
])
def test_consume_option_mistakes(tmp_path: Path, args: list[str], says: str) -> None:
    p = run("process", *args, "--log", "none", cwd=tmp_path)
    assert p.returncode == 2 and says in one_line(p)


def test_stream_and_partitions_must_agree(tmp_path: Path, nats_server: NatsServer) -> None:
    p = run("process", "--consume", nats_server.url, "--partitions", "0", "--state", "s", "--log", "none", cwd=tmp_path)
    assert p.returncode == 2 and "no stream 'sip'" in one_line(p)
    p = run("capture", "-r", str(SAMPLE), "--publish", nats_server.url, "--partitions", "4", "-q")
    assert p.returncode == 0, p.stderr
    p = run("capture", "-r", str(SAMPLE), "--publish", nats_server.url, "--partitions", "8")
    assert p.returncode == 2 and "has 4 partitions" in one_line(p)
    p = run("process", "--consume", nats_server.url, "--partitions", "2-5", "--state", "s", "--log", "none",
            cwd=tmp_path)
    assert p.returncode == 2 and "4 is not one" in one_line(p)


def test_nats_down_mid_run_is_counted_and_retried(tmp_path: Path, nats_server: NatsServer) -> None:
    """The server goes away and comes back under a sensor reading a pipe and a worker consuming:
    alarm lines, the sensor's messages wait in its buffer and are published after the
    reconnect (exit 0, all acknowledged), the worker's fetches fail (counted) and resume; its
    records are those of the offline run."""
    offline = tmp_path / "offline.jsonl"
    p = run("process", str(SAMPLE), "--no-db", "--log", "none", "--jsonl", str(offline), "-q", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    want = sorted(offline.read_text().splitlines())
    asyncio.run(make_stream(nats_server.url, 2))
    data = SAMPLE.read_bytes()
    records = _pcap_records(data)
    half = len(records) // 2
    stats = tmp_path / "stats.json"
    out = tmp_path / "worker.jsonl"
    worker = subprocess.Popen([sys.executable, "-m", "sipsniff_acc", "process", "--consume", nats_server.url,
                               "--partitions", "0-1", "--state", str(tmp_path / "w.state"), "--no-db", "--log", "none",
                               "--jsonl", str(out)], stderr=subprocess.PIPE, cwd=tmp_path)
    sensor = subprocess.Popen([sys.executable, "-m", "sipsniff_acc", "capture", "-", "--publish", nats_server.url,
                               "--partitions", "2", "--sensor-id", "pipe", "--stats", str(stats)],
                              stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert sensor.stdin is not None and sensor.stderr is not None and worker.stderr is not None
    try:
        sensor.stdin.write(data[:24] + b"".join(records[:half]))
        sensor.stdin.flush()
        time.sleep(3)  # published (not asserted on time: the totals below are)
        nats_server.stop()
        sensor.stdin.write(b"".join(records[half:]))
        sensor.stdin.flush()
        time.sleep(2)
        nats_server.start()
        sensor.stdin.close()
        assert sensor.wait(180) == 0
        wait_for_lines(out, len(want), 180)
    finally:
        for proc in (sensor, worker):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if proc is worker else signal.SIGKILL)
            proc.wait(60)
    err = sensor.stderr.read().decode()
    assert "alarm: NATS" in err and "connection lost" in err, err
    doc = json.loads(stats.read_text())
    assert doc["published"] == doc["sip_messages"] > 0 and doc["unacknowledged"] == 0 and doc["dropped"] == 0, doc
    assert doc["disconnects"] >= 1
    werr = worker.stderr.read().decode()
    assert "connection lost" in werr and "reconnected" in werr, werr
    assert sorted(out.read_text().splitlines()) == want


def _pcap_records(data: bytes) -> list[bytes]:
    import struct
    out, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack_from("<I", data, off + 8)[0]
        out.append(data[off:off + 16 + incl])
        off += 16 + incl
    return out


def test_partitions_spec() -> None:
    assert parse_partitions("0-3") == [0, 1, 2, 3]
    assert parse_partitions("5,0-1,1") == [0, 1, 5]
    for bad in ("", "a", "3-1", "-1", "4096", "0-"):
        with pytest.raises(NatsUsageError):
            parse_partitions(bad)


def test_bus_format_round_trip_and_bounds() -> None:
    rec = (1.5e9, 7, "UDP", b"\x0a\x00\x00\x01", 5060, b"\x0a\x00\x00\x02", 5070, b"INVITE sip:a SIP/2.0\r\n\r\n",
           ("eth", "ip4"), "file.pcap")
    data = encode_batch(b"s1", 1.6e9, [rec, rec[:3] + (bytes(16), 1, bytes(range(16)), 2, b"x", (), "hep:2001")])
    sensor, clock, ds = decode_batch(data)
    assert sensor == "s1" and clock == 1.6e9 and len(ds) == 2
    assert ds[0].source == "s1" and ds[1].source == "hep:2001"  # a HEP agent's provenance goes through
    d = ds[0]
    assert (d.ts, d.no, d.transport, d.src, d.sport, d.dport, d.payload, d.encap) == (
        1.5e9, 7, Transport.UDP, rec[3], 5060, 5070, rec[7], ("eth", "ip4"))
    assert ds[1].dst == bytes(range(16))
    # every cut of the message, and every single-byte change of its lengths, is refused or decoded whole
    for n in range(len(data)):
        with pytest.raises(BadMessage):
            decode_batch(data[:n])
    with pytest.raises(BadMessage):
        decode_batch(data + b"\0")
    with pytest.raises(BadMessage):
        decode_batch(b"XYZ" + data[3:])
    with pytest.raises(BadMessage):
        decode_batch(data[:3] + b"\x02" + data[4:])  # another version
    with pytest.raises(BadMessage):  # a payload length beyond the bound
        decode_batch(data, max_payload=5)
    for i in range(len(data)):
        mutated = bytearray(data)
        mutated[i] ^= 0xFF
        try:
            _s, _c, got = decode_batch(bytes(mutated))
        except BadMessage:
            continue
        assert sum(len(x.payload) for x in got) <= len(data)


def test_bad_bus_messages_are_counted_and_dropped(tmp_path: Path, nats_server: NatsServer) -> None:
    """Someone else's bytes on our subjects: counted (anomaly nats_bad_message in --stats),
    acknowledged, dropped; the good messages around them are accounted as offline."""
    offline = tmp_path / "offline.jsonl"
    p = run("process", str(SAMPLE), "--no-db", "--log", "none", "--jsonl", str(offline), "-q", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    want = sorted(offline.read_text().splitlines())
    asyncio.run(make_stream(nats_server.url, 2))

    async def junk() -> None:
        import nats
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        good = encode_batch(b"x", 1.0, [(1.0, 1, "UDP", bytes(4), 1, bytes(4), 2, b"OPTIONS", (), "")])
        for data in (b"", b"hello", b"SSA\x01\x05x", good[:-3], good[:4] + b"\xff" * 40):
            await js.publish("sip.0", data)
        await nc.close()

    asyncio.run(junk())
    p = run("capture", "-r", str(SAMPLE), "--publish", nats_server.url, "--partitions", "2", "-q")
    assert p.returncode == 0, p.stderr
    out, stats = tmp_path / "w.jsonl", tmp_path / "stats.json"
    worker = subprocess.Popen([sys.executable, "-m", "sipsniff_acc", "process", "--consume", nats_server.url,
                               "--partitions", "0-1", "--state", str(tmp_path / "w.state"), "--no-db", "--log", "none",
                               "--jsonl", str(out), "--stats", str(stats)], stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        wait_for_lines(out, len(want), 180)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 128 + signal.SIGTERM
    assert sorted(out.read_text().splitlines()) == want
    assert json.loads(stats.read_text())["anomalies"].get("nats_bad_message") == 5
