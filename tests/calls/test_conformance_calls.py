"""Golden: the calls of every recorded Kamailio case (tests/conformance/cases/*/capture.pcap).

Two checks per case: the expected calls (outcome / final code / who / how, by hand from the
scenario), and agreement with Kamailio's own rows recorded with the capture: every call's final
code is one of Kamailio's INVITE rows (acc or missed_calls) for its Call-ID and From-tag, and an
answered call's billable seconds match Kamailio's dialog CDR duration (acc_cdrs) within 20 ms
(Kamailio starts at the 200 it receives, we at the 200 the caller gets).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.calls.util import calls_of_pcap

CASES = Path(__file__).resolve().parent.parent / "conformance" / "cases"

EXPECTED: dict[str, dict[str, int]] = {
    "answered_bye_from_caller": {"answered/200/caller/bye": 2},
    "busy_486": {"busy/486/callee/error_reply": 1},
    "busy_486_failed_and_missed": {"busy/486/callee/error_reply": 1},
    "bye_from_callee": {"answered/200/callee/bye": 1},
    "bye_from_callee_detect_direction": {"answered/200/callee/bye": 1},
    "callee_404": {"rejected/404/callee/error_reply": 1},
    "cancel_after_180": {"cancelled/487/caller/cancel": 1},
    "cdr_answered": {"answered/200/caller/bye": 2},
    "cdr_busy": {"busy/486/callee/error_reply": 1},
    "cdr_callee_bye": {"answered/200/callee/bye": 1},
    "cdr_cancelled": {"cancelled/487/caller/cancel": 1},
    "cdr_expired": {"answered/200/caller/bye": 1},
    "cdr_no_answer": {"no_answer/408/proxy/error_reply": 1},
    "cdr_parallel_fork": {"answered/200/caller/bye": 1},
    "cdr_proxy_404": {"rejected/404/proxy/error_reply": 1},
    "cdr_reinvite": {"answered/200/caller/bye": 1},
    "cdr_start_on_confirmed": {"answered/200/caller/bye": 2},
    "early_media_183": {"answered/200/caller/bye": 1},
    "extras_and_legs": {"answered/200/caller/bye": 6},
    "message_flagged": {},
    "no_answer_proxy_408": {"no_answer/408/proxy/error_reply": 1},
    "options_flagged": {},
    "parallel_fork_one_answers": {"answered/200/caller/bye": 1},
    "proxy_404": {"rejected/404/proxy/error_reply": 1},
    "proxy_404_stateless": {"rejected/404/proxy/error_reply": 1},
    "reinvite": {"answered/200/caller/bye": 1},
    "report_ack": {"answered/200/caller/bye": 1},
    "report_cancels": {"cancelled/487/caller/cancel": 1},
    "tcp_caller": {"answered/200/caller/bye": 5, "busy/486/callee/error_reply": 1},
    "volume_mixed": {"answered/200/caller/bye": 183, "busy/486/callee/error_reply": 76,
                     "rejected/404/callee/error_reply": 41},
    # serial forking: the failure_route relays to a second callee; one call across the rounds
    "serial_486_then_200": {"answered/200/caller/bye": 1},
    "serial_486_then_480": {"no_answer/480/callee/error_reply": 1},
    "serial_timeout_then_200": {"answered/200/caller/bye": 1},
    "serial_failure_setflag": {"no_answer/480/callee/error_reply": 1},
    "serial_failure_rearm": {"no_answer/480/callee/error_reply": 1},
    "cdr_serial_486_then_200": {"answered/200/caller/bye": 1},
    "cdr_serial_486_then_480": {"no_answer/480/callee/error_reply": 1},
    "cdr_serial_timeout_then_200": {"answered/200/caller/bye": 1},
}
#: Cases whose 2-legged forks must come out as one call with both legs.
FORKS = {"cdr_parallel_fork": 2, "parallel_fork_one_answers": 2,
         **{name: 2 for name in EXPECTED if "serial_" in name}}
#: a serial fork's legs in the order they were tried, each with its own final code (the branch
#: that timed out ends 487: the proxy CANCELs it after its fr timer)
SERIAL_LEG_CODES = {"serial_486_then_200": [486, 200], "serial_486_then_480": [486, 480],
                    "serial_timeout_then_200": [487, 200], "serial_failure_setflag": [486, 480],
                    "serial_failure_rearm": [486, 480],
                    "cdr_serial_486_then_200": [486, 200], "cdr_serial_486_then_480": [486, 480],
                    "cdr_serial_timeout_then_200": [487, 200]}


def _rows(case: Path, name: str) -> list[dict[str, object]]:
    p = case / name
    return json.loads(p.read_text()) if p.exists() else []


def test_every_recorded_case_is_listed() -> None:
    assert sorted(p.name for p in CASES.iterdir() if (p / "capture.pcap").exists()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_calls_of_a_recorded_case(name: str) -> None:
    case = CASES / name
    calls = calls_of_pcap(case / "capture.pcap")
    got = Counter(f"{c.outcome}/{c.final_code}/{c.ended_by}/{c.ended_how}" for c in calls)
    assert dict(got) == EXPECTED[name]
    kamailio: dict[tuple[object, object], set[int]] = {}
    for r in _rows(case, "acc.json") + _rows(case, "missed_calls.json"):
        if r.get("method") == "INVITE":
            kamailio.setdefault((r["callid"], r["from_tag"]), set()).add(int(str(r["sip_code"])))
    for c in calls:
        assert c.end is not None and c.capture_gaps is False
        codes = kamailio.get((c.call_id, c.from_tag))
        if codes:  # Kamailio wrote a row for this INVITE (not every route accounts every call)
            assert c.final_code in codes, (c.call_id, c.final_code, codes)
    cdrs = {(r["c_callid"], r["c_ft"]): r for r in _rows(case, "acc_cdrs.json")}
    for c in calls:
        r = cdrs.get((c.call_id, c.from_tag))
        if r is not None and c.answer is not None and c.ended_how == "bye":
            # a serial fork's dialog CDR starts when Kamailio created the dialog (the INVITE): a
            # failed round leaves the start it set there; else at the answer, as billable
            ours = c.as_dict()["duration" if name in SERIAL_LEG_CODES else "billable"]
            assert abs(ours - float(str(r["duration"]))) < 0.02, (c.call_id, r["duration"])
    if name in FORKS:
        assert [len(c.legs) for c in calls] == [FORKS[name]]
    if name in SERIAL_LEG_CODES:
        legs = calls[0].as_dict()["legs"]
        assert [leg["final_code"] for leg in legs] == SERIAL_LEG_CODES[name]
        assert [leg["ruri"].split("@")[0] for leg in legs] == ["sip:serial", "sip:serial2"]
        assert legs[0]["invite_time"] < legs[1]["invite_time"]
