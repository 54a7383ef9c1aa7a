"""A durable spool between the engine and a backend that can fail (SQL, RADIUS, Diameter).

Records are appended to an SQLite file in WAL mode with synchronous=FULL: once
``append`` returns, a crash or a SIGKILL cannot lose them (that is the spool's
acknowledgement). A backend's ``deliver`` takes the oldest batch; only after it succeeds
is the batch removed. Delivery is therefore at-least-once, and backends make it
exactly-once by the record's stable id (SQL: a unique column and INSERT ... IGNORE).

When the backend is down, records wait in the spool in order and delivery is retried every
``retry_interval`` seconds (wall clock: this is the I/O side). The spool is bounded: when
full, the producer waits (backpressure) with an alarm on stderr, and gives up with
``SpoolFull`` after ``full_timeout``; what is spooled stays for the next run.
"""

from __future__ import annotations

import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

import orjson

from sipsniff_acc.records import AccRecord

DEFAULT_SPOOL = "sipsniff-acc.spool"
BATCH = 500
FLUSH_INTERVAL = 1.0
RETRY_INTERVAL = 1.0
MAX_RECORDS = 1_000_000  #: per backend (~0.5 GB on disk)


class BackendDown(RuntimeError):
    """The backend could not take a batch now; the message is safe to print (no secrets).
    ``delivered``: how many records of the batch, from its start, did get through."""

    def __init__(self, message: str, delivered: int = 0) -> None:
        super().__init__(message)
        self.delivered = delivered


def deliver_each(records: list[AccRecord], wants: Callable[[AccRecord], bool],
                 send: Callable[[AccRecord], None]) -> None:
    """Send a batch record by record (RADIUS, Diameter); a failure says how many got through."""
    for i, r in enumerate(records):
        if wants(r):
            try:
                send(r)
            except BackendDown as e:
                raise BackendDown(str(e), delivered=i) from None


class RecordRejected(RuntimeError):
    """The backend refused a record for what it holds (data too long, NUL, encoding,
    constraint, Diameter 5xxx, RADIUS attribute too long): retrying cannot help.

    ``index``: the position in the batch of the refused record, when the backend can tell
    (records before it were delivered); None when it cannot (a whole SQL batch refused):
    the spool then bisects the batch to find it. The refused record is set aside in the
    spool's dead-letter table with ``reason``, counted and alarmed; delivery goes on.
    ``reason`` is safe to print (no secrets)."""

    def __init__(self, reason: str, index: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.index = index


class SpoolFull(RuntimeError):
    pass


class Backend(Protocol):
    name: str  #: also the spool's queue name: one queue per backend
    where: str  #: where records go, printable (no password)

    def wants(self, r: AccRecord) -> bool: ...

    def deliver(self, records: list[AccRecord]) -> None: ...

    def close(self) -> None: ...


def to_json(r: AccRecord) -> bytes:
    return orjson.dumps(r.as_dict())


def from_json(data: bytes) -> AccRecord:
    d = orjson.loads(data)
    return AccRecord(
        kind=d["kind"], ts=d["ts"], method=d["method"], from_tag=d["from_tag"], to_tag=d["to_tag"],
        call_id=d["call_id"], code=d["code"], reason=d["reason"], backends=tuple(d["backends"]), table=d["table"],
        extras={b: list(v.items()) for b, v in d["extras"].items()},
        legs=[list(leg.items()) for leg in d["legs"]], cseq=d["cseq"], local=d["local"],
        in_dialog=d.get("in_dialog", False), realm=d.get("realm", ""), record_id=d["id"],
    )


class DurableSpool:
    """An ordered, crash-safe queue per backend, in one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS queue (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                        "backend TEXT NOT NULL, record BLOB NOT NULL, queued REAL NOT NULL DEFAULT 0)")
        self.db.execute("CREATE INDEX IF NOT EXISTS queue_backend ON queue (backend, seq)")

    def append(self, backend: str, records: list[AccRecord]) -> None:
        now = time.time()
        with self._tx():
            self.db.executemany("INSERT INTO queue (backend, record, queued) VALUES (?, ?, ?)",
                                [(backend, to_json(r), now) for r in records])

    def peek(self, backend: str, n: int) -> list[tuple[int, AccRecord]]:
        rows = self.db.execute("SELECT seq, record, queued FROM queue WHERE backend = ? ORDER BY seq LIMIT ?",
                               (backend, n)).fetchall()
        out = []
        for seq, rec, queued in rows:
            r = from_json(rec)
            r.queued_at = queued
            out.append((seq, r))
        return out

    def ack(self, backend: str, upto: int) -> None:
        with self._tx():
            self.db.execute("DELETE FROM queue WHERE backend = ? AND seq <= ?", (backend, upto))

    def count(self, backend: str) -> int:
        return int(self.db.execute("SELECT count(*) FROM queue WHERE backend = ?", (backend,)).fetchone()[0])

    def close(self) -> None:
        self.db.close()

    def _tx(self) -> _Tx:
        return _Tx(self.db)


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


class SpooledEmitter:
    """An emitter: buffer → durable spool → backend, with retry, backpressure and a drain at close."""

    def __init__(self, backend: Backend, spool: DurableSpool, *, batch: int = BATCH,
                 flush_interval: float = FLUSH_INTERVAL, retry_interval: float = RETRY_INTERVAL,
                 max_records: int = MAX_RECORDS, full_timeout: float = 600.0, drain_timeout: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 alarms: IO[str] | None = None) -> None:
        self.backend, self.spool = backend, spool
        self.batch, self.flush_interval, self.retry_interval = batch, flush_interval, retry_interval
        self.max_records, self.full_timeout, self.drain_timeout = max_records, full_timeout, drain_timeout
        self.clock, self.sleep = clock, sleep
        self.alarms = alarms if alarms is not None else sys.stderr
        self.buffer: list[AccRecord] = []
        self.buffered_since = 0.0
        self.down_since: float | None = None
        self.next_try = 0.0
        self.last_error = ""
        self.delivered = 0
        self.spooled = 0
        self.outages = 0
        self._queued = spool.count(backend.name)  #: left by an earlier run: delivered first, in order
        self.recovered = self._queued

    @property
    def pending(self) -> int:
        return self._queued + len(self.buffer)

    def emit(self, records: list[AccRecord]) -> None:
        wanted = [r for r in records if self.backend.wants(r)]
        if not wanted:
            return
        if not self.buffer:
            self.buffered_since = self.clock()
        self.buffer.extend(wanted)
        if len(self.buffer) >= self.batch or self.clock() - self.buffered_since >= self.flush_interval:
            self.flush()

    def flush(self) -> None:
        """Commit the buffer to the spool (waiting while it is full), then deliver what can be."""
        if self.buffer:
            self._wait_for_room(len(self.buffer))
            self.spool.append(self.backend.name, self.buffer)
            self._queued += len(self.buffer)
            self.spooled += len(self.buffer)
            self.buffer = []
        self.deliver()

    def deliver(self) -> bool:
        """Deliver queued batches until empty or the backend fails; True when empty."""
        while self._queued:
            now = self.clock()
            if self.down_since is not None and now < self.next_try:
                return False
            batch = self.spool.peek(self.backend.name, self.batch)
            if not batch:
                self._queued = 0
                break
            try:
                self.backend.deliver([r for _seq, r in batch])
            except BackendDown as e:
                if e.delivered:  # the start of the batch got through: never send it again
                    self.spool.ack(self.backend.name, batch[e.delivered - 1][0])
                    self._queued -= e.delivered
                    self.delivered += e.delivered
                if self.down_since is None:
                    self.down_since = now
                    self.outages += 1
                    print(f"alarm: {self.backend.name} backend down ({e}); {self._queued} record(s) kept in the "
                          f"spool {self.spool.path}, retrying every {self.retry_interval:g} s", file=self.alarms)
                self.last_error = str(e)
                self.next_try = now + self.retry_interval
                return False
            self.spool.ack(self.backend.name, batch[-1][0])
            self._queued -= len(batch)
            self.delivered += len(batch)
            if self.down_since is not None:
                print(f"note: {self.backend.name} backend back after {now - self.down_since:.1f} s; delivering "
                      f"the spooled records", file=self.alarms)
                self.down_since = None
        return True

    def _wait_for_room(self, n: int) -> None:
        if self._queued + n <= self.max_records:
            return
        print(f"alarm: spool full for {self.backend.name} ({self._queued} records, limit {self.max_records}); "
              "reading waits for the backend", file=self.alarms)
        deadline = self.clock() + self.full_timeout
        while self._queued + n > self.max_records:
            if self.clock() >= deadline:
                raise SpoolFull(f"{self.backend.name}: spool full ({self._queued} records) for "
                                f"{self.full_timeout:g} s; the records stay in {self.spool.path}")
            if not self.deliver():
                self.sleep(min(self.retry_interval, max(0.0, self.next_try - self.clock())) or 0.05)

    def close(self) -> None:
        """Spool what is buffered and try to deliver everything for up to drain_timeout seconds."""
        try:
            if self.buffer:
                self.spool.append(self.backend.name, self.buffer)
                self._queued += len(self.buffer)
                self.spooled += len(self.buffer)
                self.buffer = []
            deadline = self.clock() + self.drain_timeout
            while not self.deliver() and self.clock() < deadline:
                self.sleep(max(0.01, min(self.retry_interval, self.next_try - self.clock())))
        finally:
            self.backend.close()
