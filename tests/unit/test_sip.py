"""sip.py: detection and parsing (RFC 3261 §7, §20)."""

from __future__ import annotations

import pytest

from sipsniff_acc import sip
from tests.builders import SDP, sip_request, sip_response


def test_request_eager_fields() -> None:
    m = sip.parse(sip_request("INVITE", call_id="c1@h", cseq=42, branch="z9hG4bK-x", from_tag="F", body=SDP, vias=2))
    assert (m.is_request, m.method, m.ruri) == (True, "INVITE", "sip:bob@example.com")
    assert (m.call_id, m.cseq_num, m.cseq_method) == ("c1@h", 42, "INVITE")
    assert (m.from_tag, m.to_tag, m.branch) == ("F", None, "z9hG4bK-x")
    assert m.content_length == len(SDP) and m.body == SDP
    assert m.defects == ()


def test_response_eager_fields() -> None:
    m = sip.parse(sip_response(486, "Busy Here", cseq=3, cseq_method="INVITE", to_tag="T"))
    assert (m.is_request, m.code, m.reason, m.to_tag, m.cseq_method) == (False, 486, "Busy Here", "T", "INVITE")


def test_compact_forms_equal_long_forms() -> None:
    long = sip.parse(sip_request("BYE", to_tag="tt", body=SDP))
    short = sip.parse(sip_request("BYE", to_tag="tt", body=SDP, compact=True))
    for field in ("call_id", "cseq_num", "cseq_method", "from_tag", "to_tag", "branch", "content_length"):
        assert getattr(long, field) == getattr(short, field), field
    assert short.header("Contact") == long.header("m") == "<sip:alice@192.0.2.1:5060>"


def test_header_names_are_case_insensitive() -> None:
    raw = (b"OPTIONS sip:a SIP/2.0\r\nvIA: SIP/2.0/UDP h;BRANCH=z9hG4bKabc\r\nCALL-id: X\r\ncseq: 9 OPTIONS\r\n"
           b"FROM: <sip:a@b>;TAG=up\r\ntO: <sip:c@d>\r\ncontent-LENGTH: 0\r\n\r\n")
    m = sip.parse(raw)
    assert (m.call_id, m.cseq_num, m.from_tag, m.branch, m.content_length) == ("X", 9, "up", "z9hG4bKabc", 0)


def test_uri_parameter_named_tag_is_not_the_header_tag() -> None:
    raw = (b"INVITE sip:a SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b;tag=inuri>;tag=real\r\n"
           b"To: <sip:c@d;tag=onlyuri>\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n\r\n")
    m = sip.parse(raw)
    assert (m.from_tag, m.to_tag) == ("real", None)


def test_several_vias_comma_and_repeated_top_is_first() -> None:
    raw = (b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP p;branch=z9hG4bKtop, SIP/2.0/UDP q;branch=z9hG4bK2\r\n"
           b"Via: SIP/2.0/UDP r;branch=z9hG4bK3\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\nTo: <sip:b>;tag=t\r\n"
           b"From: <sip:a>;tag=f\r\nContent-Length: 0\r\n\r\n")
    m = sip.parse(raw)
    assert m.branch == "z9hG4bKtop"
    assert m.header_values("Via") == ["SIP/2.0/UDP p;branch=z9hG4bKtop", "SIP/2.0/UDP q;branch=z9hG4bK2",
                                      "SIP/2.0/UDP r;branch=z9hG4bK3"]


def test_folded_lines_are_unfolded() -> None:
    raw = (b"INVITE sip:a SIP/2.0\r\nVia: SIP/2.0/UDP h\r\n ;branch=z9hG4bKf\r\nCall-ID:\r\n\tfolded-id\r\n"
           b"CSeq: 1\r\n INVITE\r\nSubject: one\r\n two\r\n\r\n")
    m = sip.parse(raw)
    assert (m.branch, m.call_id, m.cseq_num, m.cseq_method) == ("z9hG4bKf", "folded-id", 1, "INVITE")
    assert m.header("subject") == "one two"


def test_lf_only_line_ends_are_tolerated() -> None:
    raw = b"BYE sip:a SIP/2.0\nVia: SIP/2.0/UDP h;branch=z9hG4bKlf\nCall-ID: lf\nCSeq: 2 BYE\n\n"
    m = sip.parse(raw)
    assert (m.call_id, m.branch, m.cseq_num) == ("lf", "z9hG4bKlf", 2)


@pytest.mark.parametrize(("raw", "defect"), [
    (b"INVITE sip:a SIP/2.0\r\nCSeq: 1 INVITE\r\nVia: SIP/2.0/UDP h\r\n\r\n", "sip_missing_call_id"),
    (b"INVITE sip:a SIP/2.0\r\nCall-ID: x\r\nVia: SIP/2.0/UDP h\r\n\r\n", "sip_missing_cseq"),
    (b"INVITE sip:a SIP/2.0\r\nCall-ID: x\r\nCSeq: one INVITE\r\nVia: SIP/2.0/UDP h\r\n\r\n", "sip_bad_cseq"),
    (b"INVITE sip:a SIP/2.0\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\nVia: v\r\nl: ten\r\n\r\n", "sip_bad_content_length"),
    (b"INVITE sip:a SIP/2.0\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\nVia: v\r\nl: 10\r\n\r\nabc", "sip_truncated_body"),
    (b"INVITE sip:a SIP/2.0\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n\r\n", "sip_missing_via"),
    (b"INVITE sip:a SIP/2.0\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\nVia: v", "sip_no_header_end"),
])
def test_defects_are_named_and_the_message_kept(raw: bytes, defect: str) -> None:
    m = sip.parse(raw)
    assert defect in m.defects
    assert m.method == "INVITE"


@pytest.mark.parametrize("raw", [
    b"SIP/2.0 2000 OK\r\n\r\n", b"SIP/2.0 abc OK\r\n\r\n", b"INVITE sip:a HTTP/1.1\r\n\r\n",
    b"INVITE  SIP/2.0\r\n\r\n", b"no newline at all", b"IN VITE sip:a SIP/2.0\r\n\r\n",
])
def test_bad_start_lines_raise_sip_error(raw: bytes) -> None:
    with pytest.raises(sip.SipError) as err:
        sip.parse(raw)
    assert err.value.name == "sip_bad_start_line"


@pytest.mark.parametrize(("payload", "expected"), [
    (sip_request(), True), (sip_response(), True), (b"SIP/2.0 200 OK\r\n", True),
    (b"MESSAGE sip:x SIP/2.0\r\n", True), (b"GET / HTTP/1.1\r\n", False), (b"\x80\x00" + bytes(100), False),
    (b"", False), (b"\r\n\r\n", False), (b"HELLO world SIP/2.0", False),
])
def test_looks_like_sip(payload: bytes, expected: bool) -> None:
    assert sip.looks_like_sip(payload) is expected


def test_keepalives() -> None:
    assert sip.is_keepalive(b"\r\n\r\n") and sip.is_keepalive(b"\r\n") and sip.is_keepalive(b"\x00\x00\x00\x00")
    assert not sip.is_keepalive(b"x\r\n")


def test_lazy_headers_keep_order_and_expand_compact_names() -> None:
    m = sip.parse(sip_request(compact=True, extra_headers=("User-Agent: ua/1", "X-A: 1", "x-a: 2")))
    names = [k for k, _ in m.headers]
    assert names[:2] == ["via", "max-forwards"] and "call-id" in names and "contact" in names
    assert m.header("user-agent") == "ua/1"
    assert m.header_values("X-A") == ["1", "2"]
    assert m.header("X-Missing") is None



def test_jsonl_line_is_valid_json_and_escapes() -> None:
    import json

    from sipsniff_acc.messagelog import FIELDS, to_jsonl

    m = sip.parse(sip_response(404, 'Nicht "gefunden" ü', call_id='we"ird\\id'))
    m.src, m.dst, m.transport, m.encap = "1.2.3.4", "::1", "UDP", ("eth", "ip4")
    m.ts, m.no = 1.5, 3
    row = json.loads(to_jsonl(m))
    assert tuple(row) == FIELDS
    assert (row["reason"], row["call_id"], row["status"], row["method"]) == ('Nicht "gefunden" ü', 'we"ird\\id', 404, None)
