"""``sipsniff-acc capture``: a sensor. It reads captures, an interface or HEP, reassembles SIP
as ``process`` does, and publishes every SIP message to NATS JetStream for the workers
(``process --consume``), partitioned by the Call-ID hash that -j N shards by.

Why batches: a JetStream publish costs a round trip and an ack; SIP messages of one partition
go out together (up to BATCH_RECORDS, or every FLUSH_EVERY wall seconds), one ack for many.

Why a bounded buffer: NATS may be slow or down. Every message stays counted in the buffer
until its ack; a publish not acked within ACK_TIMEOUT is sent again (``Nats-Msg-Id`` makes
JetStream drop the copy, so a retry never doubles a message). Past ``--buffer`` messages a
capture file waits (nothing lost); a live interface or HEP cannot wait, so the newest batch is
dropped and counted, with one alarm line per outage. Never a crash; exit 3 if anything was
dropped or left unacknowledged at the end (after ``--drain-timeout``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Annotated, Any

import typer

from sipsniff_acc import stopping
from sipsniff_acc.events import Counters, Datagram, Frame, Idle
from sipsniff_acc.messagerun import _TEXT
from sipsniff_acc.outfiles import write_private_or_say
from sipsniff_acc.pipeline import CaptureStage, shard_of
from sipsniff_acc.sources.nats import (
    DEFAULT_STREAM, MAX_BATCH_RECORDS, LoopThread, NatsUsageError, check_name, connect, encode_batch,
    ensure_stream, parse_servers,
)
from sipsniff_acc.sysloglines import escape

BATCH_RECORDS = 200  #: SIP messages in one NATS message, at most
BATCH_BYTES = 256 * 1024  #: payload bytes in one NATS message, about at most
FLUSH_EVERY = 0.02  #: wall seconds a message waits in its partition's batch, at most
HEARTBEAT = 1.0  #: wall seconds between heartbeats on a partition with nothing to publish
MAX_IN_FLIGHT = 256  #: NATS messages published and not yet acknowledged
ACK_TIMEOUT = 5.0  #: seconds to wait for a publish's ack before sending it again
EXIT_USAGE = 2
EXIT_INPUT = 1
EXIT_LOST = 3


class Publisher:
    """Batches to ``<stream>.<partition>`` with acks, at most ``buffer`` SIP messages held
    (queued or in flight). Runs its asyncio loop in a thread; ``put`` is called by the reader."""

    def __init__(self, url: str, stream: str, partitions: int, sensor: str, buffer: int, wait_when_full: bool) -> None:
        self.servers = parse_servers(url, "--publish")
        self.stream, self.partitions, self.sensor = stream, partitions, sensor
        self.buffer, self.wait_when_full = buffer, wait_when_full
        self.lock = threading.Lock()
        self.queue: deque[tuple[int, bytes, int, str]] = deque()  #: (partition, data, SIP messages, msg id)
        self.held = 0  #: SIP messages queued or in flight
        self.published = 0  #: SIP messages acknowledged by JetStream
        self.nats_messages = 0  #: NATS messages acknowledged
        self.heartbeats = 0
        self.dropped = 0  #: SIP messages dropped because the buffer was full (live sources)
        self.retries = 0  #: publishes sent again (no ack in time, or refused)
        self.events = {"disconnects": 0, "reconnects": 0, "errors": 0}
        self.outage = False  #: an alarm said the buffer is full; said again when it drains
        self.boot = f"{sensor}-{time.time_ns():x}"
        self.seq = 0
        self.io = LoopThread("nats-publish")
        self.nc: Any = None
        self.js: Any = None
        self.inflight: dict[str, tuple[float, Any, tuple[int, bytes, int, str]]] = {}
        self.wake: asyncio.Event | None = None
        self.task: Any = None

    def open(self) -> None:
        """Connect and make or check the stream: ``NatsUsageError`` (one line) if it cannot."""
        try:
            self.io.call(self._open(), 30)
        except NatsUsageError:
            self.io.stop()
            raise
        except Exception as e:  # noqa: BLE001 - the server refused: one line
            self.io.stop()
            raise NatsUsageError(f"--publish {self.servers[0]}: {e.__class__.__name__}: {e}") from None
        self.task = self.io.submit(self._pump())

    async def _open(self) -> None:
        self.nc = await connect(self.servers, "--publish", f"sipsniff-acc sensor {self.sensor}", self.events)
        self.js = self.nc.jetstream(publish_async_max_pending=MAX_IN_FLIGHT)
        try:
            await ensure_stream(self.js, self.stream, self.partitions, "--publish")
        except BaseException:
            await self.nc.close()
            raise
        self.wake = asyncio.Event()

    def put(self, partition: int, data: bytes, count: int) -> bool:
        """Queue one batch; False if it was dropped (buffer full and a live source)."""
        while True:
            with self.lock:
                if self.held + count <= self.buffer or not self.held:
                    self.seq += 1
                    self.queue.append((partition, data, count, f"{self.boot}-{self.seq}"))
                    self.held += count
                    if self.outage and self.held <= self.buffer // 2:
                        self.outage = False
                        print(f"NATS {self.servers[0]}: publishing again ({self.dropped} SIP message(s) dropped "
                              "so far)", file=sys.stderr, flush=True)
                    break
                full_alarm = not self.outage
                self.outage = True
            if full_alarm:
                print(f"alarm: NATS {self.servers[0]}: {self.held} SIP message(s) wait for acks (--buffer "
                      f"{self.buffer}); " + ("reading waits" if self.wait_when_full else
                                             "new messages are dropped and counted"), file=sys.stderr, flush=True)
            if not self.wait_when_full:
                self.dropped += count
                return False
            if stopping.STATE.signum:
                self.dropped += count
                return False
            time.sleep(0.01)
        if self.wake is not None:
            self.io.loop.call_soon_threadsafe(self.wake.set)
        return True

    async def _pump(self) -> None:
        """Send what is queued, bounded in flight; resend what is not acked in time."""
        from nats.js.errors import TooManyStalledMsgsError  # noqa: PLC0415

        assert self.wake is not None
        while True:
            self._expire()
            with self.lock:
                item = self.queue.popleft() if self.queue else None
            if item is None:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), 0.2)
                except asyncio.TimeoutError:
                    pass
                continue
            p, data, count, mid = item
            try:
                fut = await self.js.publish_async(f"{self.stream}.{p}", data, wait_stall=1.0,
                                                  headers={"Nats-Msg-Id": mid})
            except asyncio.CancelledError:
                raise
            except (TooManyStalledMsgsError, Exception):  # noqa: BLE001 - down, stalled: again later
                self.retries += 1
                with self.lock:
                    self.queue.appendleft(item)
                await asyncio.sleep(0.2)
                continue
            self.inflight[mid] = (time.monotonic(), fut, item)
            fut.add_done_callback(lambda f, it=item: self._done(f, it))

    def _done(self, fut: Any, item: tuple[int, bytes, int, str]) -> None:
        if self.inflight.pop(item[3], None) is None:
            return  # expired and requeued already
        if fut.cancelled() or fut.exception() is not None:
            self.retries += 1
            with self.lock:
                self.queue.appendleft(item)
            return
        with self.lock:
            self.held -= item[2]
            self.published += item[2]
            self.nats_messages += 1
            if not item[2]:
                self.heartbeats += 1

    def _expire(self) -> None:
        now = time.monotonic()
        old = [mid for mid, (t, _f, _i) in self.inflight.items() if now - t > ACK_TIMEOUT]
        for mid in old:
            _t, fut, item = self.inflight.pop(mid)
            fut.cancel()  # frees its place in flight
            self.retries += 1
            with self.lock:
                self.queue.appendleft(item)

    def drain(self, timeout: float) -> bool:
        """Wait until everything queued is acknowledged, at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if not self.held and not self.queue and not self.inflight:
                    return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()

        async def _close() -> None:
            if self.nc is not None:
                try:
                    await self.nc.close()
                except Exception:  # noqa: BLE001 - a connection already gone
                    pass

        try:
            self.io.call(_close(), 10)
        except Exception:  # noqa: BLE001
            pass
        self.io.stop()


class Batcher:
    """Per-partition batches of SIP messages; flushed by size, by age, and on heartbeats."""

    def __init__(self, pub: Publisher, sensor: bytes, partitions: int) -> None:
        self.pub, self.sensor, self.n = pub, sensor, partitions
        self.parts: list[list[Any]] = [[] for _ in range(partitions)]
        self.sizes = [0] * partitions
        self.first = [0.0] * partitions
        self.sent_at = [0.0] * partitions
        self.clock = 0.0  #: packet time: the newest capture time seen
        self.messages = 0
        self.lost = 0

    def add(self, d: Datagram) -> None:
        p = shard_of(d.payload, self.n)
        batch = self.parts[p]
        if not batch:
            self.first[p] = time.monotonic()
        batch.append((d.ts, d.no, _TEXT[d.transport], d.src, d.sport, d.dst, d.dport, d.payload, d.encap, d.source))
        self.sizes[p] += len(d.payload)
        self.messages += 1
        if d.ts > self.clock:
            self.clock = d.ts
        if len(batch) >= BATCH_RECORDS or self.sizes[p] >= BATCH_BYTES:
            self.flush(p)

    def flush(self, p: int) -> None:
        batch = self.parts[p]
        self.parts[p], self.sizes[p] = [], 0
        self.sent_at[p] = time.monotonic()
        for i in range(0, len(batch), MAX_BATCH_RECORDS):
            part = batch[i:i + MAX_BATCH_RECORDS]
            if not self.pub.put(p, encode_batch(self.sensor, self.clock, part), len(part)):
                self.lost += len(part)

    def poll(self, heartbeat: bool = False) -> None:
        """Batches older than FLUSH_EVERY go; a partition quiet for HEARTBEAT gets the clock."""
        now = time.monotonic()
        for p in range(self.n):
            if self.parts[p]:
                if now - self.first[p] >= FLUSH_EVERY:
                    self.flush(p)
            elif heartbeat and self.clock and now - self.sent_at[p] >= HEARTBEAT:
                self.sent_at[p] = now
                self.pub.put(p, encode_batch(self.sensor, self.clock, []), 0)

    def finish(self) -> None:
        for p in range(self.n):
            if self.parts[p]:
                self.flush(p)
            self.sent_at[p] = 0.0
        self.poll(heartbeat=True)  # the last clock to every partition: workers' timers reach it


def capture(
    files: Annotated[list[str] | None, typer.Argument(help="pcap/pcapng files (.gz too), directories, or - for stdin")] = None,
    read: Annotated[list[str] | None, typer.Option("--read-file", "-r", help="a capture to read (repeatable)")] = None,
    interface: Annotated[list[str] | None, typer.Option("--interface", "-i", help="capture live from this interface (repeatable); until stopped")] = None,
    capture_filter: Annotated[str | None, typer.Option("--filter", "-f", help="live: BPF capture filter as in tcpdump")] = None,
    hep_listen: Annotated[list[str] | None, typer.Option("--hep-listen", help="take HEP from udp://ADDR:PORT or tcp://ADDR:PORT (repeatable)")] = None,
    hep_password: Annotated[str | None, typer.Option("--hep-password", help="HEP: the auth key senders must carry")] = None,
    publish: Annotated[str | None, typer.Option("--publish", help="NATS JetStream server(s): nats://HOST:PORT[,nats://…]")] = None,
    sensor_id: Annotated[str | None, typer.Option("--sensor-id", help="this sensor's name on the bus (default: the host name)")] = None,
    partitions: Annotated[int, typer.Option("--partitions", help="partitions of the stream (calls by Call-ID hash); the same on every sensor and worker")] = 16,
    stream: Annotated[str, typer.Option("--stream", help="JetStream stream; subjects STREAM.0 … STREAM.N-1")] = DEFAULT_STREAM,
    buffer: Annotated[int, typer.Option("--buffer", help="SIP messages held while NATS is slow or down (files wait beyond; live drops, counted)")] = 100_000,
    drain_timeout: Annotated[float, typer.Option("--drain-timeout", help="seconds to wait for the last acks at the end")] = 60.0,
    stats: Annotated[Path | None, typer.Option("--stats", help="write the counters as JSON to this file (created 0600)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no summary on stderr")] = False,
) -> None:
    """A sensor: publish the SIP messages of captures, an interface or HEP to NATS JetStream
    for `process --consume` workers.

    Example: sipsniff-acc capture -i eth1 --publish nats://10.0.0.5:4222 --sensor-id span1 --partitions 16
    """
    from sipsniff_acc.cli import _open_sources, usage_error  # noqa: PLC0415 - cli registers this command

    stopping.before_run()
    if publish is None:
        raise usage_error("--publish nats://HOST:PORT is required (where the workers consume)")
    sensor = sensor_id if sensor_id is not None else socket.gethostname()
    try:
        parse_servers(publish, "--publish")
        check_name(stream, "--stream")
        if not 0 < len(sensor.encode()) <= 64 or not sensor.isprintable():
            raise NatsUsageError(f"--sensor-id {sensor!r}: 1 to 64 printable bytes")
        if not 1 <= partitions <= 4096:
            raise NatsUsageError(f"--partitions {partitions}: 1 to 4096")
        if buffer < 1000:
            raise NatsUsageError(f"--buffer {buffer}: at least 1000 SIP messages")
        if not drain_timeout >= 0:
            raise NatsUsageError("--drain-timeout: seconds, 0 or more")
    except NatsUsageError as e:
        raise usage_error(escape(str(e))) from None
    files = [*(read or ()), *(files or ())]
    counters = Counters()
    sources: list[Any]
    hep = None
    if hep_listen:
        if files or interface:
            raise usage_error("give capture files, --interface or --hep-listen, one of them")
        try:
            from sipsniff_acc.sources.hep import HepListener, HepUsageError  # noqa: PLC0415
        except ImportError:
            raise usage_error("--hep-listen: this build has no HEP input") from None
        try:
            hep = HepListener(list(hep_listen), hep_password, on_open=None if quiet else _listening)
        except HepUsageError as e:
            raise usage_error(str(e)) from None
        hep.counters = counters
        sources = [hep]
    else:
        if hep_password is not None:
            raise usage_error("--hep-password goes with --hep-listen")
        sources = _open_sources(files, interface, None, None, quiet, capture_filter)
    live = bool(interface) or hep is not None
    pub = Publisher(publish, stream, partitions, sensor, buffer, wait_when_full=not live)
    try:
        pub.open()
    except NatsUsageError as e:
        raise usage_error(escape(str(e))) from None
    from sipsniff_acc.sources import SourceError, open_captures  # noqa: PLC0415

    errors: list[SourceError] = []
    batcher = Batcher(pub, sensor.encode(), partitions)
    stage = CaptureStage(counters)
    stopped = 0
    frames = iter(sources[0]) if hep is not None else open_captures(sources, errors)
    with stopping.Watch([], 0.0) as stop:
        try:
            _pump(frames, stage, batcher, stop)
        except (KeyboardInterrupt, stopping.Stopped) as e:
            stopped = e.signum if isinstance(e, stopping.Stopped) else signal.SIGINT
        if stop.signum:
            stopped = stop.signum
        stop.closing = True
        batcher.finish()
        drained = pub.drain(drain_timeout)
    pub.close()
    unacked = pub.held
    doc = {"sensor": sensor, "stream": stream, "partitions": partitions, "frames": counters.frames,
           "sip_messages": batcher.messages, "published": pub.published, "nats_messages": pub.nats_messages,
           "heartbeats": pub.heartbeats, "dropped": pub.dropped, "unacknowledged": unacked,
           "retries": pub.retries, "skipped": dict(counters.skipped), "anomalies": dict(counters.anomalies)} \
        | pub.events | {"errors": [str(e) for e in errors]}
    failed = False
    if stats is not None and not write_private_or_say(stats, json.dumps(doc, indent=1) + "\n", f"--stats {stats}"):
        failed = True
    if not quiet:
        print(f"capture {escape(sensor)}: {batcher.messages} SIP message(s) read, {pub.published} published to "
              f"{escape(stream)}.0-{partitions - 1} and acknowledged in {pub.nats_messages - pub.heartbeats} NATS "
              f"message(s); {pub.dropped} dropped (buffer full), {unacked} unacknowledged, {pub.retries} resent",
              file=sys.stderr)
    for err in errors:
        print(f"error: {escape(str(err))}", file=sys.stderr)
    if stopped:
        raise typer.Exit(128 + stopped)
    if pub.dropped or unacked or not drained or failed:
        if unacked:
            print(f"error: NATS {pub.servers[0]}: {unacked} SIP message(s) not acknowledged within "
                  f"--drain-timeout {drain_timeout:g} s", file=sys.stderr)
        raise typer.Exit(EXIT_LOST)
    if errors:
        raise typer.Exit(EXIT_INPUT)


def _pump(frames: Any, stage: CaptureStage, batcher: Batcher, stop: Any) -> None:
    """Frames (or HEP's Datagrams) → SIP messages → batches; a stop is taken between frames."""
    feed = stage.feed
    add = batcher.add
    release = getattr(stage, "advance", None)
    clock = time.monotonic
    next_poll = clock() + FLUSH_EVERY
    for item in frames:
        cls = item.__class__
        if cls is Frame:
            for d in feed(item):
                if d.__class__ is Datagram:
                    add(d)
        elif cls is Datagram:  # HEP: whole SIP messages already
            add(item)
        elif cls is Idle:
            if release is not None:
                for d in release(item.ts):
                    if d.__class__ is Datagram:
                        add(d)
            if batcher.messages and item.ts > batcher.clock:
                # a live source's clock in silence: the heartbeats carry it (not before the first
                # message: HEP's clock before any packet is our wall clock, not the sender's)
                batcher.clock = item.ts
            batcher.poll(heartbeat=True)
        if clock() >= next_poll:  # batches out within FLUSH_EVERY at any rate (~50 ns a look)
            batcher.poll(heartbeat=True)
            next_poll = clock() + FLUSH_EVERY
        if stop.signum:
            return
    for d in stage.finish():
        if d.__class__ is Datagram:
            add(d)


def _listening(addresses: str) -> None:
    """tcpdump's start line: the sockets are bound, packets from now on are taken."""
    print(f"listening on {addresses}", file=sys.stderr, flush=True)


def register(app: typer.Typer) -> None:
    """Add ``capture`` to the command line."""
    app.command("capture")(capture)
