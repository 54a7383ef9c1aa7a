"""Red-team findings on the command line (issue 10, second pass): `-j` without an upper bound,
tracebacks for a bad `--syslog` URL and for a full disk on an output, and a summary listing
backends the run did not have.

Each case runs the real command in a subprocess; a full disk is /dev/full (every write fails
with ENOSPC), the database is a real SQLite file.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PCAPS

SAMPLE = str(PCAPS / "sample.pcap")
SAMPLE_RECORDS = 20  #: acc records of sample.pcap with the default rules
FULL = "/dev/full"
needs_full = pytest.mark.skipif(not os.path.exists(FULL), reason="no /dev/full on this system")


def run(*args: str, cwd: Path, stdout: object = subprocess.PIPE, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sipsniff_acc", *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=timeout, cwd=cwd)


def one_error(res: subprocess.CompletedProcess[str], status: int, *words: str) -> None:
    """Exit ``status``, no traceback, stderr exactly one line `error: ...` holding ``words``."""
    assert res.returncode == status, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and res.stderr.startswith("error: "), res.stderr
    assert res.stderr.count("\n") == 1, res.stderr
    for w in words:
        assert w in res.stderr, res.stderr


def acc_rows(db: Path) -> int:
    with sqlite3.connect(db) as con:
        return int(con.execute("SELECT count(*) FROM acc").fetchone()[0])


def test_workers_above_the_maximum_is_one_line_before_the_work(tmp_path: Path) -> None:
    """-j 5000 forked ~750 processes on 2 cores and woke the OOM killer. Just above the bound
    (a few processes on the old code, which then exited 0) is refused before any fork."""
    top = max(8, 4 * (os.cpu_count() or 1))  # the documented bound (cli.max_workers)
    for cmd in (["process", SAMPLE, "--no-db", "--log", "none"], ["messages", SAMPLE]):
        res = run(*cmd, "-q", "-j", str(top + 1), cwd=tmp_path)
        one_error(res, 2, f"-j/--workers {top + 1}", f"1 to {top}")
        assert res.stdout == ""
        one_error(run(*cmd, "-q", "-j", "-2", cwd=tmp_path), 2, "-j/--workers -2")
    ok = run("messages", SAMPLE, "-q", "-j", "2", cwd=tmp_path)
    assert ok.returncode == 0 and len(ok.stdout.splitlines()) == 60, ok.stderr


@pytest.mark.parametrize("url, why", [("udp://127.0.0.1:99999", "Port out of range"),
                                      ("udp://[::1", "Invalid IPv6 URL"),
                                      ("udp://127.0.0.1:abc", "abc")])
def test_bad_syslog_url_is_one_line(tmp_path: Path, url: str, why: str) -> None:
    """ValueError from urlsplit/.port was a traceback."""
    res = run("process", SAMPLE, "--no-db", "--log", "none", "--syslog", url, cwd=tmp_path)
    one_error(res, 2, f"--syslog {url!r}", why)


@needs_full
@pytest.mark.parametrize("args, to_stdout, what", [
    (["-o", FULL], False, f"writing --output {FULL}: No space left on device"),
    ([], True, "writing stdout: No space left on device"),
    (["-T", "table", "-j", "2"], True, "writing stdout: No space left on device"),
    (["--stats", FULL, "-o", os.devnull], False, f"writing --stats {FULL}: No space left on device"),
])
def test_messages_full_disk_is_one_line_exit_3(tmp_path: Path, args: list[str], to_stdout: bool, what: str) -> None:
    with open(FULL if to_stdout else os.devnull, "w") as out:
        res = run("messages", SAMPLE, "-q", *args, cwd=tmp_path, stdout=out)
    one_error(res, 3, what)


@needs_full
def test_process_stats_on_a_full_disk_exit_3_records_in_the_database(tmp_path: Path) -> None:
    db = tmp_path / "acc.db"
    res = run("process", SAMPLE, "-q", "--log", "none", "--stats", FULL, "--db-url", f"sqlite:///{db}",
              "--spool", str(tmp_path / "s.spool"), cwd=tmp_path)
    one_error(res, 3, f"writing --stats {FULL}: No space left on device")
    assert acc_rows(db) == SAMPLE_RECORDS


@needs_full
@pytest.mark.parametrize("args, to_stdout, what", [
    ([], True, "the log stdout"),
    (["--log", FULL], False, f"the log {FULL}"),
    (["--log", "none", "--jsonl", FULL], False, f"the JSON lines {FULL}"),
    (["-j", "2"], True, "the log stdout"),
])
def test_process_copy_output_on_a_full_disk_every_record_reaches_the_database(
        tmp_path: Path, args: list[str], to_stdout: bool, what: str) -> None:
    """A full stdout stopped the run at the first batch: the records of the rest of the capture
    were never produced (0 or 9 of 20 in the database). Now the copy output is left out, said
    once, and the database gets every record; exit 3."""
    db = tmp_path / "acc.db"
    with open(FULL if to_stdout else os.devnull, "w") as out:
        res = run("process", SAMPLE, "-q", *args, "--db-url", f"sqlite:///{db}",
                  "--spool", str(tmp_path / "s.spool"), cwd=tmp_path, stdout=out)
    one_error(res, 3, f"{what}: No space left on device")  # "writing", or "closing" for the last buffer
    assert acc_rows(db) == SAMPLE_RECORDS


@needs_full
def test_spool_export_to_a_full_disk_is_one_line_exit_3(tmp_path: Path) -> None:
    spool = tmp_path / "s.spool"
    kept = run("process", SAMPLE, "-q", "--log", "none", "--db-url", "postgresql+psycopg://u@127.0.0.1:1/db",
               "--drain-timeout", "0", "--spool", str(spool), cwd=tmp_path)
    assert kept.returncode == 3 and spool.exists(), kept.stderr
    with open(FULL, "w") as out:
        one_error(run("spool", "export", "--spool", str(spool), cwd=tmp_path, stdout=out), 3,
                  "writing stdout: No space left on device")
    one_error(run("spool", "export", "--spool", str(spool), "-o", FULL, cwd=tmp_path), 3,
              f"writing --output {FULL}: No space left on device")
    ok = run("spool", "export", "--spool", str(spool), cwd=tmp_path)
    assert ok.returncode == 0 and len(ok.stdout.splitlines()) == SAMPLE_RECORDS, ok.stderr


def test_by_backend_lists_only_the_outputs_of_the_run(tmp_path: Path) -> None:
    """--no-db --log none printed "by backend: db 20, log 20" though nothing was written there."""
    res = run("process", SAMPLE, "--no-db", "--log", "none", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("acc: "))
    assert line.endswith("by backend: none (flagged for outputs this run did not have: db 20, log 20)"), line
    res = run("process", SAMPLE, "--no-db", cwd=tmp_path)
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("acc: "))
    assert line.endswith("by backend: log 20 (flagged for outputs this run did not have: db 20)"), line


def test_a_pool_refuses_more_workers_than_the_bound() -> None:
    """The library keeps the bound too: a caller other than the CLI cannot fork thousands."""
    import multiprocessing

    from sipsniff_acc.shard import max_workers, ordered_map
    before = len(multiprocessing.active_children())
    with pytest.raises(ValueError, match=f"1 to {max_workers()}"):
        next(ordered_map([1], abs, max_workers() + 1))
    assert len(multiprocessing.active_children()) == before
    assert list(ordered_map([[1], [-2]], lambda b: [abs(x) for x in b], 2)) == [[1], [2]]
