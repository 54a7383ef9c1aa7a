"""The vocabulary: every type that crosses a stage boundary.

Per-packet types are plain ``slots`` classes (not frozen: a frozen dataclass costs ~4x
to build, see docs/architecture.md). This module imports nothing from the package, so
it can be read first and on its own.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
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
class Idle:
    """A live source's heartbeat when no packet came for a while (at most every 100 ms).

    ``ts`` is the wall clock, which is the kernel's packet clock in a live capture: timers
    (transaction timeouts, 408s, dialog expiry) fire and outputs flush in silence, so a record
    never waits for the next packet. Files never yield it.
    """

    ts: float


@dataclass(slots=True)
class CaptureGap:
    """The kernel (or our own queue) dropped packets: what follows may miss messages.

    Yielded by a live source in the frame stream as soon as it sees drops; records of calls
    open at that moment are marked ``capture_gaps`` so an auditor knows they may be incomplete.
    """

    ts: float  #: when the drops were seen (wall clock = packet clock)
    interface: str
    dropped: int  #: packets lost since the previous report (kernel + ring + ours)
    where: str = "kernel"  #: "kernel" (socket/ring drops) or "queue" (our own hand-off)


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
    #: IPv4 Identification of the (innermost) packet, or the fragment header's Identification of a
    #: reassembled IPv4/IPv6 datagram; -1 when there is none (an unfragmented IPv6 packet). A SPAN
    #: copy keeps it, a sender's retransmission gets a new one: the duplicate filter tells them apart.
    ipid: int = -1


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


@dataclass
class Counters:
    """What happened to every frame; the end-of-run summary prints these."""

    frames: int = 0
    bytes: int = 0
    sip_messages: int = 0
    keepalives: int = 0
    duplicates: int = 0  #: mirrored copies of a frame dropped (exact duplicates within DUP_WINDOW)
    tls_decrypted: int = 0  #: SIP messages read from TLS with a key log
    tls_unreadable: int = 0  #: TLS directions from which no SIP could be read
    fragments: int = 0
    datagrams_reassembled: int = 0
    streams: Counter[str] = field(default_factory=Counter)  #: TCP directions seen, by what they carried
    skipped: Counter[str] = field(default_factory=Counter)  #: not SIP, by reason (not anomalies)
    anomalies: Counter[str] = field(default_factory=Counter)
    #: SIP messages by request method (IANA, else "other") or status class ("1xx".."6xx"): bounded
    sip_by_kind: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return {
            "frames": self.frames, "bytes": self.bytes, "sip_messages": self.sip_messages,
            "keepalives": self.keepalives, "duplicates": self.duplicates, "fragments": self.fragments,
            "datagrams_reassembled": self.datagrams_reassembled,
            "tls_decrypted": self.tls_decrypted, "tls_unreadable": self.tls_unreadable,
            "streams": dict(sorted(self.streams.items())), "skipped": dict(sorted(self.skipped.items())), "anomalies": dict(sorted(self.anomalies.items())),
            "sip_by_kind": dict(sorted(self.sip_by_kind.items())),
        }
