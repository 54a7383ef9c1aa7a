"""decode.py: link, network and tunnel layers down to the transport payload."""

from __future__ import annotations

import struct

import pytest

from sipsniff_acc.decode import decode
from sipsniff_acc.events import Anomaly, Datagram, Fragment, Frame, Transport
from tests.builders import ether, ip4_udp, sip_request

SIP = sip_request()


def frame(data: bytes, linktype: int = 1) -> Frame:
    return Frame(1.5, linktype, data, 7, "t.pcap")


def test_ethernet_ipv4_udp() -> None:
    d = decode(frame(ether(ip4_udp(SIP, sport=5062, dport=5080))))
    assert isinstance(d, Datagram)
    assert (d.transport, d.sport, d.dport, d.payload, d.encap) == (Transport.UDP, 5062, 5080, SIP, ("eth", "ip4"))
    assert (d.src, d.dst, d.ts, d.no, d.source) == (bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]), 1.5, 7, "t.pcap")


def test_ethernet_padding_is_trimmed_by_ip_and_udp_lengths() -> None:
    d = decode(frame(ether(ip4_udp(b"tiny")) + b"\0" * 20))
    assert isinstance(d, Datagram) and d.payload == b"tiny"


def test_vlan_stack_is_walked() -> None:
    tags = struct.pack("!HH", 0x0064, 0x8100) + struct.pack("!HH", 0x00C8, 0x0800)
    d = decode(frame(ether(tags + ip4_udp(SIP), ethertype=0x88A8)))
    assert isinstance(d, Datagram) and d.encap == ("eth", "vlan:100", "vlan:200", "ip4")


def test_mpls_then_ip() -> None:
    labels = struct.pack("!I", (16 << 12) | 0) + struct.pack("!I", (17 << 12) | 0x100)  # 2 labels, S on the second
    d = decode(frame(ether(labels + ip4_udp(SIP), ethertype=0x8847)))
    assert isinstance(d, Datagram) and d.encap == ("eth", "mpls", "ip4")


def test_raw_null_and_loop_link_types() -> None:
    pkt = ip4_udp(SIP)
    assert isinstance(decode(frame(pkt, 101)), Datagram)
    assert isinstance(decode(frame(struct.pack("<I", 2) + pkt, 0)), Datagram)
    assert isinstance(decode(frame(struct.pack(">I", 2) + pkt, 0)), Datagram)  # written on a big-endian host
    assert isinstance(decode(frame(struct.pack(">I", 2) + pkt, 108)), Datagram)


def test_ipv4_fragment_is_handed_on() -> None:
    f = decode(frame(ether(ip4_udp(b"x" * 16, ident=77, frag=0x2000))))
    assert isinstance(f, Fragment)
    assert (f.key[2], f.offset, f.more, f.proto, f.version) == (77, 0, True, 17, 4)
    g = decode(frame(ether(ip4_udp(b"y" * 16, ident=77, frag=3, raw_payload=True))))
    assert isinstance(g, Fragment) and (g.offset, g.more) == (24, False)


def test_ip_in_ip_and_gre() -> None:
    inner = ip4_udp(SIP)
    d = decode(frame(ether(ip4_udp(inner, proto=4, raw_payload=True))))
    assert isinstance(d, Datagram) and d.encap == ("eth", "ip4", "ip4")
    gre = struct.pack("!HH", 0, 0x0800) + inner
    d = decode(frame(ether(ip4_udp(gre, proto=47, raw_payload=True))))
    assert isinstance(d, Datagram) and d.encap == ("eth", "ip4", "gre", "ip4")


def test_erspan_types() -> None:
    inner = ether(ip4_udp(SIP))
    t2 = struct.pack("!HHI", 0x1000, 0x88BE, 1) + b"\x10\x00\x00\x01\x00\x00\x00\x00" + inner  # S bit, seq
    d = decode(frame(ether(ip4_udp(t2, proto=47, raw_payload=True))))
    assert isinstance(d, Datagram) and d.encap == ("eth", "ip4", "gre", "erspan2", "eth", "ip4")
    t1 = struct.pack("!HH", 0, 0x88BE) + inner
    d = decode(frame(ether(ip4_udp(t1, proto=47, raw_payload=True))))
    assert isinstance(d, Datagram) and d.encap[3] == "erspan1"
    t3 = struct.pack("!HHI", 0x1000, 0x22EB, 1) + bytes(11) + b"\x01" + bytes(8) + inner  # O bit: +8 bytes
    d = decode(frame(ether(ip4_udp(t3, proto=47, raw_payload=True))))
    assert isinstance(d, Datagram) and d.encap[3] == "erspan3" and d.payload == SIP


def test_vxlan() -> None:
    vx = b"\x08\x00\x00\x00\x00\x00\x64\x00" + ether(ip4_udp(SIP))
    d = decode(frame(ether(ip4_udp(vx, dport=4789))))
    assert isinstance(d, Datagram) and d.encap == ("eth", "ip4", "udp", "vxlan", "eth", "ip4")


def test_tcp_and_sctp_are_tagged_for_reassembly() -> None:
    tcp = struct.pack("!HHIIBBHHH", 5060, 5061, 1, 0, 0x50, 0x18, 1000, 0, 0) + SIP
    d = decode(frame(ether(ip4_udp(tcp, proto=6, raw_payload=True))))
    assert isinstance(d, Datagram) and d.transport is Transport.TCP and (d.sport, d.dport) == (5060, 5061)


def test_non_ip_is_skipped_not_anomalous() -> None:
    assert decode(frame(ether(b"\x00" * 28, ethertype=0x0806))) is None


@pytest.mark.parametrize(("data", "linktype", "name"), [
    (b"\x02\x00", 1, "link_truncated"),
    (ether(b"\x45\x00"), 1, "ip_truncated"),
    (ether(b"\x75" + bytes(30)), 1, "ip_bad_header"),
    (ether(ip4_udp(SIP)[:60]), 1, "ip_truncated"),
    (b"\x00" * 10, 147, "link_unknown"),
    (ether(ip4_udp(b"abc", proto=17, raw_payload=True)), 1, "udp_truncated"),
])
def test_malformed_becomes_a_named_anomaly(data: bytes, linktype: int, name: str) -> None:
    a = decode(frame(data, linktype))
    assert isinstance(a, Anomaly) and a.name == name and a.frame == 7
