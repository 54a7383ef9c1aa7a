"""One line per SIP message, for ``sipsniff-acc messages`` (pure formatting, bytes out).

The transport facts come in as arguments rather than from a ``SipMessage``'s attributes,
so the worker processes format straight from what the capture stage shipped them. JSON
goes through orjson: 1.1 µs a line against 1.8 µs for hand-built f-strings and ~4 µs for
``json.dumps`` of the same dict, on a path that runs once per message. The usual message
skips all of it: ``fast_jsonl``/``fast_table`` (C) parse and format it in ~0.5/0.7 µs where
``sip.parse`` and these functions take ~2/3 µs (50k-call workload, ``messages -j 0``: 4.7 ->
2.7 s of CPU); these functions are the reference and take every other message.

Nothing from a packet reaches a terminal raw: the table escapes control characters as the
ACC lines do (``sysloglines.escape``), and JSON lines, whose C0 controls orjson already
escapes, get DEL, C1 and U+2028/9 as ``\\u`` escapes too (``json_safe``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import orjson

from sipsniff_acc.sip import SipMessage
from sipsniff_acc.sysloglines import escape, json_safe

Fast = Callable[[float, int, str, int, str, int, str, str, bytes], bytes | None]
#: ``jsonl`` and ``table`` of ``sip.parse(payload)`` in one C call each (_speedups.jsonl/table),
#: taking the payload where they take the message: no SipMessage, dict or field texts are built.
#: They return None (the caller parses and formats here) for all but the plain, well-formed
#: message whose bytes they are sure to give alike (printable ASCII texts, no defect); both None
#: when the C is not built.
fast_jsonl: Fast | None = None
fast_table: Fast | None = None
try:
    from sipsniff_acc._speedups import jsonl as fast_jsonl, table as fast_table
except ImportError:  # not built: parse() and jsonl()/table() for every message
    pass

FIELDS: Final = (
    "ts", "frame", "src", "sport", "dst", "dport", "transport", "method", "status", "reason",
    "call_id", "cseq", "cseq_method", "from_tag", "to_tag", "branch", "encap",
)
_dumps = orjson.dumps
_NEWLINE: Final = orjson.OPT_APPEND_NEWLINE


def jsonl(ts: float, no: int, src: str, sport: int, dst: str, dport: int, transport: str, encap: str,
          m: SipMessage) -> bytes:
    req = m.is_request
    return json_safe(_dumps({
        "ts": ts, "frame": no, "src": src, "sport": sport, "dst": dst, "dport": dport, "transport": transport,
        "method": m.method if req else None, "status": None if req else m.code, "reason": None if req else m.reason,
        "call_id": m.call_id, "cseq": m.cseq_num, "cseq_method": m.cseq_method, "from_tag": m.from_tag,
        "to_tag": m.to_tag, "branch": m.branch, "encap": encap,
    }, option=_NEWLINE))


TABLE_HEADER: Final = (
    f"{'time':<17} {'source':<21} {'destination':<21} {'proto':<5} {'message':<24} "
    f"{'cseq':<16} {'call-id':<36} {'from-tag':<12} {'to-tag':<12} branch\n"
).encode()


def table(ts: float, no: int, src: str, sport: int, dst: str, dport: int, transport: str, encap: str,
          m: SipMessage) -> bytes:
    what = m.method if m.is_request else f"{m.code} {m.reason}"
    cseq = f"{m.cseq_num} {m.cseq_method}" if m.cseq_num is not None else "-"
    s = f"{src}:{sport}" if ":" not in src else f"[{src}]:{sport}"
    d = f"{dst}:{dport}" if ":" not in dst else f"[{dst}]:{dport}"
    return escape(
        f"{ts:<17.6f} {s:<21} {d:<21} {transport:<5} {what[:24]:<24} {cseq[:16]:<16} "
        f"{(m.call_id or '-'):<36} {(m.from_tag or '-'):<12} {(m.to_tag or '-'):<12} {m.branch or '-'}"
    ).encode() + b"\n"


def to_jsonl(m: SipMessage) -> bytes:
    """The JSON line of a message that carries its own transport facts."""
    return jsonl(m.ts, m.no, m.src, m.sport, m.dst, m.dport, m.transport, "/".join(m.encap), m)
