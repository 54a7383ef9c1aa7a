"""Scale-out on NATS JetStream: the bus format, and the worker's source (``process --consume``).

Sensors (``sipsniff-acc capture … --publish nats://…``, commands/capture.py) publish the SIP
messages they reassemble to the subjects ``<stream>.<partition>``, partition = CRC-32 of the
Call-ID mod N (``pipeline.shard_of``, the hash -j N shards by), so every message of a call
lands on one subject whichever sensor saw it. A worker (``NatsSource``) holds one durable
pull consumer per partition it owns and yields the messages as ``Datagram``s into the same
-j 0 run loop as every other source.

Why a reorder heap: two sensors see two legs of one call and publish at their own pace, so
the stream holds their messages in arrival order, not packet order. Messages are held in a
heap on packet time and released when the worker has caught up with the stream (no message
pending) and the message has been held ``window`` seconds of wall time; a backlog (a restart,
a late worker) is held whole up to ``max_held`` messages, so catching up replays in packet
order. A message older than one already released is counted ``late`` and fed all the same.

Why checkpoints: a message can only be acknowledged once everything it caused is safe: its
records in the spool (a committed SQLite transaction) and the open calls it changed in the
``--state`` file. Every ``CHECKPOINT_EVERY`` seconds the source yields an ``Idle`` (the run
commits its outputs), and when the run comes back for the next item it saves the state, writes
which stream sequences that state covers (``FILE.nats``), then acknowledges them. A worker
killed at any point restarts from the state and is redelivered exactly what the state lacks;
records have stable ids, so a record made twice is inserted once.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import os
import queue
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from sipsniff_acc import stopping
from sipsniff_acc.events import Counters, Datagram, Idle, Transport
from sipsniff_acc.messagerun import TICK, Tick

MAGIC: Final = b"SSA"  #: the bus format's mark
VERSION: Final = 1
#: one NATS message: MAGIC, version, sensor id length, the sensor id, the sensor's packet clock
#: when it published (a heartbeat without records moves a quiet worker's timers), record count
_HEAD = struct.Struct("<3sBB")
_COUNT = struct.Struct("<dH")
#: one SIP message: capture time, frame number, transport, address family (4 or 6), ports,
#: encapsulation text length, provenance text length, payload length; then src, dst, encap
#: text, provenance ("hep:<agent id>" for HEP, else empty), payload
_REC = struct.Struct("<dIBBHHBBI")
TRANSPORTS: Final = (Transport.UDP, Transport.TCP, Transport.SCTP, Transport.TLS, Transport.WS)
_TCODE: Final[dict[str, int]] = {t.value: i for i, t in enumerate(TRANSPORTS)}  # (a str Enum looks up as its text)
MAX_SENSOR_ID: Final = 64
MAX_BATCH_RECORDS: Final = 1000  #: SIP messages in one NATS message, at most
MAX_PAYLOAD: Final = 1 << 20  #: bytes of one SIP message, at most (limits.max_sip_message's default)
DEFAULT_STREAM: Final = "sip"
DEFAULT_DURABLE: Final = "sipsniff"
DEFAULT_WINDOW_MS: Final = 200.0
CHECKPOINT_EVERY: Final = 1.0  #: wall seconds between checkpoints (state saved, messages acknowledged)
HEARTBEAT: Final = 0.5  #: wall seconds of silence between Idles (timers fire, outputs flush)
FETCH_BATCH: Final = 256
MAX_HELD: Final = 100_000  #: SIP messages held in the reorder heap, at most (~100 MB at 1 kB each)
#: bytes of SIP held in the reorder heap, at most: the count alone let a backlog of 1 MB messages
#: (each batch may carry one: MAX_PAYLOAD) hold 100 GB
MAX_HELD_BYTES: Final = 256 << 20
MAX_ACK_PENDING: Final = 20_000  #: NATS messages delivered and not yet acknowledged, per partition
ACK_WAIT: Final = 60.0  #: seconds before the server redelivers an unacknowledged message (skipped: seen)
CONNECT_TIMEOUT: Final = 5.0
#: seconds a bus message's packet time (or a sensor's clock) may be ahead of this worker's clock;
#: past it the message is set aside (``nats_future_time``): the packet time is every timer's clock
MAX_AHEAD: Final = 300.0
CONSUMER_CHECK: Final = 5  #: empty fetches (1 s each) in a row before a look that the partition's consumer is there


class NatsUsageError(Exception):
    """A mistake found before the work: one line for the user (bad URL, unreachable server,
    stream or partitions that do not match)."""


class BadMessage(ValueError):
    """A bus message that is not in our format or breaks its own bounds."""


def parse_servers(url: str, option: str) -> list[str]:
    """``nats://HOST:PORT[,nats://HOST2:PORT…]`` → the server list nats-py takes."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    if not servers:
        raise NatsUsageError(f"{option}: give nats://HOST:PORT")
    for s in servers:
        try:
            p = urlsplit(s)
            port = p.port
        except ValueError:
            raise NatsUsageError(f"{option} {s}: not a nats://HOST:PORT URL") from None
        if p.scheme not in ("nats", "tls") or not p.hostname or port is None:
            raise NatsUsageError(f"{option} {s}: not a nats://HOST:PORT URL (e.g. nats://127.0.0.1:4222)")
    return servers


def parse_partitions(spec: str, option: str = "--partitions") -> list[int]:
    """``0-3`` or ``0,2,5-7`` → sorted partition numbers (at most 4096)."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
            else:
                a = b = int(part)
        except ValueError:
            raise NatsUsageError(f"{option} {spec}: give partitions as 0-3 or 0,2,5-7") from None
        if a < 0 or b < a or b >= 4096:
            raise NatsUsageError(f"{option} {spec}: partitions are 0 to 4095, low-high")
        out.update(range(a, b + 1))
    if not out:
        raise NatsUsageError(f"{option}: give partitions as 0-3 or 0,2,5-7")
    return sorted(out)


def check_name(name: str, option: str) -> str:
    """A stream or durable name NATS takes (no dots, wildcards or spaces)."""
    if not name or len(name) > 64 or any(c in name for c in ".*> \t/\\") or not name.isprintable():
        raise NatsUsageError(f"{option} {name!r}: letters, digits, - and _ only (at most 64)")
    return name


# --- the bus format -------------------------------------------------------------------

def encode_batch(sensor: bytes, clock: float,
                 records: list[tuple[float, int, str, bytes, int, bytes, int, bytes, tuple[str, ...], str]]) -> bytes:
    """Candidates (processrun's tuples) of one partition → one NATS message; a source is kept
    only when it is a HEP agent's (provenance); ``clock``: the sensor's packet time now (no
    records: a heartbeat)."""
    out = [_HEAD.pack(MAGIC, VERSION, len(sensor)), sensor, _COUNT.pack(clock, len(records))]
    pack = _REC.pack
    codes = _TCODE
    for ts, no, transport, src, sport, dst, dport, payload, encap, source in records:
        enc = ",".join(encap).encode()[:255] if encap else b""
        prov = source.encode("utf-8", "replace")[:255] if source[:4] == "hep:" else b""
        out.append(pack(ts, no & 0xFFFFFFFF, codes[transport], 4 if len(src) == 4 else 6,
                        sport, dport, len(enc), len(prov), len(payload)))
        out += (src, dst, enc, prov, payload)
    return b"".join(out)


def decode_batch(data: bytes, max_payload: int = MAX_PAYLOAD) -> tuple[str, float, list[Datagram]]:
    """One NATS message → (sensor id, sensor clock, Datagrams). Every length is checked against the bytes
    that arrived and the format's bounds, never trusted: ``BadMessage`` otherwise."""
    n = len(data)
    if n < _HEAD.size + _COUNT.size:
        raise BadMessage("short")
    magic, version, slen = _HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        raise BadMessage("not a sipsniff-acc bus message")
    if version != VERSION:
        raise BadMessage(f"format version {version}")
    if slen > MAX_SENSOR_ID:
        raise BadMessage("sensor id too long")
    off = _HEAD.size
    if off + slen + _COUNT.size > n:
        raise BadMessage("short")
    sensor = data[off:off + slen].decode("utf-8", "replace")
    off += slen
    clock, count = _COUNT.unpack_from(data, off)
    off += _COUNT.size
    if not (clock == clock and 0 <= clock < 1e11):
        raise BadMessage("bad sensor clock")
    if count > MAX_BATCH_RECORDS or count * _REC.size > n - off:
        raise BadMessage("record count beyond the message")
    out: list[Datagram] = []
    unpack = _REC.unpack_from
    rsize = _REC.size
    for _ in range(count):
        if off + rsize > n:
            raise BadMessage("short record")
        ts, no, tcode, fam, sport, dport, elen, vlen, plen = unpack(data, off)
        off += rsize
        alen = 4 if fam == 4 else 16 if fam == 6 else -1
        if alen < 0 or tcode >= len(TRANSPORTS):
            raise BadMessage("bad address family or transport")
        if plen > max_payload:
            raise BadMessage("payload beyond the message size limit")
        end = off + 2 * alen + elen + vlen + plen
        if end > n:
            raise BadMessage("record beyond the message")
        if not (ts == ts and 0 <= ts < 1e11):  # NaN, negative or absurd capture times
            raise BadMessage("bad capture time")
        src = data[off:off + alen]
        dst = data[off + alen:off + 2 * alen]
        p = off + 2 * alen
        encap = tuple(data[p:p + elen].decode("ascii", "replace").split(",")) if elen else ()
        p += elen
        source = data[p:p + vlen].decode("utf-8", "replace") if vlen else sensor
        payload = data[p + vlen:end]
        off = end
        out.append(Datagram(ts, no, TRANSPORTS[tcode], src, sport, dst, dport, payload, encap, source))
    if off != n:
        raise BadMessage("trailing bytes")
    return sensor, clock, out


# --- an asyncio loop in a thread: nats-py is asyncio, the run loops are not ---------------

class LoopThread:
    """One asyncio event loop in a daemon thread; ``call`` runs a coroutine there and waits."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        """Cancel what still runs there (nats-py's reader, pinger, flusher), then stop the loop."""
        if not self.loop.is_running():
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.call(cancel_all(), 5)
        except Exception:  # noqa: BLE001 - stopping anyway
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def say(line: str) -> None:
    """An alarm or notice line on stderr (never a traceback)."""
    print(line, file=sys.stderr, flush=True)


async def connect(servers: list[str], option: str, name: str, events: dict[str, int],
                  alarm: Callable[[str], None] = say) -> Any:
    """Connect or raise ``NatsUsageError`` (one line): at the start an unreachable server is
    the user's mistake. Afterwards nats-py reconnects forever; each loss is counted and said."""
    import nats  # noqa: PLC0415 - only for the bus
    from nats.errors import NoServersError  # noqa: PLC0415

    nc: Any = None

    async def disconnected() -> None:
        if nc is not None and (nc.is_closed or nc.is_draining):
            return  # our own close
        events["disconnects"] += 1
        alarm(f"alarm: NATS {servers[0]}: connection lost; reconnecting (messages wait, counted)")

    async def reconnected() -> None:
        events["reconnects"] += 1
        alarm(f"NATS {servers[0]}: reconnected")

    async def error(e: Exception) -> None:
        events["errors"] += 1

    try:
        # bounded: with endless reconnects nats-py would also retry the first connect forever
        nc = await asyncio.wait_for(nats.connect(
            servers=servers, name=name, connect_timeout=CONNECT_TIMEOUT, max_reconnect_attempts=-1,
            reconnect_time_wait=0.5, allow_reconnect=True, disconnected_cb=disconnected,
            reconnected_cb=reconnected, error_cb=error), CONNECT_TIMEOUT)
        return nc
    except (NoServersError, OSError, asyncio.TimeoutError, Exception) as e:  # noqa: BLE001 - one line
        raise NatsUsageError(f"{option} {servers[0]}: NATS not reachable ({e.__class__.__name__}); "
                             "is nats-server running with -js?") from None


def stream_partitions(description: str | None) -> int | None:
    """The partition count a stream was made with (in its description), if ours."""
    if description and description.startswith("sipsniff-acc partitions="):
        try:
            return int(description.split("=", 1)[1])
        except ValueError:
            return None
    return None


async def ensure_stream(js: Any, stream: str, partitions: int | None, option: str) -> int:
    """The stream ``<stream>`` with subjects ``<stream>.*``; made when missing (partitions
    given: a sensor). Returns its partition count; a mismatch is one line (``NatsUsageError``)."""
    from nats.js.api import StreamConfig  # noqa: PLC0415
    from nats.js.errors import NotFoundError  # noqa: PLC0415

    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        if partitions is None:
            raise NatsUsageError(f"{option}: no stream {stream!r} on the server yet: start a sensor "
                                 f"(sipsniff-acc capture … --publish … --stream {stream}) first") from None
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.*"],
                                         description=f"sipsniff-acc partitions={partitions}"))
        return partitions
    have = stream_partitions(info.config.description)
    if have is None:
        raise NatsUsageError(f"{option}: stream {stream!r} exists but was not made by sipsniff-acc; "
                             "give another --stream")
    if partitions is not None and partitions != have:
        raise NatsUsageError(f"--partitions {partitions}: stream {stream!r} has {have} partitions; "
                             "every sensor and worker must use the same count")
    return have


# --- the worker's source -------------------------------------------------------------------

@dataclass
class _Entry:
    """One NATS message delivered: acknowledged once all its SIP messages are fed and saved."""

    msg: Any
    sseq: int
    left: int  #: its SIP messages not yet fed to the run


@dataclass
class _Partition:
    sub: Any = None
    pending: dict[int, _Entry] = field(default_factory=dict)  #: by stream sequence, in delivery order
    seen: int = 0  #: the highest stream sequence delivered (a redelivery at or below it is skipped)
    floor: int = 0  #: from the sidecar: every sequence ≤ floor is in the state already
    above: set[int] = field(default_factory=set)  #: and these above it
    caught_up: bool = False  #: the last fetch left nothing pending


@dataclass
class ConsumeStats:
    """Counters of the bus side, for --stats and the summary."""

    nats_messages: int = 0
    sip_messages: int = 0
    late: int = 0  #: released after a message with a later packet time
    held_full: int = 0  #: released early because the reorder heap was full
    bad: int = 0  #: not our format or beyond its bounds: acknowledged and dropped
    future: int = 0  #: SIP messages (and sensor clocks) stamped more than MAX_AHEAD past our clock: set aside
    redelivered_skipped: int = 0  #: already in the state (sidecar) or already held
    acked: int = 0
    checkpoints: int = 0
    fetch_errors: int = 0
    events: dict[str, int] = field(default_factory=lambda: {"disconnects": 0, "reconnects": 0, "errors": 0,
                                                            "consumers_recreated": 0})

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "events"}
        return d | self.events


class NatsSource:
    """``process --consume``: the SIP messages of some partitions, merged in packet time.

    A FrameSource for the run loop (path, size, bytes_read, iteration) that yields Datagram,
    Tick (packet time went on) and Idle (checkpoint or heartbeat). ``bind(acc)`` is called by
    the run with its AccPipeline (the state saved at checkpoints). ``open()`` connects and
    checks before the work; ``close(saved)`` after the run."""

    size = 0

    def __init__(self, url: str, partitions: list[int], state: str, stream: str = DEFAULT_STREAM,
                 durable: str = DEFAULT_DURABLE, window: float = DEFAULT_WINDOW_MS / 1000,
                 max_held: int = MAX_HELD, checkpoint_every: float = CHECKPOINT_EVERY,
                 max_held_bytes: int = MAX_HELD_BYTES,
                 alarm: Callable[[str], None] = say) -> None:
        self.servers = parse_servers(url, "--consume")
        self.path = f"{url} {stream}.{{{','.join(map(str, partitions))}}}"
        self.stream = check_name(stream, "--stream")
        self.durable = check_name(durable, "--durable")
        self.partition_ids = partitions
        self.state = state
        self.sidecar = Path(state + ".nats")
        self.window = window
        self.max_held = max_held
        self.max_held_bytes = max_held_bytes
        self.held_bytes = 0  #: payload bytes in the reorder heap now
        self.checkpoint_every = checkpoint_every
        self.alarm = alarm
        self.stats = ConsumeStats()
        self.parts: dict[int, _Partition] = {p: _Partition() for p in partitions}
        self.inbox: queue.Queue[tuple[int, list[Any]]] = queue.Queue(maxsize=8)  # fetched batches waiting: bounded
        self.acc: Any = None
        self.counters = Counters()  #: the run's (set by the CLI): anomalies nats_* for --stats, summary, /metrics
        self.nc: Any = None
        self.io: LoopThread | None = None
        self.fetchers: list[Any] = []
        self._bytes = 0
        self._running = False
        self.heap: list[tuple[float, int, float, Datagram, _Entry]] = []  #: (packet time, arrival order, wall time, ...)
        self.order = 0
        self.unacked = 0  #: NATS messages fed since the last checkpoint
        self.sensor_clock = float("-inf")  #: the newest packet clock a sensor published
        self.resumed = False  #: a sidecar was read: the consumers restart after its floors

    @property
    def bytes_read(self) -> int:
        return self._bytes

    # -- setup ----------------------------------------------------------------------------
    def open(self) -> None:
        """Connect, check the stream and partitions, bind the durable consumers; read the
        sidecar of the last checkpoint. ``NatsUsageError`` (one line) for every mistake."""
        self._read_sidecar()
        self.io = LoopThread("nats-consume")
        try:
            self.io.call(self._open(), CONNECT_TIMEOUT * 3)
        except NatsUsageError:
            self.io.stop()
            raise
        except Exception as e:  # noqa: BLE001 - the server refused something: one line
            self.io.stop()
            raise NatsUsageError(f"--consume {self.servers[0]}: {e.__class__.__name__}: {e}") from None

    async def _open(self) -> None:
        from nats.js.api import DeliverPolicy  # noqa: PLC0415

        self.nc = await connect(self.servers, "--consume", f"sipsniff-acc worker {self.durable}",
                                self.stats.events, self.alarm)
        js = self.nc.jetstream()
        try:
            total = await ensure_stream(js, self.stream, None, "--consume")
        except BaseException:
            await self.nc.close()
            raise
        beyond = [p for p in self.partition_ids if p >= total]
        if beyond:
            await self.nc.close()
            raise NatsUsageError(f"--partitions: stream {self.stream!r} has partitions 0-{total - 1}; "
                                 f"{beyond[0]} is not one")
        from nats.js.errors import NotFoundError  # noqa: PLC0415

        for p, part in self.parts.items():
            name = f"{self.durable}_{p}"
            start: dict[str, Any] = {"deliver_policy": DeliverPolicy.ALL}
            if self.resumed:
                # The sidecar, not the server's ack floor, says where the state ends: what a killed
                # worker had fetched but not acknowledged would come back only after ack_wait, behind
                # newer messages (out of packet order). So the durable restarts right after the floor.
                try:
                    await js.delete_consumer(self.stream, name)
                except NotFoundError:
                    pass
                start = {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": part.floor + 1}
            part.sub = await self._subscribe(js, p, start)

    async def _subscribe(self, js: Any, p: int, start: dict[str, Any]) -> Any:
        from nats.js.api import AckPolicy, ConsumerConfig  # noqa: PLC0415

        cfg = ConsumerConfig(durable_name=f"{self.durable}_{p}", filter_subject=f"{self.stream}.{p}",
                             ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT,
                             max_ack_pending=MAX_ACK_PENDING, max_deliver=-1, **start)
        return await js.pull_subscribe(f"{self.stream}.{p}", durable=f"{self.durable}_{p}", stream=self.stream,
                                       config=cfg)

    async def _check_consumer(self, p: int, part: _Partition) -> None:
        """A quiet partition's durable consumer still there? Deleted (``nats consumer rm``, a
        cleanup script), its fetches only time out: the partition was read as empty for good,
        its calls never accounted, nothing said. Made again from the first message we did not
        take, with an alarm line (counted ``consumers_recreated``)."""
        from nats.js.api import DeliverPolicy  # noqa: PLC0415
        from nats.js.errors import NotFoundError  # noqa: PLC0415

        js = self.nc.jetstream()
        try:
            await js.consumer_info(self.stream, f"{self.durable}_{p}")
            return
        except NotFoundError:
            pass
        first = max(part.seen, part.floor) + 1
        old, part.sub = part.sub, await self._subscribe(
            js, p, {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": first})
        try:
            await old.unsubscribe()
        except Exception:  # noqa: BLE001 - the old subscription is gone with its consumer
            pass
        self.stats.events["consumers_recreated"] += 1
        self.alarm(f"alarm: --consume: the consumer {self.durable}_{p} of partition {p} was deleted; "
                   f"made again from stream sequence {first}")

    def _read_sidecar(self) -> None:
        try:
            doc = json.loads(self.sidecar.read_text())
            for p, v in doc.get("partitions", {}).items():
                part = self.parts.get(int(p))
                if part is not None:
                    part.floor = int(v["floor"])
                    part.above = {int(x) for x in v["above"]}
            self.resumed = True
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError, OSError) as e:
            self.alarm(f"warning: {self.sidecar}: unreadable ({e}); messages redelivered may be fed twice "
                       "(records are still inserted once)")

    def bind(self, acc: Any) -> None:
        """The run's AccPipeline: what a checkpoint saves."""
        self.acc = acc

    # -- fetching (in the loop thread) --------------------------------------------------------
    async def _fetch(self, p: int, part: _Partition) -> None:
        from nats.errors import TimeoutError as NatsTimeout  # noqa: PLC0415

        inbox = self.inbox
        quiet = 0
        while self._running:
            try:
                msgs = await part.sub.fetch(FETCH_BATCH, timeout=1.0)
                quiet = 0
            except (NatsTimeout, asyncio.TimeoutError):
                part.caught_up = True
                quiet += 1
                if quiet % CONSUMER_CHECK == 0:
                    try:
                        await self._check_consumer(p, part)
                    except asyncio.CancelledError:
                        return
                    except Exception:  # noqa: BLE001 - the server away: counted, looked at again later
                        self.stats.fetch_errors += 1
                continue
            except asyncio.CancelledError:
                return
            except Exception:  # noqa: BLE001 - disconnected, server restarting: counted, retried
                self.stats.fetch_errors += 1
                await asyncio.sleep(0.5)
                continue
            while self._running:
                try:
                    inbox.put_nowait((p, msgs))
                    break
                except queue.Full:  # the run is behind: fetch no more (bounded)
                    await asyncio.sleep(0.01)

    def _start(self) -> None:
        assert self.io is not None
        self._running = True
        self.fetchers = [self.io.submit(self._fetch(p, part)) for p, part in self.parts.items()]

    # -- the stream of items (the run loop's thread) --------------------------------------------
    def __iter__(self) -> Iterator[Datagram | Tick | Idle]:
        if self.io is None:
            self.open()
        self._start()
        heap = self.heap
        pop = heapq.heappop
        last_ts = float("-inf")  #: the packet time of the last message released
        clock = float("-inf")  #: the packet clock the run was given (Ticks, Idles)
        next_tick = float("-inf")
        quiet_since = time.monotonic()  #: wall time of the last release
        last_cp = time.monotonic()
        checkpoint_due = False
        released = 0
        inbox = self.inbox
        parts = self.parts
        st = self.stats
        window = self.window
        while True:
            if checkpoint_due:  # the run came back after our Idle: its records are committed
                checkpoint_due = False
                self._checkpoint()
                last_cp = time.monotonic()
            try:  # block only when there is nothing to do: an empty heap, or one still waiting
                got: tuple[int, list[Any]] | None = (
                    inbox.get_nowait() if released else inbox.get(timeout=0.01 if heap else 0.05))
            except queue.Empty:
                got = None
            now = time.monotonic()
            while got is not None:
                p, msgs = got
                part = parts[p]
                for m in msgs:
                    self._take(part, m, now)
                part.caught_up = self._num_pending(msgs[-1]) == 0 if msgs else True
                got = get_nowait(inbox)
            caught_up = all(pt.caught_up for pt in parts.values())
            released = 0
            while heap and released < 1000:
                ts, _o, arrived, d, entry = heap[0]
                if len(heap) > self.max_held or self.held_bytes > self.max_held_bytes:
                    st.held_full += 1
                    self.counters.anomalies["nats_reorder_full"] += 1
                elif not caught_up or now - arrived < window:
                    break
                pop(heap)
                self.held_bytes -= len(d.payload)
                if ts < last_ts:
                    st.late += 1
                    self.counters.anomalies["nats_reorder_late"] += 1
                else:
                    last_ts = ts
                if ts >= next_tick:  # Ticks at the messages where an offline run ticks at frames
                    if next_tick != float("-inf") and ts > clock:
                        clock = ts
                        yield Tick(ts)
                    next_tick = ts + TICK
                released += 1
                yield d
                # counted fed only once the run came back for more: a stop raised in between
                # (stopping.waiting_on) leaves it unacknowledged, to be redelivered
                entry.left -= 1
                if entry.left == 0:
                    self.unacked += 1
                st.sip_messages += 1
            if released:
                quiet_since = time.monotonic()
            now = time.monotonic()
            if self.unacked and (now - last_cp >= self.checkpoint_every or self.unacked >= MAX_ACK_PENDING // 2):
                checkpoint_due = True
                clock = max(clock, last_ts)
                yield Idle(clock)  # the run commits its outputs, then asks for the next item
            elif not heap and not released and now - quiet_since >= HEARTBEAT:
                # a quiet bus: the sensors' clocks (their heartbeats) move the timers, never
                # beyond what a sensor has seen; the outputs flush
                quiet_since = now
                if self.sensor_clock > clock and self.sensor_clock > last_ts:
                    clock = self.sensor_clock
                if clock != float("-inf"):
                    yield Idle(clock)

    @staticmethod
    def _num_pending(m: Any) -> int:
        try:
            return int(m.metadata.num_pending)
        except Exception:  # noqa: BLE001 - not a JetStream message
            return 0

    def _take(self, part: _Partition, m: Any, now: float) -> None:
        """One delivered NATS message: skipped if the state holds it, else decoded into the heap."""
        st = self.stats
        try:
            sseq = m.metadata.sequence.stream
        except Exception:  # noqa: BLE001 - not a JetStream message: cannot be tracked
            st.bad += 1
            return
        if sseq <= part.seen:  # redelivered (ack_wait passed) while we still hold it
            st.redelivered_skipped += 1
            return
        part.seen = sseq
        if sseq <= part.floor or sseq in part.above:  # in the state already (its ack was lost)
            st.redelivered_skipped += 1
            self._ack([m])
            return
        st.nats_messages += 1
        self._bytes += len(m.data)
        try:
            _sensor, clock, datagrams = decode_batch(m.data)
        except BadMessage:
            st.bad += 1
            self.counters.anomalies["nats_bad_message"] += 1
            self._ack([m])
            return
        limit = time.time() + MAX_AHEAD
        if clock > limit or (datagrams and max(d.ts for d in datagrams) > limit):
            # a sensor's clock far ahead (or someone else's batch stamped 2100): fed, its Tick
            # and the heartbeats after it would fire every timer of every open call at once
            # and count every later message late; set aside, counted, the rest of it fed
            ahead = [d for d in datagrams if d.ts > limit]
            st.future += len(ahead) + (clock > limit)
            self.counters.anomalies["nats_future_time"] += len(ahead) + (clock > limit)
            datagrams = [d for d in datagrams if d.ts <= limit]
            if clock > limit:
                clock = float("-inf")
        if clock > self.sensor_clock:
            self.sensor_clock = clock
        entry = _Entry(m, sseq, len(datagrams))
        part.pending[sseq] = entry
        if not datagrams:  # a heartbeat: fed as it is taken
            self.unacked += 1
            return
        heap = self.heap
        order = self.order
        for d in datagrams:
            heapq.heappush(heap, (d.ts, order, now, d, entry))
            self.held_bytes += len(d.payload)
            order += 1
        self.order = order

    def _checkpoint(self) -> None:
        """State saved, then the sequences it covers, then the acknowledgements."""
        from sipsniff_acc import state as st_mod  # noqa: PLC0415

        if self.acc is None:
            return
        with stopping.locked():
            st_mod.write_state(self.state, self.acc, None)
            self._write_sidecar()
        done: list[Any] = []
        for part in self.parts.values():
            fed = [s for s, e in part.pending.items() if e.left == 0]
            for s in fed:
                done.append(part.pending.pop(s).msg)
        self._ack(done)
        self.unacked = 0
        self.stats.checkpoints += 1

    def _write_sidecar(self) -> None:
        doc: dict[str, Any] = {"version": 1, "partitions": {}}
        for p, part in self.parts.items():
            held = [s for s, e in part.pending.items() if e.left > 0]
            floor = (min(held) - 1) if held else part.seen
            above = sorted(s for s, e in part.pending.items() if e.left == 0 and s > floor)
            doc["partitions"][str(p)] = {"floor": max(floor, part.floor), "above": above}
        tmp = self.sidecar.with_name(self.sidecar.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.sidecar)

    def _ack(self, msgs: list[Any]) -> None:
        if not msgs or self.io is None:
            return
        self.stats.acked += len(msgs)

        async def ack_all() -> None:
            for m in msgs:
                try:
                    await m.ack()
                except Exception:  # noqa: BLE001 - lost ack: redelivered, then skipped by the sidecar
                    self.stats.events["errors"] += 1

        self.io.submit(ack_all())

    def close(self, saved: bool, quiet: bool = False) -> None:
        """After the run. ``saved``: the run saved the state on its way out (a clean stop),
        so every message fed is in it: write the sidecar and acknowledge them."""
        self._running = False
        if self.io is None:
            return
        st = self.stats
        if not quiet:
            self.alarm(f"consume {self.path}: {st.sip_messages} SIP message(s) in {st.nats_messages} NATS message(s), "
                       f"{st.checkpoints} checkpoint(s); {st.late} late, {st.held_full} released early (reorder "
                       f"heap full), {st.bad} bad, {st.redelivered_skipped} redelivered and skipped, "
                       f"{st.fetch_errors} fetch error(s), {st.events['disconnects']} disconnect(s)")
        if saved and self.acc is not None:
            try:
                self._write_sidecar()
                done = [e.msg for part in self.parts.values() for e in part.pending.values() if e.left == 0]
                self._ack(done)
            except OSError as e:
                self.alarm(f"error: {self.sidecar}: {e.strerror or e}")
        try:
            self.io.call(self._close(), 10)
        except Exception:  # noqa: BLE001 - closing a connection that is gone
            pass
        self.io.stop()

    async def _close(self) -> None:
        for f in self.fetchers:
            f.cancel()
        if self.nc is not None:
            try:
                await self.nc.flush(timeout=5)
            except Exception:  # noqa: BLE001
                pass
            await self.nc.close()


def get_nowait(q: queue.Queue[Any]) -> Any:
    try:
        return q.get_nowait()
    except queue.Empty:
        return None



def consumer_from_options(url: str | None, partitions: str | None, durable: str, stream: str, window_ms: float,
                          files: list[str], interface: list[str] | None, state: Any, workers: int,
                          live_option: str | None = None) -> NatsSource:
    """``process --consume``'s options checked together (``NatsUsageError``, one line); the
    connection is made by ``open()``, after the other checks of the command. ``live_option``:
    an option of live captures that was given (meaningless here)."""
    if url is None or partitions is None:
        raise NatsUsageError("--consume nats://HOST:PORT and --partitions (e.g. 0-3) go together")
    if live_option is not None:
        raise NatsUsageError(f"{live_option} goes with --interface, not --consume (a worker runs until stopped)")
    if files or interface:
        raise NatsUsageError("--consume reads from NATS: give no capture files or --interface")
    if state is None:
        raise NatsUsageError("--consume needs --state FILE: the open calls at the last acknowledgement "
                             "(a restarted worker resumes from it)")
    if workers > 0:
        raise NatsUsageError(f"--consume runs in one process (-j 0), not -j {workers}: run more workers "
                             "with other --partitions instead")
    if not 0 <= window_ms <= 60_000:
        raise NatsUsageError(f"--reorder-window {window_ms:g}: 0 to 60000 ms")
    return NatsSource(url, parse_partitions(partitions), str(state), stream, durable, window_ms / 1000)
