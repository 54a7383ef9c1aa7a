"""A durable spool between the engine and a backend that can fail (SQL, RADIUS, Diameter): a ledger.

Records are appended to an SQLite file in WAL mode with synchronous=FULL: once ``append``
returns, a crash or a SIGKILL cannot lose them (that is the spool's acknowledgement). A
backend's ``deliver`` takes the oldest batch; only after it succeeds is the batch removed.
Delivery is therefore at-least-once, and backends make it exactly-once by the record's
stable id (SQL: a unique column and INSERT ... ON CONFLICT DO NOTHING).

Why a ledger and not a queue per backend type: every entry is keyed by its *destination*
(``Backend.name``: kind + address without secrets, e.g. ``sql:postgresql+psycopg://acc@db/acc``)
and is self-describing (a backend that can render, like SQL, stores the finished rows: table,
columns, values), so a later run with other rules or another URL can neither break on it nor
send it elsewhere: it is left alone, and one line says how to deliver it.

Errors: ``BackendDown`` is transient (retried every ``retry_interval`` s, wall clock: this is
the I/O side); ``RecordRejected`` is about one record: the batch is bisected, the rest is
delivered in order and the refused record moves to the ``dead`` table with the backend's
reason (counted, alarmed; ``sipsniff-acc spool`` shows, exports and retries them). A row that
cannot be decoded is dead-lettered too. A full disk stops intake (``SpoolDiskFull``) and
loses nothing the spool had accepted. The spool is bounded: when full, the producer waits
(backpressure) and gives up with ``SpoolFull`` after ``full_timeout``.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import orjson

from sipsniff_acc.records import AccRecord

DEFAULT_SPOOL = "sipsniff-acc.spool"
BATCH = 500
FLUSH_INTERVAL = 1.0
RETRY_INTERVAL = 1.0
MAX_RECORDS = 1_000_000  #: per destination (~0.5 GB on disk)
SCHEMA_VERSION = 2  #: 1: queue keyed by backend type, records only (before issue 10)
RESERVE_BYTES = 8 << 20  #: intake stops when less is free under the spool: room left for the buffer + WAL
MIN_RESERVE = 1 << 20  #: ... or an eighth of a small filesystem, at least this
ALARM_LINES = 5  #: dead-letter alarms printed one by one per run; the rest are counted at close


class BackendDown(RuntimeError):
    """The backend could not take a batch now; the message is safe to print (no secrets).
    ``delivered``: how many records of the batch, from its start, did get through."""

    def __init__(self, message: str, delivered: int = 0) -> None:
        super().__init__(message)
        self.delivered = delivered


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
    """Intake stops: the spool reached its bound (or the disk is full); what it holds is safe."""


class SpoolDiskFull(SpoolFull):
    """The filesystem under the spool is full: nothing more can be accepted."""


class SpoolError(sqlite3.DatabaseError):
    """The spool file cannot be used (not a spool, corrupt, another format); one line, no traceback."""


class Backend(Protocol):
    name: str  #: the destination: the spool's queue key (kind + address, no secrets)
    where: str  #: where records go, printable (no password)

    def wants(self, r: AccRecord) -> bool: ...

    def deliver(self, records: list[AccRecord]) -> None: ...

    def close(self) -> None: ...


class RenderingBackend(Backend, Protocol):
    """A backend whose spooled entries are already rendered (SQL rows): delivered without rules."""

    def render(self, r: AccRecord) -> dict[str, Any]: ...

    def deliver_entries(self, entries: list[dict[str, Any]]) -> None: ...


def dumps(obj: object) -> bytes:
    """orjson, or the standard library for what orjson refuses (an integer of 64 bits or more)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode()


def loads(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)  # big integers; anything else raises ValueError again


def to_json(r: AccRecord) -> bytes:
    return dumps(r.as_dict())


def record_from_dict(d: dict[str, Any]) -> AccRecord:
    """An AccRecord from its as_dict(); KeyError/TypeError/AttributeError when it is not one."""
    return AccRecord(
        kind=d["kind"], ts=d["ts"], method=d["method"], from_tag=d["from_tag"], to_tag=d["to_tag"],
        call_id=d["call_id"], code=d["code"], reason=d["reason"], backends=tuple(d["backends"]), table=d["table"],
        extras={b: list(v.items()) for b, v in d["extras"].items()},
        legs=[list(leg.items()) for leg in d["legs"]], cseq=d["cseq"], local=d["local"],
        in_dialog=d.get("in_dialog", False), realm=d.get("realm", ""), record_id=d["id"],
        capture_gaps=d.get("capture_gaps", False),
    )


def from_json(data: bytes) -> AccRecord:
    return record_from_dict(loads(data))


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    code = getattr(e, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "database or disk is full" in str(e)


def create_private(path: str | Path) -> None:
    """Create an empty file readable by its owner only (0600), unless it already exists: spools
    and SQLite files hold billing data (SQLite gives its -wal/-journal the same mode)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


@dataclass(slots=True)
class Entry:
    """One spooled record: its queue position, the stored document, when it was queued."""

    seq: int
    doc: dict[str, Any]
    queued: float


class DurableSpool:
    """Ordered, crash-safe queues keyed by destination, plus a dead-letter table, in one SQLite file."""

    def __init__(self, path: str | Path, create: bool = True, reserve_bytes: int | None = None) -> None:
        self.path = str(path)
        self.reserve_bytes = reserve_bytes
        if not create and not os.path.isfile(self.path):
            raise SpoolError(f"{self.path}: no spool file here (give --spool PATH)")
        try:
            if create:
                create_private(self.path)
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self._schema(create)
        except SpoolError:
            raise
        except sqlite3.Error as e:
            raise SpoolError(f"{self.path}: not a usable spool ({e}); move it aside") from None
        except OSError as e:
            raise SpoolError(f"{self.path}: cannot open the spool: {e.strerror or e}") from None
        self.claimed: set[str] = set()
        self._noted = False

    def _schema(self, create: bool) -> None:
        names = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "meta" in names:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            version = int(row[0]) if row and str(row[0]).isdigit() else 0
            if version != SCHEMA_VERSION:
                newer = version > SCHEMA_VERSION
                raise SpoolError(f"{self.path}: spool format {version or '?'}, this sipsniff-acc reads format "
                                 f"{SCHEMA_VERSION}: {'use a newer sipsniff-acc' if newer else 'move it aside'}")
            return
        if "queue" in names:  # format 1: keyed by backend type, records needing the rules: destination unknown
            raise SpoolError(f"{self.path}: spool format 1 (keyed by backend type, written before records kept "
                             "their destination): deliver it with the sipsniff-acc that wrote it, or move it aside")
        if names - {"sqlite_sequence"} or not create:
            raise SpoolError(f"{self.path}: not a sipsniff-acc spool (tables: {', '.join(sorted(names)) or 'none'})")
        with self._tx():
            self.db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            self.db.execute("CREATE TABLE queue (seq INTEGER PRIMARY KEY AUTOINCREMENT, backend TEXT NOT NULL, "
                            "record BLOB NOT NULL, queued REAL NOT NULL DEFAULT 0)")
            self.db.execute("CREATE INDEX queue_backend ON queue (backend, seq)")
            self.db.execute("CREATE TABLE dead (seq INTEGER PRIMARY KEY AUTOINCREMENT, backend TEXT NOT NULL, "
                            "record BLOB NOT NULL, queued REAL NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL)")
            self.db.execute("CREATE INDEX dead_backend ON dead (backend, seq)")

    # --- intake -------------------------------------------------------------------------
    def append(self, backend: str, records: list[AccRecord]) -> None:
        """Spool records as themselves (for backends that render at delivery: RADIUS, Diameter)."""
        self.append_docs(backend, [dumps({"record": r.as_dict()}) for r in records])

    def append_docs(self, backend: str, docs: list[bytes], dead: Sequence[tuple[bytes, str]] = ()) -> None:
        """One transaction; SpoolDiskFull when the filesystem is full (nothing of it was stored).
        ``dead``: (document, reason) of records refused before they could be queued (they could
        not be rendered): straight to the dead letters, in the same transaction."""
        now = time.time()
        try:
            with self._tx():
                self.db.executemany("INSERT INTO queue (backend, record, queued) VALUES (?, ?, ?)",
                                    [(backend, d, now) for d in docs])
                if dead:
                    self.db.executemany("INSERT INTO dead (backend, record, queued, reason, at) VALUES (?, ?, ?, ?, ?)",
                                        [(backend, d, now, reason, now) for d, reason in dead])
        except (sqlite3.Error, OSError) as e:
            if _is_disk_full(e):
                raise SpoolDiskFull(f"spool {self.path}: the disk is full; intake stopped ({len(docs) + len(dead)} record(s) "
                                    "not accepted; everything accepted before is safe in the spool)") from None
            raise

    def check_room(self, n: int) -> None:
        """Stop intake *before* the filesystem is full (SpoolDiskFull), so that what was accepted
        so far (the emitter's buffer included) can still be written at close."""
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        reserve = self.reserve_bytes
        if reserve is None:
            reserve = max(MIN_RESERVE, min(RESERVE_BYTES, st.f_blocks * st.f_frsize // 8))
        if free < reserve:
            raise SpoolDiskFull(f"spool {self.path}: the disk is full ({free >> 10} KiB free, "
                                f"{reserve >> 10} KiB kept in reserve); intake stopped, everything "
                                f"accepted is in the spool ({n} record(s) buffered are written to it at exit)")

    # --- delivery -----------------------------------------------------------------------
    def peek_entries(self, backend: str, n: int, check: Callable[[dict[str, Any]], object] | None = None,
                     on_dead: Callable[[int, str], None] | None = None) -> list[Entry]:
        """The oldest n entries; one that cannot be decoded (or fails ``check``) is dead-lettered
        (and reported to ``on_dead(seq, reason)``), never fatal."""
        while True:
            rows = self.db.execute("SELECT seq, record, queued FROM queue WHERE backend = ? ORDER BY seq LIMIT ?",
                                   (backend, n)).fetchall()
            out: list[Entry] = []
            bad = False
            for seq, blob, queued in rows:
                try:
                    doc = loads(blob)
                    if not isinstance(doc, dict):
                        raise ValueError("not a JSON object")
                    if check is not None:
                        check(doc)
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    reason = f"unreadable spool entry ({type(e).__name__}: {str(e)[:120]})"
                    self.bury(backend, [seq], reason)
                    if on_dead is not None:
                        on_dead(seq, reason)
                    bad = True
                    continue
                out.append(Entry(seq, doc, float(queued)))
            if not bad or len(rows) < n:
                return out

    def peek(self, backend: str, n: int) -> list[tuple[int, AccRecord]]:
        out = []
        for e in self.peek_entries(backend, n, lambda d: record_from_dict(d["record"])):
            r = record_from_dict(e.doc["record"])
            r.queued_at = e.queued
            out.append((e.seq, r))
        return out

    def ack(self, backend: str, upto: int) -> None:
        with self._tx():
            self.db.execute("DELETE FROM queue WHERE backend = ? AND seq <= ?", (backend, upto))

    def bury(self, backend: str, seqs: list[int], reason: str) -> None:
        """Move entries to the dead-letter table with the reason and the time."""
        now = time.time()
        with self._tx():
            for seq in seqs:
                self.db.execute("INSERT INTO dead (backend, record, queued, reason, at) SELECT backend, record, "
                                "queued, ?, ? FROM queue WHERE backend = ? AND seq = ?", (reason, now, backend, seq))
                self.db.execute("DELETE FROM queue WHERE backend = ? AND seq = ?", (backend, seq))

    def count(self, backend: str) -> int:
        return int(self.db.execute("SELECT count(*) FROM queue WHERE backend = ?", (backend,)).fetchone()[0])

    # --- the ledger's views (sipsniff-acc spool) ------------------------------------------
    def claim(self, backend: str) -> None:
        """This run delivers to ``backend``; other destinations' entries are left alone."""
        self.claimed.add(backend)

    def pending(self) -> dict[str, int]:
        return {d: int(n) for d, n in self.db.execute("SELECT backend, count(*) FROM queue GROUP BY backend")}

    def dead_reasons(self) -> dict[str, Counter[str]]:
        out: dict[str, Counter[str]] = {}
        for d, reason, n in self.db.execute("SELECT backend, reason, count(*) FROM dead GROUP BY backend, reason"):
            out.setdefault(d, Counter())[reason] = int(n)
        return out

    def note_unclaimed(self, out: IO[str]) -> None:
        """Once per run: one line per destination this run does not deliver to, with how to deliver it."""
        if self._noted:
            return
        self._noted = True
        for dest, n in sorted(self.pending().items()):
            if dest not in self.claimed:
                print(f"note: {n} record(s) in the spool {self.path} are for {dest}, not this run's "
                      f"destination: left alone; deliver them with {how_to_deliver(dest, self.path)}", file=out)

    def rows(self, table: str, backend: str | None = None, ids: list[int] | None = None
             ) -> Iterator[tuple[int, str, bytes, float, str | None, float | None]]:
        """(seq, destination, stored document, queued, reason, at) of the queue or of the dead letters."""
        cols = "seq, backend, record, queued, NULL, NULL" if table == "queue" else \
            "seq, backend, record, queued, reason, at"
        sql = f"SELECT {cols} FROM {table} WHERE 1=1"  # noqa: S608 - fixed names
        args: list[object] = []
        if backend is not None:
            sql += " AND backend = ?"
            args.append(backend)
        if ids:
            sql += f" AND seq IN ({','.join('?' * len(ids))})"
            args.extend(ids)
        yield from self.db.execute(sql + " ORDER BY seq", args)

    def retry(self, backend: str | None = None, ids: list[int] | None = None) -> dict[str, int]:
        """Dead letters back to the end of their destination's queue; how many per destination."""
        moved: Counter[str] = Counter()
        with self._tx():
            for seq, dest, blob, queued, _reason, _at in list(self.rows("dead", backend, ids)):
                self.db.execute("INSERT INTO queue (backend, record, queued) VALUES (?, ?, ?)", (dest, blob, queued))
                self.db.execute("DELETE FROM dead WHERE seq = ?", (seq,))
                moved[dest] += 1
        return dict(moved)

    def close(self) -> None:
        self.db.close()

    def _tx(self) -> _Tx:
        return _Tx(self.db)


def how_to_deliver(dest: str, spool: str) -> str:
    """The command that delivers a destination's entries (SQL: the URL is in the key)."""
    kind, _, address = dest.partition(":")
    if kind == "sql":
        return f"`sipsniff-acc deliver --spool {spool} --db-url '{address}'` (add --db-password-file if it needs one)"
    return f"`sipsniff-acc deliver --spool {spool} --rules <the rules.yaml that configures {dest}>`"


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
            return
        try:  # SQLite may have rolled back itself (disk full): nothing left to undo
            self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass


class SpooledEmitter:
    """An emitter: buffer → durable spool → backend, with retry, backpressure, dead letters and a drain at close."""

    def __init__(self, backend: Backend, spool: DurableSpool, *, batch: int = BATCH,
                 flush_interval: float = FLUSH_INTERVAL, retry_interval: float = RETRY_INTERVAL,
                 max_records: int = MAX_RECORDS, full_timeout: float = 600.0, drain_timeout: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 alarms: IO[str] | None = None) -> None:
        self.backend, self.spool = backend, spool
        self.label: str = getattr(backend, "kind", backend.name)  #: short name for messages ("db", "radius")
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
        self.dead_lettered = 0  #: records set aside this run (refused by the backend or unreadable)
        self.dead_reasons: Counter[str] = Counter()
        self.lost = 0  #: records neither spooled (disk full) nor delivered: counted, never silent
        self.spool_error = ""  #: the spool cannot be written (disk full): stop trying for this run
        self._probe = 0  #: batch size while bisecting a refused batch; 0 = not bisecting
        self._suspect_end = 0  #: last seq of the batch being bisected
        self._render: Callable[[AccRecord], dict[str, Any]] | None = getattr(backend, "render", None)
        spool.claim(backend.name)
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
            self.spool.check_room(len(self.buffer))
            self._append(self.buffer)
            self.buffer = []
        self.deliver()

    def tick(self) -> None:
        """The run's clock, called in silence too (records out within 1 s): the buffer goes to
        the spool and the backend now, and a backend that is down is retried when due, instead
        of waiting for the next record to arrive."""
        if self.spool_error:
            return  # the spool cannot be written this run (said once): the close counts what is left
        if self.buffer:
            self.flush()
        elif self._queued and (self.down_since is None or self.clock() >= self.next_try):
            self.deliver()

    def _append(self, records: list[AccRecord]) -> None:
        """Spool the records, each rendered on its own: one that cannot be rendered for this
        backend (a time outside what a DATETIME holds, ...) goes to the dead letters with its
        reason, in the same transaction, and takes no other record down."""
        docs, dead = self._documents(records)
        try:
            self.spool.append_docs(self.backend.name, docs, [(d, reason) for _rid, d, reason in dead])
        except SpoolDiskFull as e:
            self.spool_error = str(e)
            raise
        self._queued += len(docs)
        self.spooled += len(docs)
        for rid, _d, reason in dead:
            self._counted_dead(rid, reason, queued=False)

    def _documents(self, records: list[AccRecord]) -> tuple[list[bytes], list[tuple[str, bytes, str]]]:
        """The spool's documents, and (id, document, reason) of the records that cannot be rendered."""
        render = self._render
        docs: list[bytes] = []
        dead: list[tuple[str, bytes, str]] = []
        for r in records:
            try:
                docs.append(dumps({"record": r.as_dict()} if render is None else render(r)))
            except Exception as e:  # noqa: BLE001 - one record's problem, whatever it is, is that record's
                reason = e.reason if isinstance(e, RecordRejected) else \
                    f"cannot be rendered ({type(e).__name__}: {str(e)[:200]})"
                dead.append((r.record_id, _unrendered(r, reason), reason))
        return docs, dead

    def _check(self, doc: dict[str, Any]) -> object:
        check = getattr(self.backend, "check_entry", None)
        if self._render is not None and check is not None:
            return check(doc)
        if self._render is None:
            return record_from_dict(doc["record"])
        return None

    def deliver(self) -> bool:
        """Deliver queued batches until empty or the backend fails; True when empty."""
        self.spool.note_unclaimed(self.alarms)
        while self._queued:
            now = self.clock()
            if self.down_since is not None and now < self.next_try:
                return False
            try:
                return self._deliver_some(now)
            except _Again:
                continue
            except (sqlite3.Error, OSError) as e:  # the spool itself (disk full on ack): stop, keep what is there
                self.spool_error = self.spool_error or f"spool {self.spool.path}: {e}"
                self.last_error = self.spool_error
                return False
        return True

    def _deliver_some(self, now: float) -> bool:
        size = self._probe or self.batch
        entries = self.spool.peek_entries(self.backend.name, size, self._check, self._unreadable)
        if not entries:
            self._queued = self.spool.count(self.backend.name)
            if self._queued:
                raise _Again
            return True
        try:
            if self._render is not None:
                self.backend.deliver_entries([e.doc for e in entries])  # type: ignore[attr-defined]
            else:
                records = []
                for e in entries:
                    r = record_from_dict(e.doc["record"])
                    r.queued_at = e.queued
                    records.append(r)
                self.backend.deliver(records)
        except BackendDown as e:
            if e.delivered:  # the start of the batch got through: never send it again
                self._ack(entries[:e.delivered])
            if self.down_since is None:
                self.down_since = now
                self.outages += 1
                print(f"alarm: {self.label} backend down ({e}); {self._queued} record(s) kept in the "
                      f"spool {self.spool.path}, retrying every {self.retry_interval:g} s", file=self.alarms)
            self.last_error = str(e)
            self.next_try = now + self.retry_interval
            return False
        except RecordRejected as e:
            self._back_up(now)
            if e.index is not None and 0 <= e.index < len(entries):
                self._ack(entries[:e.index])
                self._dead(entries[e.index], e.reason)
                self._probe = 0
            elif len(entries) == 1:
                self._dead(entries[0], e.reason)
                self._probe = 0
            else:  # somewhere in the batch: halve it until the refused record is alone
                self._probe = max(1, len(entries) // 2)
                self._suspect_end = max(self._suspect_end, entries[-1].seq)
            raise _Again from None
        self._ack(entries)
        if self._probe and entries[-1].seq >= self._suspect_end:
            self._probe = 0  # past the refused batch: full batches again
        self._back_up(now)
        raise _Again

    def _back_up(self, now: float) -> None:
        if self.down_since is not None:
            print(f"note: {self.label} backend back after {now - self.down_since:.1f} s; delivering "
                  f"the spooled records", file=self.alarms)
            self.down_since = None

    def _ack(self, entries: list[Entry]) -> None:
        if entries:
            self.spool.ack(self.backend.name, entries[-1].seq)
            self._queued -= len(entries)
            self.delivered += len(entries)

    def _dead(self, entry: Entry, reason: str) -> None:
        self.spool.bury(self.backend.name, [entry.seq], reason)
        self._counted_dead(entry.doc.get("id") or (entry.doc.get("record") or {}).get("id", "?"), reason)

    def _unreadable(self, seq: int, reason: str) -> None:
        self._counted_dead(f"#{seq}", reason)

    def _counted_dead(self, rid: object, reason: str, queued: bool = True) -> None:
        if queued:
            self._queued -= 1
        self.dead_lettered += 1
        self.dead_reasons[reason] += 1
        if self.dead_lettered <= ALARM_LINES:
            print(f"alarm: {self.label} {self.backend.where}: record {rid} refused ({reason}): set aside in the "
                  f"spool's dead letters ({self.spool.path}; `sipsniff-acc spool status`)", file=self.alarms)

    def _wait_for_room(self, n: int) -> None:
        if self._queued + n <= self.max_records:
            return
        print(f"alarm: spool full for {self.label} ({self._queued} records, limit {self.max_records}); "
              "reading waits for the backend", file=self.alarms)
        deadline = self.clock() + self.full_timeout
        while self._queued + n > self.max_records:
            if self.clock() >= deadline:
                raise SpoolFull(f"{self.label}: spool full ({self._queued} records) for "
                                f"{self.full_timeout:g} s; the records stay in {self.spool.path}")
            if not self.deliver():
                if self.spool_error:
                    raise SpoolFull(self.spool_error)
                self.sleep(min(self.retry_interval, max(0.0, self.next_try - self.clock())) or 0.05)

    def close(self) -> None:
        """Spool what is buffered and try to deliver everything for up to drain_timeout seconds.

        Never raises: on a full disk the buffer (never accepted by the spool) goes straight to
        the backend once what is spooled got through; what cannot go anywhere is counted in
        ``lost`` with an alarm."""
        try:
            if self.buffer and not self.spool_error:
                try:
                    self._append(self.buffer)
                    self.buffer = []
                except SpoolDiskFull:
                    pass
                except (sqlite3.Error, OSError) as e:  # the spool cannot take them: straight to the backend
                    self.spool_error = f"spool {self.spool.path}: {e}"
                    self.last_error = self.spool_error
            deadline = self.clock() + self.drain_timeout
            while not self.deliver() and self.clock() < deadline and not self.spool_error:
                self.sleep(max(0.01, min(self.retry_interval, self.next_try - self.clock())))
            if self.buffer:
                self._deliver_unspooled()
            fitted = getattr(self.backend, "fitted", None)
            if fitted:
                print(f"note: {self.label} {self.backend.where}: values fitted to the schema: "
                      f"{', '.join(f'{k} {n}' for k, n in sorted(fitted.items()))}", file=self.alarms)
            if self.dead_lettered > ALARM_LINES:
                print(f"alarm: {self.label} {self.backend.where}: {self.dead_lettered} record(s) set aside in the "
                      f"spool's dead letters this run ({self.spool.path}; `sipsniff-acc spool status`)",
                      file=self.alarms)
        except (sqlite3.Error, OSError) as e:
            self.spool_error = self.spool_error or f"spool {self.spool.path}: {e}"
            self.last_error = self.spool_error
        finally:
            try:
                if self.buffer:  # never reported as kept in the spool when it is not there
                    self._deliver_unspooled()
            finally:
                self.backend.close()

    def _deliver_unspooled(self) -> None:
        """The spool cannot take the buffer (disk full, spool broken): hand it to the backend
        directly, or count it lost with an alarm; a record that cannot be rendered is lost with its reason."""
        records, self.buffer = self.buffer, []
        why = "disk full" if isinstance(self.spool_error, str) and "full" in self.spool_error else \
            (self.spool_error or "the spool failed")
        if self._render is not None:
            docs: list[dict[str, Any]] = []
            kept: list[AccRecord] = []
            for r in records:
                try:
                    docs.append(self._render(r))
                    kept.append(r)
                except Exception as e:  # noqa: BLE001 - that record's own problem: lost, with its reason
                    reason = e.reason if isinstance(e, RecordRejected) else f"{type(e).__name__}: {str(e)[:200]}"
                    self._lose(1, f"could not be rendered ({reason}) nor spooled ({why})")
            records = kept
        if not records:
            return
        if self._queued == 0:
            try:
                if self._render is not None:
                    self.backend.deliver_entries(docs)  # type: ignore[attr-defined]
                else:
                    self.backend.deliver(records)
                self.delivered += len(records)
                return
            except (BackendDown, RecordRejected) as e:
                self.last_error = str(e)
            except Exception as e:  # noqa: BLE001 - never raises from close: counted below
                self.last_error = f"{type(e).__name__}: {str(e)[:200]}"
        self._lose(len(records), f"could be neither spooled ({why}) nor delivered")

    def _lose(self, n: int, why: str) -> None:
        self.lost += n
        print(f"alarm: {self.label} {self.backend.where}: {n} record(s) {why}: lost", file=self.alarms)

    def stats(self) -> dict[str, object]:
        """For --stats: what this destination got, keeps and set aside."""
        out: dict[str, object] = {"delivered": self.delivered, "pending": self.pending,
                                  "dead_lettered": self.dead_lettered,
                                  "dead_letter_reasons": dict(self.dead_reasons), "lost": self.lost}
        fitted = getattr(self.backend, "fitted", None)
        if fitted:
            out["fitted"] = dict(fitted)
        return out


def _unrendered(r: AccRecord, reason: str) -> bytes:
    """The dead letter of a record that could not be rendered: the record itself and the reason
    (`spool retry` renders it again at delivery)."""
    try:
        return dumps({"id": r.record_id, "record": r.as_dict(), "unrendered": reason})
    except Exception:  # noqa: BLE001 - even the record cannot be written out: its id and the reason
        return dumps({"id": str(r.record_id), "unrendered": reason})


class _Again(Exception):
    """Internal: go round the delivery loop once more."""
