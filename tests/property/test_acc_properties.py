"""Hypothesis: the acc stages never raise on odd input, and retransmissions never change records."""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from sipsniff_acc.processrun import records_of
from sipsniff_acc.pv import PvError, parse_extra, parse_pv
from sipsniff_acc.rules import RulesError, parse_rules
from tests.flows import Call, answered_call, local_reject, rejected_call

RULES = parse_rules("""
acc: {log_flag: 1, log_missed_flag: 2, db_flag: 1, db_missed_flag: 2, failed_transaction_flag: 3,
      report_ack: true, log_extra: "ua=$ua;ru=$ru;av=$(avp(x)[*])"}
route:
  - if: {method: INVITE, in_dialog: false}
    setflag: [1, 2, 3]
  - if: {method: INVITE}
    set_avp: {x: "$fU"}
  - if: {method: BYE}
    setflag: [1, 3]
""")


def flows() -> list:  # type: ignore[type-arg]
    out = []
    out += answered_call(Call(call_id="a"), t=1000.0)
    out += rejected_call(call=Call(call_id="b"), t=1000.5)
    out += local_reject(call=Call(call_id="c"), t=1001.0)
    out += answered_call(Call(call_id="d"), t=1001.5, bye_from_callee=True)
    return sorted(out, key=lambda m: m.ts)


BASE = flows()


def key(r):  # type: ignore[no-untyped-def]
    return (r.kind, r.method, r.from_tag, r.to_tag, r.call_id, r.code, r.reason, r.ts, tuple(r.backends),
            str(r.extras), str(r.legs))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(BASE) - 1), st.floats(0.01, 0.9)), max_size=12))
def test_retransmissions_never_change_the_records(dups: list[tuple[int, float]]) -> None:
    msgs = list(BASE)
    for i, delay in dups:
        again = copy.copy(BASE[i])
        again.ts = BASE[i].ts + delay
        msgs.append(again)
    msgs.sort(key=lambda m: m.ts)
    assert list(map(key, records_of(msgs, RULES))) == list(map(key, records_of(BASE, RULES)))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(BASE) - 1), max_size=60), st.booleans())
def test_any_subset_in_any_order_never_raises(picks: list[int], open_as_408: bool) -> None:
    msgs = [copy.copy(BASE[i]) for i in picks]
    for n, m in enumerate(msgs):
        m.ts = 1000.0 + n * 0.3
    for r in records_of(msgs, RULES, open_as_408):
        assert r.kind in ("answered", "missed", "acked", "request") and r.record_id


@given(st.text(max_size=40))
def test_pv_parser_raises_only_pv_errors(text: str) -> None:
    for f in (parse_pv, parse_extra):
        try:
            f(text)
        except PvError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("acdefgilmnoprstuwy_:-[]{}$()0123456789 \n\"'|,.")), max_size=120))
def test_rules_parser_raises_only_rules_errors(text: str) -> None:
    try:
        parse_rules(text, "h.yaml")
    except RulesError as e:
        assert all(p.startswith("h.yaml:") for p in e.problems)
