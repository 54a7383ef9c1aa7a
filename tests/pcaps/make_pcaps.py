#!/usr/bin/env python3
"""Generate the golden captures in this folder and their ground truth.

Run from the repository root: ``python tests/pcaps/make_pcaps.py``. Deterministic: fixed
MACs, addresses and BASE_TIME (Zeek's Traces/sip pattern), so re-running rewrites the
same bytes. Frames are built with scapy (a real, independent packet builder); the few
things scapy does not write (pcapng with two link types, nanosecond pcap, a cut file) are
written with struct here. Each ``<case>.pcap`` gets ``<case>.expected.json``: the SIP
messages that were put in (from the builder's arguments, not from our parser), the
anomalies and skip counters the case must produce, and the exit status.
"""

from __future__ import annotations

import gzip
import json
import struct
import sys
from pathlib import Path

from scapy.all import (  # type: ignore[import-untyped]
    GRE, IP, SCTP, TCP, UDP, SCTPChunkData, SCTPChunkSACK, CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop, Loopback, Raw, fragment, fragment6, wrpcap,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from tests.builders import SDP, sip_request, sip_response  # noqa: E402

BASE_TIME = 1700000000.0
MAC_A, MAC_B = "02:00:00:00:00:01", "02:00:00:00:00:02"
A4, B4 = "192.0.2.10", "198.51.100.20"
A6, B6 = "2001:db8::10", "2001:db8:1::20"


def call(call_id: str, compact: bool = False, big: bool = False) -> list[tuple[bytes, dict[str, object]]]:
    """INVITE / 100 / 200 / ACK / BYE / 200 with the facts each message must show."""
    body = SDP * (6 if big else 1)
    extra = ("User-Agent: golden-builder/1.0",) + (("X-Padding: " + "p" * 1200,) if big else ())
    msgs = [
        (sip_request("INVITE", call_id=call_id, branch="z9hG4bK-inv", body=body, compact=compact, extra_headers=extra),
         dict(method="INVITE", status=None, cseq=1, cseq_method="INVITE", from_tag="ftag1", to_tag=None, branch="z9hG4bK-inv")),
        (sip_response(100, "Trying", call_id=call_id, branch="z9hG4bK-inv", to_tag=None, compact=compact),
         dict(method=None, status=100, cseq=1, cseq_method="INVITE", from_tag="ftag1", to_tag=None, branch="z9hG4bK-inv")),
        (sip_response(200, "OK", call_id=call_id, branch="z9hG4bK-inv", body=SDP, compact=compact),
         dict(method=None, status=200, cseq=1, cseq_method="INVITE", from_tag="ftag1", to_tag="ttag1", branch="z9hG4bK-inv")),
        (sip_request("ACK", call_id=call_id, branch="z9hG4bK-ack", to_tag="ttag1", compact=compact),
         dict(method="ACK", status=None, cseq=1, cseq_method="ACK", from_tag="ftag1", to_tag="ttag1", branch="z9hG4bK-ack")),
        (sip_request("BYE", call_id=call_id, cseq=2, branch="z9hG4bK-bye", to_tag="ttag1", compact=compact),
         dict(method="BYE", status=None, cseq=2, cseq_method="BYE", from_tag="ftag1", to_tag="ttag1", branch="z9hG4bK-bye")),
        (sip_response(200, "OK", call_id=call_id, cseq=2, cseq_method="BYE", branch="z9hG4bK-bye", compact=compact),
         dict(method=None, status=200, cseq=2, cseq_method="BYE", from_tag="ftag1", to_tag="ttag1", branch="z9hG4bK-bye")),
    ]
    for i, (_raw, facts) in enumerate(msgs):
        facts["call_id"] = call_id
        facts["to_uac"] = facts["status"] is not None  # replies flow back to the caller
        facts["i"] = i
    return msgs


class Case:
    def __init__(self, name: str) -> None:
        self.name = name
        self.packets: list[object] = []
        self.expected: list[dict[str, object]] = []
        self.anomalies: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.exit = 0
        self.t = BASE_TIME

    def tick(self) -> float:
        self.t += 0.01
        return self.t

    def expect(self, facts: dict[str, object], src: str, sport: int, dst: str, dport: int, encap: str,
               transport: str = "UDP") -> None:
        row = {k: v for k, v in facts.items() if k not in ("to_uac", "i")}
        if facts["to_uac"]:
            src, sport, dst, dport = dst, dport, src, sport
        row.update(src=src, sport=sport, dst=dst, dport=dport, encap=encap, transport=transport)
        self.expected.append(row)

    def write_expected(self) -> None:
        doc = {"messages": self.expected, "anomalies": self.anomalies, "skipped": self.skipped, "exit": self.exit}
        (HERE / f"{self.name}.expected.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")

    def write(self, linktype: int | None = None) -> None:
        for p in self.packets:
            p.time = self.tick()  # type: ignore[attr-defined]
        kw = {"linktype": linktype} if linktype is not None else {}
        wrpcap(str(HERE / f"{self.name}.pcap"), self.packets, **kw)
        self.write_expected()


def simple(name: str, wrap, encap: str, v6: bool = False, compact: bool = False, linktype: int | None = None) -> None:
    """One call, each message wrapped by ``wrap(ip_packet)``."""
    c = Case(name)
    a, b = (A6, B6) if v6 else (A4, B4)
    for raw, facts in call(f"{name}-call@golden", compact=compact):
        src, dst = (b, a) if facts["to_uac"] else (a, b)
        ip = (IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst, id=100 + int(facts["i"])))  # type: ignore[arg-type]
        c.packets.append(wrap(ip / UDP(sport=5060, dport=5060) / Raw(raw)))
        c.expect(facts, a, 5060, b, 5060, encap)
    c.write(linktype)


def fragmented(name: str, v6: bool, reverse: bool) -> None:
    """A big INVITE (and 200) fragmented; out of order and with a duplicate when ``reverse``."""
    c = Case(name)
    a, b = (A6, B6) if v6 else (A4, B4)
    nfrag = 0
    for raw, facts in call(f"{name}-call@golden", big=True):
        src, dst = (b, a) if facts["to_uac"] else (a, b)
        if v6:
            pkt = IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(id=0x1000 + int(facts["i"])) / UDP(sport=5060, dport=5060) / Raw(raw)
            pieces = fragment6(pkt, 1280) if len(raw) > 1200 else [IPv6(src=src, dst=dst) / UDP(sport=5060, dport=5060) / Raw(raw)]
        else:
            pkt = IP(src=src, dst=dst, id=0x1000 + int(facts["i"])) / UDP(sport=5060, dport=5060) / Raw(raw)
            pieces = fragment(pkt, 1400) if len(raw) > 1400 else [pkt]
        if len(pieces) > 1:
            nfrag += len(pieces)
            if reverse:
                pieces = list(reversed(pieces)) + [pieces[-1]]  # last piece first, and once more at the end
                nfrag += 1
        c.packets.extend(Ether(src=MAC_A, dst=MAC_B) / p for p in pieces)
        frag = len(pieces) > 1
        c.expect(facts, a, 5060, b, 5060, ("eth/ip6" if v6 else "eth/ip4") + ("/frag" if frag else ""))
    # With reverse, the duplicate arrives after its datagram completed: a mirror copy, recognised (no anomaly).
    c.write()


def folded() -> None:
    c = Case("folded")
    raw = (
        b"INVITE sip:bob@example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.10:5060\r\n ;branch=z9hG4bK-folded\r\n"
        b"From: \"Alice\"\r\n\t<sip:alice@example.com>;tag=ftag-folded\r\n"
        b"To: <sip:bob@example.com>\r\n"
        b"Subject: a subject\r\n  that goes on\r\n"
        b"Call-ID: folded-call@golden\r\n"
        b"CSeq:\r\n 7 INVITE\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    c.packets.append(Ether(src=MAC_A, dst=MAC_B) / IP(src=A4, dst=B4) / UDP(sport=5060, dport=5060) / Raw(raw))
    c.expect(dict(method="INVITE", status=None, cseq=7, cseq_method="INVITE", from_tag="ftag-folded", to_tag=None,
                  branch="z9hG4bK-folded", call_id="folded-call@golden", to_uac=False), A4, 5060, B4, 5060, "eth/ip4")
    c.write()


def garbage() -> None:
    """Noise around one good call: nothing crashes, every oddity is counted, the call survives."""
    c = Case("garbage")
    eth = lambda p: Ether(src=MAC_A, dst=MAC_B) / p  # noqa: E731
    good = call("garbage-call@golden")
    c.packets.append(Ether(src=MAC_A, dst=MAC_B, type=0x0806) / Raw(b"\x00\x01" * 14))  # ARP-ish: not IP
    c.packets.append(eth(IP(src=A4, dst=B4) / UDP(sport=40000, dport=40002) / Raw(b"\x80\x00" + bytes(range(170)))))  # RTP
    c.packets.append(eth(IP(src=A4, dst=B4) / UDP(sport=5060, dport=5060) / Raw(b"\r\n\r\n")))  # keep-alive
    c.packets.append(eth(IP(src=A4, dst=B4) / UDP(sport=5060, dport=5060) / Raw(b"INVITE sip:x SIP/2.0\r\nFrom: <sip:a@b>\r\n\r\n")))
    c.packets.append(eth(IP(src=A4, dst=B4) / UDP(sport=5060, dport=5060) / Raw(b"SIP/2.0 20x Broken\r\n\r\n")))
    c.packets.append(Raw(b"\x02\x00\x00"))  # a 3-byte "Ethernet" frame
    c.packets.append(Ether(src=MAC_A, dst=MAC_B, type=0x0800) / Raw(b"\x45\x00\x00"))  # IPv4 header cut short
    c.packets.append(Ether(src=MAC_A, dst=MAC_B, type=0x0800) / Raw(b"\x75" + b"\x00" * 30))  # IP version 7
    for raw, facts in good:
        src, dst = (B4, A4) if facts["to_uac"] else (A4, B4)
        c.packets.append(eth(IP(src=src, dst=dst) / UDP(sport=5060, dport=5060) / Raw(raw)))
        c.expect(facts, A4, 5060, B4, 5060, "eth/ip4")
    c.expected.insert(0, dict(method="INVITE", status=None, cseq=None, cseq_method="", from_tag=None, to_tag=None,
                              branch=None, call_id=None, src=A4, sport=5060, dst=B4, dport=5060, encap="eth/ip4",
                              transport="UDP"))
    c.anomalies.update(sip_missing_call_id=1, sip_missing_cseq=1, sip_missing_via=1, sip_bad_start_line=1,
                       link_truncated=1, ip_truncated=1, ip_bad_header=1)
    c.skipped.update(not_ip_or_unsupported=1, udp_not_sip=1)
    c.write()


def truncated() -> None:
    """A capture cut in the middle of its fourth record: three messages, then a clear error."""
    c = Case("truncated")
    for raw, facts in call("truncated-call@golden")[:4]:
        src, dst = (B4, A4) if facts["to_uac"] else (A4, B4)
        c.packets.append(Ether(src=MAC_A, dst=MAC_B) / IP(src=src, dst=dst) / UDP(sport=5060, dport=5060) / Raw(raw))
        c.expect(facts, A4, 5060, B4, 5060, "eth/ip4")
    c.write()
    data = (HERE / "truncated.pcap").read_bytes()
    (HERE / "truncated.pcap").write_bytes(data[: len(data) - 40])
    c.expected.pop()
    c.exit = 1
    c.write_expected()


def pcapng_two_links() -> None:
    """pcapng with an Ethernet and a raw-IP interface, nanosecond timestamps on the second."""
    c = Case("twolinks")
    def block(btype: int, body: bytes) -> bytes:
        body += b"\0" * (-len(body) % 4)
        return struct.pack("<II", btype, len(body) + 12) + body + struct.pack("<I", len(body) + 12)
    out = [block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))]
    out.append(block(1, struct.pack("<HHI", 1, 0, 65535) + struct.pack("<HHI", 0, 0, 0)))
    tsresol = struct.pack("<HH", 9, 1) + b"\x09\0\0\0" + struct.pack("<HH", 0, 0)
    out.append(block(1, struct.pack("<HHI", 101, 0, 65535) + tsresol))
    for raw, facts in call("twolinks-call@golden"):
        src, dst = (B4, A4) if facts["to_uac"] else (A4, B4)
        ip = bytes(IP(src=src, dst=dst) / UDP(sport=5060, dport=5060) / Raw(raw))
        t = c.tick()
        iface = int(facts["i"]) % 2
        data = bytes(Ether(src=MAC_A, dst=MAC_B, type=0x0800) / Raw(ip)) if iface == 0 else ip
        ticks = round(t * (1e6 if iface == 0 else 1e9))
        out.append(block(6, struct.pack("<IIIII", iface, ticks >> 32, ticks & 0xFFFFFFFF, len(data), len(data)) + data))
        c.expect(facts, A4, 5060, B4, 5060, "eth/ip4" if iface == 0 else "ip4")
    (HERE / "twolinks.pcapng").write_bytes(b"".join(out))
    c.write_expected()


def nanosecond_gz() -> None:
    """A nanosecond-resolution pcap, gzip-compressed."""
    c = Case("nanos")
    hdr = struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1)
    recs = []
    for raw, facts in call("nanos-call@golden"):
        src, dst = (B4, A4) if facts["to_uac"] else (A4, B4)
        data = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=src, dst=dst) / UDP(sport=5060, dport=5060) / Raw(raw))
        t = c.tick()
        recs.append(struct.pack("<IIII", int(t), 123456789, len(data), len(data)) + data)
        c.expect(facts, A4, 5060, B4, 5060, "eth/ip4")
    (HERE / "nanos.pcap.gz").write_bytes(gzip.compress(hdr + b"".join(recs), mtime=0))
    c.write_expected()


class TcpConn:
    """Both directions of one TCP connection between A (client) and B (server)."""

    def __init__(self, c: Case, v6: bool = False) -> None:
        self.c = c
        self.a, self.b = (A6, B6) if v6 else (A4, B4)
        self.v6 = v6
        self.seq = {True: 1000, False: 5000}  # True: A -> B

    def seg(self, to_b: bool, data: bytes = b"", flags: str = "PA", seq: int | None = None) -> object:
        src, dst = (self.a, self.b) if to_b else (self.b, self.a)
        sport, dport = (40000, 5060) if to_b else (5060, 40000)
        s = self.seq[to_b] if seq is None else seq
        ip = IPv6(src=src, dst=dst) if self.v6 else IP(src=src, dst=dst)
        pkt = Ether(src=MAC_A, dst=MAC_B) / ip / TCP(sport=sport, dport=dport, seq=s, ack=self.seq[not to_b],
                                                     flags=flags) / Raw(data)
        if seq is None:
            self.seq[to_b] = s + len(data) + (1 if "S" in flags or "F" in flags else 0)
        return pkt

    def handshake(self) -> list[object]:
        return [self.seg(True, flags="S"), self.seg(False, flags="SA"), self.seg(True, flags="A")]


def tcp_cases() -> None:
    """TCP framing: each case is one call whose six messages travel on one connection."""
    def case(name: str, shape) -> None:  # type: ignore[no-untyped-def]
        c = Case(name)
        conn = TcpConn(c)
        msgs = call(f"{name}-call@golden")
        c.packets.extend(conn.handshake())
        shape(c, conn, msgs)
        c.write()

    def expect_all(c: Case, msgs, skip: int = 0) -> None:  # type: ignore[no-untyped-def]
        for _raw, facts in msgs[skip:]:
            c.expect(facts, A4, 40000, B4, 5060, "eth/ip4", "TCP")

    def split3(c: Case, conn: TcpConn, msgs) -> None:  # type: ignore[no-untyped-def]
        for raw, facts in msgs:
            to_b = not facts["to_uac"]
            if facts["i"] == 0:  # the INVITE in three segments
                for a, b in ((0, 100), (100, 400), (400, len(raw))):
                    c.packets.append(conn.seg(to_b, raw[a:b]))
            else:
                c.packets.append(conn.seg(to_b, raw))
        expect_all(c, msgs)

    def coalesced(c: Case, conn: TcpConn, msgs) -> None:  # type: ignore[no-untyped-def]
        c.packets.append(conn.seg(True, msgs[0][0]))
        c.packets.append(conn.seg(False, msgs[1][0] + msgs[2][0] + b"\r\n\r\n"))  # 100, 200 and a ping together
        c.packets.append(conn.seg(True, msgs[3][0] + msgs[4][0]))  # ACK and BYE together
        c.packets.append(conn.seg(False, msgs[5][0]))
        expect_all(c, msgs)

    def out_of_order(c: Case, conn: TcpConn, msgs) -> None:  # type: ignore[no-untyped-def]
        raw = msgs[0][0]
        p1, p2, p3 = conn.seg(True, raw[:200]), conn.seg(True, raw[200:500]), conn.seg(True, raw[500:])
        c.packets.extend([p1, p3, p2])
        for raw, facts in msgs[1:]:
            c.packets.append(conn.seg(not facts["to_uac"], raw))
        expect_all(c, msgs)

    def retransmitted(c: Case, conn: TcpConn, msgs) -> None:  # type: ignore[no-untyped-def]
        raw = msgs[0][0]
        start = conn.seq[True]
        third = len(raw) // 3
        c.packets.append(conn.seg(True, raw[:third]))
        c.packets.append(conn.seg(True, raw[:third], seq=start))  # a plain retransmission
        c.packets.append(conn.seg(True, raw[third // 2 : 2 * third], seq=start + third // 2))  # half old, half new
        conn.seq[True] = start + 2 * third
        c.packets.append(conn.seg(True, raw[2 * third :]))
        for raw2, facts in msgs[1:]:
            p = conn.seg(not facts["to_uac"], raw2)
            c.packets.append(p)
            if facts["i"] == 2:
                c.packets.append(p.copy())  # the 200 OK retransmitted whole
        expect_all(c, msgs)
        c.skipped["tcp_retransmitted_segments"] = 2

    def keepalives(c: Case, conn: TcpConn, msgs) -> None:  # type: ignore[no-untyped-def]
        c.packets.append(conn.seg(True, b"\r\n\r\n"))
        c.packets.append(conn.seg(False, b"\r\n"))
        for raw, facts in msgs:
            c.packets.append(conn.seg(not facts["to_uac"], raw))
            if facts["i"] == 3:
                c.packets.append(conn.seg(True, b"\r\n\r\n"))
        expect_all(c, msgs)

    def mid_stream(c: Case, conn: TcpConn, msgs) -> None:  # type: ignore[no-untyped-def]
        c.packets.clear()  # no handshake: the capture starts inside the INVITE
        raw = msgs[0][0]
        conn.seq[True] += 300
        c.packets.append(conn.seg(True, raw[300:]))
        for raw2, facts in msgs[1:]:
            c.packets.append(conn.seg(not facts["to_uac"], raw2))
        expect_all(c, msgs, skip=1)
        c.skipped["tcp_not_sip_bytes"] = len(raw) - 300

    def lost(c: Case, conn: TcpConn, msgs) -> None:  # type: ignore[no-untyped-def]
        raw = msgs[0][0]
        c.packets.append(conn.seg(True, raw[:100]))
        conn.seq[True] += 150  # raw[100:250] never captured
        c.packets.append(conn.seg(True, raw[250:]))
        for raw2, facts in msgs[1:]:
            c.packets.append(conn.seg(not facts["to_uac"], raw2))
        expect_all(c, msgs, skip=1)
        c.anomalies["tcp_gap"] = 1
        c.skipped["tcp_gap_discarded_bytes"] = 100  # the INVITE's head, before the hole
        c.skipped["tcp_not_sip_bytes"] = len(raw) - 250  # its tail, after the hole: resync skips it

    for name, shape in (("tcp_split", split3), ("tcp_coalesced", coalesced), ("tcp_outoforder", out_of_order),
                        ("tcp_retransmit", retransmitted), ("tcp_keepalive", keepalives),
                        ("tcp_midstream", mid_stream), ("tcp_lost", lost)):
        case(name, shape)


def ws_frame(payload: bytes, opcode: int = 1, fin: bool = True, mask: bytes | None = None) -> bytes:
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    head = bytes([b0]) + (bytes([(0x80 if mask else 0) | n]) if n < 126 else
                          bytes([(0x80 if mask else 0) | 126]) + struct.pack("!H", n))
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return head + mask + payload
    return head + payload


def websocket() -> None:
    """RFC 7118: HTTP upgrade, masked client frames, a message in two frames, a ping."""
    c = Case("websocket")
    conn = TcpConn(c)
    c.packets.extend(conn.handshake())
    c.packets.append(conn.seg(True, b"GET / HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                   b"Sec-WebSocket-Protocol: sip\r\nSec-WebSocket-Version: 13\r\n\r\n"))
    c.packets.append(conn.seg(False, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                    b"Connection: Upgrade\r\nSec-WebSocket-Protocol: sip\r\n\r\n"))
    for raw, facts in call("websocket-call@golden"):
        to_b = not facts["to_uac"]
        mask = b"\x11\x22\x33\x44" if to_b else None
        if facts["i"] == 0:  # INVITE in two frames, a ping between them
            c.packets.append(conn.seg(to_b, ws_frame(raw[:150], 1, False, mask) + ws_frame(b"", 9, True, mask)))
            c.packets.append(conn.seg(to_b, ws_frame(raw[150:], 0, True, mask)))
        else:
            c.packets.append(conn.seg(to_b, ws_frame(raw, 1, True, mask)))
        c.expect(facts, A4, 40000, B4, 5060, "eth/ip4", "WS")
    c.write()


def sctp() -> None:
    """Two DATA chunks in one packet, a user message in two chunks, a retransmitted chunk."""
    c = Case("sctp")
    msgs = call("sctp-call@golden")
    tsn = {True: 100, False: 900}
    ssn = {True: 0, False: 0}  # per user message, the same on all its fragments

    def chunk(to_b: bool, data: bytes, flags: int = 3) -> object:
        ch = SCTPChunkData(tsn=tsn[to_b], stream_id=0, stream_seq=ssn[to_b], proto_id=0,
                           beginning=bool(flags & 2), ending=bool(flags & 1), data=data)
        tsn[to_b] += 1
        if flags & 1:
            ssn[to_b] += 1
        return ch

    def pkt(to_b: bool, *chunks: object) -> object:
        src, dst = (A4, B4) if to_b else (B4, A4)
        p = IP(src=src, dst=dst) / SCTP(sport=5060 if not to_b else 40000, dport=40000 if not to_b else 5060, tag=1)
        for ch in chunks:
            p = p / ch
        return Ether(src=MAC_A, dst=MAC_B) / p

    inv = msgs[0][0]
    c.packets.append(pkt(True, chunk(True, inv[:300], 2)))
    c.packets.append(pkt(True, chunk(True, inv[300:], 1)))
    c.packets.append(pkt(False, chunk(False, msgs[1][0]), chunk(False, msgs[2][0])))
    ack = chunk(True, msgs[3][0])
    c.packets.append(pkt(True, ack))
    c.packets.append(pkt(True, ack.copy(), SCTPChunkSACK()))  # the ACK chunk retransmitted with a SACK
    c.packets.append(pkt(True, chunk(True, msgs[4][0])))
    c.packets.append(pkt(False, chunk(False, msgs[5][0])))
    for _raw, facts in msgs:
        c.expect(facts, A4, 40000, B4, 5060, "eth/ip4", "SCTP")
    c.write()


def tunnels() -> None:
    """One call per tunnel kind a mirror setup uses."""
    outer = lambda p, proto=17: Ether(src=MAC_A, dst=MAC_B) / IP(src="203.0.113.1", dst="203.0.113.2",  # noqa: E731
                                                                 proto=proto) / p
    erspan2 = (struct.pack("!HHI", 0x1000, 0x88BE, 7), b"\x10\x00\x00\x01\x00\x00\x00\x00")
    def gre_raw(proto_hdr: bytes, extra: bytes = b""):  # type: ignore[no-untyped-def]
        return lambda p: outer(Raw(proto_hdr + extra + bytes(Ether(src=MAC_A, dst=MAC_B) / p)), 47)
    ipproto = lambda proto: (lambda p: Ether(src=MAC_A, dst=MAC_B) / IP(src="203.0.113.1", dst="203.0.113.2",  # noqa: E731
                                                                       proto=proto) / p)
    ip6outer = lambda p: Ether(src=MAC_A, dst=MAC_B) / IPv6(src="2001:db8:ffff::1", dst="2001:db8:ffff::2") / p  # noqa: E731
    vx = lambda p: outer(UDP(sport=50000, dport=4789) / Raw(b"\x08\x00\x00\x00\x00\x00\x64\x00"  # noqa: E731
                                                          + bytes(Ether(src=MAC_A, dst=MAC_B) / p)))
    tz = lambda p: outer(UDP(sport=50000, dport=37008) / Raw(b"\x01\x00\x00\x01" + b"\x0a\x01\x05"  # noqa: E731
                                                           + b"\x01" + bytes(Ether(src=MAC_A, dst=MAC_B) / p)))
    mpls = lambda p: Ether(src=MAC_A, dst=MAC_B, type=0x8847) / Raw(struct.pack("!II", 16 << 12, (17 << 12) | 0x100)  # noqa: E731
                                                                   + bytes(p))
    simple("tun_gre", lambda p: outer(GRE(proto=0x0800) / p, 47), "eth/ip4/gre/ip4")
    simple("tun_gre_teb", gre_raw(struct.pack("!HHI", 0x2000, 0x6558, 0)), "eth/ip4/gre/eth/ip4")
    simple("tun_erspan2", gre_raw(*erspan2), "eth/ip4/gre/erspan2/eth/ip4")
    simple("tun_erspan3", gre_raw(struct.pack("!HHI", 0x1000, 0x22EB, 7), b"\x20" + bytes(10) + b"\x01" + bytes(8)),
           "eth/ip4/gre/erspan3/eth/ip4")
    simple("tun_vxlan", vx, "eth/ip4/udp/vxlan/eth/ip4")
    simple("tun_tzsp", tz, "eth/ip4/udp/tzsp/eth/ip4")
    simple("tun_mpls", mpls, "eth/mpls/ip4")
    simple("tun_4in4", ipproto(4), "eth/ip4/ip4")
    simple("tun_6in4", ipproto(41), "eth/ip4/ip6", v6=True)
    simple("tun_4in6", ip6outer, "eth/ip6/ip4")


def pptp(name: str, v6: bool) -> None:
    """Enhanced GRE (version 1, PPTP, RFC 2637) with PPP inside: key (payload length + call ID),
    sequence and acknowledgement numbers, address/control bytes present or compressed, protocol
    field 2 bytes or compressed to 1; between the messages an acknowledgement without payload
    and a PPP LCP echo, which are not IP (counted as skipped)."""
    c = Case(name)
    a, b = (A6, B6) if v6 else (A4, B4)
    seq = {True: 1, False: 1}

    def gre1(to_b: bool, ppp: bytes, ack: bool) -> object:
        # K (key), S (sequence number) when there is payload, A (acknowledgement), version 1
        flags = 0x2001 | (0x1000 if ppp else 0) | (0x0080 if ack else 0)
        hdr = struct.pack("!HHHH", flags, 0x880B, len(ppp), 0x4000 if to_b else 0x8000)
        if flags & 0x1000:
            hdr += struct.pack("!I", seq[to_b])
            seq[to_b] += 1
        if flags & 0x0080:
            hdr += struct.pack("!I", seq[not to_b] - 1)
        src, dst = ("203.0.113.1", "203.0.113.2") if to_b else ("203.0.113.2", "203.0.113.1")
        return Ether(src=MAC_A, dst=MAC_B) / IP(src=src, dst=dst, proto=47) / Raw(hdr + ppp)

    for raw, facts in call(f"{name}-call@golden"):
        i = int(facts["i"])
        to_b = not facts["to_uac"]
        src, dst = (a, b) if to_b else (b, a)
        ip = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst, id=200 + i)
        inner = bytes(ip / UDP(sport=5060, dport=5060) / Raw(raw))
        proto = 0x0057 if v6 else 0x0021
        # alternate: full FF 03 + 2-byte protocol; compressed address/control; compressed protocol too
        head = [b"\xff\x03" + struct.pack("!H", proto), struct.pack("!H", proto), bytes([proto])][i % 3]
        c.packets.append(gre1(to_b, head + inner, ack=i % 2 == 1))
        c.expect(facts, a, 5060, b, 5060, "eth/ip4/gre/ppp/" + ("ip6" if v6 else "ip4"))
        if i == 1:
            c.packets.append(gre1(False, b"", ack=True))  # a bare acknowledgement
        if i == 3:  # LCP Echo-Request (protocol C021): PPP control, not IP
            c.packets.append(gre1(True, b"\xff\x03\xc0\x21\x09\x01\x00\x08\x00\x00\x00\x00", ack=False))
    c.skipped = {"not_ip_or_unsupported": 2}
    c.write()


def tcp_big() -> None:
    """A 200 KB NOTIFY (an RLS contact list, RFC 4662) over TCP in 1448-byte segments, then an
    ordinary call on the same connection: above Kamailio's 64 KB buffer, within
    limits.max_sip_message (1 MiB by default)."""
    c = Case("tcp_big")
    conn = TcpConn(c)
    c.packets.extend(conn.handshake())
    entries = "".join(f'<resource uri="sip:user{i:05d}@example.com"><name>User {i:05d}</name>'
                      f'<instance id="i{i}" state="active" cid="c{i}@example.com"/></resource>\r\n'
                      for i in range(1700))
    body = ('<?xml version="1.0" encoding="UTF-8"?>\r\n<list xmlns="urn:ietf:params:xml:ns:rlmi" '
            'uri="sip:buddies@example.com" version="1" fullState="true">\r\n' + entries + "</list>\r\n").encode()
    assert len(body) > 200_000
    call_id = "tcp_big-notify@golden"
    notify = sip_request("NOTIFY", call_id=call_id, branch="z9hG4bK-ntf", to_tag="ttag1", body=body,
                         extra_headers=("Event: presence", "Subscription-State: active;expires=3600"))
    ok = sip_response(200, "OK", call_id=call_id, cseq_method="NOTIFY", branch="z9hG4bK-ntf")
    for at in range(0, len(notify), 1448):
        c.packets.append(conn.seg(True, notify[at : at + 1448]))
    c.packets.append(conn.seg(False, ok))
    base = dict(call_id=call_id, cseq=1, cseq_method="NOTIFY", from_tag="ftag1", to_tag="ttag1", branch="z9hG4bK-ntf")
    c.expect({**base, "method": "NOTIFY", "status": None, "to_uac": False, "i": 0}, A4, 40000, B4, 5060, "eth/ip4", "TCP")
    c.expect({**base, "method": None, "status": 200, "to_uac": True, "i": 1}, A4, 40000, B4, 5060, "eth/ip4", "TCP")
    for raw, facts in call("tcp_big-call@golden"):
        c.packets.append(conn.seg(not facts["to_uac"], raw))
        c.expect(facts, A4, 40000, B4, 5060, "eth/ip4", "TCP")
    c.write()


def dup_ipid() -> None:
    """A SPAN port mirroring both directions: every datagram twice, the copy 10 µs later with the
    same IP ID. The phone resends its INVITE 0.3 ms after the first (a new packet: a new IP ID),
    and that one is mirrored too; the IPv6 BYE's copy has no ID to go by (the exact-payload rule
    decides: a copy). Kept: the INVITE twice, every other message once; 7 copies dropped."""
    c = Case("dup_ipid")
    t = BASE_TIME
    packets = []
    ipid = 300
    for raw, facts in call("dup_ipid-call@golden"):
        i = int(facts["i"])
        src, dst = (B4, A4) if facts["to_uac"] else (A4, B4)
        sends = 2 if i == 0 else 1  # the INVITE goes out twice, 0.3 ms apart
        for k in range(sends):
            t += 0.0003 if k else 0.01
            ipid += 1
            if i == 4:  # the BYE over IPv6: no Identification outside a fragment header
                pkt = Ether(src=MAC_A, dst=MAC_B) / IPv6(src=A6, dst=B6) / UDP(sport=5060, dport=5060) / Raw(raw)
            else:
                pkt = Ether(src=MAC_A, dst=MAC_B) / IP(src=src, dst=dst, id=ipid) / UDP(sport=5060, dport=5060) / Raw(raw)
            copy = pkt.copy()
            pkt.time, copy.time = t, t + 0.00001
            packets += [pkt, copy]
            if i == 4:
                row = {k2: v for k2, v in facts.items() if k2 not in ("to_uac", "i")}
                row.update(src=A6, sport=5060, dst=B6, dport=5060, encap="eth/ip6", transport="UDP")
                c.expected.append(row)
            else:
                c.expect(facts, A4, 5060, B4, 5060, "eth/ip4")
    wrpcap(str(HERE / "dup_ipid.pcap"), packets)
    c.write_expected()


def sctp_not_sip() -> None:
    """An SCTP capture beside a core network: Diameter (PPID 46), S1AP (18) and M3UA (3) DATA
    chunks, and a Diameter message sent with PPID 0 ("unspecified"), among a SIP call's chunks.
    The non-SIP chunks are skipped and counted, not taken for SIP that does not parse."""
    c = Case("sctp_not_sip")
    msgs = call("sctp_not_sip-call@golden")
    tsn = {True: 100, False: 900}

    def chunk(to_b: bool, data: bytes, ppid: int = 0) -> object:
        ch = SCTPChunkData(tsn=tsn[to_b], stream_id=0, stream_seq=0, proto_id=ppid, beginning=True, ending=True,
                           data=data)
        tsn[to_b] += 1
        return ch

    def pkt(to_b: bool, *chunks: object) -> object:
        src, dst = (A4, B4) if to_b else (B4, A4)
        p = IP(src=src, dst=dst) / SCTP(sport=5060 if not to_b else 40000, dport=40000 if not to_b else 5060, tag=1)
        for ch in chunks:
            p = p / ch
        return Ether(src=MAC_A, dst=MAC_B) / p

    # Diameter CCR header: version 1, length, flags R, command 272, application 4, hop-by-hop, end-to-end
    diameter = struct.pack("!I", 0x01000000 | 20) + struct.pack("!I", 0x80000000 | 272) + struct.pack("!III", 4, 1, 2)
    s1ap = bytes.fromhex("000c4068000006000800020001001a00")
    m3ua = bytes.fromhex("0100010100000018000600080000000100")
    for n, (raw, facts) in enumerate(msgs):
        to_b = not facts["to_uac"]
        extra = [chunk(to_b, diameter, 46)] if n == 0 else [chunk(to_b, s1ap, 18)] if n == 2 else []
        c.packets.append(pkt(to_b, *extra, chunk(to_b, raw)))
        c.expect(facts, A4, 40000, B4, 5060, "eth/ip4", "SCTP")
        if n == 3:
            c.packets.append(pkt(to_b, chunk(to_b, m3ua, 3), chunk(to_b, diameter, 0)))
    c.skipped = {"sctp_not_sip": 1, "sctp_not_sip_ppid": 3}
    c.write()


def main() -> None:
    eth = lambda p: Ether(src=MAC_A, dst=MAC_B) / p  # noqa: E731
    simple("vlan", lambda p: Ether(src=MAC_A, dst=MAC_B) / Dot1Q(vlan=100) / p, "eth/vlan:100/ip4")
    simple("qinq", lambda p: Ether(src=MAC_A, dst=MAC_B) / Dot1AD(vlan=10) / Dot1Q(vlan=20) / p, "eth/vlan:10/vlan:20/ip4")
    simple("sll", lambda p: CookedLinux(pkttype=0, lladdrtype=1, lladdrlen=6, src=b"\x02\0\0\0\0\x01\0\0", proto=0x0800) / p, "sll/ip4")
    simple("sll2", lambda p: CookedLinuxV2(proto=0x0800, ifindex=2, lladdrtype=1, lladdrlen=6) / p, "sll2/ip4")
    simple("ipv6", lambda p: Ether(src=MAC_A, dst=MAC_B) / _v6_ext(p), "eth/ip6", v6=True)
    simple("compact", eth, "eth/ip4", compact=True)
    simple("null", lambda p: Loopback(type=2) / p, "null/ip4")
    simple("rawip", lambda p: p, "ip4", linktype=101)
    fragmented("frag4_inorder", v6=False, reverse=False)
    fragmented("frag4_outoforder", v6=False, reverse=True)
    fragmented("frag6_inorder", v6=True, reverse=False)
    fragmented("frag6_outoforder", v6=True, reverse=True)
    folded()
    garbage()
    truncated()
    pcapng_two_links()
    nanosecond_gz()
    tcp_cases()
    websocket()
    sctp()
    tunnels()
    pptp("tun_pptp", v6=False)
    pptp("tun_pptp6", v6=True)
    tcp_big()
    dup_ipid()
    sctp_not_sip()


def _v6_ext(p):  # type: ignore[no-untyped-def]
    """Put hop-by-hop and destination-options headers between IPv6 and UDP."""
    ip = p.copy()
    udp = ip.payload
    ip.remove_payload()
    return ip / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / udp


if __name__ == "__main__":
    main()
