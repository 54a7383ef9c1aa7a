"""The SQL emitter with a fallback: nothing is dropped when the database fails.

If the database cannot be reached or refuses a batch, that batch and every later "db"
record go, as JSON lines (table, row), to an unsent file; the run carries on, the summary
and the exit status (3) say how many rows and where. Rows carry their stable id, so
loading the file later cannot duplicate rows. (A durable spool with retry belongs to the
SQL backends issue; this keeps the no-silent-loss promise until then.)
"""

from __future__ import annotations

import os
from typing import IO, Any

import orjson

from sipsniff_acc.emitters.sql import SqlEmitter, SqlError, safe_url
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import RulesFile

RETRIES = 2


class SpoolingSql:
    def __init__(self, url: str, rules: RulesFile, unsent_path: str | None = None) -> None:
        self.safe_url = safe_url(url)
        self.unsent_path = unsent_path or os.path.abspath("sipsniff-acc.unsent.jsonl")
        self.unsent = 0
        self.error: str | None = None
        self._file: IO[bytes] | None = None
        self.sql: SqlEmitter | None = None
        self._rows_offered = 0
        try:
            self.sql = SqlEmitter(url, rules)
        except SqlError as e:
            self.error = str(e)

    @property
    def rows_offered(self) -> int:
        return self.sql.rows_offered if self.sql is not None else 0

    def emit(self, records: list[AccRecord]) -> None:
        if self.sql is None:
            self._spool_records(records)
            return
        try:
            self.sql.emit(records)
        except SqlError as e:
            self._fail(e)

    def _fail(self, e: SqlError) -> None:
        assert self.sql is not None
        for _attempt in range(RETRIES):
            try:
                self.sql.flush()
                return
            except SqlError:
                continue
        self.error = str(e)
        pending, self.sql.pending = self.sql.pending, {}
        for table, rows in pending.items():
            for row in rows:
                self._write(table, row)
        self.sql.engine.dispose()
        self._spool_with = self.sql
        self.sql = None

    def _spool_records(self, records: list[AccRecord]) -> None:
        maker = getattr(self, "_spool_with", None)
        for r in records:
            if "db" not in r.backends:
                continue
            rows = maker.rows(r) if maker is not None else [r.as_dict()]
            for row in rows:
                self._write(r.table, row)

    def _write(self, table: str, row: dict[str, Any]) -> None:
        if self._file is None:
            self._file = open(self.unsent_path, "ab")  # noqa: SIM115
        self._file.write(orjson.dumps({"table": table, "row": row}, default=str) + b"\n")
        self.unsent += 1

    def close(self) -> None:
        if self.sql is not None:
            try:
                self.sql.close()
            except SqlError as e:
                self._fail(e)
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
