"""The spool as a ledger through the real command line (issue 10's measured cases).

A database "down" here is a real SQLite file the test holds an exclusive lock on (every
access fails with "database is locked" after the URL's 0.1 s timeout), released later.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backends.poison import RULES, call, poison_then_normal
from tests.backends.test_sql_backends import sipsniff
from tests.builders import pcap_bytes
from tests.conftest import PCAPS

SAMPLE = PCAPS / "sample.pcap"  # 10 calls: 20 records


class Locked:
    """An SQLite database someone else holds an exclusive lock on: unreachable until released."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}?timeout=0.1"
        self.con: sqlite3.Connection | None = sqlite3.connect(path, isolation_level=None)
        self.con.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self.con is not None:
            self.con.execute("ROLLBACK")
            self.con.close()
            self.con = None


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[Locked]:
    db = Locked(tmp_path / "a.db")
    try:
        yield db
    finally:
        db.release()


def count(db: Path, table: str = "acc") -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608 - fixed names
    finally:
        con.close()


def poison_case(tmp: Path) -> tuple[Path, Path]:
    pcap, rules = tmp / "poison.pcap", tmp / "rules.yaml"
    pcap.write_bytes(poison_then_normal())
    rules.write_text(RULES)
    return pcap, rules


def test_records_are_only_ever_delivered_to_their_own_database(tmp_path: Path, locked: Locked) -> None:
    """Issue 10: keyed by backend type, records meant for one database went into another."""
    pcap, rules = poison_case(tmp_path)  # 50 records for A
    spool = str(tmp_path / "spool")
    res = sipsniff("process", str(pcap), "--rules", str(rules), "--db-url", locked.url, "--log", "none",
                   "--drain-timeout", "0", "--spool", spool, cwd=tmp_path)
    assert res.returncode == 3 and "50 record(s) kept in the spool" in res.stderr, res.stderr
    b = tmp_path / "b.db"
    res = sipsniff("process", str(SAMPLE), "--db-url", f"sqlite:///{b}", "--log", "none", "--spool", spool,
                   cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert count(b) == 20  # its own 20, none of A's 50
    note = f"note: 50 record(s) in the spool {spool} are for sql:sqlite:///{tmp_path / 'a.db'}?timeout=0.1"
    assert note in res.stderr and f"--db-url 'sqlite:///{tmp_path / 'a.db'}?timeout=0.1'" in res.stderr
    res = sipsniff("deliver", "--spool", spool, cwd=tmp_path)  # a plain deliver: default URL, not A
    assert res.returncode == 0 and note in res.stderr and "nothing pending for" in res.stdout
    assert not (tmp_path / "acc.db").exists()
    locked.release()
    res = sipsniff("deliver", "--spool", spool, "--db-url", locked.url, "--rules", str(rules), cwd=tmp_path)
    assert res.returncode == 0 and "db: 50 record(s) delivered" in res.stdout, res.stdout + res.stderr
    assert count(tmp_path / "a.db") == 50


def test_records_spooled_under_other_rules_are_delivered_after_the_rules_change(tmp_path: Path) -> None:
    """Issue 10: records spooled under one rules file crashed the run after the rules changed (KeyError)."""
    pcap, rules = poison_case(tmp_path)
    a = tmp_path / "a.db"
    assert sipsniff("init-db", f"sqlite:///{a}", "--rules", str(rules), cwd=tmp_path).returncode == 0
    db = Locked(a)
    spool = str(tmp_path / "spool")
    res = sipsniff("process", str(pcap), "--rules", str(rules), "--db-url", db.url, "--log", "none",
                   "--drain-timeout", "0", "--spool", spool, cwd=tmp_path)
    assert res.returncode == 3, res.stderr
    db.release()
    other = tmp_path / "other.yaml"
    other.write_text("acc: {db_flag: 1, db_table_acc: cdr}\nroute:\n  - if: {method: INVITE}\n    setflag: [1]\n")
    res = sipsniff("process", str(SAMPLE), "--rules", str(other), "--db-url", db.url, "--log", "none",
                   "--spool", spool, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert count(a) == 50 and count(a, "cdr") == 10  # the old rows in acc with their extras; the new in cdr
    con = sqlite3.connect(a)
    assert con.execute("SELECT count(*) FROM acc WHERE ua = 'sipp'").fetchone()[0] == 48
    con.close()


def test_a_corrupt_spool_row_is_set_aside_and_the_rest_delivered(tmp_path: Path, locked: Locked) -> None:
    """Issue 10: a corrupt spool row made every later run crash."""
    spool = tmp_path / "spool"
    res = sipsniff("process", str(SAMPLE), "--db-url", locked.url, "--log", "none", "--drain-timeout", "0",
                   "--spool", str(spool), cwd=tmp_path)
    assert res.returncode == 3
    con = sqlite3.connect(spool)
    con.execute("UPDATE queue SET record = x'deadbeef' WHERE seq = (SELECT min(seq) + 3 FROM queue)")
    con.commit()
    con.close()
    locked.release()
    res = sipsniff("deliver", "--spool", str(spool), "--db-url", locked.url, cwd=tmp_path)
    assert res.returncode == 0 and "db: 19 record(s) delivered" in res.stdout and "Traceback" not in res.stderr
    assert count(locked.path) == 19
    status = sipsniff("spool", "status", "--spool", str(spool), cwd=tmp_path)
    assert ": 0 pending, 1 dead-lettered" in status.stdout and "unreadable spool entry" in status.stdout


def test_an_impossible_sqlite_path_fails_at_once_in_one_line(tmp_path: Path) -> None:
    """Issue 10: sqlite:////nonexistent/dir/acc.db waited 61 s before failing."""
    start = time.monotonic()
    res = subprocess.run([*_cmd().split(), "process", str(SAMPLE), "--db-url", "sqlite:////nonexistent/dir/acc.db",
                          "--log", "none", "--spool", str(tmp_path / "spool")], capture_output=True, text=True,
                         cwd=tmp_path, timeout=30)
    assert time.monotonic() - start < 15
    assert res.returncode == 3 and "Traceback" not in res.stderr
    assert "error: sqlite:////nonexistent/dir/acc.db: the directory /nonexistent/dir does not exist" in res.stderr


def test_spool_and_database_files_are_created_0600(tmp_path: Path) -> None:
    """Issue 10: spool and SQLite files were created world-readable."""
    res = subprocess.run(["sh", "-c", f"umask 022 && exec {_cmd()} process {SAMPLE} --log none "
                          f"--db-url sqlite:///{tmp_path}/acc.db --spool {tmp_path}/spool"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for name in ("acc.db", "spool"):
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == "0o600", name


def _cmd() -> str:
    import sys
    return f"{sys.executable} -m sipsniff_acc"


def test_spool_commands_fail_in_one_line_on_a_missing_or_foreign_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00garbage" * 64)
    for args in (("status",), ("export", "--dead"), ("retry",)):
        for path in (tmp_path / "missing", junk):
            res = sipsniff("spool", *args, "--spool", str(path), cwd=tmp_path)
            assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res
    res = sipsniff("deliver", "--spool", str(junk), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_stops_intake_in_one_line_and_loses_nothing(tmp_path: Path, locked: Locked) -> None:
    """Issue 10: on a full filesystem, a traceback and 520 of 9761 records lost; `deliver`
    then crashed on every try. The spool lives on a 3 MiB tmpfs; the database is down."""
    calls = [f for n in range(6000) for f in call(n, 1_700_000_000.0 + n * 0.05)]
    pcap = tmp_path / "big.pcap"
    pcap.write_bytes(pcap_bytes(sorted(calls, key=lambda x: x[0])))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mnt)], check=True, timeout=30)
    try:
        rules = tmp_path / "rules.yaml"
        rules.write_text(RULES)
        res = sipsniff("process", str(pcap), "--rules", str(rules), "--db-url", locked.url, "--log", "none",
                       "--drain-timeout", "0", "--spool", str(mnt / "spool"), "-j", "0", cwd=tmp_path)
        assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr
        assert f"error: spool {mnt / 'spool'}: the disk is full" in res.stderr
        produced = int(res.stderr.split("acc: ")[1].split(" records")[0])
        assert "lost" not in res.stderr and 0 < produced < 12000
        for name in os.listdir(mnt):
            shutil.copy(mnt / name, tmp_path / name)
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)
    locked.release()
    res = sipsniff("deliver", "--spool", str(tmp_path / "spool"), "--db-url", locked.url, "--rules", str(rules),
                   cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert count(locked.path) == produced  # every record the run produced before it stopped


def test_spool_status_and_export_never_print_raw_control_characters(tmp_path: Path) -> None:
    """A backend's reason can quote the refused value: a CR or an escape sequence from a packet
    must not forge a line or drive the operator's terminal; the export file is private."""
    from sipsniff_acc.emitters.spool import DurableSpool

    spool_path = tmp_path / "s.spool"
    spool = DurableSpool(spool_path)
    spool.append_docs("sql:sqlite:///x.db", [b'{"rows": [["acc", {"callid": "a\\u001b[2Jb"}]]}'])
    spool.bury("sql:sqlite:///x.db", [1], "value 'x\r\x1b[2J\nACC: transaction answered' refused")
    spool.close()
    status = sipsniff("spool", "status", "--spool", str(spool_path), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "\x1b" not in status.stdout and "\r" not in status.stdout
    assert "\\x1b[2J" in status.stdout and "\\r" in status.stdout
    assert not any(line.startswith("ACC:") for line in status.stdout.splitlines())
    out = tmp_path / "dead.jsonl"
    export = sipsniff("spool", "export", "--dead", "--spool", str(spool_path), "-o", str(out), cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    assert (out.stat().st_mode & 0o777) == 0o600
    text = out.read_text()
    assert len(text.splitlines()) == 1 and "\x1b" not in text and "\r" not in text
