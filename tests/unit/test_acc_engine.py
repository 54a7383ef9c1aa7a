"""The acc logic (acc-spec §1-2) on crafted flows: which records, with which fields."""

from __future__ import annotations

from sipsniff_acc.processrun import records_of
from sipsniff_acc.records import AccRecord, parse_comment
from sipsniff_acc.rules import parse_rules
from sipsniff_acc.sysloglines import payload
from tests.flows import PROXY, TM_TAG, UAC, UAS, C, Call, P, answered_call, local_reject, rejected_call

BASE = """
proxy: {addresses: ["10.0.0.10:5060"]}
acc: {log_flag: 1, log_missed_flag: 2, db_flag: 1, db_missed_flag: 2, failed_transaction_flag: 3 %s}
route:
  - if: {method: BYE, in_dialog: true}
    setflag: [1, 3]
  - if: {in_dialog: true}
    stop: true
  - if: {method: INVITE}
    setflag: %s
"""


def recs(msgs, flags="[1, 2]", params="", extra_rules="", profile=""):  # type: ignore[no-untyped-def]
    text = (f"profile: {profile}\n" if profile else "") + BASE % (params, flags) + extra_rules
    return records_of(msgs, parse_rules(text))


def brief(rs: list[AccRecord]) -> list[tuple[str, str, str, str]]:
    return [(r.kind, r.method, r.code, r.reason) for r in rs]


def test_answered_call() -> None:
    rs = recs(answered_call())
    assert brief(rs) == [("answered", "INVITE", "200", "OK"), ("answered", "BYE", "200", "OK")]
    inv = rs[0]
    assert (inv.from_tag, inv.to_tag, inv.call_id, inv.ts) == ("alice-tag", "bob-tag", "call-1", 1002.001)
    assert inv.backends == ("log", "db") and inv.table == "acc"
    assert payload(inv) == ("ACC: transaction answered: timestamp=1002;method=INVITE;from_tag=alice-tag;"
                            "to_tag=bob-tag;call_id=call-1;code=200;reason=OK")


def test_missed_only_then_missed_and_failed() -> None:
    assert brief(recs(rejected_call())) == [("missed", "INVITE", "486", "Busy Here")]
    rs = recs(rejected_call(), flags="[1, 2, 3]")
    assert brief(rs) == [("missed", "INVITE", "486", "Busy Here"), ("answered", "INVITE", "486", "Busy Here")]
    assert rs[0].table == "missed_calls" and rs[0].ts == 1003.0 and rs[1].ts == 1003.002


def test_failed_filter_exempts_codes() -> None:
    rs = recs(rejected_call(), flags="[1, 3]", params=', failed_filter: "486,487"')
    assert rs == []


def test_local_reply_reason_is_error_text_and_to_tag_local() -> None:
    rs = recs(local_reject(404, "Not Here Custom"), flags="[1, 2, 3]")
    assert brief(rs) == [("missed", "INVITE", "404", "Not Found"), ("answered", "INVITE", "404", "Not Found")]
    assert rs[0].to_tag == rs[1].to_tag == f"{TM_TAG}-a1b2c3d4" and rs[0].local
    wire = recs(local_reject(404, "Not Here Custom"), flags="[1, 3]", params=', local_reason: "wire"')
    assert brief(wire) == [("answered", "INVITE", "404", "Not Here Custom")]
    assert recs(local_reject(stateless=True), flags="[1, 2, 3]") == []


def test_reason_from_hf() -> None:
    rs = recs(rejected_call(extra='Reason: SIP ;cause=486 ;text="Busy"\n'), flags="[1, 3]",
              params=", reason_from_hf: true")
    assert rs[0].reason == 'SIP ;cause=486 ;text="Busy"'


def test_early_media_needs_a_body_in_kamailio_and_183_in_openser() -> None:
    c = Call()
    sdp = "v=0\r\n"
    msgs = [c.request("INVITE", 1000.0, UAC, PROXY, [C]), c.request("INVITE", 1000.01, PROXY, UAS, [P, C]),
            c.reply(180, "Ringing", 1000.1, UAS, PROXY, [P, C], to_tag="t"),
            c.reply(180, "Ringing", 1000.11, PROXY, UAC, [C], to_tag="t", body=sdp),
            c.reply(183, "Session Progress", 1000.2, PROXY, UAC, [C], to_tag="t"),
            c.reply(183, "Session Progress", 1000.3, PROXY, UAC, [C], to_tag="t", body=sdp),
            c.reply(200, "OK", 1001.0, UAS, PROXY, [P, C], to_tag="t"),
            c.reply(200, "OK", 1001.01, PROXY, UAC, [C], to_tag="t")]
    k = recs(msgs, params=", early_media: true")
    assert [r.code for r in k] == ["180", "183", "200"]  # 1xx with a body, any code
    o = recs(msgs, params=", early_media: true", profile="openser-1.2")
    assert [r.code for r in o] == ["183", "183", "200"]  # exactly 183, body or not
    assert [r.code for r in recs(msgs)] == ["200"]


def test_report_ack_once_with_the_invite_code_and_canonical_reason() -> None:
    msgs = answered_call()
    msgs[6] = Call().reply(200, "Fine Thanks", 1002.001, PROXY, UAC, [C], to_tag="bob-tag")
    rs = recs([*msgs[:8], msgs[7], *msgs[8:]], params=", report_ack: true")
    assert brief(rs) == [("answered", "INVITE", "200", "Fine Thanks"), ("acked", "ACK", "200", "OK"),
                         ("answered", "BYE", "200", "OK")]
    assert rs[1].ts == 1002.01 and rs[1].to_tag == "bob-tag"


def test_detect_direction_swaps_only_core_tags() -> None:
    msgs = answered_call(bye_from_callee=True)
    plain = recs(msgs, params=', log_extra: "fu=$fU;ft=$ft"')
    assert (plain[1].from_tag, plain[1].to_tag) == ("bob-tag", "alice-tag")
    swapped = recs(msgs, params=', detect_direction: true, log_extra: "ft=$ft"')
    assert (swapped[1].from_tag, swapped[1].to_tag) == ("alice-tag", "bob-tag")
    assert swapped[1].extras["log"] == [("ft", "bob-tag")]  # $ft is the request's, not swapped


def test_report_cancels_accounts_a_flagged_cancel() -> None:
    c = Call()
    msgs = [*rejected_call(487, "Request Terminated")[:4],
            c.request("CANCEL", 1001.0, UAC, PROXY, [C]),
            c.reply(200, "canceling", 1001.001, PROXY, UAC, [C], method="CANCEL", to_tag=f"{TM_TAG}-99"),
            *rejected_call(487, "Request Terminated")[4:]]
    cancel_rule = "  - if: {method: CANCEL}\n    setflag: [1]\n"
    text = BASE % (", report_cancels: true", "[1, 2]")
    text = text.replace("route:\n", "route:\n" + cancel_rule)
    rs = records_of(msgs, parse_rules(text))
    assert brief(rs) == [("answered", "CANCEL", "200", "OK"), ("missed", "INVITE", "487", "Request Terminated")]
    off = records_of(msgs, parse_rules(text.replace("report_cancels: true", "report_cancels: false")))
    assert brief(off) == [("missed", "INVITE", "487", "Request Terminated")]


def test_failure_route_runs_after_missed_and_can_suppress_the_answered_record() -> None:
    fr = ("failure_route:\n  - if: {code: 4xx}\n    acc_log_request: \"404 callee unavailable\"\n"
          "  - if: {code: 486}\n    resetflag: [3]\n")
    rs = recs(rejected_call(), flags="[1, 2, 3]", extra_rules=fr)
    assert brief(rs) == [("missed", "INVITE", "486", "Busy Here"), ("request", "INVITE", "404", "callee unavailable")]
    assert rs[1].backends == ("log",) and rs[1].ts == 1003.0


def test_route_actions_avps_drop_and_script_records() -> None:
    rules = ('  - if: {method: INVITE}\n    set_avp: {who: "$fU"}\n'
             '  - if: {method: INVITE, ruri: "^sip:bob@"}\n    acc_db_request: {comment: "sent to bob", table: audit}\n')
    rs = recs(answered_call(), params=', log_extra: "who=$avp(who)"', extra_rules="", flags="[1]")
    assert rs[0].extras["log"] == [("who", None)]
    text = BASE % (', log_extra: "who=$avp(who)"', "[1]") + rules
    rs = records_of(answered_call(), parse_rules(text))
    assert brief(rs)[0] == ("request", "INVITE", "", "sent to bob")
    assert rs[0].table == "audit" and rs[0].backends == ("db",) and rs[0].ts == 1000.0
    assert rs[1].extras["log"] == [("who", "alice")]
    drop = BASE % ("", "[1]") + "  - if: {method: INVITE}\n    drop: true\n"
    assert brief(records_of(answered_call(), parse_rules(drop))) == [("answered", "BYE", "200", "OK")]


def test_flags_unset_at_creation_mean_no_record() -> None:
    assert recs(answered_call(), flags="[]")[0].method == "BYE"


def test_openser_method_comes_from_the_request_line() -> None:
    c = Call()
    msgs = [c.request("INVITE", 1000.0, UAC, PROXY, [C], cseq_method="INVITE"),
            c.reply(200, "OK", 1000.5, PROXY, UAC, [C], to_tag="t")]
    msgs[0].cseq_method = "Invite"
    assert recs(msgs)[0].method == "Invite"
    assert recs(msgs, profile="openser-1.2")[0].method == "INVITE"


def test_record_ids_are_stable_and_distinct() -> None:
    a = recs(answered_call())
    b = recs(answered_call())
    assert [r.record_id for r in a] == [r.record_id for r in b]
    assert len({r.record_id for r in a}) == len(a)


def test_parse_comment() -> None:
    assert parse_comment("404 Not here") == ("404", "Not here")
    assert parse_comment("no code") == ("", "no code")
    assert parse_comment("4040 x") == ("", "4040 x")


def test_proxy_not_involved_is_not_accounted_with_addresses() -> None:
    c = Call()
    direct = [c.request("INVITE", 1000.0, UAC, UAS, [C]), c.reply(200, "OK", 1000.5, UAS, UAC, [C], to_tag="t")]
    assert recs(direct) == []
    assert PROXY


def test_route_memo_gives_the_flags_the_walk_gives() -> None:
    """The request_route outcome remembered per (method, in-dialog) equals the walk of the rules,
    for every method spelling and dialog state, and is not used for rules that read more."""
    from sipsniff_acc import sip
    from sipsniff_acc.acc import AccEngine, TxnAcc

    extra = "  - if: {method: [OPTIONS, register]}\n    setflag: [4]\n    resetflag: [2]\n" \
            "  - if: {method: CANCEL}\n    drop: true\n"
    simple = AccEngine(parse_rules(BASE % ("", "[1, 2]") + extra))
    walked = AccEngine(parse_rules(BASE % ("", "[1, 2]") + extra))
    walked._route_memo = None
    assert simple._route_memo == {}
    reading = AccEngine(parse_rules(BASE % ("", "[1, 2]") + "  - if: {ruri: '^sip:9'}\n    setflag: [5]\n"))
    assert reading._route_memo is None
    for method in ("INVITE", "invite", "BYE", "OPTIONS", "Register", "CANCEL", "ACK", "FOO"):
        for to in ("", ";tag=x"):
            for _again in range(2):  # the first fills the memo, the second reads it
                msg = sip.parse(f"{method} sip:b@h SIP/2.0\r\nVia: SIP/2.0/UDP 1.2.3.4;branch=z9hG4bK1\r\n"
                                f"From: <sip:a@h>;tag=f\r\nTo: <sip:b@h>{to}\r\nCall-ID: c\r\n"
                                f"CSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n".encode())
                a, b = TxnAcc(0), TxnAcc(0)
                simple._route(msg, a, [])
                walked._route(msg, b, [])
                assert (a.flags, a.dropped, a.rearmed) == (b.flags, b.dropped, b.rearmed), (method, to)
    assert simple._route_memo and len(simple._route_memo) == 16
