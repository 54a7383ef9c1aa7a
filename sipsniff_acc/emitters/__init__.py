"""Where records go: syslog-style lines, SQL (SQLAlchemy), JSON lines. The only I/O after the sources."""

from __future__ import annotations

from typing import Protocol

from sipsniff_acc.records import AccRecord


class Emitter(Protocol):
    def emit(self, records: list[AccRecord]) -> None: ...

    def close(self) -> None: ...
