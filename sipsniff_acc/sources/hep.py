"""HEP (Homer Encapsulation Protocol, "EEP") in: what Kamailio ``siptrace``, OpenSIPS ``proto_hep``,
FreeSWITCH, Asterisk ``res_hep`` and heplify send to a Homer collector, as a source beside files
and interfaces (``--hep-listen udp://ADDR:PORT`` or ``tcp://ADDR:PORT``, several allowed).

Why ``Datagram``s and not frames: a HEP packet carries one whole SIP message (over TCP too: the
sender frames it) with its addresses, ports and transport, so the capture stage (link decode,
IP reassembly, TCP framing) has nothing to do; the SIP stage takes it as it takes a message
framed out of a TCP stream. ``Datagram.encap`` is ``("hep3",)`` (or hep2/hep1) and
``Datagram.source`` ``"hep:<capture agent id>"``: records made from it name the agent
(``capture_agent`` in JSON lines).

What real senders do (``../shared/hep-notes.md``, Kamailio 5.6): the order of the datagrams
is not the wire's, a reply may come before its request, and timestamps are 0-4.6 ms late.
So messages wait in a bounded reorder buffer and go out in HEP-timestamp order once they are
``reorder`` seconds old on the sender's clock (estimated from the newest packet); one that
comes after a later one was released is delivered at once and counted (``hep_reorder_late``);
past ``max_held`` the oldest goes early (``hep_reorder_overflow``). In silence an ``Idle``
heartbeat carries the sender's estimated clock, so timers fire as with a live capture.
A reply stamped before its request (Kamailio reads its clock for a sent message once it is
sent: over TCP the callee's 180 was stamped before the forwarded INVITE) waits for that
request, bounded by the same window, and goes right after it (``RequestFirst``).

Every packet is bounded by what arrived: each length (the packet's, each chunk's) is checked
against the bytes received, at most ``MAX_CHUNKS`` chunks, a compressed payload is inflated
to at most ``max_payload`` bytes. Bad packets (truncated, unknown version, malformed chunks,
wrong or missing ``--hep-password``) are counted per reason (``Counters.skipped["hep_<reason>"]``:
--stats, the summary and /metrics) and dropped; nothing a sender does raises past ``decode``
but ``HepError``.
"""

from __future__ import annotations

import bisect
import hmac
import os
import re
import heapq
import select
import socket
import struct
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from sipsniff_acc.events import CaptureGap, Counters, Datagram, Idle, Transport

HEP3_MAGIC: Final = b"HEP3"
MAX_CHUNKS: Final = 128  #: Kamailio sends 12 chunks, heplify ~15; a packet of 6-byte chunks could hold 10,000
MAX_PACKET: Final = 65535  #: the HEPv3 length field is 16 bits; a UDP datagram cannot be longer either
DEFAULT_MAX_PAYLOAD: Final = 1 << 20  #: limits.max_sip_message's default
DEFAULT_REORDER: Final = 0.05  #: seconds a message waits for earlier ones (hep-notes: 0-4.6 ms late, swaps within ms)
MAX_REORDER: Final = 10.0
MAX_HELD: Final = 65536  #: messages the reorder buffer holds at most (then the oldest goes early, counted)
MAX_TCP_CONNECTIONS: Final = 256  #: senders connected at once over TCP (then the idlest goes, counted)
IDLE_AFTER: Final = 0.1  #: seconds without a message before an Idle heartbeat (as the live capture)
UDP_BURST: Final = 256  #: datagrams read from one socket before looking at the others
RCVBUF: Final = 4 << 20  #: asked of the kernel for each UDP socket (a burst of a busy proxy)
DROPS_EVERY: Final = 1.0  #: seconds between two reads of the kernel's drop counters of our UDP sockets
MAX_CLOCK_JUMP: Final = 300.0  #: seconds a packet's HEP time may be off the senders' clock (else set aside)
CLOCK_SAMPLES: Final = 15  #: recent packets whose clock offsets vote for the senders' clock (the median)

#: HEPv3 chunk types of vendor 0 (the generic chunks; RFC-like spec at github.com/sipcapture/HEP)
IP_FAMILY, IP_PROTO, SRC4, DST4, SRC6, DST6, SPORT, DPORT, TS_SEC, TS_USEC, PROTO_TYPE, AGENT_ID, KEEPALIVE, \
    AUTH_KEY, PAYLOAD, ZPAYLOAD, CORRELATION = range(1, 18)
PROTO_SIP: Final = 1  #: chunk 11's value for SIP
AF_INET_HEP, AF_INET6_HEP = 2, 10  #: the family values senders write (Linux's AF_INET/AF_INET6)
_TRANSPORT = {17: Transport.UDP, 6: Transport.TCP, 132: Transport.SCTP}
_IP_PROTO = {Transport.UDP: 17, Transport.TCP: 6, Transport.SCTP: 132, Transport.TLS: 6, Transport.WS: 6}
_IP_PROTO_BY_NAME: dict[object, int] = {**{t: n for t, n in _IP_PROTO.items()}, **{t.value: n for t, n in _IP_PROTO.items()}}
#: fixed chunk body sizes (any other length is a malformed chunk); AGENT_ID: some senders use 16 bits
_FIXED = {IP_FAMILY: (1,), IP_PROTO: (1,), SRC4: (4,), DST4: (4,), SRC6: (16,), DST6: (16,), SPORT: (2,),
          DPORT: (2,), TS_SEC: (4,), TS_USEC: (4,), PROTO_TYPE: (1,), AGENT_ID: (4, 2), KEEPALIVE: (2,)}

_H3 = struct.Struct(">4sH")
#: the IPv4 chunks before the auth key, in one struct (encode's fast path)
_V4_HEAD = struct.Struct(">4sH" "HHHB" "HHHB" "HHH4s" "HHH4s" "HHHH" "HHHH" "HHHI" "HHHI" "HHHB" "HHHI")
_CHUNK = struct.Struct(">HHH")
_V2 = struct.Struct(">BBBBHH")
_V2TIME = struct.Struct("<IIH")  #: hep_timehdr is written in the sender's byte order (little-endian on x86)


class HepError(Exception):
    """A HEP packet we cannot take; ``reason`` is a stable snake_case name (the counter's)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


#: every reason decode() and the listener count (``hep_`` + reason in Counters.skipped)
REASONS: Final = ("truncated", "bad_version", "bad_length", "bad_chunk", "too_many_chunks", "missing_chunk",
                  "bad_family", "decompress", "too_big", "auth_missing", "auth_wrong", "not_sip", "keepalive",
                  "tcp_evicted", "held_at_stop", "kernel_drops", "bad_time")


@dataclass(slots=True)
class HepPacket:
    """A decoded HEP packet (v1/v2/v3). ``ts`` is None only for HEPv1 (no time header)."""

    version: int
    family: int  #: 4 or 6
    proto: int  #: IP protocol: 17 UDP, 6 TCP, 132 SCTP
    src: bytes
    dst: bytes
    sport: int
    dport: int
    ts: float | None
    payload: bytes
    proto_type: int = PROTO_SIP
    agent_id: int | None = None
    auth_key: bytes | None = None
    correlation_id: bytes | None = None
    ts_sec: int = 0
    ts_usec: int = 0


def decode(data: bytes, max_payload: int = DEFAULT_MAX_PAYLOAD) -> HepPacket:
    """One HEP packet from ``data`` (a datagram, or a frame cut out of a TCP stream by
    ``hep3_length``); raises ``HepError`` and nothing else whatever the bytes."""
    if len(data) < 4:
        raise HepError("truncated", f"{len(data)} bytes")
    if data[:4] == HEP3_MAGIC:
        return _decode3(data, max_payload)
    if data[0] in (1, 2):
        return _decode2(data, max_payload)
    raise HepError("bad_version", repr(bytes(data[:4])))


def _decode3(data: bytes, max_payload: int) -> HepPacket:
    n = len(data)
    if n < 6:
        raise HepError("truncated", f"{n} bytes")
    total = _H3.unpack_from(data)[1]
    if total > n:
        raise HepError("truncated", f"length field {total}, {n} bytes arrived")
    if total < 6:
        raise HepError("bad_length", f"length field {total}")
    fam = proto = sport = dport = sec = usec = -1
    src4 = dst4 = src6 = dst6 = payload = auth = corr = None
    ptype = PROTO_SIP
    agent: int | None = None
    zipped = False
    pos, chunks = 6, 0
    unpack = _CHUNK.unpack_from
    while pos < total:
        if pos + 6 > total:
            raise HepError("bad_chunk", f"{total - pos} bytes left for a 6-byte chunk header")
        vendor, ctype, clen = unpack(data, pos)
        if clen < 6 or pos + clen > total:
            raise HepError("bad_chunk", f"chunk {vendor}/{ctype} length {clen} at {pos} of {total}")
        chunks += 1
        if chunks > MAX_CHUNKS:
            raise HepError("too_many_chunks", f"more than {MAX_CHUNKS}")
        if vendor == 0:
            body = data[pos + 6:pos + clen]
            size = clen - 6
            if ctype in _FIXED and size not in _FIXED[ctype]:
                raise HepError("bad_chunk", f"chunk {ctype} of {size} bytes")
            if ctype == PAYLOAD:
                payload, zipped = bytes(body), False
            elif ctype == ZPAYLOAD:
                payload, zipped = bytes(body), True
            elif ctype == IP_FAMILY:
                fam = body[0]
            elif ctype == IP_PROTO:
                proto = body[0]
            elif ctype == SRC4:
                src4 = bytes(body)
            elif ctype == DST4:
                dst4 = bytes(body)
            elif ctype == SRC6:
                src6 = bytes(body)
            elif ctype == DST6:
                dst6 = bytes(body)
            elif ctype == SPORT:
                sport = int.from_bytes(body, "big")
            elif ctype == DPORT:
                dport = int.from_bytes(body, "big")
            elif ctype == TS_SEC:
                sec = int.from_bytes(body, "big")
            elif ctype == TS_USEC:
                usec = int.from_bytes(body, "big")
            elif ctype == PROTO_TYPE:
                ptype = body[0]
            elif ctype == AGENT_ID:
                agent = int.from_bytes(body, "big")
            elif ctype == AUTH_KEY:
                auth = bytes(body)
            elif ctype == CORRELATION:
                corr = bytes(body)
            # KEEPALIVE and the types we do not use (VLAN, agent name, ...): skipped
        pos += clen  # vendor chunks (vendor id != 0): skipped whole
    if payload is None:
        if chunks and fam == -1 and sport == -1:
            raise HepError("keepalive", "no payload")
        raise HepError("missing_chunk", "no payload")
    if fam == AF_INET_HEP:
        src, dst, family = src4, dst4, 4
    elif fam == AF_INET6_HEP:
        src, dst, family = src6, dst6, 6
    elif fam == -1:
        raise HepError("missing_chunk", "no IP family")
    else:
        raise HepError("bad_family", f"IP family {fam}")
    if src is None or dst is None or sport < 0 or dport < 0:
        raise HepError("missing_chunk", "addresses or ports")
    if sec < 0:
        raise HepError("missing_chunk", "timestamp")
    if usec >= 1_000_000:
        raise HepError("bad_chunk", f"{usec} microseconds")
    if zipped:
        payload = _inflate(payload, max_payload)
    elif len(payload) > max_payload:
        raise HepError("too_big", f"{len(payload)} bytes")
    return HepPacket(3, family, proto, src, dst, sport, dport, sec + max(usec, 0) / 1e6, payload, ptype, agent,
                     auth, corr, sec, max(usec, 0))


def _inflate(data: bytes, max_payload: int) -> bytes:
    """A zlib payload (chunk 16), inflated to at most ``max_payload`` bytes: a bomb is refused
    after ``max_payload`` bytes of work, not after it filled the memory."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, max_payload + 1)
    except zlib.error as e:
        raise HepError("decompress", str(e)) from None
    if len(out) > max_payload or d.unconsumed_tail:
        raise HepError("too_big", f"inflates past {max_payload} bytes")
    if not d.eof:
        raise HepError("decompress", "incomplete zlib stream")
    return out


def _decode2(data: bytes, max_payload: int) -> HepPacket:
    """HEPv1/v2: ``struct hep_hdr`` (version, header length, family, protocol, ports), the
    addresses, and for v2 ``struct hep_timehdr`` (seconds, microseconds, capture id)."""
    n = len(data)
    if n < 8:
        raise HepError("truncated", f"{n} bytes")
    version, hlen, fam, proto, sport, dport = _V2.unpack_from(data)
    if fam == AF_INET_HEP:
        size, family = 4, 4
    elif fam == AF_INET6_HEP:
        size, family = 16, 6
    else:
        raise HepError("bad_family", f"IP family {fam}")
    if hlen != 8 + 2 * size:
        raise HepError("bad_length", f"header length {hlen} for IPv{family}")
    pos = hlen + (10 if version == 2 else 0)
    if n < pos:
        raise HepError("truncated", f"{n} bytes, header needs {pos}")
    src, dst = data[8:8 + size], data[8 + size:8 + 2 * size]
    ts: float | None = None
    agent: int | None = None
    sec = usec = 0
    if version == 2:
        sec, usec, agent = _V2TIME.unpack_from(data, hlen)
        if usec >= 1_000_000:
            raise HepError("bad_length", f"{usec} microseconds")
        ts = sec + usec / 1e6
    payload = bytes(data[pos:])
    if len(payload) > max_payload:
        raise HepError("too_big", f"{len(payload)} bytes")
    if not payload:
        raise HepError("missing_chunk", "no payload")
    return HepPacket(version, family, proto, bytes(src), bytes(dst), sport, dport, ts, payload, PROTO_SIP, agent,
                     None, None, sec, usec)


def hep3_length(buf: bytes | bytearray) -> int:
    """The length of the HEPv3 packet at the start of a TCP buffer, 0 if fewer than 6 bytes
    are there, -1 if the buffer does not start with ``HEP3`` (the stream must resync)."""
    if len(buf) < 6:
        return 0 if HEP3_MAGIC.startswith(bytes(buf[:4])) else -1
    if buf[:4] != HEP3_MAGIC:
        return -1
    return int.from_bytes(buf[4:6], "big")


def split_stream(buf: bytearray) -> tuple[list[bytes], list[str]]:
    """The whole HEPv3 packets at the start of a TCP buffer, taken out of it (a partial one
    stays), and the reasons of what was skipped: bytes that are not a packet are skipped to
    the next ``HEP3`` (one ``bad_version``/``bad_length`` per skip). Every step removes at
    least one byte or stops: no input makes it loop."""
    packets: list[bytes] = []
    bad: list[str] = []
    while True:
        n = hep3_length(buf)
        if n == 0:
            break
        if n < 6:  # not HEP3 here (-1), or a length shorter than its own header
            bad.append("bad_version" if n < 0 else "bad_length")
            at = buf.find(HEP3_MAGIC, 1)
            del buf[:at if at > 0 else max(1, len(buf) - 3)]  # keep a tail that may begin "HEP3"
            continue
        if len(buf) < n:
            break
        packets.append(bytes(buf[:n]))
        del buf[:n]
    return packets, bad


def _chunk(ctype: int, body: bytes) -> bytes:
    return _CHUNK.pack(0, ctype, 6 + len(body)) + body


def encode(ts: float, transport: Transport | str | int, src: bytes, sport: int, dst: bytes, dport: int,
           payload: bytes, agent_id: int = 0, password: bytes | None = None,
           correlation_id: bytes | None = None, compress: bool = False) -> bytes:
    """A HEPv3 packet, chunks in Kamailio siptrace's order (family, protocol, addresses,
    ports, seconds, microseconds, protocol type SIP, agent id, auth key, payload), with a
    correlation id when given. ``transport``: a Transport, its text, or an IP protocol number.
    Raises ValueError when the packet would pass the 16-bit length."""
    proto = transport if isinstance(transport, int) else _IP_PROTO_BY_NAME.get(transport, 17)
    six = len(src) == 16
    sec = int(ts)
    usec = min(999_999, max(0, round((ts - sec) * 1e6)))
    if correlation_id is None and not compress and not six and len(src) == 4 and len(dst) == 4:
        # the common case in one pack (3.1 -> ~1 µs a message): Kamailio's chunk set for IPv4
        tail = (b"" if password is None else _chunk(AUTH_KEY, password)) + _CHUNK.pack(0, PAYLOAD, 6 + len(payload))
        total = _V4_HEAD.size + len(tail) + len(payload)
        if total > MAX_PACKET:
            raise ValueError(f"a HEP packet of {total} bytes passes the 16-bit length")
        return _V4_HEAD.pack(
            HEP3_MAGIC, total, 0, IP_FAMILY, 7, AF_INET_HEP, 0, IP_PROTO, 7, proto & 0xFF, 0, SRC4, 10, src,
            0, DST4, 10, dst, 0, SPORT, 8, sport, 0, DPORT, 8, dport, 0, TS_SEC, 10, sec & 0xFFFFFFFF,
            0, TS_USEC, 10, usec, 0, PROTO_TYPE, 7, PROTO_SIP, 0, AGENT_ID, 10, agent_id & 0xFFFFFFFF) + tail + payload
    parts = [
        _chunk(IP_FAMILY, bytes((AF_INET6_HEP if six else AF_INET_HEP,))), _chunk(IP_PROTO, bytes((proto & 0xFF,))),
        _chunk(SRC6 if six else SRC4, src), _chunk(DST6 if six else DST4, dst),
        _chunk(SPORT, sport.to_bytes(2, "big")), _chunk(DPORT, dport.to_bytes(2, "big")),
        _chunk(TS_SEC, (sec & 0xFFFFFFFF).to_bytes(4, "big")), _chunk(TS_USEC, usec.to_bytes(4, "big")),
        _chunk(PROTO_TYPE, bytes((PROTO_SIP,))), _chunk(AGENT_ID, (agent_id & 0xFFFFFFFF).to_bytes(4, "big")),
    ]
    if password is not None:
        parts.append(_chunk(AUTH_KEY, password))
    if correlation_id is not None:
        parts.append(_chunk(CORRELATION, correlation_id))
    parts.append(_chunk(ZPAYLOAD, zlib.compress(payload)) if compress else _chunk(PAYLOAD, payload))
    body = b"".join(parts)
    if len(body) + 6 > MAX_PACKET:
        raise ValueError(f"a HEP packet of {len(body) + 6} bytes passes the 16-bit length")
    return _H3.pack(HEP3_MAGIC, len(body) + 6) + body


# --- the reorder buffer (pure: the caller gives the times) ---------------------------------


class ReorderBuffer:
    """Messages in, in HEP-timestamp order out once ``window`` seconds old on the sender's
    clock. ``late``: released after a later message had gone (delivered all the same);
    ``overflow``: released early because ``max_held`` were waiting."""

    def __init__(self, window: float = DEFAULT_REORDER, max_held: int = MAX_HELD) -> None:
        self.window = window
        self.max_held = max_held
        self._heap: list[tuple[float, int, Datagram]] = []
        self._seq = 0
        self.released = float("-inf")  #: the timestamp of the newest message released
        self.late = 0
        self.overflow = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, d: Datagram) -> list[Datagram]:
        """Hold ``d``; returns what the bound forces out (in order)."""
        self._seq += 1
        heapq.heappush(self._heap, (d.ts, self._seq, d))
        out: list[Datagram] = []
        while len(self._heap) > self.max_held:
            self.overflow += 1
            out.append(self._pop())
        return out

    def due(self, now: float) -> list[Datagram]:
        """What is at least ``window`` old at ``now`` (the sender's clock), oldest first."""
        out: list[Datagram] = []
        limit = now - self.window
        heap = self._heap
        while heap and heap[0][0] <= limit:
            out.append(self._pop())
        return out

    def drain(self) -> list[Datagram]:
        out: list[Datagram] = []
        while self._heap:
            out.append(self._pop())
        return out

    def _pop(self) -> Datagram:
        ts, _seq, d = heapq.heappop(self._heap)
        if ts < self.released:
            self.late += 1
        else:
            self.released = ts
        return d


#: the top Via's branch and the CSeq method of a raw SIP message (RequestFirst's key), without a parse
_BRANCH = re.compile(rb"\n(?:via|v)[ \t]*:[^\n]*?;[ \t]*branch[ \t]*=[ \t]*([^;,\s]+)", re.IGNORECASE)
_CSEQ_METHOD = re.compile(rb"\n(?:cseq)[ \t]*:[ \t]*\d+[ \t]+([!-~]+)", re.IGNORECASE)
MAX_BRANCHES: Final = 65536  #: requests remembered for RequestFirst (the oldest forgotten first)


class RequestFirst:
    """A reply released before its request (same top-Via branch and CSeq method) waits for it,
    at most ``hold`` seconds of HEP time, and goes right after it.

    Why: Kamailio stamps a message it sends once sent and one it receives once read, so over
    TCP the callee's 180 carried an earlier HEP time than the INVITE the proxy had forwarded
    (hep-notes): sorting by time cannot put them back. Pure: the caller gives the times.
    ``matched``: replies put after their request; ``expired``: held ``hold`` seconds and let go
    without one (a request this agent never saw: normal for a partial view, only delayed)."""

    def __init__(self, hold: float, max_branches: int = MAX_BRANCHES, max_held: int = MAX_HELD) -> None:
        self.hold = hold
        self.max_branches, self.max_held = max_branches, max_held
        self._requests: dict[tuple[bytes, bytes], None] = {}  #: insertion order: the oldest first
        #: replies held, by key, by their number here: found and taken out in O(1) (a list made a
        #: flood of 65,536 replies of one key cost 30 s of CPU: each expiry scanned the list)
        self._waiting: dict[tuple[bytes, bytes], dict[int, Datagram]] = {}
        self._deadlines: deque[tuple[float, tuple[bytes, bytes], Datagram, int]] = deque()
        self._seq = 0
        self.held = 0
        self.matched = 0
        self.expired = 0

    def oldest(self) -> float | None:
        """The HEP time of the oldest reply held (the stream's time may not pass it)."""
        q = self._deadlines
        while q and not self._is_held(q[0][1], q[0][3]):
            q.popleft()  # released after its request: its deadline goes too
        return q[0][2].ts if q else None

    def _is_held(self, key: tuple[bytes, bytes], seq: int) -> bool:
        waiting = self._waiting.get(key)
        return waiting is not None and seq in waiting

    def feed(self, items: list[Datagram]) -> list[Datagram]:
        if self.hold <= 0:
            return items
        out: list[Datagram] = []
        for d in items:
            payload = d.payload
            m = _BRANCH.search(payload)
            c = _CSEQ_METHOD.search(payload)
            if m is None or c is None:
                out.append(d)
                continue
            key = (m.group(1), c.group(1).upper())
            if payload[:8] == b"SIP/2.0 ":
                if key in self._requests or self.held >= self.max_held:
                    out.append(d)
                    continue
                self._seq += 1
                self._waiting.setdefault(key, {})[self._seq] = d
                self._deadlines.append((d.ts + self.hold, key, d, self._seq))
                self.held += 1
                continue
            out.append(d)
            if key not in self._requests:
                self._requests[key] = None
                if len(self._requests) > self.max_branches:
                    del self._requests[next(iter(self._requests))]
            waiting = self._waiting.pop(key, None)
            if waiting:
                out += waiting.values()
                self.matched += len(waiting)
                self.held -= len(waiting)
        return out

    def due(self, now: float) -> list[Datagram]:
        """Replies held past their time without their request, oldest first."""
        out: list[Datagram] = []
        q = self._deadlines
        while q and (q[0][0] <= now or not self._is_held(q[0][1], q[0][3])):
            _t, key, d, seq = q.popleft()
            waiting = self._waiting.get(key)
            if waiting is not None and waiting.pop(seq, None) is not None:
                if not waiting:
                    del self._waiting[key]
                out.append(d)
                self.expired += 1
                self.held -= 1
        return out

    def drain(self) -> list[Datagram]:
        return self.due(float("inf"))


# --- the listener --------------------------------------------------------------------------


class HepUsageError(ValueError):
    """A --hep-listen/--hep-out mistake found before the work: one line, exit 2."""


MAX_PASSWORD: Final = 256  #: bytes of --hep-password (it rides in every packet, beside a 16-bit total length)


def check_password(password: str | bytes | None) -> bytes | None:
    """--hep-password as the bytes of the auth key chunk. Empty (an unset variable in a unit
    file) dropped every packet of a real sender as ``auth_missing``; 70,000 bytes made each
    --hep-out packet pass HEP's 16-bit length (a traceback). Both are one line before the work."""
    if password is None:
        return None
    raw = password.encode() if isinstance(password, str) else bytes(password)
    if not raw:
        raise HepUsageError("--hep-password is empty: give the password, or leave the option out for none")
    if len(raw) > MAX_PASSWORD:
        raise HepUsageError(f"--hep-password: {len(raw)} bytes; at most {MAX_PASSWORD}")
    return raw


def parse_url(url: str, option: str = "--hep-listen") -> tuple[str, str, int]:
    """'udp://ADDR:PORT' or 'tcp://[v6]:PORT' -> (scheme, host, port)."""
    form = f"{option} {url!r}: use udp://ADDR:PORT or tcp://ADDR:PORT (e.g. udp://0.0.0.0:9060)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise HepUsageError(form) from None
    if parts.username is not None or parts.password is not None:
        raise HepUsageError(f"{option}: no user or password in the URL; give the password with --hep-password")
    if parts.scheme not in ("udp", "tcp") or not parts.hostname or port is None or parts.path not in ("", "/") \
            or parts.query or parts.username is not None:
        raise HepUsageError(form)
    low = 0 if option == "--hep-listen" else 1  # a listener may let the kernel choose (the start line says which)
    if not low <= port < 65536:
        raise HepUsageError(f"{option} {url!r}: the port must be {low} to 65535")
    return parts.scheme, parts.hostname, port


class _Conn:
    __slots__ = ("sock", "buf", "peer", "since", "good")

    def __init__(self, sock: socket.socket, peer: str, since: float) -> None:
        self.sock, self.buf, self.peer = sock, bytearray(), peer
        self.since = since  #: when it was accepted (monotonic)
        self.good = 0.0  #: when it last brought a packet we took (0: never)

    def rank(self) -> tuple[bool, float]:
        """The first to go when the connections are all taken: one that never brought a packet
        we took (the oldest first), then the one idle the longest."""
        return (self.good > 0, self.good or self.since)


class HepListener:
    """HEP packets from UDP and TCP sockets, yielded as ``Datagram``s in HEP-timestamp order
    (``ReorderBuffer``) with ``Idle`` heartbeats in silence; until ``count`` packets,
    ``duration`` seconds, or a stop (SIGTERM/SIGINT raise from the wait, stopping.py).

    The sockets are bound here, so an address that is taken or not ours is a usage error
    before the work starts. ``counters`` (the run's, set by the caller) gets ``frames`` and
    ``bytes`` per HEP packet and the drops per reason in ``skipped["hep_<reason>"]`` (the
    kernel's own drops on our UDP sockets too, also yielded as a ``CaptureGap``);
    ``anomalies["hep_reorder_late"/"hep_reorder_overflow"/"hep_reply_before_request"/
    "hep_reply_hold_expired"]`` count what the order repairs did.

    The API other commands use (``capture --hep-listen``): construct, set ``counters``,
    iterate (Datagram | Idle | CaptureGap), read ``stats_doc()``/``summary_line()``."""

    def __init__(self, urls: list[str], password: str | bytes | None = None, reorder: float = DEFAULT_REORDER,
                 count: int | None = None, duration: float | None = None,
                 on_open: Callable[[str], None] | None = None, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 max_held: int = MAX_HELD, max_connections: int = MAX_TCP_CONNECTIONS) -> None:
        if not urls:
            raise HepUsageError("--hep-listen: give at least one udp://ADDR:PORT or tcp://ADDR:PORT")
        parsed = [parse_url(u) for u in urls]
        if len(set(parsed)) != len(parsed):
            raise HepUsageError("--hep-listen: an address is given twice")
        if count is not None and count < 1 or duration is not None and not duration > 0:
            raise HepUsageError("--count and --duration must be positive")
        if not 0 <= reorder <= MAX_REORDER:
            raise HepUsageError(f"--hep-reorder {reorder * 1000:g} ms: use 0 to {MAX_REORDER * 1000:g}")
        self.urls = list(urls)
        self.password = check_password(password)
        self.count, self.duration, self.on_open = count, duration, on_open
        self.max_payload, self.max_connections = max_payload, max_connections
        self.reorder = ReorderBuffer(reorder, max_held)
        self.first = RequestFirst(reorder, max_held=max_held)
        self.counters = Counters()  #: replaced by the run's counters (cli)
        self.agents: Counter[int] = Counter()  #: packets taken per capture agent id (the first 4096 agents)
        self.path = "hep:" + ",".join(urls)
        self.size = 0
        self._bytes = 0
        self.packets = 0  #: HEP packets received (good or not)
        self.udp: list[socket.socket] = []
        self.listeners: list[socket.socket] = []
        self.conns: dict[int, _Conn] = {}
        self._closed = False
        self._kernel_dropped = 0  #: the kernel's drop count on our UDP sockets at the last look
        self._got: list[Datagram] = []  #: read in this round, not yet in the reorder buffer
        self._out: deque[Any] = deque()  #: released, not yet handed on
        #: the offsets (HEP time - our wall clock) of the last packets, taken or not, oldest first;
        #: our own clock (0) votes first. Their median is the senders' clock: one packet cannot move it.
        self._offsets: deque[float] = deque([0.0], maxlen=CLOCK_SAMPLES)
        self._sorted: list[float] = [0.0]
        self.skew = 0.0  #: the senders' clock minus ours (the median of ``_offsets``)
        self._suspects: list[tuple[int, float, Datagram]] = []  #: (packet number, offset, message) off the clock
        try:
            for scheme, host, port in parsed:
                self._bind(scheme, host, port)
        except BaseException:
            self.close()
            raise
        self.opened_at = 0.0

    def _bind(self, scheme: str, host: str, port: int) -> None:
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM if scheme == "udp" else socket.SOCK_STREAM,
                                      flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV)
        except (OSError, UnicodeError) as e:
            raise HepUsageError(f"--hep-listen {scheme}://{host}:{port}: cannot resolve {host!r} "
                                f"({getattr(e, 'strerror', None) or e})") from None
        fam, typ, _p, _c, addr = info[0]
        s = socket.socket(fam, typ)
        try:
            if scheme == "tcp":  # a restart over connections in TIME_WAIT; never over a live listener
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # not on UDP: there SO_REUSEADDR let us bind beside a proxy's own socket on that port
            # (Kamailio sets it on its UDP listeners) and take its SIP from it, with no error
            if scheme == "udp":
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
                except OSError:
                    pass
            s.bind(addr)
            if scheme == "tcp":
                s.listen(128)
            s.setblocking(False)
        except OSError as e:
            s.close()
            raise HepUsageError(f"--hep-listen {scheme}://{host}:{port}: cannot listen: {e.strerror or e}") from None
        (self.udp if scheme == "udp" else self.listeners).append(s)

    # -- FrameSource protocol
    @property
    def bytes_read(self) -> int:
        return self._bytes

    def addresses(self) -> list[str]:
        """The bound addresses as URLs (a port 0 given is the one the kernel chose)."""
        out = []
        for s, scheme in [*((u, "udp") for u in self.udp), *((t, "tcp") for t in self.listeners)]:
            host, port = s.getsockname()[:2]
            out.append(f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}")
        return out

    def close(self) -> None:
        for s in [*self.udp, *self.listeners, *(c.sock for c in self.conns.values())]:
            try:
                s.close()
            except OSError:
                pass
        self.conns.clear()
        self._closed = True

    def summary_line(self) -> str:
        return summary_line(self)

    def stats_doc(self) -> dict[str, object]:
        return stats_doc(self)

    def _drop(self, reason: str) -> None:
        self.counters.skipped["hep_" + reason] += 1

    def _take(self, data: bytes) -> Datagram | None:
        """One packet's bytes: a Datagram, or None (counted)."""
        self.packets += 1
        c = self.counters
        c.frames += 1
        c.bytes += len(data)
        self._bytes += len(data)
        try:
            p = decode(data, self.max_payload)
        except HepError as e:
            self._drop(e.reason)
            return None
        if self.password is not None:
            if p.auth_key is None:
                self._drop("auth_missing")
                return None
            if not hmac.compare_digest(p.auth_key, self.password):
                self._drop("auth_wrong")
                return None
        if p.proto_type != PROTO_SIP:
            self._drop("not_sip")
            return None
        wall = time.time()
        ts = p.ts if p.ts is not None else wall  # HEPv1: no time header, the arrival is the best
        agent = p.agent_id
        if agent is not None and (agent in self.agents or len(self.agents) < 4096):
            self.agents[agent] += 1
        transport = _TRANSPORT.get(p.proto, Transport.UDP)
        d = Datagram(ts, self.packets, transport, p.src, p.sport, p.dst, p.dport, p.payload,
                     (f"hep{p.version}",), "" if agent is None else f"hep:{agent}")
        return self._on_time(d, ts - wall)

    def _on_time(self, d: Datagram, offset: float) -> Datagram | None:
        """``d`` if its HEP time (``offset`` seconds off our clock) agrees with the senders'
        clock within ``MAX_CLOCK_JUMP``, else None: ``d`` waits as a suspect.

        Why: the stream's time (the reorder buffer's releases, the Idles, every timer) follows
        the senders' clock; one packet stamped 2100 made every timer of every open call fire,
        one stamped 1970 held the reorder buffer until the next packet. The senders' clock is
        the median offset of the last ``CLOCK_SAMPLES`` packets (our own clock votes first),
        so one packet cannot move it. A suspect is taken (into this round's messages) once the
        vote comes round to it: a sender whose clock was stepped, or the first packets of a
        replayed capture, are followed after a few packets and none is lost; one still out
        after ``CLOCK_SAMPLES`` later packets, or at the end, is set aside (``hep_bad_time``)."""
        offsets, ranked = self._offsets, self._sorted
        if len(offsets) == offsets.maxlen:
            del ranked[bisect.bisect_left(ranked, offsets[0])]
        offsets.append(offset)
        bisect.insort(ranked, offset)
        n = len(ranked)
        if n & 1:
            self.skew = ranked[n >> 1]
        else:  # a tie: the side nearer our own clock
            lo, hi = ranked[(n >> 1) - 1], ranked[n >> 1]
            self.skew = lo if abs(lo) <= abs(hi) else hi
        skew = self.skew
        suspects = self._suspects
        if suspects:
            keep: list[tuple[int, float, Datagram]] = []
            for no, off, s in suspects:
                if abs(off - skew) <= MAX_CLOCK_JUMP:
                    self._got.append(s)
                elif self.packets - no >= CLOCK_SAMPLES:
                    self._drop("bad_time")
                else:
                    keep.append((no, off, s))
            suspects[:] = keep
        if abs(offset - skew) <= MAX_CLOCK_JUMP:
            return d
        suspects.append((self.packets, offset, d))
        return None

    def kernel_drops(self) -> int:
        """Datagrams the kernel dropped on our UDP sockets (their receive buffer was full):
        the ``drops`` column of /proc/net/udp{,6} for our sockets' inodes; 0 where there is none."""
        inodes = set()
        for s in self.udp:
            try:
                inodes.add(str(os.fstat(s.fileno()).st_ino))
            except OSError:
                pass
        total = 0
        for name in ("/proc/net/udp", "/proc/net/udp6"):
            try:
                with open(name) as f:
                    lines = f.read().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                cols = line.split()
                if len(cols) > 12 and cols[9] in inodes and cols[-1].isdigit():
                    total += int(cols[-1])
        return total

    def __iter__(self) -> Iterator[Datagram | Idle | CaptureGap]:
        if self._closed:
            raise RuntimeError("this HEP listener was closed: open a new one")
        try:
            yield from self._run()
        finally:
            held = (len(self.reorder) + self.first.held + len(self._got)
                    + sum(1 for x in self._out if x.__class__ is Datagram))
            if held:  # a stop: what was read but not handed on is not accounted, and said so
                self.counters.skipped["hep_held_at_stop"] += held
            if self._suspects:  # never agreed with the senders' clock
                self.counters.skipped["hep_bad_time"] += len(self._suspects)
                self._suspects.clear()
            self.close()

    def _gap(self, ts: float) -> CaptureGap | None:
        """Drops the kernel made since the last look, as the live capture reports its own:
        records of calls open then are marked capture_gaps; counted as ``hep_kernel_drops``."""
        total = self.kernel_drops()
        new, self._kernel_dropped = total - self._kernel_dropped, total
        if new <= 0:
            return None
        self.counters.skipped["hep_kernel_drops"] += new
        return CaptureGap(ts, self.path, new, "kernel")

    def _run(self) -> Iterator[Datagram | Idle | CaptureGap]:
        poller = select.poll()
        for s in [*self.udp, *self.listeners]:
            poller.register(s.fileno(), select.POLLIN)
        listeners = {s.fileno(): s for s in self.listeners}
        udp = {s.fileno(): s for s in self.udp}
        if self.on_open is not None:
            self.on_open(", ".join(self.addresses()))
        self.opened_at = clock = time.monotonic()
        next_drops = clock + DROPS_EVERY
        deadline = None if self.duration is None else clock + self.duration
        left = self.count
        idle_ts = float("-inf")  #: the last Idle's time (the stream's time never goes back)
        last_out = clock
        last_ts = float("-inf")
        reorder, first = self.reorder, self.first
        anomalies = self.counters.anomalies
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline or left is not None and left <= 0:
                break
            got = self._got  # read, not yet in the reorder buffer (counted if a stop cuts in)
            got.clear()
            wait = IDLE_AFTER
            if len(reorder):
                wait = min(wait, max(0.0, reorder._heap[0][0] + reorder.window - (time.time() + self.skew)))
            if first.oldest() is not None:
                wait = min(wait, max(0.0, first._deadlines[0][0] + reorder.window - (time.time() + self.skew)))
            if deadline is not None:
                wait = min(wait, deadline - now)
            events = poller.poll(max(0, int(wait * 1000) + 1))
            for fd, what in events:
                if fd in udp:
                    self._read_udp(udp[fd], got, left)
                elif fd in listeners:
                    self._accept(listeners[fd], poller)
                else:
                    self._read_tcp(fd, what, poller, got)
            if got:
                if left is not None:
                    left -= len(got)
            out: list[Datagram] = []
            for d in got:
                out += reorder.push(d)
            got.clear()
            late, over = reorder.late, reorder.overflow
            sender_now = time.time() + self.skew
            out += reorder.due(sender_now)
            matched, expired = first.matched, first.expired
            out = first.feed(out)
            out += first.due(sender_now - reorder.window)
            if first.matched != matched:
                anomalies["hep_reply_before_request"] += first.matched - matched
            if first.expired != expired:
                anomalies["hep_reply_hold_expired"] += first.expired - expired
            if reorder.late != late:
                anomalies["hep_reorder_late"] += reorder.late - late
            if reorder.overflow != over:
                anomalies["hep_reorder_overflow"] += reorder.overflow - over
            if self.udp and time.monotonic() >= next_drops:
                next_drops = time.monotonic() + DROPS_EVERY
                gap = self._gap(max(last_ts, out[-1].ts if out else last_ts))
                if gap is not None:
                    out.append(gap)  # type: ignore[arg-type]  # after what was read before the drops were seen
            if out:
                last_ts = max(last_ts, out[-1].ts)
                yield from self._hand_on(out)
                last_out = time.monotonic()
            elif time.monotonic() - last_out >= IDLE_AFTER:
                # the sender's clock, less the window: what is due was released, time never goes back
                # (nor past a reply still waiting for its request)
                held = first.oldest()
                now_ts = time.time() + self.skew - reorder.window
                idle_ts = max(idle_ts, last_ts, now_ts if held is None else min(now_ts, held))
                yield Idle(idle_ts)
                last_out = time.monotonic()
        late, expired_before = reorder.late, first.expired
        rest: list[Datagram | CaptureGap] = [*first.feed(reorder.drain()), *first.drain()]
        if first.expired != expired_before:
            anomalies["hep_reply_hold_expired"] += first.expired - expired_before
        if reorder.late != late:
            anomalies["hep_reorder_late"] += reorder.late - late
        if self.udp and (gap := self._gap(max([last_ts, *(d.ts for d in rest)]))) is not None:
            rest.append(gap)
        yield from self._hand_on(rest)

    def _hand_on(self, items: list[Any]) -> Iterator[Any]:
        """Yield ``items``; what a stop leaves unyielded stays in ``_out`` (counted at the end)."""
        pending = self._out
        pending.extend(items)
        while pending:
            yield pending.popleft()

    def _read_udp(self, s: socket.socket, got: list[Datagram], left: int | None) -> None:
        for _ in range(UDP_BURST if left is None else max(1, min(UDP_BURST, left - len(got)))):
            try:
                data = s.recv(MAX_PACKET + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # an ICMP error queued on the socket: nothing to read
            d = self._take(data)
            if d is not None:
                got.append(d)

    def _accept(self, ls: socket.socket, poller: select.poll) -> None:
        try:
            s, peer = ls.accept()
        except (BlockingIOError, InterruptedError, OSError):
            return
        if len(self.conns) >= self.max_connections:
            # all taken: the newcomer gets the slot of the one that never brought a packet we
            # took (or idle the longest); refusing it let 256 half-packets held open (slowloris,
            # no password needed) shut every real sender out for good
            fd, old = min(self.conns.items(), key=lambda kv: kv[1].rank())
            self._drop("tcp_evicted")
            if old.buf:
                self._drop("truncated")
            poller.unregister(fd)
            old.sock.close()
            del self.conns[fd]
        s.setblocking(False)
        self.conns[s.fileno()] = _Conn(s, str(peer), time.monotonic())
        poller.register(s.fileno(), select.POLLIN)

    def _read_tcp(self, fd: int, what: int, poller: select.poll, got: list[Datagram]) -> None:
        conn = self.conns.get(fd)
        if conn is None:
            return
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        buf = conn.buf
        buf += data
        packets, bad = split_stream(buf)
        for reason in bad:
            self._drop(reason)
        for pkt in packets:
            d = self._take(pkt)
            if d is not None:
                got.append(d)
                conn.good = time.monotonic()
        if not data:  # closed by the sender (or reset): a partial packet left is truncated
            if buf:
                self._drop("truncated")
            poller.unregister(fd)
            conn.sock.close()
            del self.conns[fd]


def reasons_of(counters: Counters) -> dict[str, int]:
    """The HEP drops of a run, by reason (from Counters.skipped)."""
    return {k[4:]: n for k, n in sorted(counters.skipped.items()) if k.startswith("hep_")}


def summary_line(listener: HepListener) -> str:
    """The summary's HEP line: packets, agents, drops by reason, the reorder bound."""
    c = listener.counters
    drops = reasons_of(c)
    agents = ", ".join(f"{a}: {n}" for a, n in listener.agents.most_common(8))
    more = f" and {len(listener.agents) - 8} more" if len(listener.agents) > 8 else ""
    line = (f"  hep {', '.join(listener.urls)}: {listener.packets} packets; by capture agent: {agents or 'none'}{more}; "
            f"dropped: {', '.join(f'{k} {n}' for k, n in drops.items()) or 'none'}; "
            f"reorder window {listener.reorder.window * 1000:g} ms: {listener.reorder.late} late, "
            f"{listener.reorder.overflow} released early, {listener.first.matched} replies put after their request, "
            f"{listener.first.expired} without one")
    return line


def stats_doc(listener: HepListener) -> dict[str, object]:
    """--stats' "hep" part."""
    return {"hep": {"listen": listener.urls, "packets": listener.packets,
                    "agents": {str(a): n for a, n in listener.agents.items()},
                    "dropped": reasons_of(listener.counters), "reorder_window_ms": listener.reorder.window * 1000,
                    "reorder_late": listener.reorder.late, "reorder_overflow": listener.reorder.overflow,
                    "replies_after_request": listener.first.matched, "replies_without_request": listener.first.expired}}


__all__ = ["HepError", "HepListener", "HepPacket", "HepUsageError", "ReorderBuffer", "decode", "encode",
           "hep3_length", "parse_url", "stats_doc", "summary_line", "REASONS"]
