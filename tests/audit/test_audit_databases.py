"""Issue 12, audit acceptance: the volume conformance case (300 calls through a real Kamailio
5.6) against Kamailio's own acc/missed_calls rows loaded into SQLite, PostgreSQL and MariaDB:
0 discrepancies and exit 0; then faults planted in a copy (rows deleted, rows with unseen
Call-IDs added, a code and a reason changed, a To-tag changed, a row duplicated, a time
shifted beyond the tolerance): each found with its kind, table and field, nothing else
reported, exit 1. The same with a dialog-CDR case (acc_cdrs beside acc): a CDR stretched by
30 s is two mismatches (end_time, duration). Real servers on loopback (tests/servers.py), databases named audit_*.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sipsniff_acc.audit.billing import from_julian
from tests.audit.books import CASES, VOLUME, kamailio_rows, load
from tests.conformance.goldens import rules_for
from tests.servers import MariaDB, Postgres, _pg_bin

PCAP = VOLUME / "capture.pcap"
CDR_CASE = "cdr_answered"  #: two answered calls through Kamailio with dialog CDRs in acc_cdrs
UNSEEN = "audit-phantom-{n}@192.0.2.77"  #: Call-IDs that never crossed the wire


def audit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sipsniff_acc", "audit", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def discrepancies(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


Fault = tuple[str, str, str | None, str]  #: (kind, table, field, callid)


def plant(rows: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, list[dict[str, Any]]], set[Fault]]:
    """A copy of Kamailio's rows with one fault of each kind; the faults as the audit must name them."""
    rows = copy.deepcopy(rows)
    acc, missed = rows["acc"], rows["missed_calls"]
    invites = [r for r in acc if r["method"] == "INVITE" and r["sip_code"] == "200"]
    busy = [r for r in acc if r["sip_code"] == "486"]
    byes = [r for r in acc if r["method"] == "BYE"]
    last = max(from_julian(r["time"]) for r in acc + missed)
    early = [r for r in missed if from_julian(r["time"]) <= last - 6]
    expect: set[Fault] = set()
    # deleted rows: the calls are on the wire, not in the books (lost revenue)
    gone_acc, gone_missed = invites[0], missed[-1]
    acc.remove(gone_acc)
    missed.remove(gone_missed)
    expect |= {("missing", "acc", None, gone_acc["callid"]), ("missing", "missed_calls", None, gone_missed["callid"])}
    # rows for calls that never happened
    for n, table in ((1, "acc"), (2, "missed_calls")):
        ghost = dict(invites[5] if table == "acc" else missed[3], callid=UNSEEN.format(n=n))
        rows[table].append(ghost)
        expect.add(("phantom", table, None, ghost["callid"]))
    # a code and a reason changed, a To-tag changed (paired by the loose key)
    busy[0]["sip_code"] = "487"
    expect.add(("mismatch", "acc", "sip_code", busy[0]["callid"]))
    invites[3]["sip_reason"] = "Okay"
    expect.add(("mismatch", "acc", "sip_reason", invites[3]["callid"]))
    invites[7]["to_tag"] = "rewritten-tag"
    expect.add(("mismatch", "acc", "to_tag", invites[7]["callid"]))
    # billed twice
    acc.append(dict(byes[2]))
    expect.add(("duplicate", "acc", None, byes[2]["callid"]))
    # a time 5 s later (tolerance 1 s), still inside the capture's span
    early[0]["time"] += 5 / 86400
    expect.add(("mismatch", "missed_calls", "time", early[0]["callid"]))
    return rows, expect


def plant_cdr(rows: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, list[dict[str, Any]]], set[Fault]]:
    """A copy of a CDR case's rows with one call's CDR stretched by 30 s (end and duration)."""
    rows = copy.deepcopy(rows)
    cdr = rows["acc_cdrs"][-1]
    cdr["end_time"] += 30 / 86400
    cdr["duration"] += 30
    return rows, {("mismatch", "acc_cdrs", "end_time", cdr["c_callid"]),
                  ("mismatch", "acc_cdrs", "duration", cdr["c_callid"])}


def check(url: str, work: Path, expect: set[Fault], case: str = "volume_mixed") -> None:
    rules = work / f"{case}.yaml"
    rules.write_text(rules_for(case))
    out = work / f"{abs(hash(url))}.jsonl"
    res = audit(str(CASES / case / "capture.pcap"), "--rules", str(rules), "--against", url, "--jsonl", str(out),
                cwd=work)
    assert res.returncode == (1 if expect else 0), res.stdout + res.stderr
    found = discrepancies(out)
    assert {(d["kind"], d["table"], d["field"], d["callid"]) for d in found} == expect, res.stdout
    assert len(found) == len(expect)  # no false alarm, each fault once
    for d in found:
        assert {"kind", "table", "callid", "method", "from_tag", "to_tag", "field", "wire", "billing", "time"} <= set(d)
        if d["kind"] == "mismatch":
            assert d["wire"] != d["billing"] and d["wire"] is not None and d["billing"] is not None
    if not expect:
        assert "the books agree: 0 discrepancies" in res.stdout
    else:
        assert f"{len(expect)} discrepancies" in res.stdout


def test_books_agree_and_faults_found_on_sqlite(tmp_path: Path) -> None:
    clean, faulty = tmp_path / "audit_clean.db", tmp_path / "audit_faults.db"
    load(f"sqlite:///{clean}", kamailio_rows())
    rows, expect = plant(kamailio_rows())
    load(f"sqlite:///{faulty}", rows)
    check(f"sqlite:///{clean}", tmp_path, set())
    check(f"sqlite:///{faulty}", tmp_path, expect)
    cdr_clean, cdr_faulty = tmp_path / "audit_cdr_clean.db", tmp_path / "audit_cdr_faults.db"
    load(f"sqlite:///{cdr_clean}", kamailio_rows(CASES / CDR_CASE))
    rows, expect = plant_cdr(kamailio_rows(CASES / CDR_CASE))
    load(f"sqlite:///{cdr_faulty}", rows)
    check(f"sqlite:///{cdr_clean}", tmp_path, set(), CDR_CASE)
    check(f"sqlite:///{cdr_faulty}", tmp_path, expect, CDR_CASE)


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    try:
        server = Postgres(tmp_path_factory.mktemp("pg"))
    except KeyError:  # no "postgres" user: the server package is not installed
        from tests.conftest import require_program
        require_program("postgres-server-user")
        raise
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def maria(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDB]:
    server = MariaDB(tmp_path_factory.mktemp("maria"))
    try:
        yield server
    finally:
        server.stop()


def test_books_agree_and_faults_found_on_postgresql(pg: Postgres, tmp_path: Path) -> None:
    for name in ("audit_clean", "audit_faults", "audit_cdr_clean", "audit_cdr_faults"):
        subprocess.run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "sipsniff", name],
                       check=True, capture_output=True, timeout=60)
    base = f"postgresql+psycopg://sipsniff@127.0.0.1:{pg.port}"
    load(f"{base}/audit_clean", kamailio_rows())
    rows, expect = plant(kamailio_rows())
    load(f"{base}/audit_faults", rows)
    check(f"{base}/audit_clean", tmp_path, set())
    check(f"{base}/audit_faults", tmp_path, expect)
    load(f"{base}/audit_cdr_clean", kamailio_rows(CASES / CDR_CASE))
    rows, expect = plant_cdr(kamailio_rows(CASES / CDR_CASE))
    load(f"{base}/audit_cdr_faults", rows)
    check(f"{base}/audit_cdr_clean", tmp_path, set(), CDR_CASE)
    check(f"{base}/audit_cdr_faults", tmp_path, expect, CDR_CASE)


def test_books_agree_and_faults_found_on_mariadb(maria: MariaDB, tmp_path: Path) -> None:
    for name in ("audit_clean", "audit_faults", "audit_cdr_clean", "audit_cdr_faults"):
        maria.query(f"CREATE DATABASE {name}")
    base = f"mysql+pymysql://root@127.0.0.1:{maria.port}"
    load(f"{base}/audit_clean", kamailio_rows())
    rows, expect = plant(kamailio_rows())
    load(f"{base}/audit_faults", rows)
    check(f"{base}/audit_clean", tmp_path, set())
    check(f"{base}/audit_faults", tmp_path, expect)
    load(f"{base}/audit_cdr_clean", kamailio_rows(CASES / CDR_CASE))
    rows, expect = plant_cdr(kamailio_rows(CASES / CDR_CASE))
    load(f"{base}/audit_cdr_faults", rows)
    check(f"{base}/audit_cdr_clean", tmp_path, set(), CDR_CASE)
    check(f"{base}/audit_cdr_faults", tmp_path, expect, CDR_CASE)
