"""Where the per-call records go (``process --calls FILE.jsonl``, ``--calls-table``).

``CallsOutput`` ties ``calls.CallBuilder`` (pure) to the run: ``attach(acc)`` makes it the
accounting pipeline's observer (``feed``/``advance``/``gap``/``finish``), so the builder sees every SIP
message, the clock and the capture gaps in the same order as the acc engine; ended calls wait
in a list and are written when the run delivers records or ticks its outputs (``emit``/
``tick``: so a write failure goes through the same one-line handling as ``--jsonl``).

The ``calls`` table is written directly (SQLAlchemy Core, created when missing), not through the
spool: a per-call row is an analysis copy, not a billing record. A database failure is one
line on stderr, the table is left out for the rest of the run (rows counted in ``sql_lost``),
and accounting goes on.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from typing import IO, Any, Final

from sipsniff_acc.calls import Call, CallBuilder
from sipsniff_acc.emitters.jsonl import json_line
from sipsniff_acc.sysloglines import escape

FLUSH_EVERY: Final = 1.0  #: wall seconds: written call lines go out at least this often


def call_line(c: Call) -> bytes:
    """The call as one JSON line (control characters escaped like the record lines)."""
    return json_line(c.as_dict())


#: The ``calls`` table: scalar fields as columns, lists/dicts as JSON text. VoIPmonitor's ``cdr``
#: names where they exist are in the comments.
SCALAR_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("call_id", "str"), ("seq", "int"), ("from_tag", "str"), ("to_tag", "str"), ("outcome", "str"),
    ("invite_time", "float"),  # calldate
    ("first_provisional", "float"), ("ringing", "float"), ("answer", "float"),
    ("end", "float"),  # callend
    ("post_dial_delay", "float"),  # progress_time
    ("duration", "float"), ("billable", "float"),  # duration, connect_duration
    ("final_code", "int"), ("final_reason", "str"),  # lastSIPresponseNum
    ("ended_by", "str"), ("ended_how", "str"),  # whohanged, bye
    ("reason_header", "str"), ("q850_cause", "int"), ("q850_text", "str"),  # reason_q850_cause/text
    ("caller_uri", "str"), ("caller_number", "str"), ("caller_name", "str"),
    ("callee_uri", "str"), ("callee_number", "str"), ("callee_name", "str"), ("request_uri", "str"),
    ("caller_ua", "str"), ("callee_ua", "str"), ("caller_addr", "str"), ("callee_addr", "str"),
    ("transport", "str"), ("offer_media", "str"), ("answer_media", "str"), ("session_expires", "int"),
    ("capture_gaps", "bool"),
)
JSON_COLUMNS: Final = ("legs", "offer_codecs", "answer_codecs", "provenance")


class CallsTable:
    """Rows into a ``calls`` table through SQLAlchemy Core; created when missing."""

    def __init__(self, url: str, table: str = "calls") -> None:
        import sqlalchemy as sa

        self.sa = sa
        self.engine = sa.create_engine(url)
        kinds = {"str": sa.Text, "int": sa.BigInteger, "float": sa.Float, "bool": sa.Boolean}
        md = sa.MetaData()
        self.table = sa.Table(
            table, md, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            *(sa.Column(name, kinds[kind]()) for name, kind in SCALAR_COLUMNS),
            *(sa.Column(name, sa.Text) for name in JSON_COLUMNS))
        md.create_all(self.engine, checkfirst=True)

    def insert(self, calls: list[Call]) -> None:
        rows = []
        for c in calls:
            d = c.as_dict()
            row = {name: d[name] for name, _ in SCALAR_COLUMNS}
            row.update({name: json.dumps(d[name], separators=(",", ":")) for name in JSON_COLUMNS})
            rows.append(row)
        with self.engine.begin() as conn:
            conn.execute(self.table.insert(), rows)

    def close(self) -> None:
        self.engine.dispose()


class CallsOutput:
    """The calls of a run: built beside the acc engine, written to JSON lines and/or a table.

    An emitter for the run (``emit``/``tick``/``close``), so it is flushed and closed with the
    other outputs; the acc records it is handed are ignored."""

    def __init__(self, out: IO[bytes] | None, table: CallsTable | None = None,
                 builder: CallBuilder | None = None, quiet: bool = True, what: str = "") -> None:
        """``quiet``: no summary line on stderr at the close; ``what``: the output's name in it."""
        self.quiet, self.what = quiet, what
        self.outcomes: Counter[str] = Counter()
        self.out = out
        self.table = table
        self.builder = builder or CallBuilder()
        self.pending: list[Call] = []
        self.written = 0
        self.sql_written = 0
        self.sql_lost = 0
        self.finished = False
        self._flushed = time.monotonic()
        self._unflushed = False

    # -- the tap on the accounting pipeline ---------------------------------------------------
    def attach(self, acc: Any) -> None:
        """The builder sees what ``acc`` (an AccPipeline) is fed, before its engine: the same
        messages, clock and gaps, in the same order (AccPipeline.observer)."""
        acc.observer = self

    def feed(self, msg: Any) -> None:
        ended = self.builder.feed(msg)
        if ended:
            self.pending.extend(ended)

    def advance(self, now: float) -> None:
        ended = self.builder.advance(now)
        if ended:
            self.pending.extend(ended)

    def gap(self, ts: float) -> None:
        self.builder.gap(ts)

    def finish(self) -> None:
        self.finished = True
        self.pending.extend(self.builder.finish())

    # -- the emitter side ---------------------------------------------------------------------
    def emit(self, records: list[Any]) -> None:
        if self.pending:
            self._write()

    def tick(self) -> None:
        """The run's clock: pending calls written, lines flushed."""
        self._write()
        if self._unflushed and self.out is not None:
            self._unflushed = False
            self.out.flush()
            self._flushed = time.monotonic()

    def _write(self) -> None:
        calls = self.pending
        if not calls:
            return
        batch = calls[:]
        calls.clear()
        self.outcomes.update(c.outcome for c in batch)
        if self.out is not None:
            self.out.write(b"".join(call_line(c) for c in batch))
            self._unflushed = True
            self.written += len(batch)
            if time.monotonic() - self._flushed >= FLUSH_EVERY:
                self._unflushed = False
                self.out.flush()
                self._flushed = time.monotonic()
        if self.table is not None:
            try:
                self.table.insert(batch)
                self.sql_written += len(batch)
            except Exception as e:  # noqa: BLE001 - any driver error: one line, accounting goes on
                self.sql_lost += len(batch)
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                print(escape(f"error: calls table: {msg}; the calls table is left out for the rest of the run"),
                      file=sys.stderr)
                self.table = None
        elif self.sql_lost and batch:
            self.sql_lost += len(batch)

    def close(self) -> None:
        """End of the run: calls still open (a --state run, a stop) go out as open; all written."""
        if not self.finished:
            self.finished = True
            self.pending.extend(self.builder.finish())
        self._write()
        if self.out is not None:
            self.out.flush()
        if self.table is not None:
            self.table.close()
        if not self.quiet:
            print(self.summary(), file=sys.stderr)

    def summary(self) -> str:
        """One line for the run's summary: calls by outcome, where they went, the bound hits."""
        s = self.builder.stats
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.outcomes.items())) or "none"
        where = [w for w in (self.what, "the calls table" if self.sql_written or self.table is not None else "") if w]
        more = f"; {self.sql_lost} not in the calls table (it failed)" if self.sql_lost else ""
        return (f"calls: {sum(self.outcomes.values())} ({kinds})" + (f" to {' and '.join(where)}" if where else "")
                + f"; {s.evicted} emitted early at max_calls; {s.orphans} messages of calls begun before the capture"
                + more)

    @property
    def stats(self) -> dict[str, int]:
        s = self.builder.stats
        return {"calls": s.calls, "evicted": s.evicted, "orphans": s.orphans, "written": self.written,
                "sql_written": self.sql_written, "sql_lost": self.sql_lost}


_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")


def table_name_problem(name: str) -> str | None:
    """--calls-table's mistake in one line (checked before the work), or None."""
    if not _TABLE_NAME.match(name):
        return f"--calls-table {name!r}: use a plain SQL name (letters, digits, _; at most 63)"
    return None


def open_table(url: str, name: str) -> CallsTable | None:
    """The calls table, created if missing; a database that cannot be reached is one line on
    stderr and the run goes on without the table (the acc records have their own spool)."""
    try:
        return CallsTable(url, name)
    except Exception as e:  # noqa: BLE001 - any driver error: one line, accounting goes on
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(escape(f"error: calls table {name}: {msg}; going on without it"), file=sys.stderr)
        return None
