"""The SQL backend against real servers on loopback: SQLite, PostgreSQL, MariaDB (issue 5).

Same capture, same rows everywhere; a database outage mid-run and a SIGKILL of sipsniff-acc
mid-run both end with every record in the database exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.goldens import rules_for
from tests.streaming import feed, pcap_chunks, run_through_outage, streaming, wait_for
from tests.servers import MariaDB, Postgres, mariadb, postgres  # noqa: F401 - fixtures

CASES = Path(__file__).resolve().parents[1] / "conformance" / "cases"
VOLUME = CASES / "volume_mixed" / "capture.pcap"  # 300 mixed calls through Kamailio: 600 records


def sipsniff(*args: str, cwd: Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sipsniff_acc", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, **kw)


def rules(tmp: Path, case: str = "volume_mixed", nullable: bool = True) -> Path:
    p = tmp / "rules.yaml"
    text = rules_for(case)
    if nullable:  # NULL for a null extra on every database (Kamailio: NULL on SQLite, '' elsewhere)
        text = text.replace("acc:\n", "acc:\n  acc_extra_nullable: true\n", 1)
    p.write_text(text)
    return p


def expected_ids(tmp: Path, pcap: Path, rules_file: Path) -> set[str]:
    out = tmp / "expected.jsonl"
    res = sipsniff("process", str(pcap), "--rules", str(rules_file), "--no-db", "--log", "none", "--jsonl", str(out),
                   "-q", cwd=tmp)
    assert res.returncode == 0, res.stderr
    return {json.loads(line)["id"] for line in out.read_text().splitlines()}


def normalised(rows: list[tuple[Any, ...]], columns: list[str]) -> list[tuple[Any, ...]]:
    """Rows without the autoincrement id; time as Unix seconds whatever the column type."""
    out = []
    for row in rows:
        d = dict(zip(columns, row, strict=True))
        t = d.pop("time")
        d.pop("id")
        if isinstance(t, float):  # SQLite: Kamailio's Julian day
            t = round(86400 * (t - 2440587.5) + 0.5)
        else:
            t = int(t.replace(tzinfo=__import__("datetime").timezone.utc).timestamp())
        out.append((t, *sorted(d.items())))
    return sorted(out, key=repr)


def test_same_rows_in_sqlite_postgresql_and_mariadb(tmp_path: Path, postgres: Postgres, mariadb: MariaDB) -> None:
    r = rules(tmp_path, "extras_and_legs")
    pcap = CASES / "extras_and_legs" / "capture.pcap"
    sqlite_url = f"sqlite:///{tmp_path / 'acc.db'}"
    tables: dict[str, dict[str, list[tuple[Any, ...]]]] = {}
    for name, url in (("sqlite", sqlite_url), ("postgresql", postgres.url), ("mariadb", mariadb.url)):
        res = sipsniff("process", str(pcap), "--rules", str(r), "--db-url", url, "--log", "none",
                       "--spool", str(tmp_path / f"{name}.spool"), cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        from sqlalchemy import create_engine, text
        engine = create_engine(url)
        with engine.connect() as con:
            tables[name] = {}
            for t in ("acc", "missed_calls"):
                result = con.execute(text(f"SELECT * FROM {t}"))  # noqa: S608 - fixed names
                tables[name][t] = normalised([tuple(x) for x in result], list(result.keys()))
        engine.dispose()
    assert len(tables["sqlite"]["acc"]) == 18  # 6 INVITE 200 x 2 legs + 6 BYE
    assert tables["sqlite"] == tables["postgresql"] == tables["mariadb"]


def db_ids(server: Postgres | MariaDB) -> list[str]:
    try:
        return [str(r[0]) for r in server.query("SELECT sipsniff_id FROM acc UNION ALL SELECT sipsniff_id FROM missed_calls")]
    except Exception:  # noqa: BLE001 - tables not created yet
        return []


@pytest.mark.parametrize("server_name", ["postgres", "mariadb"])
def test_database_outage_mid_run_loses_and_duplicates_nothing(tmp_path: Path, server_name: str,
                                                              request: pytest.FixtureRequest) -> None:
    server: Postgres | MariaDB = request.getfixturevalue(server_name)
    r = rules(tmp_path)
    want = expected_ids(tmp_path, VOLUME, r)
    assert len(want) == 600
    err = run_through_outage(tmp_path, VOLUME, r, server, lambda: len(db_ids(server)), server.url)
    assert "alarm: db backend down" in err
    got = db_ids(server)
    assert len(got) == len(set(got)) == 600 and set(got) == want


def test_sigkill_mid_run_then_restart_on_the_same_spool(tmp_path: Path, postgres: Postgres) -> None:
    r = rules(tmp_path)
    want = expected_ids(tmp_path, VOLUME, r)
    chunks = pcap_chunks(VOLUME, 10)
    proc = streaming(tmp_path, postgres.url, r)
    feed(proc, chunks[:3], 0.6)
    wait_for(lambda: len(db_ids(postgres)) > 0)
    postgres.stop()  # records now wait in the spool ...
    feed(proc, chunks[3:6], 0.6)
    spool = sqlite3.connect(tmp_path / "spool")
    wait_for(lambda: spool.execute("SELECT count(*) FROM queue").fetchone()[0] > 0)
    spooled = spool.execute("SELECT count(*) FROM queue").fetchone()[0]
    spool.close()
    os.kill(proc.pid, signal.SIGKILL)  # ... when sipsniff-acc is killed
    proc.wait(30)
    postgres.start()
    before = len(db_ids(postgres))
    res = sipsniff("process", str(VOLUME), "--rules", str(r), "--db-url", postgres.url, "--log", "none",
                   "--spool", str(tmp_path / "spool"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"{spooled} of them left in the spool by an earlier run" in res.stderr
    got = db_ids(postgres)
    assert before < 600 and len(got) == len(set(got)) == 600 and set(got) == want


def test_sigterm_flushes_what_was_produced(tmp_path: Path, postgres: Postgres) -> None:
    r = rules(tmp_path)
    chunks = pcap_chunks(VOLUME, 10)
    proc = streaming(tmp_path, postgres.url, r)
    feed(proc, chunks[:4], 0)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    err = (tmp_path / "stderr").read_text()
    assert "stopping on SIGTERM: flushing" in err
    delivered = int(__import__("re").search(r"(\d+) records delivered to postgresql", err).group(1))
    assert delivered > 0 and len(db_ids(postgres)) == delivered
