"""Issue 10 (red-team pass): a record time a DATETIME cannot hold, and database URLs that can never work.

A pcapng whose interface says ``if_tsresol=0`` (whole seconds) can carry any time, up to
2^64 s; a large negative ``if_tsoffset`` sends it before year 1. Such a record must be set
aside alone, with its reason, while every other record is spooled and delivered, and the
run must never say records are kept in the spool when they are not. A URL that can never
work (in-memory SQLite, unknown dialect, a missing driver, a port out of range,
unparseable) is a usage mistake: one line, exit 2, before the work.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.backends.test_sql_backends import sipsniff
from tests.builders import ether, ip4_udp, sip_request, sip_response
from tests.conftest import PCAPS
from tests.servers import Postgres, free_port, postgres  # noqa: F401 - fixture

YEAR_10000 = 253402300800  #: 10000-01-01T00:00:00Z: one second past what a DATETIME holds
SAMPLE = PCAPS / "sample.pcap"


def _block(kind: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    return struct.pack("<II", kind, 12 + len(body)) + body + struct.pack("<I", 12 + len(body))


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def pcapng_seconds(frames: list[tuple[int, bytes]], tsoffset: int | None = None) -> bytes:
    """A pcapng with if_tsresol=0 (timestamps in whole seconds) and an optional if_tsoffset."""
    options = _option(9, bytes([0]))
    if tsoffset is not None:
        options += _option(14, struct.pack("<q", tsoffset))
    options += _option(0, b"")
    out = [_block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)),
           _block(1, struct.pack("<HHI", 1, 0, 65535) + options)]
    for ts, frame in frames:
        out.append(_block(6, struct.pack("<IIIII", 0, ts >> 32, ts & 0xFFFFFFFF, len(frame), len(frame)) + frame))
    return b"".join(out)


def calls(n: int, poison: int | None = None, poison_time: int = YEAR_10000, start: int = 1_700_000_000
          ) -> list[tuple[int, bytes]]:
    """n answered INVITEs (one record each), call ``poison`` at ``poison_time``."""
    frames: list[tuple[int, bytes]] = []
    for i in range(n):
        t = poison_time if i == poison else start + 2 * i
        cid, branch = f"call-{i}@192.0.2.1", f"z9hG4bK-{i}"
        frames.append((t, ether(ip4_udp(sip_request("INVITE", call_id=cid, branch=branch)))))
        frames.append((t + 1, ether(ip4_udp(sip_response(200, call_id=cid, branch=branch),
                                            src="192.0.2.2", dst="192.0.2.1"))))
    return frames


def spool_counts(spool: Path) -> tuple[int, int, list[str]]:
    """(queued, dead-lettered, dead-letter reasons) read straight from the spool file."""
    db = sqlite3.connect(spool)
    try:
        queued = db.execute("SELECT count(*) FROM queue").fetchone()[0]
        reasons = [r[0] for r in db.execute("SELECT reason FROM dead ORDER BY seq")]
    finally:
        db.close()
    return int(queued), len(reasons), reasons


def acc_count(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as con:
            return int(con.execute(text("SELECT count(*) FROM acc")).scalar_one())
    finally:
        engine.dispose()


def test_a_year_10000_record_is_set_aside_alone_and_the_rest_reach_postgresql(tmp_path: Path,
                                                                               postgres: Postgres) -> None:
    """Was: `ValueError: year 10000 is out of range` traceback, exit 1, 0 rows, an empty spool."""
    cap = tmp_path / "poison.pcapng"
    cap.write_bytes(pcapng_seconds(calls(1200, poison=300)))
    spool = tmp_path / "spool"
    res = sipsniff("process", "-j", "0", str(cap), "--db-url", postgres.url, "--log", "none",
                   "--drain-timeout", "20", "--spool", str(spool), cwd=tmp_path)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 0, res.stderr
    assert acc_count(postgres.url) == 1199
    queued, dead, reasons = spool_counts(spool)
    assert (queued, dead) == (0, 1)
    assert reasons[0].startswith(f"time {YEAR_10000 + 1} is outside what a DATETIME column holds")
    assert "1199 records delivered" in res.stderr and "1 set aside as dead letters" in res.stderr, res.stderr


@pytest.mark.parametrize("case", ["year-10000", "before-year-1"])
def test_with_the_database_down_the_spool_keeps_exactly_what_it_says(tmp_path: Path, case: str) -> None:
    """Was: "21 record(s) kept in the spool" with an empty spool (year 10000), and
    "spool ...: [Errno 75] Value too large" for a large negative if_tsoffset."""
    if case == "year-10000":
        data = pcapng_seconds(calls(21, poison=7))
    else:  # if_tsoffset -2^62 s puts every record before year 1: each is set aside, none is "kept"
        data = pcapng_seconds(calls(1), tsoffset=-2 ** 62)
    cap = tmp_path / "t.pcapng"
    cap.write_bytes(data)
    spool = tmp_path / "spool"
    url = f"postgresql+psycopg://acc@127.0.0.1:{free_port()}/acc"  # nothing listens there
    res = sipsniff("process", "-j", "0", str(cap), "--db-url", url, "--log", "none", "--drain-timeout", "1",
                   "--spool", str(spool), cwd=tmp_path)
    assert "Traceback" not in res.stderr and "Errno" not in res.stderr, res.stderr
    queued, dead, reasons = spool_counts(spool)
    assert dead == 1 and "is outside what a DATETIME column holds" in reasons[0], reasons
    if case == "year-10000":
        assert queued == 20
        assert res.returncode == 3 and "20 record(s) kept in the spool" in res.stderr, res.stderr
    else:
        assert queued == 0
        assert "kept in the spool" not in res.stderr, res.stderr
    assert "refused (time " in res.stderr and "set aside in the spool's dead letters" in res.stderr


@pytest.mark.parametrize("time_mode", [0, 4])
def test_sqlite_refuses_only_the_record_whose_time_no_time_column_holds(tmp_path: Path, time_mode: int) -> None:
    """SQLite (time_mode 0: a Julian day; 4: a formatted UTC time): the same record is refused as on
    PostgreSQL (SQLite's date functions stop at year 9999 too), the others are written."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"acc:\n  db_flag: 1\n  time_mode: {time_mode}\nroute:\n  - if: {{method: INVITE}}\n"
                     "    setflag: [1]\n")
    cap = tmp_path / "t.pcapng"
    cap.write_bytes(pcapng_seconds(calls(30, poison=3, poison_time=2 ** 40)))
    url = f"sqlite:///{tmp_path / 'acc.db'}"
    res = sipsniff("process", "-j", "0", str(cap), "--rules", str(rules), "--db-url", url, "--log", "none",
                   "--drain-timeout", "5", "--spool", str(tmp_path / "spool"), cwd=tmp_path)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 0, res.stderr
    assert acc_count(url) == 29
    queued, dead, reasons = spool_counts(tmp_path / "spool")
    assert (queued, dead) == (0, 1) and reasons[0].startswith(f"time {2 ** 40 + 1} is outside what a DATETIME"), \
        reasons


def test_a_retried_unrenderable_record_is_refused_again_with_its_reason(tmp_path: Path, postgres: Postgres) -> None:
    """`spool retry` of such a record renders it again at delivery: same reason, not 'unreadable'."""
    cap = tmp_path / "t.pcapng"
    cap.write_bytes(pcapng_seconds(calls(3, poison=1)))
    spool = tmp_path / "spool"
    res = sipsniff("process", "-j", "0", str(cap), "--db-url", postgres.url, "--log", "none",
                   "--drain-timeout", "10", "--spool", str(spool), cwd=tmp_path)
    assert res.returncode == 0 and spool_counts(spool)[:2] == (0, 1), res.stderr
    res = sipsniff("spool", "retry", "--spool", str(spool), cwd=tmp_path)
    assert res.returncode == 0 and spool_counts(spool)[:2] == (1, 0), res.stderr
    res = sipsniff("deliver", "--spool", str(spool), "--db-url", postgres.url, "--drain-timeout", "10", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    queued, dead, reasons = spool_counts(spool)
    assert (queued, dead) == (0, 1), res.stderr
    assert reasons[0].startswith(f"time {YEAR_10000 + 1} is outside what a DATETIME column holds"), reasons
    assert acc_count(postgres.url) == 2


BAD_URLS = {
    "sqlite://": "an in-memory SQLite database",
    "sqlite:///": "an in-memory SQLite database",
    "sqlite:///:memory:": "an in-memory SQLite database",
    "foo://x": "unknown database dialect or driver 'foo'",
    "postgresql+psycopg://u@127.0.0.1:99999/db": "port 99999 is out of range (1-65535)",
    "postgresql+psycopg://u:s3cret@127.0.0.1:abc/db": "is not a database URL",
    "postgresql+nosuchdriver://u@127.0.0.1/db": "unknown database dialect or driver",
}


@pytest.mark.parametrize("url", list(BAD_URLS))
@pytest.mark.parametrize("command", ["process", "init-db", "deliver"])
def test_a_url_that_can_never_work_is_a_usage_error_before_the_work(tmp_path: Path, url: str,
                                                                     command: str) -> None:
    """Was: in-memory SQLite "20 records delivered", exit 0, rows gone; `process --db-url foo://x`
    exit 3 (init-db 2); a port out of range retried for the whole drain time; `deliver` said
    "nothing pending"."""
    if command == "init-db":
        args = [command, url]
    elif command == "deliver":
        args = [command, "--db-url", url, "--spool", str(tmp_path / "spool")]
    else:
        args = [command, str(SAMPLE), "--db-url", url, "--log", "none", "--drain-timeout", "30",
                "--spool", str(tmp_path / "spool")]
    start = time.monotonic()
    res = sipsniff(*args, cwd=tmp_path)
    assert time.monotonic() - start < 15
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert BAD_URLS[url] in lines[0]
    assert "s3cret" not in res.stderr and "delivered" not in res.stderr + res.stdout
    assert not (tmp_path / "spool").exists()  # refused before the work


def test_init_db_creates_the_sqlite_file_0600(tmp_path: Path) -> None:
    """Was 0644 under umask 022 (process made it 0600)."""
    old = os.umask(0o022)
    try:
        res = sipsniff("init-db", f"sqlite:///{tmp_path / 'acc.db'}", cwd=tmp_path)
    finally:
        os.umask(old)
    assert res.returncode == 0, res.stderr
    assert oct(os.stat(tmp_path / "acc.db").st_mode & 0o777) == "0o600"
