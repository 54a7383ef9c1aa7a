"""One line per SIP message, for ``sipsniff-acc messages`` (pure formatting).

JSON lines are built by hand from C-encoded strings: ``json.dumps`` of a 17-key dict
costs about as much as parsing the message, and this runs once per message.
"""

from __future__ import annotations

from json.encoder import encode_basestring_ascii as _js  # type: ignore[attr-defined]
from typing import Final

from sipsniff_acc.sip import SipMessage

FIELDS: Final = (
    "ts", "frame", "src", "sport", "dst", "dport", "transport", "method", "status", "reason",
    "call_id", "cseq", "cseq_method", "from_tag", "to_tag", "branch", "encap",
)


def _opt(v: str | None) -> str:
    return "null" if v is None else _js(v)


def to_jsonl(m: SipMessage) -> str:
    return (
        f'{{"ts":{m.ts:.6f},"frame":{m.no},"src":"{m.src}","sport":{m.sport},"dst":"{m.dst}",'
        f'"dport":{m.dport},"transport":"{m.transport}","method":{_js(m.method) if m.is_request else "null"},'
        f'"status":{m.code if m.code else "null"},"reason":{"null" if m.is_request else _js(m.reason)},'
        f'"call_id":{_opt(m.call_id)},"cseq":{"null" if m.cseq_num is None else m.cseq_num},'
        f'"cseq_method":{_js(m.cseq_method)},"from_tag":{_opt(m.from_tag)},"to_tag":{_opt(m.to_tag)},'
        f'"branch":{_opt(m.branch)},"encap":"{"/".join(m.encap)}"}}\n'
    )


TABLE_HEADER: Final = (
    f"{'time':<15} {'source':<21} {'destination':<21} {'proto':<5} {'message':<24} "
    f"{'cseq':<16} {'call-id':<36} {'from-tag':<12} {'to-tag':<12} branch\n"
)


def to_table_row(m: SipMessage) -> str:
    what = m.method if m.is_request else f"{m.code} {m.reason}"
    cseq = f"{m.cseq_num} {m.cseq_method}" if m.cseq_num is not None else "-"
    src = f"{m.src}:{m.sport}" if ":" not in m.src else f"[{m.src}]:{m.sport}"
    dst = f"{m.dst}:{m.dport}" if ":" not in m.dst else f"[{m.dst}]:{m.dport}"
    return (
        f"{m.ts:<15.6f} {src:<21} {dst:<21} {m.transport:<5} {what[:24]:<24} {cseq[:16]:<16} "
        f"{(m.call_id or '-'):<36} {(m.from_tag or '-'):<12} {(m.to_tag or '-'):<12} {m.branch or '-'}\n"
    )
