"""One JSON object per record (every field, all backends' extras): for pipelines and audits."""

from __future__ import annotations

from typing import IO

import orjson

from sipsniff_acc.records import AccRecord


class JsonlEmitter:
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out

    def emit(self, records: list[AccRecord]) -> None:
        write = self.out.write
        for r in records:
            write(orjson.dumps(r.as_dict()) + b"\n")

    def close(self) -> None:
        self.out.flush()
