"""Tests are isolated from the user's own files (issue 10): a spool left in the project
folder was delivered by a test into pytest's temporary database, and the user's records
vanished. conftest runs every test in a fresh directory without SIPSNIFF_DB_* and checks at
the end of the session that the project folder's spool and acc.db are untouched."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.conftest import PCAPS, ROOT

#: what a run with the defaults writes in its working directory, and where it takes its database from
USER_FILES = ("sipsniff-acc.spool", "sipsniff-acc.spool-wal", "acc.db")
USER_ENV = ("SIPSNIFF_DB_URL", "SIPSNIFF_DB_PASSWORD")


def _fingerprint(folder: Path) -> dict[str, tuple[int, int] | None]:
    out: dict[str, tuple[int, int] | None] = {}
    for name in USER_FILES:
        p = folder / name
        out[name] = (p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else None
    return out


def test_each_test_runs_in_its_own_empty_directory() -> None:
    cwd = Path.cwd().resolve()
    assert cwd != ROOT and ROOT not in cwd.parents, f"tests run in the project folder: {cwd}"
    assert not any((cwd / name).exists() for name in USER_FILES)
    assert not any(name in os.environ for name in USER_ENV)


def test_a_default_run_never_touches_the_project_spool_or_db() -> None:
    """`process` with every default (./acc.db, ./sipsniff-acc.spool), started the way most
    tests start it (no cwd=): what it writes lands in the test's directory."""
    before = _fingerprint(ROOT)
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", str(PCAPS / "sample.pcap"),
                          "--log", "none", "-q"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert _fingerprint(ROOT) == before, "the run wrote the project folder's own acc.db or spool"
    con = sqlite3.connect(Path.cwd() / "acc.db")
    try:
        assert con.execute("SELECT count(*) FROM acc").fetchone()[0] == 20
    finally:
        con.close()
