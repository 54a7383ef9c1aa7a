"""One JSON object per record (every field, all backends' extras): for pipelines and audits.

JSON escapes C0 controls itself; DEL, C1 controls and U+2028/9 are escaped too
(``sysloglines.json_safe``), so a record's line is one line for every reader and never
drives a terminal.
"""

from __future__ import annotations

import json
from typing import Any, IO

import orjson

from sipsniff_acc.records import AccRecord
from sipsniff_acc.sysloglines import json_safe


def record_line(r: AccRecord) -> bytes:
    """The record as one JSON line."""
    return json_line(r.as_dict())


def json_line(doc: dict[str, Any]) -> bytes:
    """One JSON line, control characters escaped. orjson refuses integers beyond 64 bits (a
    CSeq a packet claims): the standard library writes those instead of losing the line."""
    try:
        text = orjson.dumps(doc)
    except orjson.JSONEncodeError:
        text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8", "replace")
    return json_safe(text) + b"\n"


class JsonlEmitter:
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self._unflushed = False

    def emit(self, records: list[AccRecord]) -> None:
        write = self.out.write
        for r in records:
            write(record_line(r))
        self._unflushed = self._unflushed or bool(records)

    def tick(self) -> None:
        """The run's clock (records out within 1 s): written lines go out now."""
        if self._unflushed:
            self._unflushed = False
            self.out.flush()

    def close(self) -> None:
        self.out.flush()
