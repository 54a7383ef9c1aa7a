"""SCTP DATA chunks (RFC 9260 §3.3.1) to SIP messages (RFC 4168: one SIP message per user message).

A packet may bundle several chunks; a user message may be fragmented over several DATA
chunks (B/E flags, consecutive TSNs). Retransmitted chunks (same TSN) are recognised and
dropped. Pure and bounded.

Not every association carries SIP: a SPAN port beside a core network also sees Diameter,
S1AP, M3UA... DATA chunks whose payload protocol identifier names another protocol
(``NOT_SIP_PPIDS``) are skipped before any reassembly, and user messages that do not begin
like SIP (PPID 0 is "unspecified": Diameter is often sent with it) are skipped once whole;
both are counted in ``Counters.skipped`` (``sctp_not_sip_ppid`` per chunk, ``sctp_not_sip``
per user message), not as SIP parse errors.

Bounded by the chunks actually held, never by the TSNs a packet claims (issue 10): TSNs
compare as RFC 1982 serial numbers (32 bits, wrapping), a B..E range is only walked when
it is no longer than the fragments held, an E fragment *before* its B is an anomaly, and
a user message in progress holds at most ``MAX_MESSAGE`` bytes. The table of recent TSNs
(retransmission filter) holds at most ``MAX_ASSOCIATIONS`` directions.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Final

from sipsniff_acc.events import Anomaly, Counters, Datagram, Transport
from sipsniff_acc.limits import DEFAULT_MAX_SIP_MESSAGE
from sipsniff_acc.sip import looks_like_sip

_CHUNK = struct.Struct("!BBH").unpack_from
_DATA = struct.Struct("!IHHI").unpack_from

SEEN_TSNS: Final = 4096  #: recent TSNs remembered per direction to drop retransmissions
MAX_PARTIAL: Final = 1024  #: fragmented user messages in progress, over all associations
FRAGMENT_TIMEOUT: Final = 30.0  #: seconds (packet time) a fragmented user message may take
MAX_MESSAGE: Final = DEFAULT_MAX_SIP_MESSAGE  #: default bound on one user message (limits.max_sip_message)
MAX_ASSOCIATIONS: Final = 65536  #: directions whose recent TSNs are remembered; the oldest is forgotten

Key = tuple[bytes, int, bytes, int]

#: IANA SCTP payload protocol identifiers of protocols that are not SIP (RFC 4168 assigns SIP
#: none: it is sent with 0). Unlisted values fall to the content check.
NOT_SIP_PPIDS: Final = frozenset({
    1,  # IUA
    2,  # M2UA
    3,  # M3UA
    4,  # SUA
    5,  # M2PA
    6,  # V5UA
    7,  # H.248
    8,  # BICC
    9,  # TALI
    10,  # DUA
    11,  # ASAP
    12,  # ENRP
    13,  # H.323
    14,  # Q.IPC
    15,  # SIMCO
    18,  # S1AP
    19,  # RUA
    20,  # HNBAP
    24,  # SBc-AP
    25,  # NBAP
    27,  # X2AP
    28,  # IRCP
    29,  # LCS-AP
    31,  # SABP
    43,  # M2AP
    44,  # M3AP
    45,  # SSH over SCTP
    46,  # Diameter
    47,  # Diameter over DTLS
    50,  # WebRTC DCEP
    53,  # WebRTC binary
    60,  # NGAP
    61,  # XnAP
    62,  # F1AP
    63,  # HTTP over SCTP
})


def serial_diff(a: int, b: int) -> int:
    """RFC 1982 serial-number distance a - b for 32-bit TSNs, in [-2**31, 2**31)."""
    d = (a - b) & 0xFFFFFFFF
    return d - 0x100000000 if d & 0x80000000 else d


class _Partial:
    """A fragmented user message in progress: its fragments by TSN and their total size."""

    __slots__ = ("since", "parts", "size")

    def __init__(self, since: float) -> None:
        self.since = since
        self.parts: dict[int, tuple[int, bytes]] = {}
        self.size = 0


class SctpReassembler:
    """SCTP packets (``Datagram`` with the whole SCTP packet) in; SIP user messages out."""

    def __init__(self, counters: Counters | None = None, max_message: int = MAX_MESSAGE) -> None:
        self.counters = counters or Counters()
        self.max_message = max_message  #: bytes of one user message (limits.max_sip_message)
        self._seen: dict[Key, tuple[set[int], deque[int]]] = {}
        self._partial: dict[tuple[object, ...], _Partial] = {}
        self.retransmitted = 0

    def feed(self, pkt: Datagram) -> list[Datagram | Anomaly]:
        data = pkt.payload
        out: list[Datagram | Anomaly] = []
        if len(data) < 12:
            return [Anomaly("sctp_truncated", pkt.ts, pkt.no, "common header", pkt.source)]
        key = (pkt.src, pkt.sport, pkt.dst, pkt.dport)
        at = 12
        while at + 4 <= len(data):  # every chunk moves at forward by >= 4 bytes
            ctype, flags, length = _CHUNK(data, at)
            if length < 4 or at + length > len(data):
                out.append(Anomaly("sctp_truncated", pkt.ts, pkt.no, f"chunk type {ctype} length {length}", pkt.source))
                break
            if ctype == 0 and length >= 16:
                tsn, sid, ssn, ppid = _DATA(data, at + 4)
                if self._duplicate(pkt, key, tsn, out):
                    self.retransmitted += 1
                elif ppid in NOT_SIP_PPIDS:
                    self.counters.skipped["sctp_not_sip_ppid"] += 1
                else:
                    self._data(pkt, key, flags, tsn, sid, ssn, data[at + 16 : at + length], out)
            at += length + (-length % 4)
        return out

    def _duplicate(self, pkt: Datagram, key: Key, tsn: int, out: list[Datagram | Anomaly]) -> bool:
        entry = self._seen.get(key)
        if entry is None:
            if len(self._seen) >= MAX_ASSOCIATIONS:
                self._seen.pop(next(iter(self._seen)))
                out.append(Anomaly("sctp_association_evicted", pkt.ts, pkt.no, "retransmission filter full", pkt.source))
            entry = self._seen[key] = (set(), deque())
        seen, order = entry
        if tsn in seen:
            return True
        seen.add(tsn)
        order.append(tsn)
        if len(order) > SEEN_TSNS:
            seen.discard(order.popleft())
        return False

    def _data(self, pkt: Datagram, key: Key, flags: int, tsn: int, sid: int, ssn: int,
              user: bytes, out: list[Datagram | Anomaly]) -> None:
        if flags & 0x03 == 0x03:  # B and E: the whole user message in one chunk
            self._message(pkt, user, out)
            return
        pkey = (key, sid, ssn if not flags & 0x04 else None)
        entry = self._partial.get(pkey)
        if entry is None:
            while len(self._partial) >= MAX_PARTIAL:
                self._partial.pop(next(iter(self._partial)))
                out.append(Anomaly("sctp_incomplete_message", pkt.ts, pkt.no, "evicted", pkt.source))
            entry = self._partial[pkey] = _Partial(pkt.ts)
        parts = entry.parts
        old = parts.get(tsn)
        entry.size += len(user) - (len(old[1]) if old is not None else 0)
        parts[tsn] = (flags, user)
        if entry.size > self.max_message:
            del self._partial[pkey]
            out.append(Anomaly("sctp_message_too_long", pkt.ts, pkt.no,
                               f"{len(parts)} fragments, more than {self.max_message} bytes (limits.max_sip_message)",
                               pkt.source))
            return
        first = next((t for t, (f, _) in parts.items() if f & 0x02), None)
        last = next((t for t, (f, _) in parts.items() if f & 0x01), None)
        if first is None or last is None:
            return
        n = serial_diff(last, first)
        if n < 0:  # the end before the beginning: no user message can be built from these
            del self._partial[pkey]
            out.append(Anomaly("sctp_bad_fragments", pkt.ts, pkt.no, f"E fragment TSN {last} before B TSN {first}",
                               pkt.source))
            return
        if n + 1 > len(parts):  # fragments still missing; the range is walked only once it can be whole
            return
        tsns = [(first + i) & 0xFFFFFFFF for i in range(n + 1)]
        if all(t in parts for t in tsns):
            del self._partial[pkey]
            self._message(pkt, b"".join(parts[t][1] for t in tsns), out)

    def _message(self, pkt: Datagram, user: bytes, out: list[Datagram | Anomaly]) -> None:
        """A whole user message: on to the SIP parser if it begins like SIP, else skipped and counted."""
        if looks_like_sip(user):
            out.append(Datagram(pkt.ts, pkt.no, Transport.SCTP, pkt.src, pkt.sport, pkt.dst, pkt.dport,
                                user, pkt.encap, pkt.source, pkt.ipid))
        else:
            self.counters.skipped["sctp_not_sip"] += 1

    def advance(self, now: float) -> list[Anomaly]:
        out: list[Anomaly] = []
        for pkey, entry in list(self._partial.items()):
            if now - entry.since > FRAGMENT_TIMEOUT:
                del self._partial[pkey]
                out.append(Anomaly("sctp_incomplete_message", now, 0, "timed out"))
        return out

    def finish(self) -> list[Anomaly]:
        out = [Anomaly("sctp_incomplete_message", e.since, 0, "end of input") for e in self._partial.values()]
        self._partial.clear()
        return out
