"""Kamailio's own rows of a recorded case loaded into a fresh billing database of each kind,
with each database's time encoding as Kamailio writes it (SQLite: db_sqlite's Julian REAL in a
TIMESTAMP column; PostgreSQL/MariaDB: a UTC DATETIME)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from sqlalchemy import Column, DateTime, Float, Integer, MetaData, String, Table, create_engine, insert

from sipsniff_acc.audit.billing import from_julian

TIMES = ("time", "start_time", "end_time")  #: Kamailio's DATETIME columns (acc, missed_calls, acc_cdrs)
CASES = Path(__file__).resolve().parents[1] / "conformance" / "cases"
VOLUME = CASES / "volume_mixed"


def kamailio_rows(folder: Path = VOLUME) -> dict[str, list[dict[str, Any]]]:
    """acc, missed_calls and (when the case has dialog CDRs) acc_cdrs rows as Kamailio wrote them."""
    names = ("acc", "missed_calls", "acc_cdrs")
    return {t: json.loads((folder / f"{t}.json").read_text()) for t in names if (folder / f"{t}.json").exists()}


def _table(meta: MetaData, name: str, sample: dict[str, Any], sqlite: bool) -> Table:
    cols: list[Column[Any]] = [Column("id", Integer, primary_key=True, autoincrement=True)]
    for k in sample:
        if k == "id":
            continue
        if k in TIMES:
            cols.append(Column(k, Float if sqlite else DateTime, nullable=False))
        elif k == "duration":
            cols.append(Column(k, Float, nullable=False))
        else:
            cols.append(Column(k, String(255), nullable=True))
    return Table(name, meta, *cols)


def to_db_time(julian: float, sqlite: bool) -> Any:
    """Kamailio's stored value: the Julian REAL on SQLite, the UTC DATETIME elsewhere."""
    if sqlite:
        return julian
    return dt.datetime.fromtimestamp(from_julian(julian), dt.timezone.utc).replace(tzinfo=None)


def load(url: str, tables: dict[str, list[dict[str, Any]]]) -> None:
    """Create the tables (Kamailio's columns, the extras as VARCHAR) and insert the rows as
    given (times as the Julian REAL of the recording, converted per database)."""
    engine = create_engine(url)
    sqlite = engine.dialect.name == "sqlite"
    meta = MetaData()
    # an empty acc or missed_calls (no such record in the case) still exists, with the other's columns
    core = next((rows[0] for name in ("acc", "missed_calls") if (rows := tables.get(name))), {})
    samples = {name: rows[0] if rows else core for name, rows in tables.items()}
    made = {name: _table(meta, name, sample, sqlite) for name, sample in samples.items() if sample}
    meta.create_all(engine)
    with engine.begin() as con:
        for name, rows in tables.items():
            if rows:
                con.execute(insert(made[name]), [{k: (to_db_time(v, sqlite) if k in TIMES else v)
                                                  for k, v in r.items() if k != "id"} for r in rows])
    engine.dispose()
