"""The audit's two data types: a row as either side holds it, and one discrepancy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MISSING, PHANTOM, MISMATCH, DUPLICATE = "missing", "phantom", "mismatch", "duplicate"
KINDS = (MISSING, PHANTOM, MISMATCH, DUPLICATE)
#: a billing row of a call already in progress when the capture began (its INVITE is not in
#: the capture): listed, counted, but not judged (not a discrepancy)
UNVERIFIED = "unverified"


@dataclass(slots=True)
class Row:
    """One billing row, or what the wire says that row should be. Times are Unix seconds;
    the billing side holds whole seconds (Kamailio writes DATETIME / Julian seconds)."""

    table: str
    callid: str
    method: str
    from_tag: str
    to_tag: str
    code: str = ""
    reason: str = ""
    time: float = 0.0  #: acc/missed: the record time; a CDR: its start_time
    end: float | None = None  #: a CDR's end_time
    duration: float | None = None  #: a CDR's duration
    caller: str = ""  #: for the report's worst callers / destinations (not compared)
    callee: str = ""
    in_dialog: bool = False
    ref: str = ""  #: where the row is: "acc id=12", "export.csv:14"

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.table, self.callid, self.method, self.from_tag, self.to_tag)

    @property
    def loose_key(self) -> tuple[str, str, str, str]:
        return (self.table, self.callid, self.method, self.from_tag)


@dataclass(slots=True)
class Discrepancy:
    """One difference between the books and the wire; ``field`` names what differs (mismatch)."""

    kind: str
    table: str
    callid: str
    method: str
    from_tag: str
    to_tag: str
    field: str = ""
    wire: Any = None
    billing: Any = None
    time: float = 0.0
    ref: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "table": self.table, "callid": self.callid, "method": self.method,
                "from_tag": self.from_tag, "to_tag": self.to_tag, "field": self.field or None,
                "wire": self.wire, "billing": self.billing, "time": self.time, "ref": self.ref or None}


@dataclass
class TableSpec:
    """Where a billing table keeps each field: column names from rules.yaml (acc_*_column,
    cdr_start_id, cdr_extra, ...). ``kind`` is "acc" (acc, missed_calls, acc_db_request
    tables) or "cdr" (acc_cdrs: no core Call-ID, it comes from a cdr_extra column)."""

    name: str
    kind: str
    columns: dict[str, str] = field(default_factory=dict)  #: our field -> the table's column
