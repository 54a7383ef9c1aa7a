"""L2 → L4 decoding: a frame becomes a transport payload, an IP fragment, or nothing.

Flat ``struct.unpack_from`` code over the frame's bytes, dispatching on small tables keyed
by link type, EtherType and IP protocol (dpkt's layout, not its object-per-layer runtime:
perf-notes measured that runtime at a third of a plain reader's speed).

Supported: Ethernet, 802.1Q / 802.1ad / QinQ, PPPoE session, MPLS, Linux SLL and SLL2,
raw IP, BSD null/loopback; IPv4, IPv6 with extension headers; IP fragments (handed to
``ipfrag``); UDP; and the tunnels a SPAN or mirror setup wraps traffic in: IP-in-IP
(4in4, 6in4, 4in6, 6in6), GRE (with transparent Ethernet bridging), ERSPAN I/II/III,
VXLAN, TZSP, and enhanced GRE (version 1, PPTP: RFC 2637) with PPP inside. TCP and SCTP packets are passed on whole, tagged with their transport, for the
reassembly stages (``tcpstream``, ``sctp``).

Pure: ``decode(frame)`` has no state. Malformed headers become an ``Anomaly``; a frame
that carries no IP (ARP, STP, LLDP...) returns ``None`` and is counted as skipped.

Every ``Datagram`` carries the IPv4 Identification of the packet that brought it (of the
innermost IP header in a tunnel; -1 for IPv6, which has none outside a fragment header):
the duplicate filter uses it to tell a SPAN copy (same ID) from a retransmission (new ID).
"""

from __future__ import annotations

import struct
from types import ModuleType
from typing import Final

from sipsniff_acc.events import Anomaly, Datagram, Fragment, Frame, Transport

speedups: ModuleType | None = None  #: sipsniff_acc._capture, when built
try:  # the C walk and decode of the common frame (setup.py builds it when a compiler is there)
    from sipsniff_acc import _capture

    _capture.setup(Frame, Datagram, Transport.UDP, Transport.TCP, Transport.SCTP)
    speedups = _capture
except ImportError:  # not built: decode_py and CaptureReader's Python walk do all of it
    pass

_U16 = struct.Struct("!H").unpack_from
_IP4 = struct.Struct("!BBHHHBBH4s4s").unpack_from
_IP6 = struct.Struct("!IHBB16s16s").unpack_from
_UDP = struct.Struct("!HHH").unpack_from
_PORTS = struct.Struct("!HH").unpack_from
#: EtherType, IPv4 version/IHL, total length, identification, flags/offset, protocol, addresses, UDP
#: ports and length
_ETH_IP4_UDP = struct.Struct("!12xHBxHHHxB2x4s4sHHH").unpack_from

ETH_IP4: Final = 0x0800
ETH_IP6: Final = 0x86DD
ETH_VLAN: Final = frozenset((0x8100, 0x88A8, 0x9100, 0x9200))
ETH_MPLS: Final = frozenset((0x8847, 0x8848))
ETH_PPPOE: Final = 0x8864
ETH_TEB: Final = 0x6558  # transparent Ethernet bridging (GRE, NVGRE)
GRE_ERSPAN2: Final = 0x88BE  # ERSPAN type I (no sequence bit) or II
GRE_ERSPAN3: Final = 0x22EB
GRE_PPP: Final = 0x880B  #: enhanced GRE (version 1, PPTP) carries PPP
PPP_IP4: Final = 0x0021
PPP_IP6: Final = 0x0057
VXLAN_PORT: Final = 4789
TZSP_PORT: Final = 37008  #: MikroTik's "TaZmen Sniffer Protocol" packet streaming
_TUNNEL_PORTS: Final = frozenset((VXLAN_PORT, TZSP_PORT))
MAX_NESTING: Final = 8  #: tunnels inside tunnels deeper than this are a loop or garbage
MAX_TAGS: Final = 8  #: stacked VLAN tags: QinQ uses 2, nobody more than a few (each one copied the encap tuple)
MAX_IP6_EXT: Final = 16  #: IPv6 extension headers walked; a real packet has 0-3

LINKTYPE_NULL: Final = 0
LINKTYPE_ETHERNET: Final = 1
LINKTYPE_RAW: Final = 101
LINKTYPE_RAW_OPENBSD: Final = 12
LINKTYPE_LOOP: Final = 108
LINKTYPE_SLL: Final = 113
LINKTYPE_IPV4: Final = 228
LINKTYPE_IPV6: Final = 229
LINKTYPE_SLL2: Final = 276

#: BSD AF_INET6 differs by OS (24 NetBSD/OpenBSD, 28 FreeBSD, 30 macOS); AF_INET is 2 everywhere.
_NULL_FAMILIES: Final = {2: ETH_IP4, 24: ETH_IP6, 28: ETH_IP6, 30: ETH_IP6}

Decoded = Datagram | Fragment | Anomaly | None


class DecodeError(Exception):
    """A header is malformed; becomes an Anomaly at the ``decode`` boundary."""

    def __init__(self, name: str, detail: str = "") -> None:
        super().__init__(name)
        self.name = name
        self.detail = detail


class _Ctx:
    """What every layer needs to build its result; one per frame, only on the slow paths."""

    __slots__ = ("frame", "depth")

    def __init__(self, frame: Frame) -> None:
        self.frame = frame
        self.depth = 0


_ENCAP_ETH_IP4: Final = ("eth", "ip4")


def decode(frame: Frame) -> Decoded:
    """Decode one frame down to its transport payload."""
    if speedups is not None:
        # C for plain UDP/TCP/SCTP over Ethernet/SLL/raw IP: 0.2 us a frame against decode_py's 0.9
        d = speedups.udp(frame)
        if d is not None:
            return d  # type: ignore[no-any-return]
    return decode_py(frame)


def decode_py(frame: Frame) -> Decoded:
    """``decode`` in Python: the reference for ``_capture.udp``, and every frame it declines."""
    data = frame.data
    lt = frame.linktype
    # Fast path for the bulk of any capture: Ethernet, IPv4 without options, not a
    # fragment, UDP, lengths consistent. Same result as the general path below, from one
    # struct call (no per-layer calls, no tuple building): 0.6 µs against 1.0 µs.
    if lt == 1 and len(data) >= 42:
        et, vihl, total, ident, frag, proto, src, dst, sport, dport, ulen = _ETH_IP4_UDP(data)
        if (
            et == ETH_IP4 and vihl == 0x45 and proto == 17 and not frag & 0x3FFF
            and 28 <= total <= len(data) - 14 and 8 <= ulen <= total - 20 and dport not in _TUNNEL_PORTS
        ):
            return Datagram(
                frame.ts, frame.no, Transport.UDP, src, sport, dst, dport, data[42 : 34 + ulen],
                _ENCAP_ETH_IP4, frame.source, ident,
            )
    try:
        if lt == LINKTYPE_ETHERNET:
            return _ethernet(data, 0, frame, ())
        if lt == LINKTYPE_SLL:
            if len(data) < 16:
                raise DecodeError("link_truncated", "SLL header")
            return _ethertype(_U16(data, 14)[0], data, 16, frame, ("sll",))
        if lt == LINKTYPE_SLL2:
            if len(data) < 20:
                raise DecodeError("link_truncated", "SLL2 header")
            return _ethertype(_U16(data, 0)[0], data, 20, frame, ("sll2",))
        if lt in (LINKTYPE_RAW, LINKTYPE_RAW_OPENBSD, LINKTYPE_IPV4, LINKTYPE_IPV6):
            return _raw_ip(data, 0, frame, ())
        if lt in (LINKTYPE_NULL, LINKTYPE_LOOP):
            if len(data) < 4:
                raise DecodeError("link_truncated", "loopback header")
            fam = int.from_bytes(data[:4], "big" if lt == LINKTYPE_LOOP else "little")
            if fam > 0xFFFF:  # a capture written on the other endianness
                fam = int.from_bytes(data[:4], "little" if lt == LINKTYPE_LOOP else "big")
            et = _NULL_FAMILIES.get(fam)
            return None if et is None else _ethertype(et, data, 4, frame, ("null",))
        return Anomaly("link_unknown", frame.ts, frame.no, f"linktype {lt}", frame.source)
    except DecodeError as bad:
        return Anomaly(bad.name, frame.ts, frame.no, bad.detail, frame.source)
    except (struct.error, IndexError) as exc:  # a length check we did not write: still not a crash
        return Anomaly("link_truncated", frame.ts, frame.no, str(exc), frame.source)


def _ethernet(data: bytes, off: int, frame: Frame, encap: tuple[str, ...]) -> Decoded:
    if len(data) < off + 14:
        raise DecodeError("link_truncated", "Ethernet header")
    return _ethertype(_U16(data, off + 12)[0], data, off + 14, frame, encap + ("eth",))


def _ethertype(et: int, data: bytes, off: int, frame: Frame, encap: tuple[str, ...]) -> Decoded:
    tags = 0
    while True:
        if et == ETH_IP4 or et == ETH_IP6:
            return _ip(data, off, frame, encap)
        if et in ETH_VLAN:
            if len(data) < off + 4:
                raise DecodeError("link_truncated", "802.1Q tag")
            tags += 1
            if tags > MAX_TAGS:  # a 64 KB frame of tags was 16k tuple copies
                raise DecodeError("link_too_many_tags", f"more than {MAX_TAGS} VLAN tags")
            encap += (f"vlan:{_U16(data, off)[0] & 0x0FFF}",)
            et = _U16(data, off + 2)[0]
            off += 4
        elif et in ETH_MPLS:
            return _mpls(data, off, frame, encap)
        elif et == ETH_PPPOE:
            if len(data) < off + 8:
                raise DecodeError("link_truncated", "PPPoE header")
            ppp = _U16(data, off + 6)[0]
            if ppp not in (0x0021, 0x0057):
                return None
            return _ip(data, off + 8, frame, encap + ("pppoe",))
        else:
            return None


def _mpls(data: bytes, off: int, frame: Frame, encap: tuple[str, ...]) -> Decoded:
    for _ in range(16):  # label stacks are a few deep; 16 bounds a garbage loop
        if len(data) < off + 4:
            raise DecodeError("tunnel_truncated", "MPLS label")
        bottom = data[off + 2] & 0x01
        off += 4
        if bottom:
            break
    else:
        raise DecodeError("tunnel_truncated", "MPLS stack without bottom of stack")
    encap += ("mpls",)
    if off >= len(data):
        raise DecodeError("tunnel_truncated", "MPLS payload")
    nibble = data[off] >> 4
    if nibble in (4, 6):
        return _ip(data, off, frame, encap)
    if nibble == 0:  # pseudowire control word, then an Ethernet frame
        return _ethernet(data, off + 4, frame, encap)
    return None


def _raw_ip(data: bytes, off: int, frame: Frame, encap: tuple[str, ...]) -> Decoded:
    if off >= len(data):
        raise DecodeError("ip_truncated", "empty IP packet")
    return _ip(data, off, frame, encap)


def _ip(data: bytes, off: int, frame: Frame, encap: tuple[str, ...]) -> Decoded:
    version = data[off] >> 4 if off < len(data) else 0
    if version == 4:
        if len(data) < off + 20:
            raise DecodeError("ip_truncated", "IPv4 header")
        vihl, _tos, total, ident, frag, _ttl, proto, _sum, src, dst = _IP4(data, off)
        hl = (vihl & 0x0F) * 4
        if hl < 20 or total < hl:
            raise DecodeError("ip_bad_header", f"IPv4 header length {hl}, total length {total}")
        end = off + total
        if end > len(data):
            raise DecodeError("ip_truncated", f"IPv4 total length {total} exceeds the {len(data) - off} bytes captured")
        encap += ("ip4",)
        if frag & 0x3FFF:  # MF set or a non-zero offset: a fragment
            return Fragment(
                frame.ts, frame.no, (src, dst, ident, proto), 4, (frag & 0x1FFF) * 8,
                bool(frag & 0x2000), proto, src, dst, data[off + hl : end], encap, frame.source,
            )
        return transport(proto, src, dst, data, off + hl, end, frame, encap, ident)
    if version == 6:
        if len(data) < off + 40:
            raise DecodeError("ip_truncated", "IPv6 header")
        _vtf, plen, nh, _hop, src, dst = _IP6(data, off)
        end = off + 40 + plen if plen else len(data)  # 0 = jumbogram (RFC 2675): take what is there
        if end > len(data):
            raise DecodeError("ip_truncated", f"IPv6 payload length {plen} exceeds the {len(data) - off - 40} bytes captured")
        encap += ("ip6",)
        off += 40
        for _ in range(MAX_IP6_EXT):  # bounded walk over extension headers
            if nh in (0, 43, 60, 135, 139, 140):  # hop-by-hop, routing, dest opts, mobility, HIP, shim6
                if off + 8 > end:
                    raise DecodeError("ip_truncated", "IPv6 extension header")
                nh, off = data[off], off + (data[off + 1] + 1) * 8
            elif nh == 51:  # AH: length in 4-octet units, minus 2
                if off + 8 > end:
                    raise DecodeError("ip_truncated", "IPv6 AH header")
                nh, off = data[off], off + (data[off + 1] + 2) * 4
            elif nh == 44:
                if off + 8 > end:
                    raise DecodeError("ip_truncated", "IPv6 fragment header")
                fo = _U16(data, off + 2)[0]
                ident = int.from_bytes(data[off + 4 : off + 8], "big")
                nxt = data[off]
                return Fragment(
                    frame.ts, frame.no, (src, dst, ident, 0), 6, fo & 0xFFF8, bool(fo & 1),
                    nxt, src, dst, data[off + 8 : end], encap, frame.source,
                )
            else:
                break
        else:  # still an extension header after MAX_IP6_EXT of them: counted, not skipped silently
            raise DecodeError("ip_bad_header", f"more than {MAX_IP6_EXT} IPv6 extension headers")
        if off > end:
            raise DecodeError("ip_truncated", "IPv6 extension headers run past the payload")
        return transport(nh, src, dst, data, off, end, frame, encap)
    raise DecodeError("ip_bad_header", f"IP version {version}")


def transport(
    proto: int, src: bytes, dst: bytes, data: bytes, off: int, end: int,
    frame: Frame, encap: tuple[str, ...], ipid: int = -1,
) -> Decoded:
    """Decode the upper layer of an IP packet (also used on reassembled datagrams).

    ``ipid``: the IP Identification of the packet (or of the reassembled datagram), -1 if none.
    """
    if proto == 17:
        if end - off < 8:
            raise DecodeError("udp_truncated", "UDP header")
        sport, dport, ulen = _UDP(data, off)
        if ulen >= 8 and off + ulen <= end:
            end = off + ulen  # trims Ethernet padding; ulen 0 (jumbo) or too large: take what IP says
        if dport == VXLAN_PORT and end - off >= 16 and data[off + 8] & 0x08:
            return _nested(_ethernet, data, off + 16, frame, encap + ("udp", "vxlan"))
        if dport == TZSP_PORT and end - off >= 13 and data[off + 8] == 1:
            return _tzsp(data, off + 8, end, frame, encap)
        return Datagram(
            frame.ts, frame.no, Transport.UDP, src, sport, dst, dport,
            data[off + 8 : end], encap, frame.source, ipid,
        )
    if proto == 6 or proto == 132:
        if end - off < 4:
            raise DecodeError("ip_truncated", "transport ports")
        sport, dport = _PORTS(data, off)
        # The whole TCP/SCTP packet travels on: the reassembly stage reads its own header.
        return Datagram(
            frame.ts, frame.no, Transport.TCP if proto == 6 else Transport.SCTP,
            src, sport, dst, dport, data[off:end], encap, frame.source, ipid,
        )
    if proto == 4 or proto == 41:
        return _nested(_ip, data, off, frame, encap)
    if proto == 47:
        return _gre(data, off, end, frame, encap)
    return None


def _nested(layer: object, data: bytes, off: int, frame: Frame, encap: tuple[str, ...]) -> Decoded:
    if len(encap) > MAX_NESTING * 2:
        raise DecodeError("tunnel_truncated", "tunnels nested too deep")
    return layer(data, off, frame, encap)  # type: ignore[operator, no-any-return]


def _gre(data: bytes, off: int, end: int, frame: Frame, encap: tuple[str, ...]) -> Decoded:
    if end - off < 4:
        raise DecodeError("tunnel_truncated", "GRE header")
    flags, proto = _PORTS(data, off)
    version = flags & 0x0007
    if version == 1:
        return _gre_ppp(flags, proto, data, off, end, frame, encap)
    if version:  # no other version is defined
        return None
    hl = 4 + 4 * bool(flags & 0x8000) + 4 * bool(flags & 0x2000) + 4 * bool(flags & 0x1000)
    off += hl
    if off > end:
        raise DecodeError("tunnel_truncated", "GRE options")
    encap += ("gre",)
    data = data[:end]
    if proto == ETH_IP4 or proto == ETH_IP6:
        return _nested(_ip, data, off, frame, encap)
    if proto == ETH_TEB:
        return _nested(_ethernet, data, off, frame, encap)
    if proto == GRE_ERSPAN2:
        if flags & 0x1000:  # type II: 8-byte ERSPAN header; type I has none (no sequence bit)
            return _nested(_ethernet, data, off + 8, frame, encap + ("erspan2",))
        return _nested(_ethernet, data, off, frame, encap + ("erspan1",))
    if proto == GRE_ERSPAN3:
        if end - off < 12:
            raise DecodeError("tunnel_truncated", "ERSPAN III header")
        extra = 8 if data[off + 11] & 0x01 else 0  # O bit: platform-specific subheader follows
        return _nested(_ethernet, data, off + 12 + extra, frame, encap + ("erspan3",))
    return None


def _gre_ppp(flags: int, proto: int, data: bytes, off: int, end: int, frame: Frame,
             encap: tuple[str, ...]) -> Decoded:
    """Enhanced GRE (RFC 2637 §4.1, PPTP): key = payload length + call ID, optional sequence and
    acknowledgement numbers, then a PPP frame, its address/control bytes (FF 03) and protocol
    field possibly compressed (RFC 1661 §6.5-6.6). IPv4/IPv6 inside are decoded; PPP control
    (LCP, IPCP, CCP), compressed or encrypted (MPPE) payloads and bare acknowledgements are not IP."""
    if proto != GRE_PPP:
        return None
    at = off + 4
    plen = -1
    if flags & 0x8000:  # checksum/offset: must be 0 in version 1, tolerated
        at += 4
    if flags & 0x2000:  # key: payload length (16 bits), call ID (16 bits)
        if at + 4 > end:
            raise DecodeError("tunnel_truncated", "enhanced GRE key")
        plen = _U16(data, at)[0]
        at += 4
    if flags & 0x1000:
        at += 4  # sequence number
    if flags & 0x0080:
        at += 4  # acknowledgement number
    if at > end:
        raise DecodeError("tunnel_truncated", "enhanced GRE header")
    if plen >= 0:
        if at + plen > end:
            raise DecodeError("tunnel_truncated", f"enhanced GRE payload length {plen} exceeds the {end - at} bytes captured")
        end = at + plen
    if at >= end:  # an acknowledgement without payload
        return None
    if data[at] == 0xFF and at + 1 < end and data[at + 1] == 0x03:
        at += 2  # address and control present (not compressed)
    if at >= end:
        raise DecodeError("tunnel_truncated", "PPP protocol field")
    if data[at] & 0x01:  # protocol field compressed to one byte (an odd first byte)
        ppp, at = data[at], at + 1
    else:
        if at + 2 > end:
            raise DecodeError("tunnel_truncated", "PPP protocol field")
        ppp, at = _U16(data, at)[0], at + 2
    if ppp != PPP_IP4 and ppp != PPP_IP6:
        return None
    return _nested(_ip, data[:end], at, frame, encap + ("gre", "ppp"))


def _tzsp(data: bytes, off: int, end: int, frame: Frame, encap: tuple[str, ...]) -> Decoded:
    """TZSP: version 1, type, encapsulation (1 = Ethernet), tagged fields up to END (tag 1)."""
    if _U16(data, off + 2)[0] != 1:
        return None
    at = off + 4
    while at < end:  # bounded: every step moves forward
        tag = data[at]
        if tag == 1:
            at += 1
            break
        if tag == 0:
            at += 1
            continue
        if at + 1 >= end:
            break
        at += 2 + data[at + 1]
    else:
        raise DecodeError("tunnel_truncated", "TZSP tags without END")
    return _nested(_ethernet, data[:end], at, frame, encap + ("udp", "tzsp"))
