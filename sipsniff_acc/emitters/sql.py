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
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    Column, DateTime, Engine, Float, Index, Integer, MetaData, String, Table, create_engine, insert, inspect, select,
)
from sqlalchemy.exc import SQLAlchemyError

from sipsniff_acc.emitters.spool import BackendDown
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import AccParams, RulesFile

ID_COLUMN = "sipsniff_id"


class SqlError(RuntimeError):
    """The database refused or could not be reached; the message never holds the password."""


def safe_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for messages
        return "<unparseable URL>"


def julian(ts: float) -> float:
    """db_sqlite's timet_to_sqlite: ((t - 0.5) / 86400) + 2440587.5 on whole seconds."""
    return ((int(ts) - 0.5) / 86400.0) + 2440587.5


def table_names(rules: RulesFile) -> list[str]:
    names = [rules.acc.db_table_acc, rules.acc.db_table_missed_calls]
    for rule in (*rules.route, *rules.failure_route):
        for backends, call in rule.acc_calls():
            if "db" in backends.split("+") and call.table and call.table not in names:
                names.append(call.table)
    return names


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


class SqlEmitter:
    """The "db" backend: rows for records, inserted idempotently, one transaction per batch.

    Connects lazily and reconnects after a failure, so it can sit behind the durable spool
    while the database is down. ``deliver`` raises ``BackendDown`` (message without the
    password) on any database error; the spool keeps the batch and retries.
    """

    name = "db"

    def __init__(self, url: str, rules: RulesFile, create: bool = True, connect: bool | str = True,
                 timezone: str = "utc") -> None:
        """connect: True = prepare the schema now (errors raise); "try" = now if the database
        answers, else at the first delivery; False = at the first delivery."""
        self.url = url
        self.safe_url = self.where = safe_url(url)
        self.rules = rules
        self.acc = rules.acc
        self.create = create
        self.local_time = timezone == "local"
        try:
            self.engine: Engine = create_engine(url, pool_pre_ping=True)
        except (SQLAlchemyError, ImportError, ValueError) as e:
            raise SqlError(f"{self.safe_url}: {type(e).__name__}: {_short(e)}") from None
        self.sqlite = self.engine.dialect.name == "sqlite"
        self.tables: dict[str, Table] = {}
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
        try:
            self.tables = prepare(self.engine, self.rules, self.create, self.engine.dialect.name)
        except SQLAlchemyError as e:
            raise SqlError(f"{self.safe_url}: {type(e).__name__}: {_short(e)}") from None

    def wants(self, r: AccRecord) -> bool:
        return "db" in r.backends

    def emit(self, records: list[AccRecord]) -> None:
        """Write now (no spool): for init-db and tests; the CLI goes through the spool."""
        try:
            self.deliver([r for r in records if self.wants(r)])
        except BackendDown as e:
            raise SqlError(str(e)) from None

    def deliver(self, records: list[AccRecord]) -> None:
        if not records:
            return
        by_table: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            by_table.setdefault(r.table, []).extend(self.rows(r))
        try:
            if not self.tables:
                self._prepare()
            with self.engine.begin() as con:
                for name, rows in by_table.items():
                    con.execute(_insert_ignore(self.tables[name], self.engine.dialect.name), rows)
        except SqlError as e:
            raise BackendDown(str(e)) from None
        except SQLAlchemyError as e:
            raise BackendDown(f"{self.safe_url}: {type(e).__name__}: {_short(e)}") from None
        self.rows_offered += sum(len(v) for v in by_table.values())

    def rows(self, r: AccRecord) -> list[dict[str, Any]]:
        a = self.acc
        empty = None if self.sqlite or a.acc_extra_nullable else ""
        sec = int(r.ts)
        if self.sqlite:
            when: Any = julian(r.ts)
        elif self.local_time:
            when = dt.datetime.fromtimestamp(sec)
        else:
            when = dt.datetime.fromtimestamp(sec, dt.timezone.utc).replace(tzinfo=None)
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
            base[a.time_attr] = time.strftime(a.time_format, time.localtime(sec) if a.time_mode == 3 else time.gmtime(sec))
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

    def close(self) -> None:
        self.engine.dispose()



def _insert_ignore(table: Table, dialect: str) -> Any:
    if dialect == "sqlite":
        return insert(table).prefix_with("OR IGNORE")
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        return pg_insert(table).on_conflict_do_nothing(index_elements=[ID_COLUMN])
    if dialect in ("mysql", "mariadb"):
        return insert(table).prefix_with("IGNORE")
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
    wanted = {"acc": versions[0], "missed_calls": versions[1]}
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
