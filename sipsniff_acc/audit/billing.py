"""The billing side: rows of the audited tables for a span of time, from a database (SQLite,
PostgreSQL, MariaDB/MySQL through SQLAlchemy) or a CSV export with a column mapping.

Times are decoded as Kamailio stores them: SQLite holds db_sqlite's Julian day REAL (of
t - 0.5 s; a text DATETIME is read too), PostgreSQL and MariaDB a DATETIME in UTC or, with
``--db-timezone local``, in local time (as Kamailio's own local clock writes it). Every
problem that makes the audit impossible (bad URL, no server, missing table or column,
unreadable CSV, unknown mapping) is a ``BillingError``, found before the capture is read.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sipsniff_acc.audit.model import Row, TableSpec

MAX_BILLING_ROWS = 5_000_000  #: rows held in memory for one audit; past it the audit stops (exit 2), named
CONNECT_TIMEOUT = 10  #: seconds to reach a database server
JULIAN_EPOCH = 2440587.5  #: the Julian day of 1970-01-01T00:00:00Z
#: Julian day numbers of years ~1582..4700: a number in this range in a CSV time column is a Julian day
_JULIAN_RANGE = (2_299_160.0, 3_500_000.0)

#: the fields a mapping may name, and for which tables
ACC_FIELDS = ("callid", "method", "from_tag", "to_tag", "code", "reason", "time")
CDR_FIELDS = ("callid", "from_tag", "to_tag", "time", "end", "duration")
#: --map accepts Kamailio's column names for the fields too
ALIASES = {"sip_code": "code", "sip_reason": "reason", "call_id": "callid", "start_time": "time",
           "end_time": "end", "table": "table"}


class BillingError(RuntimeError):
    """The billing side cannot be audited; one line naming what to fix (never a password)."""


def from_julian(j: float) -> float:
    """db_sqlite's Julian REAL back to Unix seconds (as tests/conformance and Kamailio read it)."""
    return float(round(86400.0 * (j - JULIAN_EPOCH) + 0.5))


def to_julian(t: float) -> float:
    return (t - 0.5) / 86400.0 + JULIAN_EPOCH


def from_datetime(value: dt.datetime, local: bool) -> float:
    if value.tzinfo is None:
        value = value if local else value.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()


def to_datetime(t: float, local: bool) -> dt.datetime:
    if local:
        return dt.datetime.fromtimestamp(t)
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).replace(tzinfo=None)


def decode_time(value: Any, local: bool) -> float | None:
    """A time as any of the supported encodings holds it: a datetime, a Julian day REAL, Unix
    seconds, or ISO text; None when it is none of them."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return from_datetime(value, local)
    if isinstance(value, dt.date):
        return from_datetime(dt.datetime(value.year, value.month, value.day), local)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
        if not math.isfinite(v):
            return None
        return from_julian(v) if _JULIAN_RANGE[0] <= v <= _JULIAN_RANGE[1] else v
    text = str(value).strip()
    if not text:
        return None
    try:
        return decode_time(float(text), local)
    except ValueError:
        pass
    try:
        return from_datetime(dt.datetime.fromisoformat(text.replace("Z", "+00:00")), local)
    except ValueError:
        return None


def _text(v: Any) -> str:
    return "" if v is None else str(v)


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass
class Span:
    """The capture's time span, widened by the margin: only billing rows inside it are audited."""

    low: float
    high: float


_UNDECODABLE = [0]  #: byte sequences of a CSV export that were not UTF-8 (this process)


def _count_undecodable(e: UnicodeError) -> tuple[str, int]:
    """A CSV export's non-UTF-8 bytes (a cp1252 name, a damaged line): shown as \\xNN and
    counted, rather than one byte making the whole audit impossible."""
    _UNDECODABLE[0] += 1
    text, end = codecs.backslashreplace_errors(e)
    return str(text), end


codecs.register_error("sipsniff-audit-csv", _count_undecodable)


def _sqlite_text(raw: bytes) -> str:
    """A SQLite TEXT value: UTF-8, undecodable bytes as \\xNN (shown, paired as written)."""
    return raw.decode("utf-8", "backslashreplace")


class SqlBilling:
    """A billing database: tables reflected once (missing table or column: BillingError), rows
    read for a time span."""

    def __init__(self, url: str, specs: list[TableSpec], timezone: str = "utc") -> None:
        from sqlalchemy import MetaData, Table, create_engine, inspect
        from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError

        from sipsniff_acc.emitters.sqlurl import SqlUsageError, check_url, safe_url, sqlite_file
        self.where = safe_url(url)
        self.local = timezone == "local"
        try:
            check_url(url)
        except SqlUsageError as e:
            raise BillingError(str(e)) from None
        path = sqlite_file(url)
        if path is not None and not os.path.isfile(path):
            raise BillingError(f"{self.where}: no such SQLite file {path}")
        args: dict[str, Any] = {}
        if url.startswith(("postgresql", "mysql", "mariadb")):
            args["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
        try:
            self.engine = create_engine(url, **args)
            if path is not None:  # read only: an audit never writes to the books
                from sqlalchemy import event

                @event.listens_for(self.engine, "connect")
                def _read_only(con: Any, _rec: Any) -> None:
                    con.execute("PRAGMA query_only = ON")
                    # SQLite stores whatever bytes it is given: one row of non-UTF-8 text must
                    # not make the whole audit impossible; its bytes are shown as \xNN
                    con.text_factory = _sqlite_text
            insp = inspect(self.engine)
            names = set(insp.get_table_names())
        except (SQLAlchemyError, ImportError, ValueError, OSError) as e:
            raise BillingError(f"{self.where}: {_short(e)}") from None
        self.sqlite = self.engine.dialect.name == "sqlite"
        self.notes: list[str] = []
        self.specs = specs
        self.tables: dict[str, Any] = {}
        for spec in specs:
            if spec.name not in names:
                raise BillingError(f"{self.where}: no table {spec.name} (named by rules.yaml; "
                                   f"the tables there: {', '.join(sorted(names)) or 'none'})")
            try:
                t = Table(spec.name, MetaData(), autoload_with=self.engine)
            except (NoSuchTableError, SQLAlchemyError) as e:
                raise BillingError(f"{self.where}: table {spec.name}: {_short(e)}") from None
            lacking = [c for c in spec.columns.values() if c not in t.c]
            if lacking:
                raise BillingError(f"{self.where}: table {spec.name} has no column(s) {', '.join(lacking)} "
                                   "(column names come from rules.yaml's acc_*_column / cdr settings)")
            self.tables[spec.name] = t

    @property
    def audited(self) -> set[str]:
        return {s.name for s in self.specs}

    def rows(self, span: Span) -> list[Row]:
        """Every row of the audited tables whose time is inside the span."""
        from sqlalchemy import Float, func, select, type_coerce
        from sqlalchemy.exc import SQLAlchemyError
        from sqlalchemy.types import NullType

        out: list[Row] = []
        try:
            with self.engine.connect() as con:
                for spec in self.specs:
                    t = self.tables[spec.name]
                    wanted = list(spec.columns.items())
                    tcol = t.c[spec.columns["time"]]
                    # raw values: db_sqlite keeps a Julian REAL in a column declared TIMESTAMP,
                    # which SQLAlchemy's DateTime would refuse to read
                    cols = [type_coerce(t.c[c], NullType()).label(f) for f, c in wanted]
                    pk = [c for c in t.primary_key.columns]
                    if pk:
                        cols.append(type_coerce(pk[0], NullType()).label("_ref"))
                    if self.sqlite:
                        cond = func.julianday(type_coerce(tcol, Float)).between(to_julian(span.low),
                                                                                to_julian(span.high + 1))
                    elif _is_numeric(tcol.type):
                        cond = tcol.between(span.low, span.high)
                    else:
                        cond = tcol.between(to_datetime(span.low, self.local), to_datetime(span.high, self.local))
                    stmt = select(*cols).where(cond)
                    if pk:
                        stmt = stmt.order_by(pk[0])
                    for rec in con.execute(stmt):
                        m = rec._mapping
                        out.append(self._row(spec, m, f"{spec.name} {pk[0].name}={m['_ref']}" if pk else spec.name))
                        if len(out) > MAX_BILLING_ROWS:
                            raise BillingError(f"{self.where}: more than {MAX_BILLING_ROWS} rows in the capture's "
                                               "time span: audit shorter captures")
        except SQLAlchemyError as e:
            raise BillingError(f"{self.where}: {_short(e)}") from None
        return [r for r in out if span.low <= r.time <= span.high + 1]

    def _row(self, spec: TableSpec, m: Any, ref: str) -> Row:
        return make_row(spec, m, self.local, ref)

    def close(self) -> None:
        self.engine.dispose()


def _is_numeric(type_: Any) -> bool:
    from sqlalchemy import Float, Integer, Numeric
    return isinstance(type_, (Float, Integer, Numeric))


def make_row(spec: TableSpec, m: Any, local: bool, ref: str) -> Row:
    """A billing row from its fields (by our field names); a time that is no time is -inf
    (so it is never inside a span and the row is reported, not lost)."""
    get = m.get if hasattr(m, "get") else (lambda k, d=None: m[k] if k in m else d)
    t = decode_time(get("time"), local)
    row = Row(spec.name, _text(get("callid")), _text(get("method")) or ("INVITE" if spec.kind == "cdr" else ""),
              _text(get("from_tag")), _text(get("to_tag")), _text(get("code")), _text(get("reason")),
              t if t is not None else float("-inf"), ref=ref)
    if spec.kind == "cdr":
        row.end = decode_time(get("end"), local)
        row.duration = _number(get("duration"))
    return row


def _short(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e)
    first = text.splitlines()[0][:300] if text else type(e).__name__
    return f"{type(getattr(e, 'orig', None) or e).__name__}: {first}"


# --- CSV exports ----------------------------------------------------------------------------

def parse_map(items: list[str] | None) -> dict[str, str]:
    """--map callid=call_id,time=ts ... (repeatable, comma lists): our field -> CSV column;
    a value written ``=acc`` is a constant (e.g. ``table==missed_calls``)."""
    out: dict[str, str] = {}
    for item in items or ():
        for part in item.split(","):
            if not part.strip():
                continue
            key, eq, value = part.partition("=")
            key = ALIASES.get(key.strip(), key.strip())
            if not eq or not value.strip():
                raise BillingError(f"--map {part.strip()!r}: write FIELD=COLUMN, e.g. callid=call_id")
            if key not in (*ACC_FIELDS, *CDR_FIELDS, "table"):
                raise BillingError(f"--map {part.strip()!r}: unknown field {key!r}; the fields: table, "
                                   + ", ".join(dict.fromkeys((*ACC_FIELDS, *CDR_FIELDS))))
            out[key] = value.strip() if not value.startswith("=") else value
    return out


class CsvBilling:
    """A CSV export (header line first). By default its columns are named as the database's
    (rules.yaml's column names); ``--map`` renames. Rows go to the table named by the ``table``
    column (or constant), else to the acc table (a CDR export: the CDR table when the
    mapping names a duration)."""

    def __init__(self, path: str, specs: list[TableSpec], mapping: dict[str, str], timezone: str = "utc") -> None:
        self.path = path
        self.local = timezone == "local"
        self.notes: list[str] = []  #: what was read but not audited, said on stderr
        self.specs = {s.name: s for s in specs}
        if not os.path.isfile(path):
            raise BillingError(f"--against {path}: no such file")
        try:
            with open(path, newline="", encoding="utf-8-sig", errors="backslashreplace") as f:
                header = next(csv.reader(f), None)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise BillingError(f"--against {path}: cannot be read as CSV ({e})") from None
        if not header:
            raise BillingError(f"--against {path}: empty (a CSV export starts with a header line)")
        self.header = [h.strip() for h in header]
        acc = next((s for s in specs if s.kind == "acc"), None)
        cdr = next((s for s in specs if s.kind == "cdr"), None)
        default = cdr if cdr is not None and "duration" in mapping else acc or cdr
        if default is None:
            raise BillingError("nothing to audit: the rules write no database rows")
        self.default = default.name
        table = mapping.get("table")
        self.table_const = table[1:] if table and table.startswith("=") else None
        self.table_col = table if table and not table.startswith("=") else None
        if self.table_const is not None and self.table_const not in self.specs:
            raise BillingError(f"--map table=={self.table_const}: not a table the rules write "
                               f"({', '.join(self.specs)})")
        fields = CDR_FIELDS if (self.specs.get(self.table_const or self.default) or default).kind == "cdr" \
            else ACC_FIELDS
        self.columns: dict[str, str] = {}
        base = (self.specs.get(self.table_const or self.default) or default).columns
        for f_ in fields:
            col = mapping.get(f_, base.get(f_, f_))
            self.columns[f_] = col
        needed = [c for f_, c in self.columns.items() if not c.startswith("=") and f_ in ("callid", "time")]
        needed += [self.table_col] if self.table_col else []
        lacking = [c for c in needed if c not in self.header]
        if lacking:
            raise BillingError(f"--against {path}: no column(s) {', '.join(lacking)} in its header "
                               f"({', '.join(self.header[:20])}); map them with --map FIELD=COLUMN")

    @property
    def audited(self) -> set[str]:
        """The tables the export stands for: all the rules' tables when it has a table column,
        else the one table its rows go to (an export of CDRs alone says nothing of acc)."""
        if self.table_col:
            return set(self.specs)
        return {self.table_const or self.default}

    def _records(self) -> Iterator[tuple[int, dict[str, str]]]:
        with open(self.path, newline="", encoding="utf-8-sig", errors="sipsniff-audit-csv") as f:
            reader = csv.DictReader(f, fieldnames=self.header)
            next(reader, None)
            for i, rec in enumerate(reader, start=2):
                yield i, rec

    def rows(self, span: Span) -> list[Row]:
        """The export's rows inside the span; rows of other tables and rows without a readable
        time are counted (``notes``), never dropped unsaid."""
        out: list[Row] = []
        others: dict[str, int] = {}
        bad_before = _UNDECODABLE[0]
        no_time: list[int] = []
        try:
            for line, rec in self._records():
                name = self.table_const or (rec.get(self.table_col, "") if self.table_col else "") or self.default
                spec = self.specs.get(name.strip())
                if spec is None:  # a table the rules do not write: not audited (counted)
                    others[name] = others.get(name, 0) + 1
                    continue
                m = {f_: (c[1:] if c.startswith("=") else rec.get(c)) for f_, c in self.columns.items()}
                row = make_row(spec, m, self.local, f"{os.path.basename(self.path)}:{line}")
                if row.time == float("-inf"):
                    no_time.append(line)
                    continue
                if span.low <= row.time <= span.high + 1:
                    out.append(row)
                    if len(out) > MAX_BILLING_ROWS:
                        raise BillingError(f"--against {self.path}: more than {MAX_BILLING_ROWS} rows in the "
                                           "capture's time span: audit shorter captures")
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise BillingError(f"--against {self.path}: {e}") from None
        if _UNDECODABLE[0] > bad_before:
            self.notes.append(f"{_UNDECODABLE[0] - bad_before} byte sequence(s) not UTF-8: read as \\xNN "
                              "(pairing on such a value fails: check the export's encoding)")
        for name, n in sorted(others.items()):
            self.notes.append(f"{n} row(s) of table {name!r}, which the rules do not write: not audited")
        if no_time:
            lines = ", ".join(map(str, no_time[:5])) + (", ..." if len(no_time) > 5 else "")
            self.notes.append(f"{len(no_time)} row(s) without a readable time (line {lines}): not audited")
        return out

    def close(self) -> None:
        pass
