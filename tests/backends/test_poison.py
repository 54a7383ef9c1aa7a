"""Poison records against real databases (issue 10 acceptance): they never block the rest.

Five poison calls (NUL in a db_extra header, a 300-character Call-ID, a 200-character
To-tag, reason and extra) then 20 normal calls, through `sipsniff-acc process`: all 40
normal rows are written to PostgreSQL, MariaDB in strict mode and SQLite; the poison
records are stored after fitting (truncate, the default: the same rows everywhere) or set
aside as dead letters with their reason (dead-letter policy); the run ends promptly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.backends.poison import LONG, NORMAL_CALLS, write_case
from tests.backends.test_sql_backends import normalised, sipsniff
from tests.servers import MariaDB, Postgres, mariadb, postgres  # noqa: F401 - fixtures

PROMPT = 60.0  #: seconds: a run that retried a refused batch would hit --drain-timeout and exit 3
FITTED = "acc.callid truncated 2, acc.sip_reason truncated 1, acc.to_tag truncated 2, acc.ua replaced 2, " \
         "acc.xx truncated 1"


def acc_rows(url: str) -> list[tuple[Any, ...]]:
    engine = create_engine(url)
    try:
        with engine.connect() as con:
            result = con.execute(text("SELECT * FROM acc"))
            return normalised([tuple(x) for x in result], list(result.keys()))
    finally:
        engine.dispose()


def by_column(rows: list[tuple[Any, ...]], column: str) -> list[Any]:
    return [dict(r[1:])[column] for r in rows]


def test_poison_is_fitted_and_the_normal_rows_all_arrive_everywhere(tmp_path: Path, postgres: Postgres,
                                                                    mariadb: MariaDB) -> None:
    pcap, rules = write_case(tmp_path)
    urls = {"sqlite": f"sqlite:///{tmp_path / 'acc.db'}", "postgresql": postgres.url, "mariadb": mariadb.url}
    tables = {}
    for name, url in urls.items():
        start = time.monotonic()
        res = sipsniff("process", str(pcap), "--rules", str(rules), "--db-url", url, "--log", "none",
                       "--drain-timeout", "10", "--spool", str(tmp_path / f"{name}.spool"), cwd=tmp_path)
        assert res.returncode == 0, (name, res.stderr)
        assert time.monotonic() - start < PROMPT
        assert f"values fitted to the schema: {FITTED}" in res.stderr, (name, res.stderr)
        tables[name] = acc_rows(url)
    rows = tables["sqlite"]
    callids = by_column(rows, "callid")
    assert len(rows) == 2 * (NORMAL_CALLS + 5)
    assert sum(c == f"call-{n}@192.0.2.1" for c in callids for n in range(NORMAL_CALLS)) == 2 * NORMAL_CALLS
    assert sorted(len(c) for c in callids)[-2:] == [255, 255]  # the 300-character Call-ID, truncated
    assert max(len(t) for t in by_column(rows, "to_tag")) == 128 and LONG > 128
    assert max(len(r) for r in by_column(rows, "sip_reason")) == 128
    assert max(len(x or "") for x in by_column(rows, "xx")) == 128
    assert by_column(rows, "ua").count("bad\ufffdagent") == 2  # NUL replaced by U+FFFD
    assert tables["sqlite"] == tables["postgresql"] == tables["mariadb"]


@pytest.mark.parametrize("server_name", ["postgres", "mariadb"])
def test_dead_letter_policy_sets_the_poison_aside_with_its_reason(tmp_path: Path, server_name: str,
                                                                  request: pytest.FixtureRequest) -> None:
    server: Postgres | MariaDB = request.getfixturevalue(server_name)
    pcap, rules = write_case(tmp_path)
    spool = str(tmp_path / "spool")
    server.stop()  # the run spools everything ...
    res = sipsniff("process", str(pcap), "--rules", str(rules), "--db-url", server.url, "--log", "none",
                   "--drain-timeout", "0", "--spool", spool, cwd=tmp_path)
    assert res.returncode == 3 and "50 record(s) kept in the spool" in res.stderr, res.stderr
    server.start()  # ... and `deliver` sends it with the dead-letter policy
    start = time.monotonic()
    res = sipsniff("deliver", "--db-url", server.url, "--rules", str(rules), "--spool", spool,
                   "--on-overlong", "dead-letter", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - start < PROMPT
    assert "db: 44 record(s) delivered" in res.stdout and "6 set aside as dead letters" in res.stdout
    assert res.stderr.count("alarm: db ") == 6 and "refused (acc.callid: 300 characters, the column holds 255)" \
        in res.stderr
    ids = [str(r[0]) for r in server.query("SELECT callid FROM acc")]
    normal = {f"call-{n}@192.0.2.1" for n in range(NORMAL_CALLS)}
    assert len(ids) == 44 and sum(i in normal for i in ids) == 2 * NORMAL_CALLS
    status = sipsniff("spool", "status", "--spool", spool, cwd=tmp_path)
    assert status.returncode == 0
    assert ": 0 pending, 6 dead-lettered" in status.stdout
    for line in ("2 x acc.callid: 300 characters, the column holds 255",
                 f"2 x acc.to_tag: {LONG} characters, the column holds 128",
                 f"1 x acc.sip_reason: {LONG} characters, the column holds 128",
                 f"1 x acc.xx: {LONG} characters, the column holds 128"):
        assert line in status.stdout, status.stdout
    exported = sipsniff("spool", "export", "--dead", "--spool", spool, "-o", str(tmp_path / "dead.jsonl"),
                        cwd=tmp_path)
    assert exported.returncode == 0
    docs = [json.loads(x) for x in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert len(docs) == 6 and all(d["state"] == "dead" and d["reason"] and d["at"] for d in docs)
    assert all(d["destination"].startswith("sql:") and "@127.0.0.1" in d["destination"] for d in docs)
    # fixed the policy: retry them, deliver with truncation: every record is in the database once
    assert sipsniff("spool", "retry", "--spool", spool, cwd=tmp_path).returncode == 0
    res = sipsniff("deliver", "--db-url", server.url, "--rules", str(rules), "--spool", spool, cwd=tmp_path)
    assert res.returncode == 0 and "db: 6 record(s) delivered" in res.stdout, res.stdout + res.stderr
    assert len(server.query("SELECT callid FROM acc")) == 50


@pytest.mark.parametrize("server_name", ["postgres", "mariadb"])
def test_dead_letter_policy_from_rules_through_process(tmp_path: Path, server_name: str,
                                                       request: pytest.FixtureRequest) -> None:
    """rules.yaml's acc.on_overlong: dead-letter, straight through `process`: exit 0 (nothing is
    pending), the 6 over-long records are dead letters with their reasons, the 44 others rows."""
    server: Postgres | MariaDB = request.getfixturevalue(server_name)
    pcap, rules = write_case(tmp_path)
    rules.write_text(rules.read_text().replace("acc:\n", "acc:\n  on_overlong: dead-letter\n", 1))
    spool = str(tmp_path / "spool")
    start = time.monotonic()
    res = sipsniff("process", str(pcap), "--rules", str(rules), "--db-url", server.url, "--log", "none",
                   "--drain-timeout", "10", "--spool", spool, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - start < PROMPT
    assert "records delivered" in res.stderr and "refused (acc.to_tag: 200 characters, the column holds 128)" \
        in res.stderr
    assert "alarm: db " in res.stderr and "6 record(s) set aside in the spool's dead letters" in res.stderr
    callids = [str(r[0]) for r in server.query("SELECT callid FROM acc")]
    normal = {f"call-{n}@192.0.2.1" for n in range(NORMAL_CALLS)}
    assert len(callids) == 44 and sum(c in normal for c in callids) == 2 * NORMAL_CALLS
    status = sipsniff("spool", "status", "--spool", spool, cwd=tmp_path)
    assert ": 0 pending, 6 dead-lettered" in status.stdout
