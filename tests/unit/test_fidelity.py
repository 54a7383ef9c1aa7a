"""Issue 11, capture fidelity: what a SPAN port beside a real proxy carries and the first
version lost or miscounted. Each test drives the real stages (decode, reassembly, dedup,
parse) with crafted frames; the golden captures (tests/pcaps: tun_pptp*, tcp_big, dup_ipid,
sctp_not_sip) check the same through the command line and against tshark.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sipsniff_acc import sip
from sipsniff_acc.decode import decode
from sipsniff_acc.events import Anomaly, Counters, Datagram, Frame, Transport
from sipsniff_acc.limits import DEFAULT_MAX_SIP_MESSAGE, Limits
from sipsniff_acc.pipeline import CaptureStage, Deduplicator, MessagePipeline
from sipsniff_acc.rules import parse_rules
from sipsniff_acc.sctp import SctpReassembler
from tests.builders import ether, ip4_udp, sip_request

A, B = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
A6 = bytes.fromhex("20010db8000000000000000000000010")
B6 = bytes.fromhex("20010db8000100000000000000000020")
PCAPS = Path(__file__).resolve().parent.parent / "pcaps"


def _ip6_udp(payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 5060, 5060, 8 + len(payload), 0) + payload
    return struct.pack("!IHBB16s16s", 0x60000000, len(udp), 17, 64, A6, B6) + udp


def _gre1(ppp: bytes, flags: int = 0x3081, plen: int | None = None, proto: int = 0x880B) -> bytes:
    """An enhanced GRE packet (RFC 2637) in IPv4/Ethernet: key (payload length, call ID), then
    the sequence and acknowledgement numbers the flags announce."""
    hdr = struct.pack("!HH", flags, proto)
    if flags & 0x2000:
        hdr += struct.pack("!HH", len(ppp) if plen is None else plen, 0x1234)
    if flags & 0x1000:
        hdr += struct.pack("!I", 7)
    if flags & 0x0080:
        hdr += struct.pack("!I", 6)
    return ether(ip4_udp(hdr + ppp, src="203.0.113.1", dst="203.0.113.2", proto=47, raw_payload=True))


# --- GRE version 1 (PPTP) -------------------------------------------------------------------

MSG = sip_request(call_id="pptp@x")


@pytest.mark.parametrize("ppp_head", [b"\xff\x03\x00\x21", b"\x00\x21", b"\x21", b"\xff\x03\x21"],
                         ids=["full", "acfc", "acfc+pfc", "pfc"])
@pytest.mark.parametrize("flags", [0x3001, 0x3081, 0x2001, 0x2081], ids=["K+S", "K+S+A", "K", "K+A"])
def test_pptp_gre_ppp_ipv4_is_decoded_to_the_inner_packet(ppp_head: bytes, flags: int) -> None:
    inner = ip4_udp(MSG, ident=77)
    d = decode(Frame(1.0, 1, _gre1(ppp_head + inner, flags), 1))
    assert isinstance(d, Datagram), d
    assert d.payload == MSG and d.encap == ("eth", "ip4", "gre", "ppp", "ip4")
    assert (d.src, d.dst, d.ipid) == (bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]), 77)  # the inner packet's


def test_pptp_gre_ppp_ipv6_is_decoded() -> None:
    d = decode(Frame(1.0, 1, _gre1(b"\x00\x57" + _ip6_udp(MSG)), 1))
    assert isinstance(d, Datagram) and d.payload == MSG and d.src == A6
    assert d.encap == ("eth", "ip4", "gre", "ppp", "ip6") and d.ipid == -1


def test_pptp_payload_length_trims_what_follows() -> None:
    ppp = b"\x00\x21" + ip4_udp(MSG)
    d = decode(Frame(1.0, 1, _gre1(ppp + b"\0" * 20, plen=len(ppp)), 1))  # 20 bytes after the PPP payload
    assert isinstance(d, Datagram) and d.payload == MSG


@pytest.mark.parametrize("ppp", [
    b"",  # an acknowledgement alone
    b"\xff\x03\xc0\x21\x09\x01\x00\x08\x00\x00\x00\x00",  # LCP echo request
    b"\x80\x21\x01\x01\x00\x04",  # IPCP
    b"\x00\xfd\x90\x00" + b"\x55" * 60,  # MPPE-compressed/encrypted datagram: not readable
], ids=["ack", "lcp", "ipcp", "mppe"])
def test_pptp_control_and_encrypted_payloads_are_not_ip(ppp: bytes) -> None:
    assert decode(Frame(1.0, 1, _gre1(ppp, 0x2081 if not ppp else 0x3001), 1)) is None


def test_pptp_truncations_are_anomalies_not_crashes() -> None:
    frame = _gre1(b"\x00\x21" + ip4_udp(MSG), plen=5000)  # claims more than was captured
    a = decode(Frame(1.0, 1, frame, 1))
    assert isinstance(a, Anomaly) and a.name == "tunnel_truncated"
    cut = ether(ip4_udp(struct.pack("!HH", 0x3001, 0x880B) + b"\x00", proto=47, raw_payload=True))
    a = decode(Frame(1.0, 1, cut, 1))
    assert isinstance(a, Anomaly) and a.name == "tunnel_truncated"


def test_other_gre_versions_and_version_1_without_ppp_are_skipped() -> None:
    assert decode(Frame(1.0, 1, _gre1(b"\x00\x21" + ip4_udp(MSG), flags=0x3002), 1)) is None
    assert decode(Frame(1.0, 1, _gre1(ip4_udp(MSG), flags=0x2001, proto=0x0800), 1)) is None


# --- mirror copies and genuine retransmissions ----------------------------------------------

def _udp(ts: float, ident: int, payload: bytes = MSG, v6: bool = False) -> Frame:
    return Frame(ts, 1, ether(_ip6_udp(payload), 0x86DD) if v6 else ether(ip4_udp(payload, ident=ident)), 1)


def _kept(frames: list[Frame]) -> tuple[list[float], Counters]:
    cs = CaptureStage()
    out = [x for f in frames for x in cs.feed(f)]
    return [x.ts for x in out if isinstance(x, Datagram)], cs.counters


def test_ipv4_identification_reaches_the_datagram_on_every_path() -> None:
    fast = decode(_udp(1.0, 4242))
    vlan = decode(Frame(1.0, 1, ether(b"\x00\x64\x08\x00" + ip4_udp(MSG, ident=4343), 0x8100), 1))
    v6 = decode(_udp(1.0, 0, v6=True))
    assert [x.ipid for x in (fast, vlan, v6) if isinstance(x, Datagram)] == [4242, 4343, -1]


def test_mirror_copy_keeps_the_ip_id_and_is_dropped() -> None:
    kept, c = _kept([_udp(1.0, 10), _udp(1.00001, 10)])
    assert kept == [1.0] and c.duplicates == 1


def test_a_retransmission_0_3_ms_later_has_a_new_ip_id_and_is_kept() -> None:
    """The phone resends at once: a new IP packet. The first version dropped it as a copy."""
    kept, c = _kept([_udp(1.0, 10), _udp(1.0003, 11)])
    assert kept == [1.0, 1.0003] and c.duplicates == 0


def test_retransmission_and_copies_interleaved() -> None:
    """original, its resend, then both mirror copies (a SPAN queue can delay the copies): two kept."""
    kept, c = _kept([_udp(1.0, 10), _udp(1.0003, 11), _udp(1.0004, 10), _udp(1.0005, 11)])
    assert kept == [1.0, 1.0003] and c.duplicates == 2


def test_without_an_id_the_exact_payload_rule_decides() -> None:
    """IPv6 has no Identification; Linux sends unconnected UDP with DF and ID 0: both are copies."""
    kept, c = _kept([_udp(1.0, 0, v6=True), _udp(1.0003, 0, v6=True)])
    assert kept == [1.0] and c.duplicates == 1
    kept, c = _kept([_udp(1.0, 0), _udp(1.0003, 0)])
    assert kept == [1.0] and c.duplicates == 1


def test_reassembled_datagrams_carry_the_fragment_id() -> None:
    big = sip_request(call_id="frag@x", body=b"v=0\r\n" + b"a=x\r\n" * 400)
    pieces = []
    for ident in (500, 501):  # the same datagram sent twice by the sender: two IDs
        udp = struct.pack("!HHHH", 5060, 5060, 8 + len(big), 0) + big
        first, rest = udp[:1480], udp[1480:]
        pieces += [ip4_udp(first, ident=ident, frag=0x2000, proto=17, raw_payload=True),
                   ip4_udp(rest, ident=ident, frag=1480 // 8, proto=17, raw_payload=True)]
    frames = [Frame(1.0 + i * 0.0001, 1, ether(p), i + 1) for i, p in enumerate(pieces)]
    frames.append(Frame(1.0005, 1, frames[-1].data, 9))  # a mirror copy of the last piece
    cs = CaptureStage()
    out = [x for f in frames for x in cs.feed(f)]
    got = [x for x in out if isinstance(x, Datagram)]
    assert [(d.payload == big, d.ipid) for d in got] == [(True, 500), (True, 501)]


def test_deduplicator_remembers_a_bounded_number_of_ids() -> None:
    dd = Deduplicator()
    d = decode(_udp(1.0, 1))
    assert isinstance(d, Datagram)
    for i in range(100):  # a burst of resends of one payload: each kept, the table entry stays small
        d.ipid, d.ts = i, 1.0 + i * 0.0001
        assert not dd.duplicate(d)
    assert len(dd._seen) == 1 and len(next(iter(dd._seen.values()))[3]) <= 7


# --- SIP over TCP above 64 KB: limits.max_sip_message ----------------------------------------

def _tcp(seq: int, data: bytes, flags: int = 0x18) -> bytes:
    return ip4_udp(struct.pack("!HHIIBBHHH", 40000, 5060, seq, 0, 0x50, flags, 65535, 0, 0) + data,
                   proto=6, raw_payload=True)


def _notify(size: int) -> bytes:
    return sip_request("NOTIFY", call_id="rls@x", body=b"<resource/>\r\n" * (size // 13))


def _over_tcp(msgs: list[bytes], limits: Limits | None = None) -> tuple[list[bytes], Counters]:
    stream = b"".join(msgs)
    frames = [Frame(1.0, 1, ether(_tcp(999, b"", 0x02)), 1)]
    for i, at in enumerate(range(0, len(stream), 1448)):
        frames.append(Frame(1.0 + i * 1e-5, 1, ether(_tcp(1000 + at, stream[at : at + 1448])), i + 2))
    mp = MessagePipeline(limits=limits)
    out = [x for f in frames for x in mp.feed(f)] + mp.finish()
    return [m.raw for m in out if isinstance(m, sip.SipMessage)], mp.counters


def test_default_limit_is_1_mib_and_a_200_kb_message_over_tcp_passes() -> None:
    assert Limits().max_sip_message == DEFAULT_MAX_SIP_MESSAGE == 1 << 20
    big, after = _notify(200_000), sip_request(call_id="after@x")
    got, c = _over_tcp([big, after])
    assert got == [big, after] and not c.anomalies


def test_a_message_above_the_configured_limit_is_counted_and_the_stream_resyncs() -> None:
    big, after = _notify(200_000), sip_request(call_id="after@x")
    got, c = _over_tcp([big, after], Limits(max_sip_message=65535))
    assert got == [after]
    assert c.anomalies["tcp_message_too_long"] == 1  # once: not again on "OTIFY sip:..." and so on
    assert c.keepalives == 0  # the body's line ends skipped while resyncing are not keep-alives


def test_websocket_messages_follow_the_same_limit() -> None:
    big = _notify(100_000)
    upgrade = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    frame = bytes([0x81, 127]) + struct.pack("!Q", len(big)) + big
    for limits, expect in ((None, [big]), (Limits(max_sip_message=65535), [])):
        got, c = _over_tcp([upgrade, frame], limits)
        assert got == expect
        assert bool(c.anomalies.get("ws_bad_frame")) == (not expect)


def test_the_limit_comes_from_rules_yaml_and_is_checked() -> None:
    rules = parse_rules("limits:\n  max_sip_message: 2097152\n")
    assert rules.limits.max_sip_message == 2 << 20
    cs = CaptureStage(limits=rules.limits)
    assert cs.tcp.max_message == cs.sctp.max_message == 2 << 20
    assert cs.tcp.max_direction >= 2 * cs.tcp.max_message and cs.tcp.max_total >= 2 * cs.tcp.max_direction
    with pytest.raises(Exception, match="max_sip_message must be between"):
        parse_rules("limits:\n  max_sip_message: 100\n")


def test_check_rules_names_a_bad_max_sip_message_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text("limits:\n  max_sip_message: 99999999999\n")
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "check-rules", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "max_sip_message" in lines[0] and "Traceback" not in res.stderr


# --- SCTP chunks that are not SIP -----------------------------------------------------------

def _sctp_packet(*chunks: bytes) -> Datagram:
    return Datagram(1.0, 1, Transport.SCTP, A, 40000, B, 5060, struct.pack("!HHII", 40000, 5060, 1, 0) + b"".join(chunks),
                    ("eth", "ip4"))


def _data(tsn: int, user: bytes, ppid: int = 0, flags: int = 0x03) -> bytes:
    length = 16 + len(user)
    return struct.pack("!BBHIHHI", 0, flags, length, tsn, 0, 0, ppid) + user + b"\0" * (-length % 4)


DIAMETER = struct.pack("!IIIII", 0x01000014, 0x80000110, 4, 1, 2)


def test_sctp_chunks_of_other_protocols_are_skipped_and_counted() -> None:
    c = Counters()
    r = SctpReassembler(c)
    out = r.feed(_sctp_packet(_data(1, DIAMETER, 46), _data(2, b"\x00\x0c\x40\x68" * 4, 18),
                              _data(3, b"\x01\x00\x01\x01" * 4, 3), _data(4, MSG)))
    assert [d.payload for d in out if isinstance(d, Datagram)] == [MSG]
    assert c.skipped == {"sctp_not_sip_ppid": 3}


def test_sctp_ppid_0_with_content_that_is_not_sip_is_skipped_not_a_parse_error() -> None:
    mp = MessagePipeline()
    d = _sctp_packet(_data(1, DIAMETER, 0), _data(2, MSG))
    frame = Frame(1.0, 1, ether(ip4_udp(d.payload, proto=132, raw_payload=True)), 1)
    out = mp.feed(frame) + mp.finish()
    assert [m.call_id for m in out if isinstance(m, sip.SipMessage)] == ["pptp@x"]
    assert mp.counters.skipped == {"sctp_not_sip": 1} and not mp.counters.anomalies


def test_fragmented_diameter_is_not_held_for_reassembly() -> None:
    c = Counters()
    r = SctpReassembler(c)
    r.feed(_sctp_packet(_data(1, DIAMETER, 46, 0x02), _data(2, b"\0" * 64, 46, 0x00)))
    assert not r._partial and c.skipped["sctp_not_sip_ppid"] == 2



def test_tcp_total_budget_holds_as_directions_grow_not_only_as_new_ones_come() -> None:
    """With 1 MiB messages, directions that opened small and then grew passed the total budget
    (it was checked only when a new direction came): the oldest are dropped and counted."""
    from sipsniff_acc.tcpstream import TcpReassembler

    r = TcpReassembler(max_total=4 << 20)
    head = b"NOTIFY sip:a@x SIP/2.0\r\nCall-ID: c\r\nCSeq: 1 NOTIFY\r\nContent-Length: 900000\r\n\r\n"

    def seg(port: int, seq: int, data: bytes, flags: int = 0x18) -> Datagram:
        tcp = struct.pack("!HHIIBBHHH", port, 5060, seq, 0, 0x50, flags, 65535, 0, 0) + data
        return Datagram(1.0, 1, Transport.TCP, A, port, B, 5060, tcp, ("eth", "ip4"))

    out: list[Datagram | Anomaly] = []
    ports = range(40000, 40040)
    for p in ports:  # 40 directions open with a header each: tiny
        out += r.feed(seg(p, 0, b"", 0x02)) + r.feed(seg(p, 1, head))
    body = b"x" * 1400
    for k in range(150):  # then each grows to ~200 KB of body: 8 MB in all, twice the budget
        for p in ports:
            out += r.feed(seg(p, 1 + len(head) + k * len(body), body))
            assert r.held <= r.max_total + len(body) + len(head)
    evicted = [a for a in out if isinstance(a, Anomaly) and a.name == "tcp_stream_evicted"]
    assert evicted and len(r.streams) < 40


def test_capture_stage_advance_releases_a_tcp_message_held_behind_a_hole_in_silence() -> None:
    """A live source's Idle calls advance(wall clock): the message after a lost segment comes out
    once the hole is given up (GAP_WAIT), without waiting for the next packet."""
    first, second = sip_request(call_id="one@x"), sip_request(call_id="two@x")
    cs = CaptureStage()
    got = cs.feed(Frame(10.0, 1, ether(_tcp(999, b"", 0x02)), 1))
    got += cs.feed(Frame(10.1, 1, ether(_tcp(1000 + len(first), second)), 2))  # `first` was lost
    assert not [d for d in got if isinstance(d, Datagram)]
    assert not [d for d in cs.advance(10.5) if isinstance(d, Datagram)]  # the hole may still fill
    out = cs.advance(11.5)
    assert [d.payload for d in out if isinstance(d, Datagram)] == [second]
    assert cs.counters.anomalies["tcp_gap"] == 1
