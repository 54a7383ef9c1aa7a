"""Issue 10: every number and loop on the wire side is bounded by the bytes that arrived.

Each test feeds the measured hostile input through the real stages (decode, reassembly,
parse) and checks that the bad message is counted as malformed and the run goes on.
"""

from __future__ import annotations

import struct
import time

import pytest

from sipsniff_acc import sip
from sipsniff_acc.anomalies import ANOMALIES
from sipsniff_acc.decode import decode
from sipsniff_acc.events import Anomaly, Datagram, Frame, Transport
from sipsniff_acc.pipeline import MessagePipeline
from sipsniff_acc.sctp import SctpReassembler
from sipsniff_acc.tcpstream import TcpReassembler
from tests.builders import ether, ip4_udp, sip_request, sip_response

HUGE = "9" * 5000  #: past CPython's 4300-digit int-from-str limit


def _with(header: str, value: str, msg: bytes | None = None) -> bytes:
    """A copy of a request whose ``header`` line has ``value``."""
    msg = msg or sip_request(call_id="bad@x")
    lines = msg.split(b"\r\n")
    for i, line in enumerate(lines):
        if line.lower().startswith(header.lower().encode() + b":"):
            lines[i] = f"{header}: {value}".encode()
    return b"\r\n".join(lines)


def _udp_frames(payloads: list[bytes]) -> list[Frame]:
    return [Frame(1.0 + i, 1, ether(ip4_udp(p)), i + 1) for i, p in enumerate(payloads)]


def _messages(frames: list[Frame]) -> tuple[list[sip.SipMessage], list[Anomaly]]:
    mp = MessagePipeline()
    out = [x for f in frames for x in mp.feed(f)] + mp.finish()
    return [x for x in out if isinstance(x, sip.SipMessage)], [x for x in out if isinstance(x, Anomaly)]


@pytest.mark.parametrize("value", [HUGE + " INVITE", str(2**64) + " INVITE", str(2**31) + " INVITE",
                                   "1" * 11 + " INVITE", "-1 INVITE", "1x INVITE"])
def test_cseq_out_of_rfc3261_range_is_bad_cseq(value: str) -> None:
    m = sip.parse(_with("CSeq", value))
    assert m.cseq_num is None and "sip_bad_cseq" in m.defects


def test_cseq_at_the_rfc3261_bound_and_leading_zeros() -> None:
    assert sip.parse(_with("CSeq", f"{2**31 - 1} INVITE")).cseq_num == 2**31 - 1
    m = sip.parse(_with("CSeq", "0" * 5000 + "7 INVITE"))
    assert m.cseq_num == 7 and not m.defects


@pytest.mark.parametrize("value", [HUGE, "1" * 11, "0x10", "+5"])
def test_content_length_with_too_many_digits_is_bad(value: str) -> None:
    m = sip.parse(_with("Content-Length", value))
    assert m.content_length is None and "sip_bad_content_length" in m.defects


def test_content_length_beyond_the_bytes_is_truncated_body_and_body_is_bounded() -> None:
    m = sip.parse(_with("Content-Length", "4294967295"))
    assert "sip_truncated_body" in m.defects and m.body == b""


@pytest.mark.parametrize("header,value", [("CSeq", HUGE + " INVITE"), ("Content-Length", HUGE),
                                          ("CSeq", str(2**64) + " INVITE")])
def test_udp_bad_number_is_counted_and_the_run_goes_on(header: str, value: str) -> None:
    good1 = sip_request(call_id="good-1")
    good2 = sip_response(call_id="good-2")
    msgs, anomalies = _messages(_udp_frames([good1, _with(header, value), good2]))
    assert [m.call_id for m in msgs if not m.defects] == ["good-1", "good-2"]
    assert {a.name for a in anomalies} & {"sip_bad_cseq", "sip_bad_content_length"}


def _tcp(seq: int, data: bytes, flags: int = 0x18, no: int = 1) -> Datagram:
    tcp = struct.pack("!HHIIBBHHH", 40000, 5060, seq, 0, 0x50, flags, 1000, 0, 0)
    return Datagram(1.0, no, Transport.TCP, b"\x0a\0\0\x01", 40000, b"\x0a\0\0\x02", 5060, tcp + data, ("ip4",))


@pytest.mark.parametrize("header,value", [("Content-Length", HUGE), ("CSeq", HUGE + " INVITE"),
                                          ("l", "0" * 5000 + "0")])
def test_tcp_bad_number_is_counted_and_the_stream_goes_on(header: str, value: str) -> None:
    good1, good2 = sip_request(call_id="good-1"), sip_request(call_id="good-2", cseq=2)
    bad = _with(header, value, sip_request(call_id="bad@x", compact=header == "l"))
    stream = good1 + bad + good2
    r = TcpReassembler()
    out = r.feed(_tcp(99, b"", flags=0x02)) + r.feed(_tcp(100, stream)) + r.finish()
    parsed = [sip.parse(d.payload) for d in out if isinstance(d, Datagram)]
    assert [m.call_id for m in parsed if not m.defects][:1] == ["good-1"]
    assert "good-2" in [m.call_id for m in parsed]


def test_tcp_content_length_with_leading_zeros_frames_the_message() -> None:
    body = b"v=0\r\n"
    msg = _with("Content-Length", "0" * 5000 + str(len(body))) + body
    r = TcpReassembler()
    out = r.feed(_tcp(99, b"", flags=0x02)) + r.feed(_tcp(100, msg + sip_request(call_id="next")))
    assert [d.payload for d in out if isinstance(d, Datagram)][0] == msg


def _sctp(*chunks: bytes) -> Datagram:
    return Datagram(1.0, 1, Transport.SCTP, b"\x01" * 4, 5060, b"\x02" * 4, 5060,
                    struct.pack("!HHII", 5060, 5060, 1, 0) + b"".join(chunks), ())


def _chunk(tsn: int, user: bytes, flags: int, ssn: int = 0) -> bytes:
    body = struct.pack("!IHHI", tsn, 0, ssn, 0) + user
    chunk = struct.pack("!BBH", 0, flags, 4 + len(body)) + body
    return chunk + b"\0" * (-len(chunk) % 4)


def test_sctp_end_fragment_before_begin_does_not_build_a_huge_range() -> None:
    r = SctpReassembler()
    t0 = time.perf_counter()
    out = r.feed(_sctp(_chunk(1000, b"SIP/2.0 200", 0x02), _chunk(999, b" OK\r\n\r\n", 0x01)))
    assert time.perf_counter() - t0 < 0.5
    assert [a.name for a in out if isinstance(a, Anomaly)] == ["sctp_bad_fragments"]
    assert not [d for d in out if isinstance(d, Datagram)]
    # the association goes on
    msg = sip_request()
    out = r.feed(_sctp(_chunk(1001, msg, 0x03)))
    assert [d.payload for d in out if isinstance(d, Datagram)] == [msg]


def test_sctp_fragments_across_tsn_wraparound() -> None:
    msg = sip_request()
    r = SctpReassembler()
    out = r.feed(_sctp(_chunk(0xFFFFFFFF, msg[:40], 0x02), _chunk(0, msg[40:80], 0x00), _chunk(1, msg[80:], 0x01)))
    assert [d.payload for d in out if isinstance(d, Datagram)] == [msg]


def test_sctp_partial_message_is_bounded_in_bytes() -> None:
    r = SctpReassembler(max_message=65535)  # limits.max_sip_message set to Kamailio's BUF_SIZE
    out: list[Datagram | Anomaly] = []
    piece = b"x" * 1400
    out += r.feed(_sctp(_chunk(1, b"INVITE sip:a SIP/2.0\r\n", 0x02)))
    for i in range(2, 2 + 100):  # 140 KB of middle fragments: more than the limit
        out += r.feed(_sctp(_chunk(i, piece, 0x00)))
    assert "sctp_message_too_long" in [a.name for a in out if isinstance(a, Anomaly)]
    assert all(p.size <= 65535 for p in r._partial.values())


def test_tcp_many_tiny_out_of_order_segments_are_bounded() -> None:
    r = TcpReassembler()
    r.feed(_tcp(99, b"", flags=0x02))
    t0 = time.perf_counter()
    out: list[Datagram | Anomaly] = []
    for i in range(20000):  # a hole at 100, then 20k one-byte segments after it
        out += r.feed(_tcp(200 + 2 * i, b"x"))
    assert time.perf_counter() - t0 < 5.0
    st = next(iter(r.streams.values()))
    assert len(st.ooo) <= 1024
    assert "tcp_gap" in [a.name for a in out if isinstance(a, Anomaly)]


def test_too_many_headers_is_counted_and_the_table_is_bounded() -> None:
    extra = tuple(f"X-H{i}: {i}" for i in range(10000))
    m = sip.parse(sip_request(extra_headers=extra))
    assert "sip_too_many_headers" in m.defects
    assert len(m.headers) <= sip.MAX_HEADERS
    assert m.call_id == "call-1@example.com" and m.cseq_num == 1  # still tracked


def test_too_many_vias_is_counted_and_bounded() -> None:
    m = sip.parse(sip_request(vias=1000))
    assert "sip_too_many_vias" in m.defects
    assert len(m.vias()) <= sip.MAX_VIAS
    one_line = sip.parse(_with("Via", ", ".join(["SIP/2.0/UDP h"] * 2000)))
    assert "sip_too_many_vias" in one_line.defects and len(one_line.vias()) <= sip.MAX_VIAS
    assert len(one_line.header_values("via")) <= sip.MAX_HEADERS


def test_ordinary_message_has_no_new_defects() -> None:
    m = sip.parse(sip_request(vias=5))
    assert not m.defects and len(m.vias()) == 5


def test_vlan_tag_chain_is_bounded() -> None:
    tags = struct.pack("!HH", 1, 0x8100) * 3000  # 3000 stacked 802.1Q tags, then IPv4
    frame = b"\x02" * 12 + struct.pack("!H", 0x8100) + tags[:-2] + struct.pack("!H", 0x0800) + ip4_udp(sip_request())
    t0 = time.perf_counter()
    out = decode(Frame(1.0, 1, frame, 1))
    assert time.perf_counter() - t0 < 0.5
    assert isinstance(out, Anomaly) and out.name == "link_too_many_tags"


def test_ipv6_extension_header_chain_is_bounded_and_counted() -> None:
    ext = bytes([60, 0]) + b"\0" * 6  # destination options, next header = destination options
    chain = ext * 40 + struct.pack("!HHHH", 5060, 5060, 8, 0)
    ip6 = struct.pack("!IHBB16s16s", 0x60000000, len(chain), 60, 64, b"\0" * 15 + b"\1", b"\0" * 15 + b"\2") + chain
    out = decode(Frame(1.0, 1, ether(ip6, 0x86DD), 1))
    assert isinstance(out, Anomaly) and out.name == "ip_bad_header"


def test_new_anomaly_names_are_registered() -> None:
    for name in ("sip_too_many_headers", "sip_too_many_vias", "sctp_bad_fragments", "sctp_message_too_long",
                 "link_too_many_tags", "sctp_association_evicted"):
        assert name in ANOMALIES


def test_many_empty_fragments_are_bounded_and_counted() -> None:
    from sipsniff_acc.events import Fragment
    from sipsniff_acc.ipfrag import MAX_PIECES, FragmentReassembler

    r = FragmentReassembler()
    key = (b"a" * 4, b"b" * 4, 1, 17)
    t0 = time.perf_counter()
    out = [x for i in range(20000)
           for x in r.feed(Fragment(1.0, i, key, 4, (i % 8000) * 8, True, 17, b"a" * 4, b"b" * 4, b"", ()))]
    assert time.perf_counter() - t0 < 3.0
    assert "ip_frag_too_many_pieces" in [a.name for a in out if isinstance(a, Anomaly)]
    assert all(len(p.pieces) <= MAX_PIECES for p in r._pending.values())


def test_a_big_message_in_one_byte_segments_is_framed_in_linear_time() -> None:
    body = b"x" * 4000  # a 60 KB header arriving byte by byte took 6.4 s (a rescan of the buffer per byte)
    msg = _with("Content-Length", str(len(body)), sip_request(extra_headers=("X-Big: " + "a" * 60000,))) + body
    r = TcpReassembler()
    out = r.feed(_tcp(99, b"", flags=0x02))
    t0 = time.perf_counter()
    for i in range(len(msg)):
        out += r.feed(_tcp(100 + i, msg[i : i + 1]))
    assert time.perf_counter() - t0 < 2.0
    assert [d.payload for d in out if isinstance(d, Datagram)] == [msg]


def test_header_end_split_across_segments_is_still_found() -> None:
    msg = sip_request(call_id="split")
    end = msg.find(b"\r\n\r\n")
    r = TcpReassembler()
    out = r.feed(_tcp(99, b"", flags=0x02))
    cuts = [0, end + 1, end + 2, end + 3, len(msg)]
    for a, b in zip(cuts, cuts[1:]):
        out += r.feed(_tcp(100 + a, msg[a:b]))
    assert [d.payload for d in out if isinstance(d, Datagram)] == [msg]


def test_websocket_64_bit_length_is_a_bad_frame_not_an_allocation() -> None:
    from sipsniff_acc.wsframe import WsDecoder, looks_like_ws_sip

    frame = bytes([0x81, 0x7F]) + struct.pack("!Q", 2**63 + 5) + b"INVITE sip:a SIP/2.0\r\n"
    buf = bytearray(frame)
    assert WsDecoder().feed(buf) == ([], ["ws_bad_frame"]) and not buf
    assert looks_like_ws_sip(frame)  # only the first 64 bytes are looked at


def test_tunnels_nested_without_end_are_counted() -> None:
    inner = ip4_udp(sip_request())
    for _ in range(200):  # IP-in-IP, 200 deep
        inner = ip4_udp(inner, proto=4, raw_payload=True)
    out = decode(Frame(1.0, 1, ether(inner), 1))
    assert isinstance(out, Anomaly) and out.name == "tunnel_truncated"


def test_reassembled_datagram_with_a_truncated_inner_frame_is_an_anomaly() -> None:
    from sipsniff_acc.pipeline import CaptureStage

    gre = struct.pack("!HH", 0, 0x22EB) + b"\x00" * 20  # ERSPAN III, then a truncated Ethernet frame
    whole = ip4_udp(gre, proto=47, raw_payload=True)
    hdr, payload = whole[:20], whole[20:]
    first = hdr[:6] + struct.pack("!H", 0x2000) + hdr[8:]
    last = hdr[:6] + struct.pack("!H", 1) + hdr[8:]
    frames = [Frame(1.0, 1, ether(_ip_len(first, 8) + payload[:8]), 1),
              Frame(1.0, 1, ether(_ip_len(last, len(payload) - 8) + payload[8:]), 2)]
    stage = CaptureStage()
    out = [x for f in frames for x in stage.feed(f)]  # must not raise
    assert all(isinstance(x, Anomaly) for x in out)


def _ip_len(hdr: bytes, payload: int) -> bytes:
    return hdr[:2] + struct.pack("!H", 20 + payload) + hdr[4:]


def test_long_blank_run_with_folding_parses_in_linear_time() -> None:
    """The unfolding regex restarted at every blank of a long run: 20k spaces and one folded
    line took 15 s, a 64 KB datagram 100 s (one packet stalled the pipeline)."""
    m = sip_request(extra_headers=("X-A: " + " " * 60000 + "x", "X-B: a", " folded"))
    t0 = time.perf_counter()
    msg = sip.parse(m)
    assert msg.header("x-b") == "a folded" and msg.header("x-a") == "x" and len(msg.vias()) == 1
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("block", [b"a  \r\n  b", b"a\n \n b", b"a \r\r\n b", b"a\t\n\tb\n c", b"\n x", b"a \n", b"a\r\n"])
def test_unfold_is_the_rfc3261_rule(block: bytes) -> None:
    """Unfolding (RFC 3261 §7.3.1: LWS = [*WSP CRLF] 1*WSP) replaces the line break, the blanks
    around it, with one space: the same result as the regex used before."""
    import re

    old = re.compile(rb"[ \t]*\r?\n[ \t]+")
    assert sip.unfold(block) == old.sub(b" ", block)


def test_tcp_byte_accounting_is_exact_under_random_segments() -> None:
    """held must equal the bytes really buffered, whatever arrives (eviction relies on it)."""
    import random

    rnd = random.Random(3)
    stream = b"".join(sip_request(call_id=f"c{i}", body=b"x" * rnd.randint(0, 300)) for i in range(40))
    r = TcpReassembler()
    r.feed(_tcp(99, b"", flags=0x02))
    for _ in range(3000):
        a = rnd.randrange(len(stream))
        b = min(len(stream), a + rnd.randint(0, 200))
        flags = rnd.choice([0x18] * 30 + [0x11, 0x04, 0x02])
        r.feed(_tcp(100 + a, stream[a:b], flags=flags))
        real = sum(len(st.buf) + sum(len(v[0]) for v in st.ooo.values()) for st in r.streams.values())
        assert r.held == real
        assert all(st.ooo_bytes == sum(len(v[0]) for v in st.ooo.values()) for st in r.streams.values())


def test_duplicate_filter_is_bounded_under_a_flood_and_counts_it() -> None:
    from sipsniff_acc.pipeline import CaptureStage

    stage = CaptureStage()
    stage.dedup.max_entries = 1000
    out = []
    for i in range(3000):  # 3000 distinct SIP datagrams within 20 ms
        d = Datagram(1.0 + i * 1e-6, i, Transport.UDP, b"\x01" * 4, 1024 + i, b"\x02" * 4, 5060,
                     sip_request(call_id=f"flood-{i}"), ())
        out += _feed_udp(stage, d)
    assert len(stage.dedup._seen) <= 1000
    assert stage.counters.anomalies["udp_dedup_overflow"] >= 2
    assert sum(isinstance(x, Datagram) for x in out) == 3000  # nothing lost, only the memory of copies


def _feed_udp(stage: object, d: Datagram) -> list[Datagram | Anomaly]:
    out: list[Datagram | Anomaly] = []
    stage._datagram(d, out)  # type: ignore[attr-defined]
    return out


def _mirrored_fragments() -> list[Frame]:
    """A SIP datagram in two IPv4 fragments, every frame mirrored twice (a SPAN port)."""
    whole = ip4_udp(sip_request(call_id="frag-mirror", extra_headers=("X-Pad: " + "p" * 1500,)))
    hdr, payload = whole[:20], whole[20:]
    cut = 1480
    first = hdr[:2] + struct.pack("!H", 20 + cut) + hdr[4:6] + struct.pack("!H", 0x2000) + hdr[8:] + payload[:cut]
    last = hdr[:2] + struct.pack("!H", 20 + len(payload) - cut) + hdr[4:6] + struct.pack("!H", cut // 8) + hdr[8:] \
        + payload[cut:]
    return [Frame(1.0 + i * 1e-4, 1, ether(p), i + 1) for i, p in enumerate((first, first, last, last))]


def test_mirror_copy_of_the_completing_fragment_is_not_a_new_datagram() -> None:
    """Found by the fuzzer's mirror invariant: the copy of the fragment that completed a datagram
    started a new reassembly, which timed out (a spurious ip_frag_timeout per mirrored datagram)
    or, with a later fragment of the same IP ID, built a second datagram (a second record)."""
    frames = _mirrored_fragments()
    msgs, anomalies = _messages(frames)
    assert [m.call_id for m in msgs] == ["frag-mirror"]
    assert not [a.name for a in anomalies if a.name.startswith("ip_frag")]
    # a later, different datagram reusing the IP ID is still rebuilt
    again = [Frame(f.ts + 5.0, f.linktype, f.data.replace(b"frag-mirror", b"frag-mirrod"), f.no + 10) for f in frames]
    msgs, anomalies = _messages(frames + again)
    assert [m.call_id for m in msgs] == ["frag-mirror", "frag-mirrod"]
