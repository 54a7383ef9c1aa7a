"""Test-data builders: SIP messages and frames (the h2 FrameFactory idea).

Everything returns bytes; frames are plain bytes of a link layer so they can be fed to
``decode`` directly or written into a pcap by ``tests/pcaps/make_pcaps.py``.
"""

from __future__ import annotations

import struct

LONG_TO_COMPACT = {"Via": "v", "From": "f", "To": "t", "Call-ID": "i", "Contact": "m", "Content-Length": "l",
                   "Content-Type": "c", "Supported": "k"}


def sip_request(
    method: str = "INVITE", *, call_id: str = "call-1@example.com", cseq: int = 1, cseq_method: str | None = None,
    branch: str = "z9hG4bK-1", from_tag: str = "ftag1", to_tag: str | None = None, ruri: str = "sip:bob@example.com",
    body: bytes = b"", compact: bool = False, extra_headers: tuple[str, ...] = (), vias: int = 1,
) -> bytes:
    headers = [f"Via: SIP/2.0/UDP 192.0.2.{i + 1}:5060;branch={branch}{'' if i == 0 else f'-{i}'}" for i in range(vias)]
    headers += [
        "Max-Forwards: 70",
        f"From: \"Alice\" <sip:alice@example.com>;tag={from_tag}",
        f"To: <{ruri}>" + (f";tag={to_tag}" if to_tag else ""),
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {cseq_method or method}",
        "Contact: <sip:alice@192.0.2.1:5060>",
        *extra_headers,
    ]
    if body:
        headers.append("Content-Type: application/sdp")
    headers.append(f"Content-Length: {len(body)}")
    return _message(f"{method} {ruri} SIP/2.0", headers, body, compact)


def sip_response(
    code: int = 200, reason: str = "OK", *, call_id: str = "call-1@example.com", cseq: int = 1,
    cseq_method: str = "INVITE", branch: str = "z9hG4bK-1", from_tag: str = "ftag1", to_tag: str | None = "ttag1",
    body: bytes = b"", compact: bool = False, extra_headers: tuple[str, ...] = (),
) -> bytes:
    headers = [
        f"Via: SIP/2.0/UDP 192.0.2.1:5060;branch={branch}",
        f"From: \"Alice\" <sip:alice@example.com>;tag={from_tag}",
        "To: <sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else ""),
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {cseq_method}",
        *extra_headers,
    ]
    if body:
        headers.append("Content-Type: application/sdp")
    headers.append(f"Content-Length: {len(body)}")
    return _message(f"SIP/2.0 {code} {reason}", headers, body, compact)


def _message(start: str, headers: list[str], body: bytes, compact: bool) -> bytes:
    if compact:
        out = []
        for h in headers:
            name, _, value = h.partition(": ")
            out.append(f"{LONG_TO_COMPACT.get(name, name)}:{value}")
        headers = out
    return (start + "\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode() + body


SDP = (
    b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
)


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip4_udp(payload: bytes, src: str = "192.0.2.1", dst: str = "192.0.2.2", sport: int = 5060, dport: int = 5060,
            ident: int = 1, frag: int = 0, proto: int = 17, raw_payload: bool = False) -> bytes:
    """An IPv4 packet; UDP around ``payload`` unless ``raw_payload``."""
    l4 = payload if raw_payload else struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident, frag, 64, proto, 0,
                      bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))))
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + l4


def ether(payload: bytes, ethertype: int = 0x0800) -> bytes:
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01" + struct.pack("!H", ethertype) + payload


def pcap_bytes(frames: list[tuple[float, bytes]], linktype: int = 1, nanos: bool = False) -> bytes:
    """A classic pcap file holding ``frames``."""
    magic = 0xA1B23C4D if nanos else 0xA1B2C3D4
    out = [struct.pack("<IHHiIII", magic, 2, 4, 0, 0, 262144, linktype)]
    for ts, data in frames:
        sec = int(ts)
        frac = round((ts - sec) * (1e9 if nanos else 1e6))
        out.append(struct.pack("<IIII", sec, frac, len(data), len(data)) + data)
    return b"".join(out)
