"""wsframe.py, sctp.py and the duplicate filter."""

from __future__ import annotations

import struct

from sipsniff_acc.events import Datagram, Transport
from sipsniff_acc.pipeline import Deduplicator
from sipsniff_acc.sctp import SctpReassembler
from sipsniff_acc.wsframe import WsDecoder, looks_like_ws_sip
from tests.builders import sip_request

MSG = sip_request()


def frame(payload: bytes, opcode: int = 1, fin: bool = True, mask: bytes = b"") -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    size = bytes([n]) if n < 126 else bytes([126]) + struct.pack("!H", n)
    if mask:
        size = bytes([size[0] | 0x80]) + size[1:]
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + size + mask + payload


def test_masked_fragmented_message_with_ping_between() -> None:
    buf = bytearray(frame(MSG[:100], 1, False, b"abcd") + frame(b"", 9, True, b"abcd")
                    + frame(MSG[100:], 0, True, b"wxyz"))
    msgs, problems = WsDecoder().feed(buf)
    assert msgs == [MSG] and problems == [] and not buf


def test_partial_frame_waits() -> None:
    full = frame(MSG)
    d = WsDecoder()
    buf = bytearray(full[:50])
    assert d.feed(buf) == ([], []) and len(buf) == 50
    buf += full[50:]
    assert d.feed(buf)[0] == [MSG]


def test_reserved_bits_are_a_bad_frame() -> None:
    buf = bytearray(b"\xf1\x05hello")
    assert WsDecoder().feed(buf) == ([], ["ws_bad_frame"])


def test_mid_stream_detection() -> None:
    assert looks_like_ws_sip(frame(MSG, mask=b"1234")) and not looks_like_ws_sip(frame(b"hello world"))


def sctp_packet(*chunks: bytes) -> Datagram:
    return Datagram(1.0, 1, Transport.SCTP, b"\x01" * 4, 5060, b"\x02" * 4, 5060,
                    struct.pack("!HHII", 5060, 5060, 1, 0) + b"".join(chunks), ())


def data_chunk(tsn: int, user: bytes, flags: int = 3, ssn: int = 0) -> bytes:
    body = struct.pack("!IHHI", tsn, 0, ssn, 0) + user
    chunk = struct.pack("!BBH", 0, flags, 4 + len(body)) + body
    return chunk + b"\0" * (-len(chunk) % 4)


def test_sctp_bundled_fragmented_and_retransmitted() -> None:
    r = SctpReassembler()
    out = r.feed(sctp_packet(data_chunk(1, MSG), data_chunk(2, b"SIP/2.0 100 Trying\r\n\r\n")))
    assert [d.payload for d in out] == [MSG, b"SIP/2.0 100 Trying\r\n\r\n"]
    out = r.feed(sctp_packet(data_chunk(4, MSG[50:], 1, ssn=2)))  # the end arrives first
    assert out == []
    out = r.feed(sctp_packet(data_chunk(3, MSG[:50], 2, ssn=2), data_chunk(1, MSG)))  # + a retransmission
    assert [d.payload for d in out] == [MSG] and r.retransmitted == 1


def test_sctp_truncated_chunk() -> None:
    out = SctpReassembler().feed(sctp_packet(struct.pack("!BBH", 0, 3, 400) + b"xx"))
    assert [a.name for a in out] == ["sctp_truncated"]  # type: ignore[union-attr]


def udp(ts: float, payload: bytes = MSG) -> Datagram:
    return Datagram(ts, 1, Transport.UDP, b"\x01" * 4, 5060, b"\x02" * 4, 5060, payload, ())


def test_dedup_window() -> None:
    d = Deduplicator(0.02)
    assert not d.duplicate(udp(1.0))
    assert d.duplicate(udp(1.001))  # a mirror copy
    assert not d.duplicate(udp(1.5))  # a SIP retransmission (T1/2 later) is real traffic
    assert not d.duplicate(udp(1.501, MSG + b"x"))
    assert not Deduplicator(0).duplicate(udp(1.0))
