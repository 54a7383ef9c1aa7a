"""acc's reply code text without a format spec (issue 13): the same text as ``:03d``."""

from __future__ import annotations

from hypothesis import given, strategies as st

from sipsniff_acc.acc import _code3


@given(st.integers(-10**6, 10**6))
def test_code3_is_03d(code: int) -> None:
    assert _code3(code) == f"{code:03d}"


def test_code3_of_the_usual_codes() -> None:
    assert [_code3(c) for c in (0, 7, 99, 100, 200, 487, 699, 1000)] == [
        "000", "007", "099", "100", "200", "487", "699", "1000"]
