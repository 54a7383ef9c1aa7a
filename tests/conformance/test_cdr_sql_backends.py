"""acc_cdrs rows on SQLite, PostgreSQL and MariaDB (real servers on loopback, tests/servers.py).

The same CDR cases through `sipsniff-acc process` into each database: the same rows
everywhere once each database's time encoding is read back (SQLite: db_sqlite's Julian REAL;
the others: a DATETIME), and on SQLite the rows Kamailio itself wrote (acc_cdrs.json).
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conformance.goldens import rules_for
from tests.servers import MariaDB, Postgres, mariadb, postgres  # noqa: F401 - fixtures

CASES = Path(__file__).resolve().parent / "cases"
PCAPS = [CASES / c / "capture.pcap" for c in ("cdr_answered", "cdr_busy", "cdr_no_answer")]


def _seconds(v: Any) -> int:
    if isinstance(v, float):  # SQLite: Kamailio's Julian day of (t - 0.5 s)
        return round(86400 * (v - 2440587.5) + 0.5)
    return int(v.replace(tzinfo=dt.timezone.utc).timestamp())


def _rows(url: str) -> list[tuple[Any, ...]]:
    from sqlalchemy import create_engine, text
    engine = create_engine(url)
    try:
        with engine.connect() as con:
            result = con.execute(text("SELECT * FROM acc_cdrs"))
            cols = list(result.keys())
            out = []
            for row in result:
                d = dict(zip(cols, row, strict=True))
                d.pop("id")
                d.pop("sipsniff_id")
                start, end, duration = _seconds(d.pop("start_time")), _seconds(d.pop("end_time")), d.pop("duration")
                out.append((start, end, round(float(duration), 3), *sorted(d.items())))
    finally:
        engine.dispose()
    return sorted(out, key=repr)


def test_same_cdr_rows_in_sqlite_postgresql_and_mariadb(tmp_path: Path, postgres: Postgres,
                                                         mariadb: MariaDB) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_for("cdr_busy").replace("acc:\n", "acc:\n  cdr_extra_nullable: true\n", 1))
    got: dict[str, list[tuple[Any, ...]]] = {}
    for name, url in (("sqlite", f"sqlite:///{tmp_path / 'acc.db'}"), ("postgresql", postgres.url),
                      ("mariadb", mariadb.url)):
        res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", *map(str, PCAPS), "--rules", str(rules),
                              "--db-url", url, "--log", "none", "-q", "--spool", str(tmp_path / f"{name}.spool")],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert res.returncode == 0, res.stderr
        got[name] = _rows(url)
    assert len(got["sqlite"]) == 4  # 2 answered calls, a busy one, a no-answer one
    assert got["sqlite"] == got["postgresql"] == got["mariadb"]
    assert {r[2] for r in got["sqlite"]} >= {0.0, 0.506}
