"""tcpstream.py: TCP reassembly and SIP framing, driven with segments (no sockets)."""

from __future__ import annotations

import struct

from sipsniff_acc.events import Anomaly, Counters, Datagram, Transport
from sipsniff_acc.tcpstream import GAP_WAIT, NOT_SIP_BYTES, TcpReassembler
from tests.builders import SDP, sip_request, sip_response

A, B = b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02"
MSGS = [sip_request("INVITE", body=SDP), sip_response(180, "Ringing"), sip_request("BYE", cseq=2, to_tag="t")]
STREAM = b"".join(MSGS)


def seg(seq: int, data: bytes = b"", flags: int = 0x18, ts: float = 1.0, no: int = 1, to_b: bool = True) -> Datagram:
    tcp = struct.pack("!HHIIBBHHH", 40000 if to_b else 5060, 5060 if to_b else 40000, seq, 0, 0x50, flags, 1000, 0, 0)
    src, dst = (A, B) if to_b else (B, A)
    return Datagram(ts, no, Transport.TCP, src, 40000 if to_b else 5060, dst, 5060 if to_b else 40000, tcp + data, ("eth", "ip4"))


def run(segs: list[Datagram], r: TcpReassembler | None = None) -> tuple[list[Datagram], list[Anomaly], TcpReassembler]:
    r = r or TcpReassembler()
    out = [x for s in segs for x in r.feed(s)] + r.finish()
    return [x for x in out if isinstance(x, Datagram)], [x for x in out if isinstance(x, Anomaly)], r


def test_syn_then_messages_split_anyhow() -> None:
    cuts = [0, 7, 300, 301, len(MSGS[0]) + 5, len(STREAM)]
    segs = [seg(99, flags=0x02)] + [seg(100 + a, STREAM[a:b], no=i + 2) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    msgs, anomalies, _ = run(segs)
    assert [m.payload for m in msgs] == MSGS and anomalies == []
    assert [m.no for m in msgs] == [5, 6, 6]  # the frame that completed each message
    assert all(m.transport is Transport.TCP and m.sport == 40000 for m in msgs)


def test_out_of_order_waits_for_the_hole() -> None:
    a, b = len(MSGS[0]) // 2, len(MSGS[0])
    msgs, anomalies, _ = run([seg(0, flags=0x02), seg(1 + a, STREAM[a:b], ts=1.0), seg(1, STREAM[:a], ts=1.1, no=3)])
    assert [m.payload for m in msgs] == MSGS[:1] and msgs[0].ts == 1.1 and anomalies == []


def test_lost_segment_declared_after_gap_wait_then_resync() -> None:
    n0 = len(MSGS[0])
    r = TcpReassembler()
    out = r.feed(seg(0, flags=0x02)) + r.feed(seg(1, STREAM[:100], ts=1.0))
    out += r.feed(seg(1 + n0, STREAM[n0:], ts=1.2))  # bytes 100..n0 never seen
    assert not [x for x in out if isinstance(x, Datagram)]
    out += r.advance(1.2 + GAP_WAIT + 0.1)
    assert [x.payload for x in out if isinstance(x, Datagram)] == MSGS[1:]
    assert [x.name for x in out if isinstance(x, Anomaly)] == ["tcp_gap"]


def test_capture_starting_mid_message_resyncs() -> None:
    c = Counters()
    msgs, anomalies, _ = run([seg(500, STREAM[50:])], TcpReassembler(c))
    assert [m.payload for m in msgs] == MSGS[1:]
    assert c.skipped["tcp_not_sip_bytes"] == len(MSGS[0]) - 50 and anomalies == []


def test_retransmissions_and_overlaps_give_each_message_once() -> None:
    c = Counters()
    segs = [seg(0, flags=0x02), seg(1, STREAM[:200]), seg(1, STREAM[:200]), seg(101, STREAM[100:400]),
            seg(1, STREAM), seg(401, STREAM[400:])]
    msgs, _, _ = run(segs, TcpReassembler(c))
    assert [m.payload for m in msgs] == MSGS
    assert c.skipped["tcp_retransmitted_segments"] == 2  # the plain copy, and the last one (already had)


def test_keepalives_between_messages() -> None:
    c = Counters()
    data = b"\r\n\r\n" + MSGS[0] + b"\r\n\r\n\r\n\r\n" + MSGS[1] + b"\r\n"
    msgs, _, _ = run([seg(0, flags=0x02), seg(1, data)], TcpReassembler(c))
    assert [m.payload for m in msgs] == MSGS[:2] and c.keepalives == 4


def test_not_sip_stream_is_given_up_cheaply() -> None:
    c = Counters()
    r = TcpReassembler(c)
    junk = bytes(range(256)) * 8
    for i in range(12):
        r.feed(seg(1 + i * len(junk), junk, no=i))
    assert c.streams["not_sip"] == 1 and r.held == 0
    assert c.skipped["tcp_not_sip_bytes"] == 12 * len(junk) > NOT_SIP_BYTES


def test_http_is_not_sip_and_tls_is_counted() -> None:
    c = Counters()
    r = TcpReassembler(c)
    r.feed(seg(0, flags=0x02))
    r.feed(seg(1, b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"))
    r.feed(seg(0, flags=0x02, to_b=False))
    r.feed(seg(1, b"\x16\x03\x01\x00\x05hello", to_b=False))
    assert c.streams["not_sip"] == 1 and c.streams["tls"] == 1
    assert c.skipped["tls_encrypted_bytes"] == 10


def test_incomplete_message_at_fin_is_reported() -> None:
    msgs, anomalies, _ = run([seg(0, flags=0x02), seg(1, MSGS[0][:-10]), seg(1 + len(MSGS[0]) - 10, flags=0x11)])
    assert msgs == [] and [a.name for a in anomalies] == ["tcp_incomplete_message"]


def test_missing_content_length_is_assumed_zero() -> None:
    m = MSGS[1].replace(b"Content-Length: 0\r\n", b"")
    msgs, anomalies, _ = run([seg(0, flags=0x02), seg(1, m + MSGS[2])])
    assert [x.payload for x in msgs] == [m, MSGS[2]]
    assert [a.name for a in anomalies] == ["tcp_no_content_length"]


def test_websocket_upgrade_and_frames() -> None:
    upgrade = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    frame = bytes([0x81, 126]) + struct.pack("!H", len(MSGS[0])) + MSGS[0]
    msgs, _, r = run([seg(0, flags=0x02), seg(1, upgrade), seg(1 + len(upgrade), frame)])
    assert [(m.transport, m.payload) for m in msgs] == [(Transport.WS, MSGS[0])]


def test_buffers_are_bounded_per_stream() -> None:
    r = TcpReassembler(max_message=65535)  # limits.max_sip_message set to Kamailio's BUF_SIZE
    r.feed(seg(0, flags=0x02))
    r.feed(seg(1, b"INVITE sip:a SIP/2.0\r\n" + b"X-Long: " + b"a" * 70000))
    assert r.held < 70000
