"""CallBuilder on crafted two-leg flows (tests/flows.py: UAC → proxy → UAS, both legs seen)."""

from __future__ import annotations

import pytest

from sipsniff_acc.calls import BYE_WAIT, INVITE_WAIT, SESSION_GRACE, Call, CallBuilder, party, sdp_media
from sipsniff_acc import sip
from sipsniff_acc.sip import SipMessage
from tests.flows import (
    C, P, P2, PROXY, UAC, UAS, UAS2, answered_call, local_reject, rejected_call,
)
from tests.flows import Call as Flow

T = 1000.0
SDP_OFFER = ("v=0\no=- 1 1 IN IP4 10.0.0.1\ns=-\nc=IN IP4 10.0.0.1\nt=0 0\n"
             "m=audio 40000 RTP/AVP 0 8 101\na=rtpmap:0 PCMU/8000\na=rtpmap:8 PCMA/8000\n"
             "a=rtpmap:101 telephone-event/8000\n")
SDP_ANSWER = ("v=0\no=- 2 2 IN IP4 10.0.0.2\ns=-\nc=IN IP4 10.0.0.2\nt=0 0\n"
              "m=audio 50000 RTP/AVP 8 101\na=rtpmap:101 telephone-event/8000\n")


def run(msgs: list[SipMessage], b: CallBuilder | None = None, until: float | None = None) -> list[Call]:
    b = b or CallBuilder()
    out: list[Call] = []
    for m in msgs:
        out.extend(b.feed(m))
    if until is not None:
        out.extend(b.advance(until))
    out.extend(b.finish())
    return out


def test_answered_call_times_durations_and_who_hung_up() -> None:
    b = CallBuilder()
    msgs = answered_call(t=T)
    ended_at = None
    for m in msgs:
        if b.feed(m):
            ended_at = m
    assert ended_at is not None and ended_at.method == "" and ended_at.cseq_method == "BYE"  # at the BYE's 200
    [c] = run(answered_call(t=T))
    d = c.as_dict()
    assert d["outcome"] == "answered" and d["final_code"] == 200
    assert d["invite_time"] == T and d["first_provisional"] == T + 0.101 and d["ringing"] == T + 0.101
    assert d["answer"] == T + 2.001 and d["end"] == T + 60  # the caller's leg; end = the BYE
    assert d["post_dial_delay"] == pytest.approx(0.101) and d["billable"] == pytest.approx(57.999)
    assert d["duration"] == pytest.approx(60.0)
    assert (d["ended_by"], d["ended_how"]) == ("caller", "bye")
    assert d["caller_addr"] == f"{UAC}:5060" and d["callee_addr"] == f"{PROXY}:5060"
    assert [leg["to"] for leg in d["legs"]] == [f"{UAS}:5060"] and d["legs"][0]["final_code"] == 200
    assert d["caller_name"] == "Alice" and d["caller_number"] == "alice" and d["callee_number"] == "bob"
    assert "end" not in d["provenance"]["inferred"] and "bye" in d["provenance"]["seen"]


def test_callee_hangs_up() -> None:
    [c] = run(answered_call(t=T, bye_from_callee=True))
    assert (c.ended_by, c.ended_how, c.end) == ("callee", "bye", T + 60)


def test_busy_is_relayed_from_the_callee() -> None:
    [c] = run(rejected_call(486, "Busy Here", t=T))
    assert (c.outcome, c.final_code, c.final_reason, c.ended_by, c.ended_how) == (
        "busy", 486, "Busy Here", "callee", "error_reply")
    assert c.end == T + 3.002 and c.answer is None and c.as_dict()["billable"] == 0.0


@pytest.mark.parametrize("code,outcome", [(480, "no_answer"), (404, "rejected"), (503, "failed"), (603, "rejected"),
                                          (302, "redirected")])
def test_outcome_classes(code: int, outcome: str) -> None:
    [c] = run(rejected_call(code, "X", t=T))
    assert c.outcome == outcome


def test_proxy_own_reply_is_the_proxy_s() -> None:
    [c] = run(local_reject(404, "Not Here", t=T))
    assert (c.outcome, c.ended_by, c.legs) == ("rejected", "proxy", [])
    [c] = run(local_reject(404, "Not Here", t=T, stateless=True))
    assert c.ended_by == "proxy"


def _cancelled(reason: str = "") -> list[SipMessage]:
    f = Flow()
    tt = "bob-tag"
    return [
        f.request("INVITE", T, UAC, PROXY, [C]),
        f.request("INVITE", T + 0.002, PROXY, UAS, [P, C]),
        f.reply(180, "Ringing", T + 0.1, UAS, PROXY, [P, C], to_tag=tt),
        f.reply(180, "Ringing", T + 0.101, PROXY, UAC, [C], to_tag=tt),
        f.request("CANCEL", T + 5, UAC, PROXY, [C], extra=reason),
        f.reply(200, "canceling", T + 5.001, PROXY, UAC, [C], method="CANCEL"),
        f.request("CANCEL", T + 5.002, PROXY, UAS, [P]),
        f.reply(487, "Request Terminated", T + 5.01, UAS, PROXY, [P, C], to_tag=tt),
        f.reply(487, "Request Terminated", T + 5.011, PROXY, UAC, [C], to_tag=tt),
    ]


def test_cancel_with_reason_q850() -> None:
    [c] = run(_cancelled('Reason: Q.850;cause=16;text="Normal call clearing"\n'))
    assert (c.outcome, c.ended_by, c.ended_how, c.final_code, c.end) == ("cancelled", "caller", "cancel", 487, T + 5.011)
    assert (c.q850_cause, c.q850_text) == (16, "Normal call clearing")
    assert c.reason_header is not None and c.reason_header.startswith("Q.850")


def test_no_final_is_a_timeout_ended_by_the_timer() -> None:
    f = Flow()
    msgs = [f.request("INVITE", T, UAC, PROXY, [C]), f.request("INVITE", T + 0.002, PROXY, UAS, [P, C]),
            f.reply(180, "Ringing", T + 0.1, UAS, PROXY, [P, C], to_tag="t"),
            f.reply(180, "Ringing", T + 0.101, PROXY, UAC, [C], to_tag="t")]
    assert run(msgs)[0].ended_how == "open"  # at finish: still open
    out: list[Call] = []
    b = CallBuilder()
    for m in msgs:
        out.extend(b.feed(m))
    assert b.advance(T + INVITE_WAIT - 1) == []
    [c] = b.advance(T + INVITE_WAIT + 1)
    assert (c.outcome, c.ended_by, c.ended_how) == ("no_answer", "timer", "timeout")
    assert "end" in c.as_dict()["provenance"]["inferred"]


def test_parallel_fork_is_one_call_with_two_legs() -> None:
    f = Flow()
    msgs = [
        f.request("INVITE", T, UAC, PROXY, [C]),
        f.request("INVITE", T + 0.002, PROXY, UAS, [P, C]),
        f.request("INVITE", T + 0.003, PROXY, UAS2, [P2, C]),
        f.reply(180, "Ringing", T + 0.1, UAS, PROXY, [P, C], to_tag="b1"),
        f.reply(180, "Ringing", T + 0.101, PROXY, UAC, [C], to_tag="b1"),
        f.reply(486, "Busy", T + 1, UAS2, PROXY, [P2, C], to_tag="b2"),
        f.reply(200, "OK", T + 2, UAS, PROXY, [P, C], to_tag="b1"),
        f.reply(200, "OK", T + 2.001, PROXY, UAC, [C], to_tag="b1"),
        f.request("BYE", T + 10, UAC, PROXY, [("10.0.0.1", "z9hG4bK-bye")], cseq=2, to_tag="b1"),
        f.reply(200, "OK", T + 10.01, PROXY, UAC, [("10.0.0.1", "z9hG4bK-bye")], cseq=2, method="BYE", to_tag="b1"),
    ]
    [c] = run(msgs)
    assert c.outcome == "answered" and c.to_tag == "b1"
    assert sorted((leg["to"], leg["final_code"]) for leg in c.legs) == [(f"{UAS}:5060", 200), (f"{UAS2}:5060", 486)]


def test_call_id_reuse_splits_and_auth_retry_does_not() -> None:
    f = Flow(call_id="reused")
    tt = "t1"
    first = [
        f.request("INVITE", T, UAC, PROXY, [("10.0.0.1", "z9hG4bK-a")]),
        f.reply(407, "Proxy Authentication Required", T + 0.001, PROXY, UAC, [("10.0.0.1", "z9hG4bK-a")], to_tag="x"),
        f.request("INVITE", T + 0.05, UAC, PROXY, [("10.0.0.1", "z9hG4bK-b")], cseq=2),  # authenticated retry
        f.reply(486, "Busy Here", T + 1, PROXY, UAC, [("10.0.0.1", "z9hG4bK-b")], cseq=2, to_tag=tt),
    ]
    second = [  # the same Call-ID and From-tag, a new INVITE after the first call ended
        f.request("INVITE", T + 5, UAC, PROXY, [("10.0.0.1", "z9hG4bK-c")], cseq=3),
        f.reply(200, "OK", T + 6, PROXY, UAC, [("10.0.0.1", "z9hG4bK-c")], cseq=3, to_tag="t2"),
        f.request("BYE", T + 9, UAC, PROXY, [("10.0.0.1", "z9hG4bK-d")], cseq=4, to_tag="t2"),
        f.reply(200, "OK", T + 9.01, PROXY, UAC, [("10.0.0.1", "z9hG4bK-d")], cseq=4, method="BYE", to_tag="t2"),
    ]
    calls = run(first + second)
    assert [(c.seq, c.outcome, c.invite_time) for c in calls] == [(0, "busy", T), (1, "answered", T + 5)]


def test_unretried_challenge_is_rejected() -> None:
    f = Flow()
    msgs = [f.request("INVITE", T, UAC, PROXY, [C]),
            f.reply(401, "Unauthorized", T + 0.001, PROXY, UAC, [C], to_tag="x")]
    b = CallBuilder()
    for m in msgs:
        assert b.feed(m) == []
    [c] = b.advance(T + 40)
    assert (c.outcome, c.final_code, c.ended_by) == ("rejected", 401, "proxy")


def test_session_timer_expiry_when_no_bye_is_seen() -> None:
    f = Flow()
    msgs = [f.request("INVITE", T, UAC, PROXY, [C], extra="Supported: timer\nSession-Expires: 90\n"),
            f.reply(200, "OK", T + 2, PROXY, UAC, [C], to_tag="t", extra="Session-Expires: 90;refresher=uac\n")]
    b = CallBuilder()
    for m in msgs:
        assert b.feed(m) == []
    assert b.advance(T + 2 + 90 + SESSION_GRACE - 1) == []
    [c] = b.advance(T + 2 + 90 + SESSION_GRACE + 1)
    d = c.as_dict()
    assert (d["outcome"], d["ended_by"], d["ended_how"], d["session_expires"]) == ("answered", "timer", "session_timer", 90)
    assert d["end"] == T + 92 and d["billable"] == 90.0 and "end" in d["provenance"]["inferred"]


def test_session_refresh_moves_the_expiry() -> None:
    f = Flow()
    se = "Session-Expires: 90;refresher=uac\n"
    msgs = [f.request("INVITE", T, UAC, PROXY, [C], extra=se),
            f.reply(200, "OK", T + 2, PROXY, UAC, [C], to_tag="t", extra=se),
            f.request("UPDATE", T + 47, UAC, PROXY, [("10.0.0.1", "z9hG4bK-u")], cseq=2, to_tag="t", extra=se),
            f.reply(200, "OK", T + 47.01, PROXY, UAC, [("10.0.0.1", "z9hG4bK-u")], cseq=2, method="UPDATE", to_tag="t",
                    extra=se)]
    b = CallBuilder()
    for m in msgs:
        b.feed(m)
    assert b.advance(T + 2 + 90 + SESSION_GRACE + 1) == []  # refreshed at +47
    [c] = b.advance(T + 47.01 + 90 + SESSION_GRACE + 1)
    assert c.end == pytest.approx(T + 47.01 + 90)


def test_bye_without_reply_ends_after_bye_wait() -> None:
    msgs = [m for m in answered_call(t=T) if not (m.cseq_method == "BYE" and not m.is_request)]
    b = CallBuilder()
    for m in msgs:
        assert b.feed(m) == []
    [c] = b.advance(T + 60 + BYE_WAIT + 1)
    assert (c.end, c.ended_how, c.ended_by) == (T + 60, "bye", "caller")


def _with_sdp(m: SipMessage, sdp: str) -> SipMessage:
    """The message with an SDP body (CRLF lines, a right Content-Length), addresses kept."""
    body = sdp.replace("\n", "\r\n").encode()
    head = m.raw[: m.raw.index(b"Content-Length:")]
    out = sip.parse(head + b"Content-Type: application/sdp\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    out.ts, out.src, out.sport, out.dst, out.dport, out.transport = m.ts, m.src, m.sport, m.dst, m.dport, m.transport
    return out


def test_sdp_offer_answer_media_and_codecs() -> None:
    f = Flow()
    msgs = [_with_sdp(f.request("INVITE", T, UAC, PROXY, [C]), SDP_OFFER),
            _with_sdp(f.reply(200, "OK", T + 2, PROXY, UAC, [C], to_tag="t", extra="Server: AcmePBX 1.0\n"), SDP_ANSWER)]
    b = CallBuilder()
    for m in msgs:
        b.feed(m)
    [c] = b.finish()
    assert c.offer_media == "10.0.0.1:40000" and c.offer_codecs == ["PCMU/8000", "PCMA/8000", "telephone-event/8000"]
    assert c.answer_media == "10.0.0.2:50000" and c.answer_codecs == ["PCMA/8000", "telephone-event/8000"]
    assert c.callee_ua == "AcmePBX 1.0" and c.ended_how == "open" and c.outcome == "answered" and c.end is None


def test_capture_gap_inside_a_call_only() -> None:
    b = CallBuilder()
    b.gap(T - 5)  # before the call: not inside
    [c] = run(answered_call(t=T), b)
    assert c.capture_gaps is False
    b = CallBuilder()
    msgs = answered_call(t=T)
    for m in msgs[:5]:
        b.feed(m)
    b.gap(T + 30)
    out = [c for m in msgs[5:] for c in b.feed(m)]
    assert [c.capture_gaps for c in out] == [True]


def test_open_calls_are_bounded_and_the_bound_is_counted() -> None:
    b = CallBuilder(max_calls=2)
    out: list[Call] = []
    for i in range(3):
        out.extend(b.feed(Flow(call_id=f"c{i}").request("INVITE", T + i, UAC, PROXY, [C])))
    assert [(c.call_id, c.ended_how) for c in out] == [("c0", "evicted")] and b.stats.evicted == 1
    assert len(b.finish()) == 2


def test_party_and_sdp_helpers() -> None:
    assert party('"Bob \\"B\\"" <sip:+4930123@example.com;user=phone>;tag=x') == (
        'Bob \\"B\\"', "sip:+4930123@example.com;user=phone", "+4930123")
    assert party("sip:carol@example.com;tag=1") == (None, "sip:carol@example.com", "carol")
    assert party("<tel:+123>") == (None, "tel:+123", None)
    assert sdp_media(b"v=0\r\nm=video 0 RTP/AVP 96\r\n") == (None, [])  # audio only
    media_level = b"v=0\r\nc=IN IP4 192.0.2.9\r\nm=audio 4000 RTP/AVP 18 9\r\nc=IN IP6 2001:db8::1\r\n"
    assert sdp_media(media_level) == ("[2001:db8::1]:4000", ["G729/8000", "G722/8000"])
    assert sdp_media(b"") == (None, [])


def test_a_branch_that_starts_with_the_caller_s_is_no_forward() -> None:
    """z9hG4bK-uac10 is a new INVITE of the caller, not a forward of z9hG4bK-uac1 (after its call ended)."""
    f = Flow(call_id="p")
    first = [f.request("INVITE", T, UAC, PROXY, [("10.0.0.1", "z9hG4bK-uac1")]),
             f.reply(486, "Busy Here", T + 1, PROXY, UAC, [("10.0.0.1", "z9hG4bK-uac1")], to_tag="t")]
    again = [f.request("INVITE", T + 3, UAC, PROXY, [("10.0.0.1", "z9hG4bK-uac10")], cseq=2),
             f.reply(603, "Decline", T + 4, PROXY, UAC, [("10.0.0.1", "z9hG4bK-uac10")], cseq=2, to_tag="u")]
    assert [(c.seq, c.final_code, c.legs) for c in run(first + again)] == [(0, 486, []), (1, 603, [])]


def test_calls_is_a_pure_stage() -> None:
    """calls.py follows the architecture rule of the middle stages: no I/O, no clock."""
    from tests.test_architecture import test_pure_stages_import_no_io

    test_pure_stages_import_no_io("calls")


def test_reinvite_from_the_callee_refreshes_the_session_timer() -> None:
    f = Flow()
    se = "Session-Expires: 90\n"
    callee_via = [("10.0.0.2", "z9hG4bK-re")]
    msgs = [f.request("INVITE", T, UAC, PROXY, [C], extra=se),
            f.reply(200, "OK", T + 2, PROXY, UAC, [C], to_tag="t", extra=se),
            f.request("INVITE", T + 50, UAS, PROXY, callee_via, cseq=1, from_tag="t", to_tag=f.ftag, extra=se),
            f.reply(200, "OK", T + 50.01, PROXY, UAS, callee_via, cseq=1, from_tag="t", to_tag=f.ftag, extra=se)]
    b = CallBuilder()
    for m in msgs:
        b.feed(m)
    assert b.advance(T + 2 + 90 + SESSION_GRACE + 1) == [] and b.stats.orphans == 0
    [c] = b.advance(T + 50.01 + 90 + SESSION_GRACE + 1)
    assert c.ended_how == "session_timer" and c.end == pytest.approx(T + 140.01)


def test_bye_made_by_the_proxy_is_the_proxy_s() -> None:
    """Kamailio's dialog timeout sends BYE to both ends itself: one Via, from the proxy's address."""
    msgs = [m for m in answered_call(t=T) if m.cseq_method != "BYE"]
    f = Flow()
    pv = [("10.0.0.10", "z9hG4bK-dlgbye")]
    msgs += [f.request("BYE", T + 30, PROXY, UAS, pv, cseq=3, to_tag="bob-tag"),
             f.reply(200, "OK", T + 30.01, UAS, PROXY, pv, cseq=3, method="BYE", to_tag="bob-tag")]
    [c] = run(msgs)
    assert (c.ended_by, c.ended_how, c.end) == ("proxy", "bye", T + 30)
