"""Watchers that stamp, with the wall clock, when each output line or SQL row becomes visible.

A reader of a log file or of the database sees a record only once it is flushed or
committed; the latency tests compare that moment with the deciding packet's kernel
timestamp (the same CLOCK_REALTIME). Each watcher polls in a thread of its own every
``POLL`` seconds (a 10-20 ms error, small against the 1 s bound) and is stopped by ``stop()``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

POLL = 0.01


class FileWatcher:
    """The complete lines appended to ``path``, each with when it was first seen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pos = 0
        partial = b""
        while True:
            stopping = self._stop.is_set()
            try:
                with open(self.path, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                now = time.time()
                pos += len(chunk)
                partial += chunk
                *done, partial = partial.split(b"\n")
                self.lines.extend((now, line.decode(errors="replace")) for line in done)
            if stopping:
                return
            self._stop.wait(POLL)

    def stop(self) -> list[tuple[float, str]]:
        self._stop.set()
        self._thread.join(10)
        return self.lines


class SqliteWatcher:
    """Rows of ``table`` (by ``key`` columns) in a SQLite file, each with when it became visible
    to another connection (committed)."""

    def __init__(self, path: Path, table: str = "acc", key: str = "callid, method", poll: float = 0.02) -> None:
        self.path, self.table, self.key, self.poll = path, table, key, poll
        self.rows: dict[tuple[object, ...], float] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _scan(self) -> None:
        if not self.path.exists():
            return
        try:
            con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=0.5)
        except sqlite3.Error as e:
            self.errors.append(str(e))
            return
        try:
            rows = con.execute(f"SELECT {self.key} FROM {self.table}").fetchall()  # noqa: S608 - our names
        except sqlite3.Error as e:  # not created yet, or locked for a moment
            self.errors.append(str(e))
            return
        finally:
            con.close()
        now = time.time()
        for row in rows:
            self.rows.setdefault(tuple(row), now)

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            self._scan()
            if stopping:
                return
            self._stop.wait(self.poll)

    def stop(self) -> dict[tuple[object, ...], float]:
        self._stop.set()
        self._thread.join(10)
        return self.rows
