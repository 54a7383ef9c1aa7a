"""Record ids keep their values across versions (a re-run after an upgrade must find its rows):
the key is built without an f-string now (issue 13), the bytes hashed must not change."""

from __future__ import annotations

import hashlib

from hypothesis import given, strategies as st

from sipsniff_acc.records import AccRecord, RecordIds, key
from sipsniff_acc.sysloglines import UNSAFE, _clean_ascii, escape


def _reference_key(r: AccRecord) -> bytes:
    """The key as versions up to 2026-12-02 formatted it (one f-string)."""
    return (f"{r.kind}\x1f{r.table}\x1f{r.method}\x1f{r.from_tag or ''}\x1f{r.to_tag or ''}\x1f"
            f"{r.call_id or ''}\x1f{r.code}\x1f{r.reason}\x1f{r.cseq}\x1f{r.ts:.6f}").encode()


def _rec(ts: float = 1709629200.123456, reason: str = "Proxy Authentication Required",
         cseq: int | None = 101) -> AccRecord:
    return AccRecord("missed", ts, "INVITE", "fe5f03f3", "622c6839", "406aac@10.1.6.235", "407", reason,
                     ("log",), table="missed_calls", cseq=cseq)


def test_ids_are_those_of_earlier_versions() -> None:
    ids = RecordIds()
    assert ids.assign(_rec()) == "b3060e9306135cdaf610b0dbc3e71b8f"
    assert ids.assign(_rec()) == "0f8cf8408610be718dc687decda990eb"  # its exact twin: numbered
    r = AccRecord("request", 12.5, "BYE", None, None, None, "", "caf\u00e9 \x00", ("db",))
    assert RecordIds().assign(r) == "b4391bf0245d9f42dd414decab3826ce" == r.record_id


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


@given(kind=st.sampled_from(["answered", "missed", "acked", "request"]), table=texts, method=texts,
       from_tag=st.none() | texts, to_tag=st.none() | texts, call_id=st.none() | texts, code=texts, reason=texts,
       cseq=st.none() | st.integers(-2**40, 2**40),
       ts=st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12) | st.integers(0, 2**33))
def test_key_is_the_reference_key(kind: str, table: str, method: str, from_tag: str | None, to_tag: str | None,
                                  call_id: str | None, code: str, reason: str, cseq: int | None, ts: float) -> None:
    r = AccRecord(kind, ts, method, from_tag, to_tag, call_id, code, reason, ("log",), table=table, cseq=cseq)
    assert key(r) == _reference_key(r)
    digest = hashlib.blake2b(_reference_key(r), digest_size=16).hexdigest()
    assert RecordIds().assign(r) == digest


@given(st.text(max_size=40) | st.text(st.characters(max_codepoint=0x7f), max_size=40))
def test_clean_ascii_is_ascii_without_controls(text: str) -> None:
    """The C check (or its fallback's False) only lets a line through escape() untouched."""
    plain = text.isascii() and not any(c < " " or c == "\x7f" for c in text)
    assert _clean_ascii(text) in ((plain,) if _clean_ascii.__name__ == "clean_ascii" else (False,))
    assert (escape(text) == text) == (UNSAFE.search(text) is None)
