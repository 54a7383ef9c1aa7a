"""Property-based tests (hypothesis): decoders and parser never raise past their boundary."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from sipsniff_acc import sip
from sipsniff_acc.decode import decode
from sipsniff_acc.events import Anomaly, Datagram, Fragment, Frame, Transport
from sipsniff_acc.ipfrag import FragmentReassembler, Reassembled
from sipsniff_acc.pipeline import MessagePipeline
from sipsniff_acc.sources import CaptureReader, SourceError
from sipsniff_acc.tcpstream import TcpReassembler
from tests.builders import SDP, ether, ip4_udp, pcap_bytes, sip_request, sip_response

LINKTYPES = st.sampled_from([0, 1, 12, 101, 108, 113, 228, 229, 276, 147])


@given(st.binary(max_size=2000))
def test_parse_any_bytes(data: bytes) -> None:
    try:
        m = sip.parse(data)
    except sip.SipError as err:
        assert err.name == "sip_bad_start_line"
    else:
        assert isinstance(m, sip.SipMessage)
        m.headers  # the lazy part must not raise either  # noqa: B018
        assert m.body is not None


TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-", min_size=1, max_size=20)


def recase(name: str, rnd: random.Random) -> str:
    return "".join(c.upper() if rnd.random() < 0.5 else c.lower() for c in name)


@given(
    method=st.sampled_from(["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "MESSAGE", "REGISTER", "UPDATE"]),
    call_id=TOKEN, cseq=st.integers(0, 2**31 - 1), branch=TOKEN, from_tag=TOKEN,
    to_tag=st.none() | TOKEN, compact=st.booleans(), seed=st.integers(0, 2**32), fold=st.booleans(),
    body=st.sampled_from([b"", SDP]),
)
def test_round_trip(method: str, call_id: str, cseq: int, branch: str, from_tag: str, to_tag: str | None,
                    compact: bool, seed: int, fold: bool, body: bytes) -> None:
    raw = sip_request(method, call_id=call_id, cseq=cseq, branch="z9hG4bK" + branch, from_tag=from_tag,
                      to_tag=to_tag, compact=compact, body=body)
    rnd = random.Random(seed)
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    out = [lines[0]]
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = recase(name.decode(), rnd).encode()
        value = value.strip()
        if fold and b" " in value:
            value = value.replace(b" ", b"\r\n ", 1)  # fold at the first space (RFC 3261 LWS)
        out.append(name + b":" + b" " * rnd.randint(0, 2) + value)
    m = sip.parse(b"\r\n".join(out) + b"\r\n\r\n" + rest)
    assert (m.method, m.call_id, m.cseq_num, m.cseq_method) == (method, call_id, cseq, method)
    assert (m.branch, m.from_tag, m.to_tag) == ("z9hG4bK" + branch, from_tag, to_tag)
    assert m.content_length == len(body) and m.body == body and m.defects == ()


@given(LINKTYPES, st.binary(max_size=600))
def test_decode_any_bytes(linktype: int, data: bytes) -> None:
    r = decode(Frame(0.0, linktype, data, 1))
    assert r is None or isinstance(r, (Datagram, Fragment, Anomaly))


VALID = [
    ether(ip4_udp(sip_request(body=SDP))),
    ether(ip4_udp(sip_response(180, "Ringing"))),
    ether(ip4_udp(ip4_udp(sip_request()), proto=4, raw_payload=True)),
    ether(ip4_udp(b"x" * 64, frag=0x2000, ident=5)),
]


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(range(len(VALID))), st.integers(0, 2000), st.integers(0, 255),
                          st.integers(0, 1500)), max_size=30))
def test_pipeline_survives_mutated_frames(mutations: list[tuple[int, int, int, int]]) -> None:
    """Flip a byte and cut the frame anywhere: records or anomalies, never an exception."""
    p = MessagePipeline()
    for i, (which, pos, value, cut) in enumerate(mutations):
        data = bytearray(VALID[which])
        data[pos % len(data)] = value
        for item in p.feed(Frame(float(i), 1, bytes(data[:cut]), i + 1)):
            assert isinstance(item, (sip.SipMessage, Anomaly))
    p.finish()
    assert p.counters.frames == len(mutations)


@given(st.permutations(range(6)), st.lists(st.integers(0, 5), max_size=4))
def test_any_order_and_duplication_of_fragments_rebuilds_the_datagram(order: list[int], dups: list[int]) -> None:
    payload = bytes(random.Random(1).randbytes(5 * 480 + 100))
    frags = []
    for i, off in enumerate(range(0, len(payload), 480)):
        chunk = payload[off : off + 480]
        frags.append(Fragment(1.0 + i, i, (b"a" * 4, b"b" * 4, 9, 17), 4, off, off + 480 < len(payload), 17,
                              b"a" * 4, b"b" * 4, chunk, ()))
    seq = [frags[i] for i in order]
    for d in dups:
        seq.insert(d, frags[d])
    r = FragmentReassembler()
    done = [x for f in seq for x in r.feed(f) if isinstance(x, Reassembled)]
    assert done and done[0].payload == payload


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(st.binary(max_size=400), st.integers(0, 1200))
def test_any_file_bytes_read_or_fail_cleanly(tmp_path: Path, junk: bytes, cut: int) -> None:
    good = pcap_bytes([(1.0, ether(ip4_udp(sip_request())))] * 2)
    for n, data in enumerate((junk, good[:cut] + junk, b"\x0a\x0d\x0d\x0a" + junk)):
        p = tmp_path / f"f{n}.pcap"
        p.write_bytes(data)
        try:
            for f in CaptureReader(p):
                assert isinstance(f, Frame)
        except SourceError as err:
            assert str(p) in str(err)


@given(st.binary(min_size=1, max_size=64))
def test_non_sip_udp_is_never_taken_for_sip(noise: bytes) -> None:
    assume(not noise.startswith(b"SIP/2.0 ") and b" SIP/2.0" not in noise)
    assert not sip.looks_like_sip(noise)


def _tcp_seg(seq: int, data: bytes, flags: int, ts: float) -> Datagram:
    hdr = bytes([0x9C, 0x40, 0x13, 0xC4]) + seq.to_bytes(4, "big") + bytes(4) + bytes([0x50, flags]) + bytes(6)
    return Datagram(ts, 1, Transport.TCP, b"\x0a\0\0\1", 40000, b"\x0a\0\0\2", 5060, hdr + data, ())


@settings(max_examples=200)
@given(
    n=st.integers(1, 4), cuts=st.lists(st.integers(1, 3000), max_size=12), seed=st.integers(0, 2**32),
    dups=st.integers(0, 3), keepalive=st.booleans(),
)
def test_any_segmentation_and_reordering_of_a_tcp_stream(n: int, cuts: list[int], seed: int, dups: int,
                                                         keepalive: bool) -> None:
    """Any split into segments, any order after the SYN, retransmitted copies: the same messages."""
    msgs = [sip_request("INVITE", call_id=f"c{i}", body=SDP) if i % 2 == 0 else sip_response(180, "Ringing",
            call_id=f"c{i}") for i in range(n)]
    stream = (b"\r\n\r\n" if keepalive else b"").join(msgs)
    bounds = sorted({0, len(stream), *(c % len(stream) for c in cuts)})
    pieces = [(100 + a, stream[a:b]) for a, b in zip(bounds, bounds[1:])]
    rnd = random.Random(seed)
    rnd.shuffle(pieces)
    for _ in range(dups):
        pieces.insert(rnd.randrange(len(pieces) + 1), rnd.choice(pieces))
    r = TcpReassembler()
    out = r.feed(_tcp_seg(99, b"", 0x02, 0.0))
    for i, (seq, data) in enumerate(pieces):
        out += r.feed(_tcp_seg(seq, data, 0x18, 0.001 * (i + 1)))
    out += r.finish()
    assert [d.payload for d in out if isinstance(d, Datagram)] == msgs
    assert not [a for a in out if isinstance(a, Anomaly)]


HEADER_LINE = st.builds(
    lambda name, case_seed, sp1, sp2, value, fold: (
        "".join(c.upper() if (case_seed >> i) & 1 else c for i, c in enumerate(name))
        + " " * sp1 + ":" + "\t" * sp2 + value + ("\r\n " + value if fold else "")
    ).encode(),
    st.sampled_from(["call-id", "i", "cseq", "from", "f", "to", "t", "via", "v", "content-length", "l",
                     "to-x", "x", "contact", "call-idx", ""]),
    st.integers(0, 2**16), st.integers(0, 2), st.integers(0, 2),
    st.text(alphabet=st.sampled_from(list("ab;=,<> \t:tagTAGbranch\r")), max_size=30),
    st.booleans(),
)


@settings(max_examples=400)
@given(st.lists(HEADER_LINE, max_size=12), st.binary(max_size=40), st.integers(0, 400), st.integers(0, 400))
def test_c_scan_agrees_with_python(lines: list[bytes], noise: bytes, start: int, end: int) -> None:
    """The C fast path (sipsniff_acc/_speedups.c) and the regex path find the same values."""
    speedups = pytest.importorskip("sipsniff_acc._speedups")
    data = b"INVITE sip:a SIP/2.0\r\n" + b"\r\n".join(lines) + noise
    for s, e in ((21, len(data)), (start, end)):
        got = speedups.scan(data, s, e)
        if got is not None:  # None: folded, the Python path takes over (checked below)
            assert got == sip.eager_headers(data, s, e)
        elif 0 <= s < len(data):
            assert any(c in data[s:e] for c in (b"\n ", b"\n\t"))


@settings(max_examples=400)
@given(st.text(alphabet=st.sampled_from(list("ab;=,<> \t\r\ntagTAGbranchBRANCH")), max_size=60),
       st.integers(0, 70), st.integers(0, 70))
def test_c_param_agrees_with_python(text: str, start: int, stop: int) -> None:
    speedups = pytest.importorskip("sipsniff_acc._speedups")
    value = text.encode()
    assert speedups.param(value, b"tag", start, len(value), True) == sip.tag_param(value, start)
    assert speedups.param(value, b"branch", 0, stop, False) == sip.branch_param(value, stop)


def test_pure_python_parse_matches_c_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both paths give the same messages on every golden capture's payloads."""
    pytest.importorskip("sipsniff_acc._speedups")
    from tests.conftest import PCAPS

    fields = ("call_id", "cseq_num", "cseq_method", "from_tag", "to_tag", "branch", "content_length", "defects")
    payloads = []
    for path in sorted(p for p in PCAPS.glob("*.pcap") if p.name != "truncated.pcap"):
        payloads += [m.raw for f in CaptureReader(path) for m in MessagePipeline().feed(f)
                     if isinstance(m, sip.SipMessage)]
    assert len(payloads) > 100
    fast = [tuple(getattr(sip.parse(p), k) for k in fields) + (sip.parse(p).second_via(),) for p in payloads]
    monkeypatch.setattr(sip, "_scan", None)
    monkeypatch.setattr(sip, "_param", None)
    monkeypatch.setattr(sip, "_fill", None)
    slow = [tuple(getattr(sip.parse(p), k) for k in fields) + (sip.parse(p).second_via(),) for p in payloads]
    assert fast == slow


FILL_FIELDS = ("is_request", "method", "ruri", "code", "reason", "call_id", "cseq_num", "cseq_method", "from_tag",
               "to_tag", "branch", "content_length", "body_start", "_hdr_start", "_hdr_end", "defects")
START_LINE = st.sampled_from([b"INVITE sip:a@b SIP/2.0", b"ACK sip:x SIP/2.0", b"SIP/2.0 200 OK", b"SIP/2.0 180 ",
                              b"SIP/2.0 486", b"SIP/2.0 1234 x", b"inv!te sip:a SIP/2.0", b"INVITE  sip:a SIP/2.0",
                              b"INVITE sip:a sip/2.0", b"IN<VITE sip:a SIP/2.0", b"SIP/2.0 20x Bad", b"",
                              b"OPTIONS sip:\xc3\xa9\xff SIP/2.0", b"SIP/2.0 200 \xe2\x82"])
_PLAIN_LINES = st.sampled_from([b"Via: SIP/2.0/UDP h;branch=z9hG4bK1", b"v: SIP/2.0/TCP h2 ;received=1.2.3.4",
                     b"Via: SIP/2.0/UDP a, SIP/2.0/UDP b", b"CSeq: 7 INVITE", b"CSeq: 0000000007 BYE",
                     b"CSeq:12", b"l: 0", b"Content-Length: 5", b"Content-Length:  00000000003 ",
                     b"i: abc@h", b"Call-ID: \x0b\x0c ", b"From: <sip:a;tag=x>;tag=y", b"t: b;TAG = q",
                     b"Via: SIP/2.0/UDP \"q,\" <x>", b"v:SIP/2.0/UDP r;branch=1 \t", b"Via: \x0bs ", b"Via:\t SIP/2.0/UDP \xff\xfe;branch=\xc3\xa9"])
FILL_LINE = st.one_of(_PLAIN_LINES, HEADER_LINE, _PLAIN_LINES)  #: the plain ones twice as often


#: the lines a message needs for the C parse to take it, mixed into the random ones (else it almost never would)
BASE_LINES = [b"Call-ID: c1@h", b"CSeq: 1 INVITE", b"Via: SIP/2.0/UDP p;branch=z9hG4bKa", b"Via: SIP/2.0/UDP q;rport"]


@settings(max_examples=800, deadline=None)
@example(b"INVITE sip:a SIP/2.0", [b"v:SIP/2.0/UDP r;branch=1 \t", b"Via: \x0bs ", b"f: <sip:a;tag=u>;tag=y",
                                   b"t: b;TAG = q"], [0, 1, 20, 20], b"\r\n\r\n", b"")
@example(b"SIP/2.0 180 ", [b"Via: SIP/2.0/UDP h;branch=z9hG4bK1", b"Via: SIP/2.0/UDP a, SIP/2.0/UDP b",
                           b"Content-Length:  00000000003 "], [0, 0, 20, 20], b"\r\n\r\n", b"abc")
@example(b"OPTIONS sip:\xc3\xa9\xff SIP/2.0", [b"Via: SIP/2.0/UDP a, SIP/2.0/UDP b", b"CSeq: 7  BYE "],
         [0, 20, 20, 20], b"\r\n\r\n", b"")
@given(START_LINE, st.lists(FILL_LINE, max_size=10), st.lists(st.integers(0, 20), min_size=4, max_size=4),
       st.sampled_from([b"\r\n\r\n", b"\r\n\r\n", b"\n\n", b"\r\n"]), st.binary(max_size=12))
def test_c_fill_agrees_with_python_parse(start: bytes, lines: list[bytes], where: list[int], sep: bytes,
                                         body: bytes) -> None:
    """Whenever the C parse (``_speedups.fill``) takes a message, every field it sets, and the
    second Via it finds, equal the pure-Python parse's; when it declines, parse() still works."""
    speedups = pytest.importorskip("sipsniff_acc._speedups")
    for line, at in zip(BASE_LINES, where):
        if at < 18:  # now and then one is missing
            lines.insert(at % (len(lines) + 1), line)
    data = start + b"\r\n" + b"\r\n".join(lines) + sep + body
    msg = sip.SipMessage(data)
    try:
        ref = sip._parse_py(data)
    except sip.SipError:
        ref = None
    if not speedups.fill(msg, data):
        return
    assert ref is not None, data
    assert [getattr(msg, k) for k in FILL_FIELDS] == [getattr(ref, k) for k in FILL_FIELDS], data
    if msg._via2 is not False:
        vias = ref.vias()
        assert msg._via2 == (vias[1] if len(vias) > 1 else None), data


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789", min_size=1, max_size=6000), st.sampled_from(["CSeq", "Content-Length", "l"]))
def test_any_digit_string_is_a_bounded_number_or_a_defect(digits: str, header: str) -> None:
    """Issue 10: whatever digits a packet claims, the parse never raises and never keeps a number
    out of range; below the bound it is the number the digits say (leading zeros included)."""
    value = f"{digits} INVITE" if header == "CSeq" else digits
    raw = sip_request(extra_headers=()).replace(b"CSeq: 1 INVITE", b"CSeq: 1 INVITE" if header != "CSeq"
                                                 else f"CSeq: {value}".encode())
    if header != "CSeq":
        raw = raw.replace(b"Content-Length: 0", f"{header}: {value}".encode())
    m = sip.parse(raw)
    significant = digits.lstrip("0") or "0"
    if header == "CSeq":
        ok = len(significant) <= 10 and int(significant) < sip.MAX_CSEQ
        assert (m.cseq_num == int(significant)) if ok else (m.cseq_num is None and "sip_bad_cseq" in m.defects)
    else:
        ok = len(significant) <= sip.MAX_DIGITS
        assert (m.content_length == int(significant)) if ok else (
            m.content_length is None and "sip_bad_content_length" in m.defects)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=60).map(lambda b: bytes(b" \t\r\na:"[x % 6] for x in b)))
def test_linear_unfold_equals_the_old_regex(block: bytes) -> None:
    """sip.unfold (linear, issue 10) does what re.sub(rb"[ \\t]*\\r?\\n[ \\t]+", b" ") did."""
    import re

    assert sip.unfold(block) == re.sub(rb"[ \t]*\r?\n[ \t]+", b" ", block)


_HEADER_PIECES = st.sampled_from([
    b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-a", b"v: SIP/2.0/TCP h;branch=z9hG4bK-b, SIP/2.0/UDP x",
    b"Via : SIP/2.0/UDP 1\xff\r:5060;branch=z9hG4bK-c", b"VIA:\tSIP/2.0/UDP [::1]:5060", b" folded;rport",
    b"From: <sip:a@x>;tag=1", b"X-Junk: \r\r\x00", b"Via: \"q,u\" <sip:x>, SIP/2.0/UDP y", b"\r", b"",
])


@given(st.lists(_HEADER_PIECES, max_size=12), st.lists(st.sampled_from([b"\r\n", b"\n"]), min_size=12, max_size=12))
@settings(max_examples=300, deadline=None)
def test_vias_are_the_same_whether_or_not_the_headers_were_parsed(pieces: list[bytes], ends: list[bytes]) -> None:
    """The tracker reads Vias by a regex, pseudo-variables by the full header list: a hostile
    header (a bare CR, a fold) must give both the same Vias, or a record would depend on
    which ran first (found by the fuzzer: a bare CR inside a Via)."""
    block = b"".join(p + e for p, e in zip(pieces, ends))
    raw = b"INVITE sip:b@x SIP/2.0\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n" + block + b"Content-Length: 0\r\n\r\n"
    fast, full = sip.parse(raw), sip.parse(raw)
    assume(isinstance(fast, sip.SipMessage) and isinstance(full, sip.SipMessage))
    assert isinstance(fast, sip.SipMessage) and isinstance(full, sip.SipMessage)
    full.headers  # noqa: B018 - parse every header first
    assert fast.vias() == full.vias()


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(HEADER_LINE, st.sampled_from([b"I:x", b"call-ID\t :\t y \r", b"callid: n", b"ix: n",
                                                         b"Call-Id:", b"i", b"\n"])), max_size=8),
       st.sampled_from([b"\r\n", b"\n", b"\r"]), st.binary(max_size=20))
def test_c_call_id_agrees_with_regex(lines: list[bytes], sep: bytes, noise: bytes) -> None:
    """The -j N front's Call-ID (``_speedups.call_id``, what shard_of hashes) is the regex's."""
    speedups = pytest.importorskip("sipsniff_acc._speedups")
    data = b"INVITE sip:a SIP/2.0" + sep + sep.join(lines) + noise
    assert speedups.call_id(data) == sip._call_id_line_py(data)
