"""Red team on process --consume: a batch on our subjects stamped 2100, and a sensor whose
clock is far ahead (its heartbeat says 2100). Fed, the first made the worker's packet clock
jump 74 years and the heartbeat kept it there: every later message of every sensor was
counted late and went to a tracker whose timers had all fired. Now a bus message or a sensor
clock more than MAX_AHEAD past the worker's own clock is set aside, counted
``nats_future_time``, and the real traffic after it is accounted as an offline run does."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sipsniff_acc.sources.nats import encode_batch
from tests.nats.natsserver import NatsServer, make_stream, nats_server, wait_for_lines  # noqa: F401 - fixture
from tests.nats.test_nats_usage import run

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "pcaps" / "sample.pcap"
YEAR_2100 = 4102444800.0
OPTIONS = (b"OPTIONS sip:x@10.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK-future\r\n"
           b"From: <sip:a@10.0.0.1>;tag=1\r\nTo: <sip:x@10.0.0.2>\r\nCall-ID: from-2100\r\nCSeq: 1 OPTIONS\r\n"
           b"Content-Length: 0\r\n\r\n")



def sample_through(nats_server: NatsServer, worker: subprocess.Popen[bytes], first: Callable[[], None], out: Path,
                   lines: int, timeout: float, tmp_path: Path) -> str:
    """``first`` (the attack), then the sample published by a sensor, the worker given time to
    write ``lines`` records, then stopped by SIGTERM: its stderr, which has no traceback."""
    try:
        first()
        p = run("capture", "-r", str(SAMPLE), "--publish", nats_server.url, "--partitions", "2", "-q", cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        wait_for_lines(out, lines, timeout)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 128 + signal.SIGTERM
    err = worker.stderr.read().decode()  # type: ignore[union-attr]
    assert "Traceback" not in err, err
    return err

def test_a_batch_and_a_sensor_clock_from_2100_are_set_aside(tmp_path: Path, nats_server: NatsServer) -> None:
    offline = tmp_path / "offline.jsonl"
    p = run("process", str(SAMPLE), "--no-db", "--log", "none", "--jsonl", str(offline), "-q", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    want = sorted(offline.read_text().splitlines())
    assert want
    asyncio.run(make_stream(nats_server.url, 2))
    out, stats = tmp_path / "w.jsonl", tmp_path / "stats.json"
    worker = subprocess.Popen([sys.executable, "-m", "sipsniff_acc", "process", "--consume", nats_server.url,
                               "--partitions", "0-1", "--state", str(tmp_path / "w.state"), "--no-db", "--log", "none",
                               "--jsonl", str(out), "--stats", str(stats)], stderr=subprocess.PIPE, cwd=tmp_path)

    async def from_2100() -> None:
        import nats
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        rec = (YEAR_2100, 1, "UDP", bytes([10, 0, 0, 1]), 5060, bytes([10, 0, 0, 2]), 5060, OPTIONS, (), "")
        await js.publish("sip.0", encode_batch(b"evil", YEAR_2100, [rec]))  # a record from 2100
        await js.publish("sip.1", encode_batch(b"ahead", YEAR_2100, []))  # a heartbeat from 2100
        await nc.close()

    def first() -> None:
        asyncio.run(from_2100())
        time.sleep(3)  # the worker takes them, its window passes, a heartbeat goes by

    sample_through(nats_server, worker, first, out, len(want), 90, tmp_path)
    anomalies = json.loads(stats.read_text())["anomalies"]
    assert anomalies.get("nats_future_time") == 3, anomalies  # the record and the two sensor clocks, counted
    assert "nats_reorder_late" not in anomalies, anomalies  # the sensors' real traffic was not late
    assert sorted(out.read_text().splitlines()) == want  # and accounted as offline


def test_a_deleted_consumer_is_made_again_and_its_partition_accounted(tmp_path: Path,
                                                                       nats_server: NatsServer) -> None:
    """An operator (or a cleanup script) deletes a worker's durable consumer mid-run: its
    fetches only timed out, the partition read as empty for good, half the calls never
    accounted and nothing said. Now it is made again from the first message not taken, with
    an alarm line, and every call is accounted as offline."""
    offline = tmp_path / "offline.jsonl"
    p = run("process", str(SAMPLE), "--no-db", "--log", "none", "--jsonl", str(offline), "-q", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    want = sorted(offline.read_text().splitlines())
    asyncio.run(make_stream(nats_server.url, 2))
    out = tmp_path / "w.jsonl"
    worker = subprocess.Popen([sys.executable, "-m", "sipsniff_acc", "process", "--consume", nats_server.url,
                               "--partitions", "0-1", "--state", str(tmp_path / "w.state"), "--no-db", "--log", "none",
                               "--jsonl", str(out)], stderr=subprocess.PIPE, cwd=tmp_path)

    async def delete() -> None:
        import nats
        nc = await nats.connect(nats_server.url)
        deadline = time.monotonic() + 60
        while True:  # once the worker made it
            try:
                await nc.jetstream().delete_consumer("sip", "sipsniff_1")
                break
            except Exception:  # noqa: BLE001 - not there yet
                assert time.monotonic() < deadline, "the worker never made its consumer"
                await asyncio.sleep(0.2)
        await nc.close()

    err = sample_through(nats_server, worker, lambda: asyncio.run(delete()), out, len(want), 120, tmp_path)
    assert "the consumer sipsniff_1 of partition 1 was deleted; made again" in err, err
    assert sorted(out.read_text().splitlines()) == want


def test_a_backlog_of_big_messages_is_held_by_bytes_not_only_by_count(tmp_path: Path,
                                                                      nats_server: NatsServer) -> None:
    """The reorder heap was bounded by count only (100,000 messages): a backlog of 1 MB SIP
    messages (each batch may carry one) would be held whole, 100 GB. Now past
    ``max_held_bytes`` the oldest go on early, counted ``nats_reorder_full``, and none is lost."""
    from sipsniff_acc.events import Datagram
    from sipsniff_acc.sources.nats import NatsSource

    asyncio.run(make_stream(nats_server.url, 1))
    n, size = 1500, 10_000

    async def backlog() -> None:
        import nats
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        for i in range(n):
            sip = OPTIONS.replace(b"from-2100", b"big-%d" % i) + b"x" * size
            rec = (1_700_000_000.0 + i / 1000, i, "UDP", bytes([10, 0, 0, 1]), 5060, bytes([10, 0, 0, 2]), 5060, sip,
                   (), "")
            await js.publish("sip.0", encode_batch(b"big", rec[0], [rec]))
        await nc.close()

    asyncio.run(backlog())
    src = NatsSource(nats_server.url, [0], str(tmp_path / "w.state"), max_held_bytes=1 << 20)
    src.open()
    got = 0
    try:
        deadline = time.monotonic() + 120
        for item in src:
            if isinstance(item, Datagram):
                got += 1
                if got == n:
                    break
            assert time.monotonic() < deadline, f"{got} of {n} messages in 120 s"
    finally:
        src.close(saved=False, quiet=True)
    assert got == n  # none lost
    assert src.counters.anomalies["nats_reorder_full"] > 0  # the byte bound let the oldest go early, counted
