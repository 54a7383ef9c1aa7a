"""The vocabulary: every type that crosses a stage boundary.

Per-packet types are plain ``slots`` classes (not frozen: a frozen dataclass costs ~4x
to build, see docs/architecture.md). This module imports nothing from the package, so
it can be read first and on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Transport(str, Enum):
    UDP = "UDP"
    TCP = "TCP"
    SCTP = "SCTP"
    WS = "WS"
    TLS = "TLS"


@dataclass(slots=True)
class Frame:
    """One captured link-layer frame, as a source yields it."""

    ts: float  #: capture time, seconds since the epoch (the only clock of the pure stages)
    linktype: int  #: pcap LINKTYPE_* of the frame
    data: bytes
    no: int  #: 1-based frame number in its file (tshark's frame.number)
    source: str = ""  #: file it came from (several files are merged in time order)


@dataclass(slots=True)
class Datagram:
    """A transport payload with its addresses: what decode hands to the SIP stage.

    Addresses stay as packed bytes; they become text only for messages that turn out to
    be SIP (inet_ntop on every RTP packet would be wasted work).
    """

    ts: float
    no: int
    transport: Transport
    src: bytes  #: packed IPv4 (4 bytes) or IPv6 (16 bytes) address
    sport: int
    dst: bytes
    dport: int
    payload: bytes
    encap: tuple[str, ...]  #: layers outside the transport, outermost first, e.g. ("eth", "vlan", "ip4")
    source: str = ""


@dataclass(slots=True)
class Fragment:
    """One IP fragment, for the reassembly stage."""

    ts: float
    no: int
    key: tuple[bytes, bytes, int, int]  #: (src, dst, identification, proto-or-0 for IPv6)
    version: int  #: 4 or 6
    offset: int  #: byte offset of this piece in the original payload
    more: bool  #: MF flag: more fragments follow
    proto: int  #: upper-layer protocol (IPv4 proto; IPv6: next header after the fragment header)
    src: bytes
    dst: bytes
    payload: bytes
    encap: tuple[str, ...]
    source: str = ""


@dataclass(frozen=True, slots=True)
class Anomaly:
    """Something odd in the input, named like Zeek's weirds (see anomalies.py)."""

    name: str
    ts: float
    frame: int
    detail: str = ""
    source: str = ""
