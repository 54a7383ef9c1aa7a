"""The calls table on real PostgreSQL and MariaDB servers (tests/servers.py, loopback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import MariaDB, Postgres, mariadb, postgres  # noqa: F401 - fixtures

CAPTURE = Path(__file__).resolve().parents[1] / "conformance" / "cases" / "volume_mixed" / "capture.pcap"


@pytest.mark.parametrize("server", ["postgres", "mariadb"])
def test_calls_table_on_a_server(server: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    db: Postgres | MariaDB = request.getfixturevalue(server)
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", str(CAPTURE), "--db-url", db.url,
                          "--spool", str(tmp_path / "spool.db"), "--log", "none", "-q", "--calls-table", "calls"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = dict(db.query("SELECT outcome, count(*) FROM calls GROUP BY outcome"))  # type: ignore[arg-type]
    assert {k: int(v) for k, v in got.items()} == {"answered": 183, "busy": 76, "rejected": 41}  # type: ignore[call-overload]
    [(billable,)] = db.query("SELECT sum(billable) FROM calls")
    assert float(billable) > 0  # type: ignore[arg-type]
