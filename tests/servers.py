"""Real database servers on loopback for the backend tests: PostgreSQL and MariaDB.

Each runs from a fresh data directory in the test's temp dir, on a free port of 127.0.0.1,
as a process we started (stopped by its PID). ``stop()``/``start()`` simulate an outage.
A missing server binary skips the test, or fails it under SIPSNIFF_REQUIRE_SERVERS=1.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_program

START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log.read_text(errors='replace')[-1500:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"server did not listen on {port} within {START_TIMEOUT} s")


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """Stop a server we started, by its PID: the signal, then SIGKILL after 20 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        require_program(name)  # skips, or fails under SIPSNIFF_REQUIRE_SERVERS=1
        raise AssertionError("unreachable")
    return found


class Postgres:
    """postgres -D <tmp> on 127.0.0.1:<free port>, trust auth, database `acc`, user `sipsniff`."""

    def __init__(self, tmp: Path) -> None:
        self.postgres, initdb = _pg_bin("postgres"), _pg_bin("initdb")
        # its own directory under /tmp: pytest's are 0700 root, and the server runs as "postgres"
        self.dir = Path(tempfile.mkdtemp(prefix="sipsniff-pg-"))
        self.as_user: dict[str, Any] = {}
        if os.geteuid() == 0:  # postgres refuses to run as root; the Popen PID must be the server itself
            os.chown(self.dir, *_uid_gid("postgres"))
            self.as_user = {"user": "postgres", "group": "postgres"}
        self.port = free_port()
        self.log = self.dir / "log"
        subprocess.run([initdb, "-D", str(self.dir / "data"), "-A", "trust", "-U", "sipsniff",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120, cwd=self.dir,
                       **self.as_user)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()
        subprocess.run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "sipsniff", "acc"],
                       check=True, capture_output=True, timeout=60)
        self.url = f"postgresql+psycopg://sipsniff@127.0.0.1:{self.port}/acc"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.postgres, "-D", str(self.dir / "data"), "-k", str(self.dir), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"], stdout=log, stderr=log, cwd=self.dir,
                **self.as_user)
        _wait_port(self.port, self.proc, self.log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:  # listening is not yet accepting: wait for pg_isready
            if subprocess.run([_pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                              capture_output=True, timeout=10).returncode == 0:
                return
            time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT)  # "fast" shutdown: clients are disconnected

    def query(self, sql: str) -> list[tuple[object, ...]]:
        import psycopg
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=sipsniff dbname=acc") as con:
            return list(con.execute(sql).fetchall())


class MariaDB:
    """mariadbd --datadir <tmp> on 127.0.0.1:<free port>, no grant tables, database `acc`, strict mode
    (STRICT_ALL_TABLES: refuses data too long instead of truncating it)."""

    def __init__(self, tmp: Path) -> None:
        self.mariadbd = shutil.which("mariadbd") or shutil.which("mysqld") or require_program("mariadbd")
        install = shutil.which("mariadb-install-db") or require_program("mariadb-install-db")
        self.dir = tmp / "my"
        self.dir.mkdir()
        self.port = free_port()
        self.log = self.dir / "log"
        subprocess.run([install, "--no-defaults", f"--datadir={self.dir / 'data'}", "--user=root",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, capture_output=True, timeout=120)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()
        self.query("CREATE DATABASE acc")
        self.db = "acc"
        self.url = f"mysql+pymysql://root@127.0.0.1:{self.port}/acc"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.mariadbd, "--no-defaults", f"--datadir={self.dir / 'data'}", f"--socket={self.dir / 'sock'}",
                 f"--port={self.port}", "--bind-address=127.0.0.1", "--user=root", "--skip-grant-tables",
                 "--innodb-flush-log-at-trx-commit=2", f"--pid-file={self.dir / 'pid'}",
                 "--sql-mode=STRICT_ALL_TABLES"], stdout=log, stderr=log)  # strict: an over-long value is an error
        _wait_port(self.port, self.proc, self.log)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM)

    db = ""

    def query(self, sql: str) -> list[tuple[object, ...]]:
        import pymysql
        con = pymysql.connect(host="127.0.0.1", port=self.port, user="root", database=self.db or None)
        try:
            with con.cursor() as cur:
                cur.execute(sql)
                return list(cur.fetchall())
        finally:
            con.commit()
            con.close()


def _uid_gid(user: str) -> tuple[int, int]:
    import pwd
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


@pytest.fixture
def postgres(tmp_path: Path):  # type: ignore[no-untyped-def]
    try:
        server = Postgres(tmp_path)
    except KeyError:  # no "postgres" user: the server package is not installed
        require_program("postgres-server-user")
        raise
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def mariadb(tmp_path: Path):  # type: ignore[no-untyped-def]
    server = MariaDB(tmp_path)
    try:
        yield server
    finally:
        server.stop()
