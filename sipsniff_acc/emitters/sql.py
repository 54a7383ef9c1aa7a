"""Kamailio-compatible ``acc`` / ``missed_calls`` rows through SQLAlchemy (acc-spec §4).

Columns in Kamailio's order (core, time_mode columns, db_extra, multi_leg_info), one row
per leg set. One column of ours, ``sipsniff_id`` (unique), holds the record's stable id, so
a re-run on the same input inserts nothing twice (INSERT OR IGNORE / ON CONFLICT DO
NOTHING / INSERT IGNORE). SQLite stores ``time`` as Kamailio's db_sqlite does: the Julian
day of (t - 0.5 s) as a REAL, so Kamailio's own tools read our rows; other databases get a
UTC DATETIME.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    Column, DateTime, Engine, Float, Index, Integer, MetaData, String, Table, create_engine, insert, inspect, select,
)
from sqlalchemy.exc import DataError, IntegrityError, NoSuchTableError, SQLAlchemyError, StatementError

from sipsniff_acc.cdr import CDR, cdr_pairs
from sipsniff_acc.emitters.spool import BackendDown, RecordRejected, create_private
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import AccParams, RulesFile
from sipsniff_acc.emitters.sqlurl import SqlError, check_url, destination, safe_url, sqlite_file

ID_COLUMN = "sipsniff_id"


def julian(ts: float) -> float:
    """db_sqlite's timet_to_sqlite: ((t - 0.5) / 86400) + 2440587.5 on whole seconds."""
    return ((int(ts) - 0.5) / 86400.0) + 2440587.5


#: what a DATETIME can hold: 0001-01-01 .. 9999-12-31 23:59:59 UTC (Python's datetime range)
MIN_TIME = -62135596800
MAX_TIME = 253402300799
#: a local-time DATETIME may shift by up to a day more
_ZONE_MARGIN = 86400


def record_second(ts: float) -> int:
    """The record's whole second; RecordRejected (that record only) when it is not a finite number."""
    if not isinstance(ts, (int, float)) or not math.isfinite(ts):
        raise RecordRejected(f"time {ts!r} is not a finite number")
    return int(ts)


def bounded(sec: int, local: bool = False) -> int:
    """The second itself when a time column can hold it. A time outside years 1-9999 (a capture
    with a broken clock, pcapng if_tsresol/if_tsoffset) is refused for that record alone: RecordRejected."""
    low, high = (MIN_TIME + _ZONE_MARGIN, MAX_TIME - _ZONE_MARGIN) if local else (MIN_TIME, MAX_TIME)
    if not low <= sec <= high:
        raise RecordRejected(f"time {sec} is outside what a DATETIME column holds "
                             f"(years 1-9999: {MIN_TIME}..{MAX_TIME} s since 1970)")
    return sec


def to_datetime(sec: int, local: bool = False) -> dt.datetime:
    """A DATETIME value for a record's second (RecordRejected when it cannot be one)."""
    bounded(sec, local)
    try:
        if local:
            return dt.datetime.fromtimestamp(sec)
        return dt.datetime.fromtimestamp(sec, dt.timezone.utc).replace(tzinfo=None)
    except (ValueError, OverflowError, OSError) as e:
        raise RecordRejected(f"time {sec} cannot be converted to a DATETIME ({type(e).__name__}: {e})") from None


def table_names(rules: RulesFile) -> list[str]:
    """The transaction tables (acc, missed_calls, acc_*_request ones); the CDR table is cdr_table()'s."""
    names = [rules.acc.db_table_acc, rules.acc.db_table_missed_calls]
    for rule in (*rules.route, *rules.failure_route):
        for backends, call in rule.acc_calls():
            if "db" in backends.split("+") and call.table and call.table not in names:
                names.append(call.table)
    return names


def cdr_table(rules: RulesFile) -> str | None:
    """The dialog CDR table when CDRs go to the database (acc cdr_enable + cdrs_table)."""
    return rules.acc.cdrs_table if "db" in rules.acc.cdr_backends else None


def build_cdr_table(meta: MetaData, name: str, acc: AccParams, dialect: str) -> Table:
    """acc_cdrs as Kamailio 5.6 creates it (acc-create.sql) plus the cdr_extra columns and our id.

    start/end are DATETIME (SQLite: db_sqlite's Julian REAL, as for acc), strings with
    time_mode 4 (acc_cdr.c writes them as gmtime text then); duration is a DOUBLE."""
    if acc.time_mode == 4:
        when: Any = String(26)
    else:
        when = Float if dialect == "sqlite" else DateTime
    default = None if dialect == "sqlite" or acc.time_mode == 4 else "2000-01-01 00:00:00"
    cols: list[Column[Any]] = [
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column(acc.cdr_start_id, when, nullable=False, server_default=default),
        Column(acc.cdr_end_id, when, nullable=False, server_default=default),
        Column(acc.cdr_duration_id, Float, nullable=False, server_default="0"),
    ]
    for extra, _spec in acc.cdr_extras:
        cols.append(Column(extra, String(128), nullable=True))
    cols.append(Column(ID_COLUMN, String(32), nullable=True, unique=True))
    t = Table(name, meta, *cols, mysql_charset="utf8mb4")
    Index(f"{name}_start_time_idx", t.c[acc.cdr_start_id])
    return t


#: column widths (tags, Call-ID, reason): Kamailio 5.6's schema, OpenSER 1.2's (acc-spec §4.1, §4.2)
WIDTHS = {"kamailio-5.6": (128, 255, 128), "openser-1.2": (64, 128, 32)}
#: Kamailio's `version` rows for acc / missed_calls
VERSIONS = {"kamailio-5.6": (5, 4), "openser-1.2": (4, 3)}


def build_table(meta: MetaData, name: str, acc: AccParams, dialect: str, profile: str = "kamailio-5.6") -> Table:
    sqlite = dialect == "sqlite"
    tag, callid, reason = WIDTHS[profile]
    cols: list[Column[Any]] = [
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column(acc.acc_method_column, String(16), nullable=False, server_default=""),
        Column(acc.acc_from_tag_column, String(tag), nullable=False, server_default=""),
        Column(acc.acc_to_tag_column, String(tag), nullable=False, server_default=""),
        Column(acc.acc_callid_column, String(callid), nullable=False, server_default=""),
        Column(acc.acc_sip_code_column, String(3), nullable=False, server_default=""),
        Column(acc.acc_sip_reason_column, String(reason), nullable=False, server_default=""),
        Column(acc.acc_time_column, Float if sqlite else DateTime, nullable=False),
    ]
    if acc.time_mode == 1:
        cols += [Column(acc.time_attr, Integer), Column(acc.time_exten, Integer)]
    elif acc.time_mode == 2:
        cols.append(Column(acc.time_attr, Float))
    elif acc.time_mode in (3, 4):
        cols.append(Column(acc.time_attr, String(64)))
    for extra, _spec in acc.extras("db") + acc.legs:
        cols.append(Column(extra, String(128), nullable=True))
    cols.append(Column(ID_COLUMN, String(32), nullable=True, unique=True))
    t = Table(name, meta, *cols, mysql_charset="utf8mb4")
    Index(f"{name}_callid_idx", t.c[acc.acc_callid_column])
    return t


OVERLONG_POLICIES = ("truncate", "dead-letter")
REPLACEMENT = "\ufffd"  #: what a NUL or an invalid (surrogate-escaped) character becomes: U+FFFD
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")


class _Shape:
    """A target table as the database declares it: what each column can hold."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.keys = frozenset(table.c.keys())  #: a set: `k in table.c` per column per row was a third of _fitted
        self.insert: Any = None  #: its INSERT ... ignoring duplicates, built once (then SQLAlchemy's compiled cache)
        self.widths: dict[str, int | None] = {}
        self.strings: set[str] = set()
        for c in table.columns:
            length = getattr(c.type, "length", None)
            if isinstance(c.type, String) or length is not None:
                self.strings.add(c.name)
                self.widths[c.name] = int(length) if length else None


class SqlEmitter:
    """The "db" backend: rows for records, fitted to the real schema, inserted idempotently.

    Connects lazily and reconnects after a failure, so it can sit behind the durable spool
    while the database is down. The spool stores the rendered rows (``render``) so they are
    delivered without the rules. Before a row is sent it is fitted to the columns the
    database declares (read at start): a NUL or an invalid character becomes U+FFFD; a
    value longer than its column is truncated to the width (counted per column in
    ``fitted``) or, with ``on_overlong="dead-letter"``, the record is refused. Errors:
    connection, timeout, lock, server down -> ``BackendDown`` (retried); an error about the
    data (DataError, IntegrityError, a column or table the row names that is not there) ->
    ``RecordRejected`` (the spool bisects and dead-letters). Messages never hold the password.
    """

    kind = "db"

    def __init__(self, url: str, rules: RulesFile, create: bool = True, connect: bool | str = True,
                 timezone: str = "utc", on_overlong: str | None = None) -> None:
        """connect: True = prepare the schema now (errors raise); "try" = now if the database
        answers, else at the first delivery; False = at the first delivery. on_overlong:
        "truncate" or "dead-letter"; None = rules.yaml's acc.on_overlong (default truncate)."""
        on_overlong = on_overlong or str(getattr(rules.acc, "on_overlong", "truncate"))
        if on_overlong not in OVERLONG_POLICIES:
            raise SqlError(f"on_overlong: {on_overlong!r} is not one of {', '.join(OVERLONG_POLICIES)}")
        self.url = url
        self.safe_url = self.where = safe_url(url)
        self.name = destination(url)
        self.rules = rules
        self.acc = rules.acc
        self.create = create
        self.local_time = timezone == "local"
        self.on_overlong = on_overlong
        check_url(url)
        path = sqlite_file(url)
        if path is not None and connect:
            _check_sqlite_path(path, self.safe_url, create)
        try:
            self.engine: Engine = create_engine(url, pool_pre_ping=True)
        except (SQLAlchemyError, ImportError, ValueError) as e:
            raise SqlError(f"{self.safe_url}: {type(e).__name__}: {_short(e)}") from None
        self.sqlite = self.engine.dialect.name == "sqlite"
        self.sqlite_path = path
        self.tables: dict[str, Table] = {}
        self.shapes: dict[str, _Shape] = {}
        self.fitted: Counter[str] = Counter()  #: "table.column truncated|replaced" -> values changed
        self.rows_offered = 0
        self.startup_error = ""
        if connect == "try":
            try:
                self._prepare()
            except SqlError as e:
                self.startup_error = str(e)
        elif connect:
            self._prepare()

    def _prepare(self) -> None:
        if self.sqlite_path is not None and self.create and os.path.isdir(os.path.dirname(os.path.abspath(
                self.sqlite_path))):
            create_private(self.sqlite_path)
        try:
            self.tables = prepare(self.engine, self.rules, self.create, self.engine.dialect.name)
            self.shapes = {}
            for name in self.tables:
                if inspect(self.engine).has_table(name):
                    self._shape(name)
        except SQLAlchemyError as e:
            raise SqlError(f"{self.safe_url}: {type(e).__name__}: {_short(e)}") from None

    def _shape(self, name: str) -> _Shape:
        """The table as the database declares it (Kamailio's schema or the user's own), read once."""
        shape = self.shapes.get(name)
        if shape is None:
            shape = self.shapes[name] = _Shape(Table(name, MetaData(), autoload_with=self.engine))
        return shape

    def wants(self, r: AccRecord) -> bool:
        return "db" in r.backends

    def emit(self, records: list[AccRecord]) -> None:
        """Write now (no spool): for init-db and tests; the CLI goes through the spool."""
        try:
            self.deliver([r for r in records if self.wants(r)])
        except (BackendDown, RecordRejected) as e:
            raise SqlError(str(e)) from None

    def deliver(self, records: list[AccRecord]) -> None:
        self.deliver_entries([self.render(r) for r in records])

    def render(self, r: AccRecord) -> dict[str, Any]:
        """The spool's self-describing entry: table, rows (column -> value); datetimes as ISO text."""
        rows = self.rows(r)
        dts = [k for k, v in rows[0].items() if isinstance(v, dt.datetime)] if rows else []
        for row in rows:
            for k in dts:
                row[k] = row[k].isoformat()
        doc: dict[str, Any] = {"id": r.record_id, "table": r.table, "rows": rows}
        if dts:
            doc["datetime"] = dts
        return doc

    @staticmethod
    def check_entry(doc: dict[str, Any]) -> None:
        """Raise (ValueError/KeyError/TypeError) when a spooled document is not one of our entries."""
        if "rows" not in doc and isinstance(doc.get("record"), dict):
            return  # a record set aside before it could be rendered (then retried): rendered at delivery
        if not isinstance(doc["table"], str) or not isinstance(doc["rows"], list) or \
                not all(isinstance(row, dict) for row in doc["rows"]):
            raise ValueError("not an SQL entry")

    def deliver_entries(self, entries: list[dict[str, Any]]) -> None:
        """Insert the entries' rows in one transaction, fitted to the schema.

        A record that cannot be fitted (dead-letter policy, a column the table lacks) stops
        the batch there: what is before it is inserted, then RecordRejected(index) names it."""
        if not entries:
            return
        try:
            if not self.tables:
                self._prepare()
        except SqlError as e:
            raise BackendDown(str(e)) from None
        groups: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
        refused: RecordRejected | None = None
        try:
            for i, doc in enumerate(entries):
                try:
                    rows = self._fitted(doc)
                except RecordRejected as e:
                    refused = RecordRejected(e.reason, index=i)
                    break
                for row in rows:
                    groups.setdefault((doc["table"], tuple(row)), []).append(row)
            if groups:
                with self.engine.begin() as con:
                    for (name, _cols), rows in groups.items():
                        shape = self._shape(name)
                        if shape.insert is None:
                            shape.insert = _insert_ignore(shape.table, self.engine.dialect.name)
                        con.execute(shape.insert, rows)
        except (DataError, IntegrityError) as e:
            raise RecordRejected(f"{type(e).__name__}: {_short(e)}") from None
        except StatementError as e:
            if isinstance(getattr(e, "orig", None), (ValueError, UnicodeError, TypeError, OverflowError)):
                raise RecordRejected(f"{type(e.orig).__name__}: {_short(e)}") from None
            raise BackendDown(f"{self.safe_url}: {type(e).__name__}: {_short(e)}") from None
        except SQLAlchemyError as e:
            raise BackendDown(f"{self.safe_url}: {type(e).__name__}: {_short(e)}") from None
        self.rows_offered += sum(len(v) for v in groups.values())
        if refused is not None:
            raise refused

    def _fitted(self, doc: dict[str, Any]) -> list[dict[str, Any]]:
        """The entry's rows as the table can hold them (RecordRejected when it cannot)."""
        if "rows" not in doc and isinstance(doc.get("record"), dict):
            doc = self._render_dead(doc["record"])
        name = doc["table"]
        try:
            shape = self._shape(name)
        except NoSuchTableError:
            raise RecordRejected(f"the database has no table {name}") from None
        dts = doc.get("datetime") or ()
        out = []
        for stored in doc["rows"]:
            row = dict(stored)
            if not shape.keys.issuperset(row):
                missing = [k for k in row if k not in shape.keys]
                raise RecordRejected(f"table {name} has no column(s) {', '.join(missing)} "
                                     "(the record was spooled under other rules)")
            for k in dts:
                if isinstance(row.get(k), str):
                    row[k] = dt.datetime.fromisoformat(row[k])
            for k in shape.strings:
                v = row.get(k)
                if type(v) is not str:
                    continue
                if "\x00" in v or (not v.isascii() and _BAD_CHARS.search(v)):
                    v = _BAD_CHARS.sub(REPLACEMENT, v)
                    self.fitted[f"{name}.{k} replaced"] += 1
                width = shape.widths[k]
                if width is not None and len(v) > width:
                    if self.on_overlong == "dead-letter":
                        raise RecordRejected(f"{name}.{k}: {len(v)} characters, the column holds {width}")
                    v = v[:width]
                    self.fitted[f"{name}.{k} truncated"] += 1
                row[k] = v
            out.append(row)
        return out

    def _render_dead(self, stored: dict[str, Any]) -> dict[str, Any]:
        """A record the spool set aside unrendered, retried (`spool retry`): rendered now or refused again."""
        from sipsniff_acc.emitters.spool import record_from_dict
        try:
            return self.render(record_from_dict(stored))
        except RecordRejected:
            raise
        except Exception as e:  # noqa: BLE001 - whatever makes it unrenderable is that record's reason
            raise RecordRejected(f"cannot be rendered ({type(e).__name__}: {str(e)[:200]})") from None

    def rows(self, r: AccRecord) -> list[dict[str, Any]]:
        if r.kind == CDR:
            return [self.cdr_row(r)]
        a = self.acc
        empty = None if self.sqlite or a.acc_extra_nullable else ""
        sec = record_second(r.ts)
        if self.sqlite:  # SQLite's own date functions, like a DATETIME, stop at year 9999
            when: Any = julian(bounded(sec))
        else:
            when = to_datetime(sec, self.local_time)
        base: dict[str, Any] = {
            a.acc_method_column: r.method, a.acc_from_tag_column: r.from_tag or "",
            a.acc_to_tag_column: r.to_tag or "", a.acc_callid_column: r.call_id or "",
            a.acc_sip_code_column: r.code, a.acc_sip_reason_column: r.reason, a.acc_time_column: when,
        }
        if a.time_mode == 1:
            base[a.time_attr], base[a.time_exten] = sec, int(round((r.ts - sec) * 1e6)) % 1000000
        elif a.time_mode == 2:
            base[a.time_attr] = round(r.ts, 3)
        elif a.time_mode in (3, 4):
            try:
                base[a.time_attr] = time.strftime(a.time_format, time.localtime(sec) if a.time_mode == 3
                                                  else time.gmtime(sec))
            except (ValueError, OverflowError, OSError) as e:
                raise RecordRejected(f"time {sec} cannot be formatted ({type(e).__name__}: {e})") from None
        for name, value in r.extras.get("db", ()):
            base[name] = value if value else empty
        legs = r.legs or [[]]
        out = []
        for i, leg in enumerate(legs):
            row = dict(base)
            for name, value in leg:
                row[name] = value if value else empty
            row[ID_COLUMN] = r.record_id if len(legs) == 1 else f"{r.record_id[:29]}.{i:02d}"
            out.append(row)
        return out

    def cdr_row(self, r: AccRecord) -> dict[str, Any]:
        """db_write_cdr(): start/end as DATETIME of their whole seconds, duration a DOUBLE (strtod),
        cdr_extra as strings (null: NULL with cdr_extra_nullable or on SQLite, else '')."""
        a = self.acc
        empty = None if self.sqlite or a.cdr_extra_nullable else ""
        pairs = cdr_pairs(r)
        row: dict[str, Any] = {}
        for i, (name, value) in enumerate(pairs):
            if i < 2:  # start, end: "sec.mmm"
                try:
                    sec = int((value or "").split(".", 1)[0])
                except ValueError:
                    raise RecordRejected(f"CDR {name} {value!r} is not a time") from None
                if a.time_mode == 4:
                    row[name] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(bounded(sec)))
                elif self.sqlite:
                    row[name] = julian(bounded(sec))
                else:
                    row[name] = to_datetime(sec, self.local_time)
            elif i == 2:
                try:
                    row[name] = float(value or "0")
                except ValueError:
                    raise RecordRejected(f"CDR {name} {value!r} is not a number") from None
            else:
                row[name] = value if value else empty
        row[ID_COLUMN] = r.record_id
        return row

    def close(self) -> None:
        self.engine.dispose()


def _check_sqlite_path(path: str, where: str, create: bool) -> None:
    """An SQLite file that can never be opened fails now, naming the path (not after retries)."""
    full = os.path.abspath(path)
    parent = os.path.dirname(full)
    if os.path.isdir(full):
        raise SqlError(f"{where}: {full} is a directory, not an SQLite database file")
    if os.path.exists(full):
        return
    if not os.path.isdir(parent):
        raise SqlError(f"{where}: the directory {parent} does not exist (create it, or fix the path in the URL)")
    if create and not os.access(parent, os.W_OK | os.X_OK):
        raise SqlError(f"{where}: cannot create {full}: the directory {parent} is not writable")


def _insert_ignore(table: Table, dialect: str) -> Any:
    """INSERT that skips a row whose sipsniff_id is already there (exactly once) and nothing
    else: MariaDB's INSERT IGNORE would also turn strict mode's errors into silent truncation."""
    if dialect == "sqlite":  # not OR IGNORE: that also skips a row a CHECK or NOT NULL refuses, silently
        from sqlalchemy.dialects.sqlite import insert as lite_insert
        return lite_insert(table).on_conflict_do_nothing(index_elements=[ID_COLUMN])
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        return pg_insert(table).on_conflict_do_nothing(index_elements=[ID_COLUMN])
    if dialect in ("mysql", "mariadb"):
        from sqlalchemy.dialects.mysql import insert as my_insert
        stmt = my_insert(table)
        return stmt.on_duplicate_key_update({ID_COLUMN: stmt.inserted[ID_COLUMN]})
    return insert(table)


def _short(e: Exception) -> str:
    text = str(getattr(e, "orig", None) or e)
    return text.splitlines()[0][:300] if text else type(e).__name__


def prepare(engine: Engine, rules: RulesFile, create: bool = True, dialect: str = "") -> dict[str, Table]:
    """Create the tables that are missing; check that existing ones have every column we write."""
    acc = rules.acc
    meta = MetaData()
    tables = {name: build_table(meta, name, acc, dialect or engine.dialect.name, rules.profile)
              for name in table_names(rules)}
    cdrs = cdr_table(rules)
    if cdrs is not None and cdrs not in tables:
        tables[cdrs] = build_cdr_table(meta, cdrs, acc, dialect or engine.dialect.name)
    insp = inspect(engine)
    existing = set(insp.get_table_names())
    problems = []
    for name, t in tables.items():
        if name not in existing:
            continue
        have = {c["name"] for c in insp.get_columns(name)}
        missing = [c.name for c in t.columns if c.name not in have and c.name != ID_COLUMN]
        if missing:
            problems.append(f"table {name} lacks column(s) {', '.join(missing)} (declared in rules.yaml)")
        if ID_COLUMN not in have:
            problems.append(f"table {name} has no {ID_COLUMN} column: add it (VARCHAR(32) UNIQUE) so re-runs "
                            f"cannot duplicate rows, or create the table with `sipsniff-acc init-db`")
    if problems:
        raise SqlError("; ".join(problems))
    if create:
        meta.create_all(engine, tables=[t for n, t in tables.items() if n not in existing])
        _version_rows(engine, tables, VERSIONS[rules.profile])
    return tables


def _version_rows(engine: Engine, tables: dict[str, Table], versions: tuple[int, int]) -> None:
    """Kamailio's `version` table (standard-create.sql) so kamctl/kamcmd accept the schema."""
    meta = MetaData()
    version = Table("version", meta, Column("id", Integer, primary_key=True, autoincrement=True),
                    Column("table_name", String(32), nullable=False, unique=True),
                    Column("table_version", Integer, nullable=False, server_default="0"))
    meta.create_all(engine)
    wanted = {"acc": versions[0], "missed_calls": versions[1], "acc_cdrs": 2}
    with engine.begin() as con:
        have = {row[0] for row in con.execute(select(version.c.table_name))}
        for name in tables:
            if name not in have:
                con.execute(insert(version), [{"table_name": name, "table_version": wanted.get(name, 5)}])


def missing_columns(url: str, rules: RulesFile) -> Sequence[str]:
    """init-db's check: what an existing schema lacks (empty when all is well)."""
    engine = create_engine(url)
    try:
        prepare(engine, rules, create=False)
    except SqlError as e:
        return str(e).split("; ")
    finally:
        engine.dispose()
    return []
