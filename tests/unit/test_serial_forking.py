"""Serial forking (a failure_route that relays again): one ON_FAILURE per failed round, and tm's
made-up To-tag of a branch that timed out. Crafted flows through the tracker, and the To-tags
Kamailio 5.6 wrote in the recorded conformance cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sipsniff_acc.pipeline import MessagePipeline
from sipsniff_acc.sip import SipMessage
from sipsniff_acc.sources.pcapfile import CaptureReader
from sipsniff_acc.tracker import FR_EARLY, BranchesFailed, ReplyOut, TransactionTracker, tm_local_tag, tm_tag_suffix
from tests.flows import PROXY, UAC, UAS, UAS2, C, Call, P, P2

CASES = Path(__file__).resolve().parents[1] / "conformance" / "cases"
P3 = ("10.0.0.10", "z9hG4bK-px3")


def failures(msgs: list[SipMessage], proxies: bool, fr_inv_timer: float = 120.0) -> list[BranchesFailed]:
    t = TransactionTracker([(PROXY, 5060)] if proxies else None, fr_inv_timer=fr_inv_timer)
    return [e for m in msgs for e in t.feed(m) if isinstance(e, BranchesFailed)]


def serial(first: int, second: int, c: Call | None = None) -> list[SipMessage]:
    """Branch 1 to UAS fails with ``first``; the failure_route relays to UAS2, which ends with ``second``."""
    c = c or Call()
    return [
        c.request("INVITE", 1000.0, UAC, PROXY, [C]),
        c.request("INVITE", 1000.002, PROXY, UAS, [P, C]),
        c.reply(first, "first", 1000.2, UAS, PROXY, [P, C], to_tag="t1"),
        c.request("ACK", 1000.201, PROXY, UAS, [P], to_tag="t1"),
        c.request("INVITE", 1000.203, PROXY, UAS2, [P2, C], ruri="sip:bob@uas2.example.com"),
        c.reply(second, "second", 1000.4, UAS2, PROXY, [P2, C], to_tag="t2"),
        c.reply(second, "second", 1000.401, PROXY, UAC, [C], to_tag="t2"),
    ]


@pytest.mark.parametrize("proxies", [True, False])
def test_a_failed_round_then_an_answer_gives_the_first_branchs_failure(proxies: bool) -> None:
    msgs = serial(486, 200)
    got = failures(msgs, proxies)
    assert len(got) == 1
    f = got[0]
    assert (f.code, f.reply, f.ts, f.branch.request.dst) == (486, msgs[2], 1000.2, UAS)  # type: ignore[union-attr]
    assert f.failure_route  # the failure_route ran: it relayed again


@pytest.mark.parametrize("proxies", [True, False])
def test_each_round_is_picked_among_its_own_branches(proxies: bool) -> None:
    """t_pick_branch over all branches would prefer round 1's 486 to round 2's 503 (4xx before
    5xx); tm picks among the last round only, and the failure_route is not armed again."""
    got = failures(serial(486, 503), proxies)
    assert [(f.code, f.reply.to_tag if f.reply else None) for f in got] == [(486, "t1"), (503, "t2")]
    assert [f.failure_route for f in got] == [True, False]


@pytest.mark.parametrize("proxies", [True, False])
def test_a_branch_that_timed_out_is_a_faked_408_at_the_next_branch(proxies: bool) -> None:
    """tm's timer fires up to a tick before fr_inv_timer after the branch went out: the round
    failed with a FAKED 408, dated when the failure_route relayed again."""
    c = Call()
    relay = 1000.002 + 2.0 - FR_EARLY / 2
    msgs = [
        c.request("INVITE", 1000.0, UAC, PROXY, [C]),
        c.request("INVITE", 1000.002, PROXY, UAS, [P, C]),
        c.reply(180, "Ringing", 1000.1, UAS, PROXY, [P, C], to_tag="t1"),
        c.request("INVITE", relay, PROXY, UAS2, [P2, C]),
        c.request("CANCEL", relay + 0.001, PROXY, UAS, [P]),
        c.reply(487, "Request Terminated", relay + 0.002, UAS, PROXY, [P, C], to_tag="t1"),
        c.reply(200, "OK", relay + 0.1, UAS2, PROXY, [P2, C], to_tag="t2"),
        c.reply(200, "OK", relay + 0.101, PROXY, UAC, [C], to_tag="t2"),
    ]
    got = failures(msgs, proxies, fr_inv_timer=2.0)
    assert [(f.code, f.reply, f.ts, f.branch.request.dst) for f in got] == [(408, None, relay, UAS)]  # type: ignore[union-attr]


@pytest.mark.parametrize("proxies", [True, False])
def test_parallel_branches_are_one_round(proxies: bool) -> None:
    """Branches relayed together (or one added while another is still inside its fr timer) are
    not a failed round: one ON_FAILURE when the reply goes upstream, picked among all."""
    c = Call()
    msgs = [
        c.request("INVITE", 1000.0, UAC, PROXY, [C]),
        c.request("INVITE", 1000.01, PROXY, UAS, [P, C]),
        c.request("INVITE", 1000.02, PROXY, UAS2, [P2, C]),
        c.reply(486, "Busy", 1001.0, UAS, PROXY, [P, C], to_tag="t1"),
        c.request("INVITE", 1000.02 + 2.0 - 2 * FR_EARLY, PROXY, "10.0.0.4", [P3, C]),  # UAS2 inside fr_inv_timer
        c.reply(480, "Gone", 1003.5, UAS2, PROXY, [P2, C], to_tag="t2"),
        c.reply(603, "Decline", 1003.6, "10.0.0.4", PROXY, [P3, C], to_tag="t3"),
        c.reply(603, "Decline", 1003.7, PROXY, UAC, [C], to_tag="t3"),
    ]
    got = failures(msgs, proxies, fr_inv_timer=2.0)
    assert [(f.code, f.ts, f.failure_route) for f in got] == [(603, 1003.6, True)]


def test_the_last_rounds_reply_goes_upstream_once() -> None:
    t = TransactionTracker([(PROXY, 5060)])
    evs = [e for m in serial(486, 480) for e in t.feed(m)]
    outs = [e for e in evs if isinstance(e, ReplyOut) and e.code >= 200]
    assert [(e.code, e.branch.request.dst if e.branch else None) for e in outs] == [(480, UAS2)]
    assert [type(e).__name__ for e in evs if isinstance(e, (BranchesFailed, ReplyOut)) and e.code >= 200] == [
        "BranchesFailed", "BranchesFailed", "ReplyOut"]


def _invites(pcap: Path) -> list[SipMessage]:
    mp = MessagePipeline()
    msgs = [m for frame in CaptureReader(str(pcap)) for m in mp.feed(frame)] + mp.finish()
    return [m for m in msgs if isinstance(m, SipMessage) and m.method == "INVITE" and m.dport == 5060 and not m.to_tag]


@pytest.mark.parametrize("case", ["no_answer_proxy_408", "cdr_no_answer", "proxy_404", "cdr_proxy_404",
                                  "serial_timeout_then_200", "cdr_serial_timeout_then_200"])
def test_tm_local_tag_is_kamailios(case: str) -> None:
    """MD5("SER-TM/tags"+ip+port) + "-" + calc_crc_suffix(INVITE), as Kamailio 5.6 wrote it in the
    missed_calls row (for the serial timeout, a tag no packet ever carried)."""
    rows = json.loads((CASES / case / "missed_calls.json").read_text())
    tags = {r["to_tag"] for r in rows if len(r["to_tag"] or "") == 41}
    (invite,) = _invites(CASES / case / "capture.pcap")
    assert tags == {tm_local_tag(invite)}


def test_the_crc_suffix_reads_the_top_via_and_call_id() -> None:
    c = Call()
    a = c.request("INVITE", 1.0, UAC, PROXY, [C])
    b = c.request("INVITE", 1.0, UAC, PROXY, [("10.0.0.1", "z9hG4bK-other")])
    d = Call(call_id="call-2").request("INVITE", 1.0, UAC, PROXY, [C])
    sa, sb, sd = tm_tag_suffix(a), tm_tag_suffix(b), tm_tag_suffix(d)
    assert len(sa) == 8 and sa[4:] == sb[4:] and sa[:4] != sb[:4]  # the branch is in the first half only
    assert sa[:4] == sd[:4] and sa[4:] != sd[4:]  # the Call-ID in the second half only


def test_a_later_round_gets_its_own_fr_timer() -> None:
    """--open-as-408 (the timer 408s accounted during a run) and the forgetting of open
    transactions count from the current round's branch: a second callee answering within its
    own fr_inv_timer is not cut off by the timer of the first, already failed, round."""
    c = Call()
    msgs = [
        c.request("INVITE", 1000.0, UAC, PROXY, [C]),
        c.request("INVITE", 1000.002, PROXY, UAS, [P, C]),
        c.request("INVITE", 1002.0, PROXY, UAS2, [P2, C]),  # UAS timed out (fr_inv_timer 2 s)
        c.reply(180, "Ringing", 1002.1, UAS2, PROXY, [P2, C], to_tag="t2"),
        c.reply(180, "Ringing", 1002.101, PROXY, UAC, [C], to_tag="t2"),
        c.reply(200, "OK", 1003.9, UAS2, PROXY, [P2, C], to_tag="t2"),
        c.reply(200, "OK", 1003.901, PROXY, UAC, [C], to_tag="t2"),
    ]
    t = TransactionTracker([(PROXY, 5060)], fr_inv_timer=2.0, open_as_408=True)
    evs = []
    for m in msgs:
        evs += t.advance(m.ts)
        evs += t.feed(m)
    finals = [(type(e).__name__, e.code) for e in evs if isinstance(e, (ReplyOut, BranchesFailed)) and e.code >= 200]
    assert finals == [("BranchesFailed", 408), ("ReplyOut", 200)]
    assert not t.stats.timer_408
    # nobody answers the second callee either: the proxy's 408 comes at its own timer
    t = TransactionTracker([(PROXY, 5060)], fr_inv_timer=2.0, open_as_408=True)
    evs = [e for m in msgs[:5] for e in (*t.advance(m.ts), *t.feed(m))] + t.advance(1003.9) + t.advance(1010.0)
    timer = [e for e in evs if isinstance(e, ReplyOut) and e.code == 408]
    assert [(e.ts, e.local) for e in timer] == [(1004.0, True)]
    # and a run that ends before it: the 408 the proxy would send, at the second round's timer
    t = TransactionTracker([(PROXY, 5060)], fr_inv_timer=2.0)
    for m in msgs[:5]:
        t.feed(m)
    assert [(type(e).__name__, e.ts) for e in t.finish(open_as_408=True)] == [("BranchesFailed", 1004.0),
                                                                              ("ReplyOut", 1004.0)]


SERIAL_RULES = """
profile: kamailio-5.6
tm: {fr_inv_timer: 120}
acc: {log_flag: 1, log_missed_flag: 2, db_flag: 1, db_missed_flag: 2, failed_transaction_flag: 3}
route:
  - if: {method: INVITE, in_dialog: false}
    setflag: [1, 2, 3]
"""


def test_a_restart_during_a_later_round_keeps_the_call(tmp_path: Path) -> None:
    """--state saved while the second callee rings, 153 s after the INVITE (past the first
    round's fr_inv_timer + 32 s, inside the second's): restored, the 200 is still accounted."""
    from sipsniff_acc.processrun import AccPipeline
    from sipsniff_acc.rules import parse_rules
    from sipsniff_acc.state import load_state, save_state

    def flow() -> list[SipMessage]:
        c = Call()
        return [
            c.request("INVITE", 1000.0, UAC, PROXY, [C]),
            c.request("INVITE", 1000.002, PROXY, UAS, [P, C]),
            c.reply(180, "Ringing", 1000.1, UAS, PROXY, [P, C], to_tag="t1"),
            c.reply(180, "Ringing", 1000.101, PROXY, UAC, [C], to_tag="t1"),
            c.request("INVITE", 1120.0, PROXY, UAS2, [P2, C]),  # UAS timed out
            c.reply(180, "Ringing", 1120.1, UAS2, PROXY, [P2, C], to_tag="t2"),
            c.reply(200, "OK", 1160.0, UAS2, PROXY, [P2, C], to_tag="t2"),
            c.reply(200, "OK", 1160.001, PROXY, UAC, [C], to_tag="t2"),
        ]

    rules = parse_rules(SERIAL_RULES)
    whole = AccPipeline(rules)
    expected = [r.as_dict() for m in flow() for r in whole.feed(m)] + [r.as_dict() for r in whole.finish()]
    assert [(r["kind"], r["code"]) for r in expected] == [("missed", "408"), ("answered", "200")]
    msgs = flow()
    first = AccPipeline(rules)
    got = [r.as_dict() for m in msgs[:6] for r in first.feed(m)]
    save_state(tmp_path / "st", first, 1153.0)
    second = AccPipeline(rules)
    res = load_state(tmp_path / "st", second, 1153.0)
    got += [r.as_dict() for m in msgs[6:] for r in second.feed(m)] + [r.as_dict() for r in second.finish()]
    assert res.transactions >= 1
    assert got == expected


def test_t_on_failure_is_a_failure_route_action() -> None:
    """check-rules: in a route rule it means nothing (failure_route rules run at the first
    failure without it): one FILE:LINE line naming it."""
    from sipsniff_acc.rules import RulesError, parse_rules

    text = "profile: kamailio-5.6\nroute:\n  - if: {method: INVITE}\n    t_on_failure: true\n"
    with pytest.raises(RulesError) as e:
        parse_rules(text, "r.yaml")
    assert e.value.problems == ["r.yaml:4: route.0.t_on_failure: t_on_failure is a failure_route action (failure_route "
                                "rules run at a transaction's first failure without it)"]


@pytest.mark.parametrize("proxies", [True, False])
def test_a_reply_of_the_failure_routes_own_shows_it_ran_again(proxies: bool) -> None:
    """An LCR script's last failure_route (re-armed) answers itself, t_reply("503"): the reply
    upstream is no branch's, so the failure_route ran at that round; a relayed last reply
    (the 480 itself) does not say so."""
    from tests.flows import TM_TAG

    msgs = serial(486, 480)
    msgs[-1] = Call().reply(503, "No more gateways", 1000.401, PROXY, UAC, [C], to_tag=f"{TM_TAG}-0badcafe")
    assert [(f.code, f.failure_route) for f in failures(msgs, proxies)] == [(486, True), (480, True)]
    assert [(f.code, f.failure_route) for f in failures(serial(486, 480), proxies)] == [(486, True), (480, False)]


def _rounds(c: Call, n: int, last: int = 480) -> list[SipMessage]:
    """One INVITE a failure_route relays ``n`` times: each branch to its own callee answers 486
    and is ACKed (a new round each time); the last round's ``last`` goes upstream."""
    msgs = [c.request("INVITE", 1000.0, UAC, PROXY, [C])]
    ts = 1000.0
    for i in range(n):
        ts += 0.01
        v = (PROXY, f"z9hG4bK-round{i}")
        callee = f"10.0.1.{i % 250 + 1}"
        code = last if i == n - 1 else 486
        msgs += [c.request("INVITE", ts, PROXY, callee, [v, C], ruri=f"sip:bob@{callee}"),
                 c.reply(code, "No", ts + 0.002, callee, PROXY, [v, C], to_tag=f"t{i}"),
                 c.request("ACK", ts + 0.003, PROXY, callee, [v], to_tag=f"t{i}")]
    return [*msgs, c.reply(last, "No", ts + 0.005, PROXY, UAC, [C], to_tag=f"t{n - 1}")]


@pytest.mark.parametrize("proxies", [True, False])
def test_an_endless_serial_fork_holds_only_the_first_and_the_current_rounds_branch(proxies: bool) -> None:
    """Every round is still accounted (one ON_FAILURE each, picked among its own branch), but
    the server transaction keeps its first branch and the current round's only: 200 rounds
    of one INVITE hold 2 branches, not 200, and nothing is cut (max_branches is per round)."""
    c = Call()
    msgs = _rounds(c, 200)
    t = TransactionTracker([(PROXY, 5060)] if proxies else None)
    got = [e for m in msgs for e in t.feed(m) if isinstance(e, BranchesFailed)]
    assert [f.code for f in got] == [486] * 199 + [480]
    assert [f.branch.request.dst for f in got] == [f"10.0.1.{i % 250 + 1}" for i in range(200)]  # type: ignore[union-attr]
    assert [f.failure_route for f in got] == [True] * 199 + [False]
    server = next(x for x in t.txns.values() if x.role == "server")
    assert [b.request.dst for b in server.branches] == ["10.0.1.1", "10.0.1.200"]  # type: ignore[union-attr]
    assert server.first_branch == 1 and t.stats.branches_cut == 0


def test_a_many_round_fork_gives_the_records_of_a_short_one() -> None:
    """Letting earlier rounds go changes no record: 40 rounds give what 3 give (the first
    round's missed call, then the last round's failure), with the last round's To-tag."""
    from sipsniff_acc.processrun import AccPipeline
    from sipsniff_acc.rules import parse_rules

    def records(n: int) -> list[tuple[object, ...]]:
        p = AccPipeline(parse_rules(SERIAL_RULES))
        out = [r.as_dict() for m in _rounds(Call(), n) for r in p.feed(m)] + [r.as_dict() for r in p.finish()]
        return [(r["kind"], r["code"], r["to_tag"]) for r in out]

    assert records(40) == [("missed", "486", "t0"), ("answered", "480", "t39")]
    assert records(3) == [("missed", "486", "t0"), ("answered", "480", "t2")]


@pytest.mark.parametrize("proxies", [True, False])
def test_a_round_past_max_branches_is_cut_and_counted(proxies: bool) -> None:
    """One INVITE forked to 40 callees at once (tm refuses past max_branches): the server
    transaction holds 32 (limits.max_branches), the other 8 are counted, and the reply
    upstream is still accounted, picked among those held."""
    from sipsniff_acc.limits import Limits

    c = Call()
    msgs = [c.request("INVITE", 1000.0, UAC, PROXY, [C])]
    msgs += [c.request("INVITE", 1000.01 + i / 1000, PROXY, f"10.0.1.{i + 1}", [(PROXY, f"z9hG4bK-par{i}"), C])
             for i in range(40)]
    msgs += [c.reply(486, "Busy", 1001.0 + i / 1000, f"10.0.1.{i + 1}", PROXY, [(PROXY, f"z9hG4bK-par{i}"), C],
                     to_tag=f"t{i}") for i in range(40)]
    msgs.append(c.reply(486, "Busy", 1002.0, PROXY, UAC, [C], to_tag="t0"))
    for limits, held in ((None, 32), (Limits(max_branches=4), 4)):
        t = TransactionTracker([(PROXY, 5060)] if proxies else None, limits=limits)
        got = [e for m in msgs for e in t.feed(m) if isinstance(e, BranchesFailed)]
        server = next(x for x in t.txns.values() if x.role == "server")
        assert len(server.branches) == held and t.stats.branches_cut == 40 - held
        assert [(f.code, f.reply.to_tag if f.reply else None) for f in got] == [(486, "t0")]
        assert f"{40 - held} branches past max_branches" in t.stats.evictions()


def test_an_endless_serial_fork_leaves_no_timer_per_round_behind() -> None:
    """Each round pushes its deadline (and --open-as-408 timer); the earlier rounds' are dropped
    when the heaps are compacted, or 12,000 rounds of one INVITE would leave 12,000 of each
    (the branches themselves are let go at max_transactions)."""
    from sipsniff_acc.limits import Limits

    t = TransactionTracker([(PROXY, 5060)], open_as_408=True, limits=Limits(max_transactions=500))
    for m in _rounds(Call(), 12_000):
        t.advance(m.ts)
        t.feed(m)
    assert max(t.pending_deadlines()) < 7000, t.pending_deadlines()
