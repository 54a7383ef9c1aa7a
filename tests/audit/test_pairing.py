"""The pairing rules on their own (pure): full key first, then the loose key by nearest time;
one discrepancy per differing field; duplicates and phantoms told apart; CDR end/duration
against the duration tolerance."""

from __future__ import annotations

from sipsniff_acc.audit.model import Row
from sipsniff_acc.audit.pairing import pair


def row(table: str = "acc", callid: str = "c1", method: str = "INVITE", ft: str = "f", tt: str = "t",
        code: str = "200", reason: str = "OK", time: float = 100.0, **kw: object) -> Row:
    return Row(table, callid, method, ft, tt, code, reason, time, **kw)  # type: ignore[arg-type]


def kinds(res: object) -> list[tuple[str, str, str]]:
    return [(d.kind, d.table, d.field) for d in res.discrepancies]  # type: ignore[attr-defined]


def test_identical_books_pair_without_discrepancy() -> None:
    wire = [row(), row(method="BYE", time=130), row("missed_calls", "c2", code="486", reason="Busy Here")]
    res = pair(wire, [row(), row(method="BYE", time=130), row("missed_calls", "c2", code="486", reason="Busy Here")])
    assert kinds(res) == [] and len(res.pairs) == 3


def test_same_call_in_another_table_is_not_a_pair() -> None:
    res = pair([row("missed_calls", code="486")], [row("acc", code="486")])
    assert sorted(kinds(res)) == [("missing", "missed_calls", ""), ("phantom", "acc", "")]


def test_reinvite_rows_pair_by_nearest_time() -> None:
    wire = [row(time=100), row(time=160)]  # the call's INVITE and its re-INVITE: same key
    billing = [row(time=160), row(time=100, code="500")]
    res = pair(wire, billing)
    assert kinds(res) == [("mismatch", "acc", "code")]
    assert res.discrepancies[0].time == 100


def test_loose_key_pairs_a_changed_to_tag_and_names_it() -> None:
    res = pair([row(tt="real")], [row(tt="forged", time=101)])
    assert kinds(res) == [("mismatch", "acc", "to_tag")]
    d = res.discrepancies[0]
    assert (d.wire, d.billing) == ("real", "forged")


def test_each_field_is_one_discrepancy_with_both_values() -> None:
    res = pair([row()], [row(code="480", reason="Gone", time=103)], time_tolerance=2)
    assert sorted((d.field, d.wire, d.billing) for d in res.discrepancies) == [
        ("code", "200", "480"), ("reason", "OK", "Gone"), ("time", 100.0, 103.0)]
    assert kinds(pair([row()], [row(time=102)], time_tolerance=2)) == []


def test_billed_twice_is_a_duplicate_not_a_phantom() -> None:
    res = pair([row()], [row(), row(time=100)])
    assert kinds(res) == [("duplicate", "acc", "")]
    res = pair([row()], [row(), row(callid="never-seen")])
    assert kinds(res) == [("phantom", "acc", "")]


def test_cdr_duration_and_end_against_the_duration_tolerance() -> None:
    w = row("acc_cdrs", code="", reason="", time=100, end=160.0, duration=60.4)
    ok = row("acc_cdrs", code="", reason="", time=100, end=161.0, duration=60.9)
    assert kinds(pair([w], [ok], duration_tolerance=1)) == []
    stretched = row("acc_cdrs", code="", reason="", time=100, end=190.0, duration=90.4)
    res = pair([w], [stretched], duration_tolerance=1)
    assert sorted(kinds(res)) == [("mismatch", "acc_cdrs", "duration"), ("mismatch", "acc_cdrs", "end")]
