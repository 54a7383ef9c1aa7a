"""The Kamailio conformance material (issue 4 builds the comparison with our records on it).

tests/conformance/cases/<case>/ holds what record_kamailio.py recorded from a real
Kamailio 5.6 + SIPp on loopback: capture.pcap, Kamailio's acc/missed_calls rows and its
ACC log lines. Until the acc engine exists, these tests check what can be checked without
it: the capture holds exactly the reply each Kamailio record describes, as relayed by the
proxy to the caller (acc-spec §1.9: the record is of the reply sent upstream), and the
recorder still reproduces the same records with the installed Kamailio.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sipsniff_acc.pipeline import MessagePipeline
from sipsniff_acc.sip import SipMessage
from sipsniff_acc.sources.pcapfile import CaptureReader
from sipsniff_acc.tracker import tm_local_tag
from tests.conformance.record_kamailio import CASES, PROXY, UAC, record
from tests.conformance.goldens import kamailio_records, require_live, shape
from tests.conformance.goldens import our_messages_of as our

HERE = Path(__file__).resolve().parent
GOLDEN = sorted(p.name for p in (HERE / "cases").iterdir() if p.is_dir())


def test_every_case_is_recorded() -> None:
    assert set(GOLDEN) == set(CASES)


@pytest.mark.parametrize("case", GOLDEN)
def test_each_kamailio_record_is_a_message_the_proxy_handled(case: str) -> None:
    """A transaction record is a reply the proxy sent upstream (towards the request's sender,
    acc-spec §1.9); an "acknowledged" record (report_ack) is the caller's ACK. Tags may be
    swapped back by detect_direction (acc-spec §2.4), so either order is accepted."""
    folder = HERE / "cases" / case
    rows = kamailio_records(folder)
    if not CASES[case].expect_rows:
        assert not rows, "Kamailio was expected to write nothing for this case"
        return
    assert rows, "Kamailio wrote nothing for this case"
    msgs = our(folder / "capture.pcap")
    replies = {
        (m["call_id"], m["cseq_method"], str(m["status"]), m["reason"], m["from_tag"], m["to_tag"])
        for m in msgs if m["status"] and m["src"] == PROXY
    }
    acks = {(m["call_id"], m["from_tag"], m["to_tag"]) for m in msgs if m["method"] == "ACK" and m["src"] == UAC}
    if CASES[case].serial:
        # a failed round's missed row is of a reply the proxy received (before its failure_route
        # relayed again), or of the 408 tm faked for a branch that timed out, To-tag never sent
        replies |= {(m["call_id"], m["cseq_method"], str(m["status"]), m["reason"], m["from_tag"], m["to_tag"])
                    for m in msgs if m["status"] and m["dst"] == PROXY}
        replies |= {(m.call_id, "INVITE", "408", "", m.from_tag, tm_local_tag(m)) for m in _initial_invites(folder)}
    for table, row in rows:
        tags = [(row["from_tag"], row["to_tag"]), (row["to_tag"], row["from_tag"])]
        if row["method"] == "ACK":
            assert any((row["callid"], *t) in acks for t in tags), f"{table} row {row}: no such ACK"
            continue
        keys = {(row["callid"], row["method"], row["sip_code"], row["sip_reason"], *t) for t in tags}
        if re.fullmatch(r"[0-9a-f]{32}-[0-9a-f]+", str(row["to_tag"])):  # the proxy's own reply: error_text reason
            keys = {k[:3] + k[4:] for k in keys}
            assert keys & {r[:3] + r[4:] for r in replies}, f"{table} row {row}: no such local reply"
            continue
        assert keys & replies, f"{table} row {row} has no matching reply from the proxy in the capture"


def _initial_invites(folder: Path) -> list[SipMessage]:
    """The caller's INVITEs to the proxy in a case's capture, parsed by our stages."""
    mp = MessagePipeline()
    msgs = [m for frame in CaptureReader(str(folder / "capture.pcap")) for m in mp.feed(frame)] + mp.finish()
    return [m for m in msgs if isinstance(m, SipMessage) and m.method == "INVITE" and m.dst == PROXY and not m.to_tag]


@pytest.mark.parametrize("case", GOLDEN)
def test_acc_log_lines_match_the_rows(case: str) -> None:
    folder = HERE / "cases" / case
    lines = (folder / "acc.log").read_text().splitlines()
    rows = kamailio_records(folder)
    # with multi_leg_info a record is one row per leg set: count records by their core fields and time
    from_rows = sorted(
        ((row["time"], "call missed" if table == "missed_calls" else
         "request acknowledged" if row["method"] == "ACK" else "transaction answered",
         f"method={row['method']};from_tag={row['from_tag']};to_tag={row['to_tag']};call_id={row['callid']};"
         f"code={row['sip_code']};reason={row['sip_reason']}"))
        for table, row in rows
    )
    from_lines = sorted(  # drop "timestamp=...;" and the extras after reason=
        (line.split("ACC: ")[1].split(": ")[0], ";".join(line.split(";")[1:7])) for line in lines
    )
    if CASES[case].legs:  # one row per leg set: the same records, counted once
        assert sorted({r[1:] for r in from_rows}) == sorted(set(from_lines))
    else:
        assert sorted(r[1:] for r in from_rows) == from_lines


def test_the_recorder_reproduces_the_golden_records(tmp_path: Path) -> None:
    """Run one case against the installed Kamailio and SIPp; same records, modulo ids and tags."""
    require_live()
    for case in ("busy_486", "answered_bye_from_caller"):
        fresh = record(case, tmp_path)
        assert shape(kamailio_records(fresh)) == shape(kamailio_records(HERE / "cases" / case))
