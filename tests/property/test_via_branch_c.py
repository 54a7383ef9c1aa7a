"""``_speedups.magic_branch`` (the tracker's usual Via branch without the regex) says only what
the regex says: on Via texts built from the pieces that matter (other parameters before the
branch, other spellings and blanks, \\s characters of a str regex, commas, non-ASCII)."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings, strategies as st

from sipsniff_acc import tracker

speedups = pytest.importorskip("sipsniff_acc._speedups")

PIECES = ["SIP/2.0/UDP 10.0.0.1:5060", ";", ";rport", ";branch=", ";branch=z9hG4bK", "branch", "BRANCH", "Branch",
          " ", "\t", "\x0b", "\x1c", "\x1f", "\x85", "\xa0", "=", "z9hG4bK", "z9hg4bk", "abc123", ",", ";received=1",
          "é", "\u0130", "\u212a", "K", "-.!%*_+`'~", ":", "\r", "\n"]


@given(st.lists(st.sampled_from(PIECES), max_size=12))
@settings(max_examples=3000)
@example(["SIP/2.0/UDP 10.1.3.206:5060", ";rport", ";branch=z9hG4bK", "abc123"])
@example(["SIP/2.0/UDP 10.0.0.10", ";branch=z9hG4bK", "abc123", ",", "SIP/2.0/UDP 10.0.0.1:5060"])
@example(["SIP/2.0/UDP 10.0.0.10", ";", " ", "branch", "=", "x", ";branch=z9hG4bK", "abc123"])
def test_magic_branch_is_the_regex(pieces: list[str]) -> None:
    via = "".join(pieces)
    got = speedups.magic_branch(via)
    m = tracker._BRANCH.search(via)
    if got is not None:
        assert m is not None and got == m.group(1) and got.startswith(tracker.MAGIC)
    assert tracker._via_id(via) == (m.group(1) if m and m.group(1).startswith(tracker.MAGIC) else
                                    via.split(";branch", 1)[0].strip().lower() + "|" + (m.group(1) if m else ""))


def test_magic_branch_takes_the_usual_vias() -> None:
    for via in ("SIP/2.0/UDP 10.1.3.206:5060;rport;branch=z9hG4bK1b167dd1485d2ff3;received=10.1.3.206",
                "SIP/2.0/UDP 10.0.0.10;branch=z9hG4bKaa2244e1d51245b6", "SIP/2.0/TCP h;branch=z9hG4bKx,SIP/2.0/UDP g"):
        assert speedups.magic_branch(via) == tracker._BRANCH.search(via).group(1)  # type: ignore[union-attr]
