"""The hot path's field-by-field builders (tracker.new_transaction, new_dialog, acc.new_txn_acc)
against the dataclass constructors they stand for, and the written-out ``__init__``s of the
events and records against their fields: a field added to the class and not to its builder
fails here (issue 13: compiled, a dataclass's generated ``__init__`` runs interpreted)."""

from __future__ import annotations

import dataclasses
import pickle

from sipsniff_acc import acc, pv, records, tracker
from sipsniff_acc.sip import SipMessage, parse
from tests.builders import sip_request


def _fields(obj: object) -> dict[str, object]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}  # type: ignore[arg-type]


def test_builders_equal_the_constructors() -> None:
    msg = SipMessage(b"INVITE sip:a SIP/2.0\r\n\r\n")
    key = ("z9hG4bK1", "INVITE", "c@h", 1)
    parent = tracker.Transaction(key, msg, "server")
    for p in (None, parent):
        assert _fields(tracker.new_transaction(key, msg, "branch", p, 123)) == _fields(
            tracker.Transaction(key, msg, "branch", p, size=123))
    assert _fields(tracker.new_dialog("c@h", "ft", 5.5)) == _fields(tracker.Dialog("c@h", "ft", created=5.5))
    avps: dict[str, list[str]] = {"x": ["1"]}
    built = acc.new_txn_acc(avps)
    assert _fields(built) == _fields(acc.TxnAcc(0, avps)) and built.avps is avps


def test_written_inits_set_every_field() -> None:
    """Every dataclass field set by the written-out __init__, keywords by their field names."""
    msg = parse(sip_request())
    txn = tracker.Transaction(("b", "INVITE", "c", 1), msg, "server")
    made = [
        tracker.RequestIn(txn=txn, msg=msg),
        tracker.AckIn(msg=msg, invite=None, first=True),
        tracker.BranchesFailed(txn=txn, reply=None, code=408, ts=1.0, branch=None, failure_route=False),
        tracker.ReplyOut(txn=txn, reply=msg, code=200, ts=2.0, local=True, late=True, branch=txn),
        pv.PvContext(msg=msg, new_uri="sip:x", avps={}, now=1.0, start=0.5, hdr_limit=7, hdr_cut=1, dlg_vars={}),
        records.AccRecord(kind="answered", ts=1.0, method="INVITE", from_tag="f", to_tag="t", call_id="c", code="200",
                          reason="OK", backends=("log",), table="acc", extras={"db": []}, legs=[[]], cseq=1,
                          local=True, in_dialog=True, realm="r", record_id="i", queued_at=2.0, capture_gaps=True,
                          capture_agent="a"),
    ]
    for obj in made:
        values = _fields(obj)
        assert len(values) == len(dataclasses.fields(obj)), obj  # type: ignore[arg-type]
    defaults = records.AccRecord("missed", 1.0, "INVITE", None, None, None, "486", "Busy", ("db",))
    assert defaults.extras == {} and defaults.legs == [] and defaults.extras is not records.AccRecord(
        "missed", 1.0, "INVITE", None, None, None, "486", "Busy", ("db",)).extras


def test_records_and_messages_pickle() -> None:
    """-j N workers send records through pickle; a state file holds SipMessages."""
    rec = records.AccRecord("answered", 1.5, "INVITE", "f", "t", "c", "200", "OK", ("log", "db"), extras={"db": [("a", "b")]},
                            cseq=3, capture_agent="x")
    back = pickle.loads(pickle.dumps(rec, pickle.HIGHEST_PROTOCOL))
    assert back == rec and _fields(back) == _fields(rec)
    msg = parse(sip_request())
    msg.ts, msg.src = 3.25, "10.0.0.1"
    again = pickle.loads(pickle.dumps(msg, pickle.HIGHEST_PROTOCOL))
    assert (again.raw, again.call_id, again.cseq_num, again.ts, again.src, again.branch) == (
        msg.raw, msg.call_id, msg.cseq_num, msg.ts, msg.src, msg.branch)
