"""The transaction tracker, fed crafted call flows (both legs of a proxy), no I/O."""

from __future__ import annotations

import pytest

from sipsniff_acc.tracker import AckIn, BranchesFailed, ReplyOut, RequestIn, TransactionTracker, tm_tag_prefix
from tests.flows import PROXY, SL_TAG, TM_TAG, UAC, UAS, UAS2, C, Call, P, P2, answered_call, local_reject, rejected_call


def events(msgs, proxies=None, **kw):  # type: ignore[no-untyped-def]
    t = TransactionTracker([(PROXY, 5060)] if proxies else None, **kw)
    out = []
    for m in msgs:
        out.extend(t.feed(m))
    return t, out


@pytest.mark.parametrize("proxies", [True, False])
def test_answered_call_gives_the_proxy_transactions_only(proxies: bool) -> None:
    t, evs = events(answered_call(), proxies)
    kinds = [(type(e).__name__, getattr(e, "code", None)) for e in evs]
    assert kinds == [("RequestIn", None), ("ReplyOut", 180), ("ReplyOut", 200), ("AckIn", None),
                     ("RequestIn", None), ("ReplyOut", 200)]
    assert t.stats.transactions == {"server": 2, "branch": 2}
    out = [e for e in evs if isinstance(e, ReplyOut)]
    assert [e.reply.src for e in out if e.reply] == [PROXY, PROXY, PROXY]  # the replies sent upstream
    assert not any(e.local for e in out)
    if not proxies:
        assert t.stats.inferred_proxies == {f"{PROXY}:5060"}


def test_the_reply_that_counts_is_the_upstream_one() -> None:
    _t, evs = events(answered_call(), True)
    final = [e for e in evs if isinstance(e, ReplyOut) and e.code == 200][0]
    assert final.ts == 1002.001 and final.branch is not None and final.branch.request.dst == UAS


def test_retransmissions_are_absorbed() -> None:
    msgs = answered_call()
    invite, ok = msgs[0], msgs[6]
    t, evs = events([invite, invite, *msgs[1:7], ok, ok, *msgs[7:]], True)
    assert t.stats.retransmissions == 1  # requests; a retransmitted final reply is simply not relayed again
    assert sum(isinstance(e, RequestIn) for e in evs) == 2
    assert sum(isinstance(e, ReplyOut) and e.code == 200 and e.txn.method == "INVITE" for e in evs) == 1


def test_first_ack_per_to_tag_within_the_wait_window() -> None:
    msgs = answered_call()
    ack = msgs[7]
    t, evs = events([*msgs[:8], ack], True)
    acks = [e for e in evs if isinstance(e, AckIn)]
    assert [a.first for a in acks] == [True]  # the retransmitted ACK is absorbed
    late = Call().request("ACK", 1010.0, UAC, PROXY, [("10.0.0.1", "z9hG4bK-ack9")], to_tag="bob-tag")
    t2, evs2 = events([*msgs[:7], late], True)
    assert [e.first for e in evs2 if isinstance(e, AckIn)] == [False]  # 8 s after the 200: beyond wait_timer


def test_ack_of_a_negative_reply_belongs_to_the_invite_transaction() -> None:
    t, evs = events(rejected_call(), True)
    assert not any(isinstance(e, AckIn) for e in evs)
    failed = [e for e in evs if isinstance(e, BranchesFailed)]
    assert len(failed) == 1 and failed[0].code == 486 and failed[0].reply is not None
    assert failed[0].ts == 1003.0  # when the proxy received the branch's final reply (ON_FAILURE)


def test_cancel_is_matched_to_its_invite() -> None:
    c = Call()
    msgs = rejected_call(487, "Request Terminated")
    cancel = c.request("CANCEL", 1001.0, UAC, PROXY, [C])
    t, evs = events([*msgs[:4], cancel, *msgs[4:]], True)
    inv = t.txns[("z9hG4bK-uac1", "INVITE", "call-1", 1)]
    assert inv.cancelled
    assert any(isinstance(e, RequestIn) and e.txn.method == "CANCEL" for e in evs)


def test_local_reply_recognised_by_tm_tag_and_stateless_by_sl_tag() -> None:
    assert tm_tag_prefix(PROXY, 5060) == TM_TAG
    _t, evs = events(local_reject(), False)
    out = [e for e in evs if isinstance(e, ReplyOut)]
    assert len(out) == 1 and out[0].local
    assert not any(isinstance(e, BranchesFailed) for e in evs)  # no branch: no ON_FAILURE
    t, evs = events(local_reject(stateless=True), False)
    assert not any(isinstance(e, ReplyOut) for e in evs) and t.stats.stateless_replies == 1
    assert SL_TAG


def test_a_branch_that_never_answers_is_picked_as_faked_408() -> None:
    c = Call()
    msgs = [
        c.request("INVITE", 1000.0, UAC, PROXY, [C]),
        c.request("INVITE", 1000.002, PROXY, UAS, [P, C]),
        c.request("CANCEL", 1030.0, PROXY, UAS, [P]),
        c.reply(408, "Request Timeout", 1030.001, PROXY, UAC, [C], to_tag=f"{TM_TAG}-11223344"),
    ]
    _t, evs = events(msgs, True)
    failed = [e for e in evs if isinstance(e, BranchesFailed)][0]
    assert failed.reply is None and failed.code == 408 and failed.ts == 1030.001
    out = [e for e in evs if isinstance(e, ReplyOut)][0]
    assert out.local and out.code == 408


def test_forking_picks_the_branch_like_t_pick_branch() -> None:
    """6xx beats 4xx; among 4xx, 401/407/415/420/484 beat the others; then the lower code."""
    c = Call()
    base = [c.request("INVITE", 1000.0, UAC, PROXY, [C]), c.request("INVITE", 1000.01, PROXY, UAS, [P, C]),
            c.request("INVITE", 1000.02, PROXY, UAS2, [P2, C])]
    for (c1, c2), picked in (((486, 603), 603), ((486, 407), 407), ((486, 480), 480), ((503, 486), 486)):
        msgs = [*base, c.reply(c1, "x", 1001.0, UAS, PROXY, [P, C], to_tag="t1"),
                c.reply(c2, "y", 1001.5, UAS2, PROXY, [P2, C], to_tag="t2"),
                c.reply(picked, "x" if picked == c1 else "y", 1001.6, PROXY, UAC, [C], to_tag="t1" if picked == c1 else "t2")]
        _t, evs = events(msgs, True)
        failed = [e for e in evs if isinstance(e, BranchesFailed)][0]
        assert failed.code == picked and failed.ts == 1001.5


def test_late_2xx_from_another_fork() -> None:
    c = Call()
    msgs = [c.request("INVITE", 1000.0, UAC, PROXY, [C]), c.request("INVITE", 1000.01, PROXY, UAS, [P, C]),
            c.request("INVITE", 1000.02, PROXY, UAS2, [P2, C]),
            c.reply(200, "OK", 1001.0, UAS, PROXY, [P, C], to_tag="t1"),
            c.reply(200, "OK", 1001.001, PROXY, UAC, [C], to_tag="t1"),
            c.reply(200, "OK", 1001.2, UAS2, PROXY, [P2, C], to_tag="t2"),
            c.reply(200, "OK", 1001.201, PROXY, UAC, [C], to_tag="t2"),
            c.reply(200, "OK", 1001.5, PROXY, UAC, [C], to_tag="t2")]  # retransmitted: nothing new
    _t, evs = events(msgs, True)
    out = [(e.code, e.late, e.reply.to_tag if e.reply else None) for e in evs if isinstance(e, ReplyOut)]
    assert out == [(200, False, "t1"), (200, True, "t2")]


def test_rfc2543_transactions_without_magic_cookie() -> None:
    c = Call()
    old = ("10.0.0.1", "1234")  # a branch without z9hG4bK: matched on the whole Via
    msgs = [c.request("INVITE", 1000.0, UAC, PROXY, [old]), c.request("INVITE", 1000.5, UAC, PROXY, [old]),
            c.reply(486, "Busy Here", 1001.0, PROXY, UAC, [old], to_tag="t1")]
    t, evs = events(msgs, True)
    assert t.stats.retransmissions == 1
    assert [type(e).__name__ for e in evs] == ["RequestIn", "BranchesFailed", "ReplyOut"]


def test_reply_without_via_is_matched_by_cseq_and_addresses() -> None:
    c = Call()
    msgs = [c.request("INVITE", 1000.0, UAC, PROXY, [C]),
            c.reply(486, "Busy Here", 1001.0, PROXY, UAC, [], to_tag="t1")]
    _t, evs = events(msgs, True)
    assert [type(e).__name__ for e in evs] == ["RequestIn", "BranchesFailed", "ReplyOut"]


def test_open_transactions_at_end_counted_or_accounted_as_408() -> None:
    msgs = answered_call()[:3]
    t, _ = events(msgs, True)
    assert t.finish() == [] and t.stats.open_at_end == {"INVITE": 1}
    t2, _ = events(msgs, True, fr_inv_timer=90.0)
    evs = t2.finish(open_as_408=True)
    assert [type(e).__name__ for e in evs] == ["BranchesFailed", "ReplyOut"]
    assert evs[1].code == 408 and evs[1].local and evs[1].ts == 1090.0


def test_completed_transactions_are_forgotten_on_the_packet_clock() -> None:
    msgs = rejected_call()
    t, _ = events(msgs, True)
    assert t.txns
    t.feed(Call(call_id="later").request("OPTIONS", 2000.0, UAC, PROXY, [("10.0.0.1", "z9hG4bK-o")]))
    assert all(k[2] == "later" for k in t.txns)


def test_dialog_states() -> None:
    t, _ = events([*answered_call(), *rejected_call(call=Call(call_id="call-2"))], True)
    t.finish()
    assert t.stats.dialogs == {"terminated": 1, "failed": 1}


def test_ended_dialogs_leave_the_table_by_packet_time_not_by_its_size() -> None:
    """A dialog that failed stays RETAIN (32 s) of packet time, however full the table: a call
    refused with a 407 comes again at once with the same From-tag and is one dialog, whether a
    -j N shard's smaller table or -j 0's bigger one passed its size first (--stats alike)."""
    t, _ = events(rejected_call(), True)
    t._dialog_limit = 0  # every sweep prunes
    t.feed(Call(call_id="o1").request("OPTIONS", 1010.0, UAC, PROXY, [("10.0.0.1", "z9hG4bK-o1")]))
    assert t.dialogs[("call-1", "alice-tag")].state == "failed"  # ended at 1003.002: kept
    t._dialog_limit = 0
    t.feed(Call(call_id="o2").request("OPTIONS", 1040.0, UAC, PROXY, [("10.0.0.1", "z9hG4bK-o2")]))
    assert ("call-1", "alice-tag") not in t.dialogs and t.stats.dialogs == {"failed": 1}


def test_many_late_2xx_to_tags_each_reported_once() -> None:
    """To-tags are held in a short tuple, a frozenset past 8 (issue 10: a one-tag frozenset was
    216 bytes a call): 20 forks answering still give one late 2xx each, retransmissions none."""
    c = Call()
    msgs = [c.request("INVITE", 1000.0, UAC, PROXY, [C])]
    for k in range(20):
        msgs.append(c.reply(200, "OK", 1001.0 + k / 100, PROXY, UAC, [C], to_tag=f"t{k}"))
        msgs.append(c.reply(200, "OK", 1001.005 + k / 100, PROXY, UAC, [C], to_tag=f"t{k // 2}"))
    msgs += [c.request("ACK", 1002.0 + k / 100, UAC, PROXY, [("10.1.0.1", f"z9hG4bK-ack{k}")], to_tag=f"t{k}")
             for k in range(20)]
    t, evs = events(msgs, True)
    out = [(e.late, e.reply.to_tag if e.reply else None) for e in evs if isinstance(e, ReplyOut)]
    assert out == [(k > 0, f"t{k}") for k in range(20)]
    txn = next(iter(t.txns.values()))
    assert isinstance(txn.to_tags_2xx, frozenset) and len(txn.to_tags_2xx) == 20
    acks = [e for e in evs if isinstance(e, AckIn)]
    assert len(acks) == 20 and all(a.first for a in acks) and len(txn.acked) == 20


def test_replies_without_via_among_transactions_sharing_call_id_and_cseq() -> None:
    """by_cseq holds one transaction as itself, several as a list (issue 10: a list each was
    ~64 bytes a transaction): a reply without a Via still finds the one it answers."""
    c = Call()
    a, b = ("10.1.0.1", "z9hG4bK-a"), ("10.1.0.1", "z9hG4bK-b")
    first = c.request("INVITE", 1000.0, UAC, PROXY, [a])
    other = c.request("INVITE", 1000.1, "10.1.0.9", PROXY, [b])  # same Call-ID/CSeq, another sender
    reply = c.reply(486, "Busy Here", 1001.0, PROXY, "10.1.0.9", [], to_tag="t1")
    t, evs = events([first, other, reply], True)
    failed = [e for e in evs if isinstance(e, BranchesFailed)]
    assert len(failed) == 1 and failed[0].txn.request is other
    (key,) = t.by_cseq
    assert isinstance(t.by_cseq[key], list) and len(t.by_cseq[key]) == 2
    t._forget(failed[0].txn.key, failed[0].txn)
    assert t.by_cseq[key] is t.txns[next(iter(t.txns))]
