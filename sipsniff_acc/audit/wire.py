"""The wire side: a capture accounted in memory exactly as `process` does (same pipeline,
same rules), with no database, spool or log written; records become the rows the billing
database should hold."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sipsniff_acc.events import Counters, Frame
from sipsniff_acc.pipeline import MessagePipeline
from sipsniff_acc.processrun import records_of
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import RulesFile
from sipsniff_acc.sip import SipMessage
from sipsniff_acc.sources import SourceError, open_captures
from sipsniff_acc.sources.pcapfile import FrameSource

from sipsniff_acc.audit.model import Row, TableSpec

#: the user part of a SIP/SIPS/tel URI in a From header or a Request-URI
_USER = re.compile(r"(?:sips?|tel):([^@;>?\s]+)")
MAX_PARTIES = 1_000_000  #: Call-IDs whose caller/callee the report remembers (counted past it)


@dataclass
class WireSide:
    """What the capture says: the rows, the span of packet time, and what went wrong reading."""

    rows: list[Row] = field(default_factory=list)
    records: list[AccRecord] = field(default_factory=list)  #: every record, all backends (the report's call stats)
    first: float | None = None
    last: float | None = None
    errors: list[SourceError] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)
    parties: dict[str, tuple[str, str]] = field(default_factory=dict)  #: Call-ID -> (caller, callee)
    parties_cut: int = 0  #: Call-IDs past MAX_PARTIES (no caller/callee in the report)
    callids: set[str] = field(default_factory=set)  #: every Call-ID seen in a SIP message
    callids_cut: int = 0  #: messages whose Call-ID was past MAX_PARTIES (then nothing is called "in progress")

    def began_before(self, callid: str) -> bool:
        """The call was on the wire but its initial INVITE was not: it began before the capture
        (its INVITE's rows cannot be judged). False whenever a bound was hit (no guess)."""
        return (not self.callids_cut and not self.parties_cut and callid in self.callids
                and callid not in self.parties)


def _user(text: str) -> str:
    m = _USER.search(text)
    return m.group(1) if m else ""


def account(sources: Sequence[FrameSource], rules: RulesFile, open_as_408: bool = False) -> WireSide:
    """Account the captures in memory: the records `process` would produce, in its order."""
    side = WireSide()
    frames = _spanned(open_captures(sources, side.errors), side)
    side.records = records_of(_messages(frames, side), rules, open_as_408)
    cdr = cdr_specs(rules)
    columns = cdr[0].columns if cdr else {}
    side.rows = [row for r in side.records for row in rows_of(r, side.parties, columns)]
    return side


def _spanned(frames: Iterable[Frame], side: WireSide) -> Iterator[Frame]:
    """The frames, noting the first and last packet times (the span the billing side is read for)."""
    first = last = None
    for f in frames:
        if first is None:
            first = f.ts
        last = f.ts
        yield f
    side.first, side.last = first, last


def _messages(frames: Iterable[Frame], side: WireSide) -> Iterator[SipMessage]:
    """SIP messages of the frames; the caller and callee of each new call noted on the way."""
    pipe = MessagePipeline(side.counters)
    parties = side.parties
    callids = side.callids

    def note(item: Any) -> Iterator[SipMessage]:
        if item.__class__ is SipMessage:
            if item.call_id and item.call_id not in callids:
                if len(callids) < MAX_PARTIES:
                    callids.add(item.call_id)
                else:
                    side.callids_cut += 1
            if item.method == "INVITE" and item.to_tag is None and item.call_id and item.call_id not in parties:
                if len(parties) < MAX_PARTIES:
                    frm = next((v for k, v in item.headers if k == "from"), "")
                    parties[item.call_id] = (_user(frm), _user(item.ruri))
                else:
                    side.parties_cut += 1
            yield item

    for frame in frames:
        for item in pipe.feed(frame):
            yield from note(item)
    for item in pipe.finish():
        yield from note(item)


def rows_of(r: AccRecord, parties: dict[str, tuple[str, str]] | None = None,
            cdr_columns: dict[str, str] | None = None) -> list[Row]:
    """The database rows a record makes (one per multi-leg set, as emitters/sql.py writes them);
    none when the record goes to no database. A dialog CDR (kind ``cdr``, cdr.py) makes the
    row of the CDR table: its keys are read from the cdr_extra columns that hold them, as
    they are on the billing side (``cdr_columns``: our field -> column, from ``cdr_specs``)."""
    if "db" not in r.backends:
        return []
    caller, callee = (parties or {}).get(r.call_id or "", ("", ""))
    if r.kind == "cdr":
        return [cdr_row(r, cdr_columns or {}, caller, callee)]
    row = Row(r.table, r.call_id or "", r.method, r.from_tag or "", r.to_tag or "", r.code, r.reason,
              float(int(r.ts)), caller=caller, callee=callee, in_dialog=r.in_dialog)
    return [row] * max(1, len(r.legs))


def _seconds(text: str | None) -> float:
    try:
        return float(text) if text else 0.0
    except ValueError:
        return 0.0


def cdr_row(r: AccRecord, columns: dict[str, str], caller: str = "", callee: str = "") -> Row:
    """A wire CDR as its acc_cdrs row: start and end as whole seconds (Kamailio's DATETIME of
    the integer seconds), the duration as written ("1.509"), keys from the extras' columns."""
    pairs = r.extras.get("cdr", [])
    values = dict(pairs)
    (_s, start), (_e, end), (_d, duration) = (pairs + [("", None)] * 3)[:3]
    key = {f: values.get(c) or "" for f, c in columns.items() if f in ("callid", "from_tag", "to_tag")}
    return Row(r.table, key.get("callid", ""), "INVITE", key.get("from_tag", ""), key.get("to_tag", ""),
               time=float(int(_seconds(start))), end=float(int(_seconds(end))), duration=_seconds(duration),
               caller=caller, callee=callee)


def acc_specs(rules: RulesFile) -> list[TableSpec]:
    """The tables the rules write rows to, with their column names (rules.yaml's acc section)."""
    from sipsniff_acc.emitters.sql import table_names
    a = rules.acc
    cols = {"callid": a.acc_callid_column, "method": a.acc_method_column, "from_tag": a.acc_from_tag_column,
            "to_tag": a.acc_to_tag_column, "code": a.acc_sip_code_column, "reason": a.acc_sip_reason_column,
            "time": a.acc_time_column}
    names = []
    for name in table_names(rules):
        if name == a.db_table_acc and a.db_flag is None and not _requested(rules, name):
            continue
        if name == a.db_table_missed_calls and a.db_missed_flag is None and not _requested(rules, name):
            continue
        names.append(name)
    return [TableSpec(n, "acc", dict(cols)) for n in names]


def _requested(rules: RulesFile, name: str) -> bool:
    """An acc_db_request / acc_request in the rules writes to this table."""
    for rule in (*rules.route, *rules.failure_route):
        for backends, call in rule.acc_calls():
            if "db" in backends.split("+") and (call.table or rules.acc.db_table_acc) == name:
                return True
    return False


#: which cdr_extra pseudo-variable carries which key of a CDR row ($dlg(callid) etc. as well)
_CDR_KEYS = {("ci", ""): "callid", ("dlg", "callid"): "callid", ("ft", ""): "from_tag",
             ("dlg", "from_tag"): "from_tag", ("tt", ""): "to_tag", ("dlg", "to_tag"): "to_tag"}


def cdr_specs(rules: RulesFile) -> list[TableSpec]:
    """The CDR table (cdrs_table) when the rules write CDR rows and cdr_extra carries the
    Call-ID (Kamailio's acc_cdrs has only start, end and duration of its own: without
    `callid=$ci` in cdr_extra nothing pairs a CDR with a call, and the table is not audited)."""
    a = rules.acc
    table = getattr(a, "cdrs_table", "")
    if not table or not getattr(a, "cdr_enable", False):
        return []
    cols = {"time": a.cdr_start_id, "end": a.cdr_end_id, "duration": a.cdr_duration_id}
    extras = a.cdr_extras
    for name, spec in (extras() if callable(extras) else extras):
        key = _CDR_KEYS.get((spec.name, spec.arg))
        if key and key not in cols:
            cols[key] = name
    if "callid" not in cols:
        return []
    return [TableSpec(table, "cdr", cols)]
