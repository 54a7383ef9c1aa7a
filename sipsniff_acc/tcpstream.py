"""TCP reassembly and SIP framing (RFC 3261 §18.3), per connection and direction.

A passive observer sees what the endpoints sent, not what they received, and may see it
partly: the capture can start mid-stream, segments can be lost, duplicated (retransmitted
or mirrored twice), reordered or overlapping. Per direction we keep the next expected
sequence number, the contiguous bytes not yet framed, and out-of-order segments. Framing
cuts messages by Content-Length (mandatory over TCP); CRLF keep-alives between messages
(RFC 5626 §4.4.1) are counted and skipped. Each message carries the timestamp and frame
number of the segment that completed it.

Losing sync (a gap, garbage, a capture that starts inside a message) is repaired by
searching for the next SIP start line. A stream that never looks like SIP is given up
cheaply: after ``NOT_SIP_BYTES`` with no start line its later segments cost one dict lookup.
WebSocket streams (RFC 6455/7118: HTTP upgrade, or frames seen mid-stream) are unwrapped
by ``wsframe``; TLS streams are recognised by their record header and only counted.

Every buffer is bounded (per stream and in total); idle streams are dropped on packet time.
A message is at most ``max_message`` bytes (rules.yaml ``limits: max_sip_message``, 1 MiB by
default: RFC 3261 sets no limit over TCP); a direction holds at most twice that (a message in
progress and the start of the next), and never less than ``MAX_STREAM_BUFFER``.
No number a segment claims sizes a loop or an ``int()``: a Content-Length of more than
``MAX_DIGITS`` significant digits is a message too long, and out-of-order segments held
per direction are bounded in count as well as bytes (issue 10).
"""

from __future__ import annotations

import re
import struct
from enum import Enum
from typing import Final

from sipsniff_acc import wsframe
from sipsniff_acc.events import Anomaly, Counters, Datagram, Transport
from sipsniff_acc.limits import DEFAULT_MAX_SIP_MESSAGE

_TCP = struct.Struct("!HHIIBB").unpack_from

MAX_MESSAGE: Final = DEFAULT_MAX_SIP_MESSAGE  #: default bound on one SIP message (limits.max_sip_message)
MAX_STREAM_BUFFER: Final = 1 << 20  #: VoIPmonitor's sip_tcp_reassembly_stream_max_length is of this order
MAX_TOTAL_BUFFER: Final = 256 << 20  #: all streams together; the oldest stream is dropped beyond it
MAX_STREAMS: Final = 200_000  #: directions tracked at once (a busy SBC has tens of thousands)
GAP_WAIT: Final = 1.0  #: seconds (packet time) an out-of-order hole may stay open before it is a loss
IDLE_TIMEOUT: Final = 300.0  #: a direction silent this long is forgotten (it resyncs if it comes back)
IDLE_SWEEP: Final = 30.0  #: how often (packet time) idle directions are looked for
NOT_SIP_BYTES: Final = 16384  #: bytes without a SIP start line before a stream is given up
MAX_OOO_SEGMENTS: Final = 1024  #: out-of-order segments held per direction (a full 1 MB window is ~720 segments)
MAX_DIGITS: Final = 10  #: significant digits of a Content-Length (sip.MAX_DIGITS)
RESYNC_TAIL: Final = 4200  #: bytes kept while resyncing: a start line split across segments (4 KB URI + method)
_TLS_RECORDS: Final = frozenset((0x14, 0x15, 0x16, 0x17))  #: change_cipher_spec, alert, handshake, application_data

#: A SIP start line at the start of the buffer or after a line end.
_START = re.compile(rb"(?:\A|\n)(SIP/2\.0 [1-6]\d\d |[A-Z][A-Z-]{1,19} [^ \r\n]{1,4096} SIP/2\.0\r?\n)")
_CLEN = re.compile(rb"\n(?:content-length|l)[ \t]*:[ \t]*(\d+)", re.IGNORECASE)
_HTTP_UPGRADE = re.compile(rb"\r\nupgrade:[ \t]*websocket", re.IGNORECASE)
_HTTP_START = re.compile(rb"HTTP/1\.[01] |[A-Z]{3,10} [^ \r\n]+ HTTP/1\.[01]\r?\n")


class Mode(Enum):
    UNKNOWN = 0
    SIP = 1
    WEBSOCKET = 2
    TLS = 3
    NOT_SIP = 4


class _Direction:
    __slots__ = ("next_seq", "buf", "ooo", "ooo_bytes", "ooo_since", "mode", "last_ts", "resync", "junk", "ws",
                 "scanned", "need")

    def __init__(self) -> None:
        self.next_seq: int | None = None
        self.buf = bytearray()
        self.ooo: dict[int, tuple[bytes, Datagram]] = {}  # seq -> (data, the segment that brought it)
        self.ooo_bytes = 0  #: bytes held in ooo (kept, not summed per segment)
        self.ooo_since = 0.0
        self.mode = Mode.UNKNOWN
        self.last_ts = 0.0
        self.resync = False  #: the buffer may start inside a message
        self.junk = 0  #: bytes discarded while looking for SIP
        self.ws: wsframe.WsDecoder | None = None
        # Framing progress on the message at the front of buf, so that a message arriving in
        # many small segments is searched once, not once per segment (a 60 KB header in
        # 1-byte segments cost 6 s). Reset whenever bytes leave the front of buf (_cut).
        self.scanned = 0  #: bytes of buf already searched for the header end, without finding it
        self.need = 0  #: length of the message at the front once its header end is known, else 0

    def cut(self) -> None:
        """Bytes left the front of buf: what was found about it no longer holds."""
        self.scanned = 0
        self.need = 0

    def restart_at(self, seq: int) -> None:
        """After bytes were given up: an empty buffer, framing resyncs on the next start line at ``seq``."""
        self.buf.clear()
        self.cut()
        self.next_seq = seq
        self.resync = True
        if self.ws is not None:
            self.ws.reset()


Key = tuple[bytes, int, bytes, int]


def _after(a: int, b: int) -> int:
    """Signed distance a - b in sequence space (RFC 793 modular arithmetic)."""
    d = (a - b) & 0xFFFFFFFF
    return d - 0x100000000 if d & 0x80000000 else d


class TcpReassembler:
    """TCP segments (``Datagram`` with the whole TCP header) in; SIP messages out."""

    def __init__(self, counters: Counters | None = None, max_message: int = MAX_MESSAGE,
                 max_total: int = MAX_TOTAL_BUFFER) -> None:
        self.counters = counters or Counters()
        self.max_message = max_message  #: bytes of one SIP (or WebSocket) message
        self.max_direction = max(MAX_STREAM_BUFFER, 2 * max_message)  #: bytes held out of order per direction
        #: bytes held over all directions (room for the largest direction, whatever max_message is)
        self.max_total = max(max_total, 2 * self.max_direction)
        self.streams: dict[Key, _Direction] = {}  # insertion order ~ age
        self._holes: dict[Key, _Direction] = {}  # directions holding out-of-order data
        self._held = 0
        self._next_sweep = 0.0

    def _skip(self, name: str, n: int = 1) -> None:
        self.counters.skipped[name] += n

    def feed(self, seg: Datagram) -> list[Datagram | Anomaly]:
        data = seg.payload
        if len(data) < 20:
            return [Anomaly("tcp_truncated", seg.ts, seg.no, "TCP header", seg.source)]
        _sp, _dp, seq, _ack, off, flags = _TCP(data, 0)
        hl = (off >> 4) * 4
        if hl < 20 or hl > len(data):
            return [Anomaly("tcp_truncated", seg.ts, seg.no, f"TCP header length {hl}", seg.source)]
        payload = data[hl:]
        key = (seg.src, seg.sport, seg.dst, seg.dport)
        st = self.streams.get(key)
        out: list[Datagram | Anomaly] = []
        if flags & 0x04:  # RST: whatever is buffered will never complete
            if st is not None:
                self._drop(key, st, seg, out, "reset")
            return out
        if flags & 0x02:  # SYN: a new connection starts; seq+1 is the first data byte
            if st is not None:
                self._drop(key, st, seg, out, "new connection")
            st = self._new(key, seg, out)
            st.next_seq = (seq + 1) & 0xFFFFFFFF
            seq = st.next_seq
        if st is None:
            if not payload:
                return out
            st = self._new(key, seg, out)
        st.last_ts = seg.ts
        if st.mode is Mode.NOT_SIP or st.mode is Mode.TLS:
            self._skip("tcp_not_sip_bytes" if st.mode is Mode.NOT_SIP else "tls_encrypted_bytes", len(payload))
            if flags & 0x01:
                self._forget(key, st)
            return out
        if payload:
            if st.next_seq is None:  # first data seen mid-stream: it may start inside a message
                st.next_seq = seq
                st.resync = True
            self._place(st, seq, payload, seg, out)
            self._frame(st, seg, out)
            if self._held > self.max_total:
                self._shrink(key, seg, out)
        if flags & 0x01:  # FIN: nothing more will come in this direction
            if st.ooo:
                self._close_gap(st, seg, out)
            self._drop(key, st, seg, out, "closed")
        return out

    def _new(self, key: Key, seg: Datagram, out: list[Datagram | Anomaly]) -> _Direction:
        while self.streams and (len(self.streams) >= MAX_STREAMS or self._held > self.max_total):
            old_key = next(iter(self.streams))
            self._drop(old_key, self.streams[old_key], seg, out, "evicted", name="tcp_stream_evicted")
        st = self.streams[key] = _Direction()
        return st

    def _shrink(self, keep: Key, seg: Datagram, out: list[Datagram | Anomaly]) -> None:
        """Over the total budget as directions grew (not only as new ones came, the 64 KB-message
        days' assumption: with 1 MiB messages a few hundred slow directions passed it): drop the
        oldest others, counted, until back under. O(1) each; every direction dropped was made once."""
        streams = self.streams
        while self._held > self.max_total and len(streams) > 1:
            old_key = next(iter(streams))
            if old_key == keep:  # the direction just fed is the newest in activity: to the end
                streams[old_key] = streams.pop(old_key)
                continue
            self._drop(old_key, streams[old_key], seg, out, "evicted", name="tcp_stream_evicted")

    def _place(self, st: _Direction, seq: int, payload: bytes, seg: Datagram, out: list[Datagram | Anomaly]) -> None:
        assert st.next_seq is not None
        d = _after(seq, st.next_seq)
        if d < 0:  # retransmission or overlap: keep only bytes we have not had
            if -d >= len(payload):
                self._skip("tcp_retransmitted_segments")
                return
            payload = payload[-d:]
            d = 0
        if d > 0:  # a hole before this segment: hold it until the hole fills or is declared lost
            if not st.ooo:
                st.ooo_since = seg.ts
                self._holes[(seg.src, seg.sport, seg.dst, seg.dport)] = st
            if seq not in st.ooo or len(st.ooo[seq][0]) < len(payload):
                grow = len(payload) - (len(st.ooo[seq][0]) if seq in st.ooo else 0)
                self._held += grow
                st.ooo_bytes += grow
                st.ooo[seq] = (payload, seg)
            if seg.ts - st.ooo_since > GAP_WAIT or st.ooo_bytes > self.max_direction or len(st.ooo) > MAX_OOO_SEGMENTS:
                self._close_gap(st, seg, out)
                if len(st.ooo) > MAX_OOO_SEGMENTS // 2:  # still riddled with holes: give all of it up
                    self._discard_ooo(st, seg, out)
            return
        st.buf += payload
        self._held += len(payload)
        st.next_seq = (st.next_seq + len(payload)) & 0xFFFFFFFF
        if st.ooo:
            self._drain_ooo(st)

    def _drain_ooo(self, st: _Direction, out: list[Datagram | Anomaly] | None = None) -> None:
        """Move held segments that now continue the stream into the buffer.

        With ``out``, frame after each piece with the piece's own segment: after a declared
        gap, each held segment completes the messages it completes, at its own time.
        """
        while st.ooo:
            nxt = st.next_seq
            assert nxt is not None
            s = min(st.ooo, key=lambda x: _after(x, nxt))
            d = _after(s, nxt)
            if d > 0:
                return
            data, pseg = st.ooo.pop(s)
            self._held -= len(data)
            st.ooo_bytes -= len(data)
            if -d < len(data):
                piece = data[-d:]
                st.buf += piece
                self._held += len(piece)
                st.next_seq = (nxt + len(piece)) & 0xFFFFFFFF
                if out is not None:
                    self._frame(st, pseg, out)

    def _close_gap(self, st: _Direction, seg: Datagram, out: list[Datagram | Anomaly]) -> None:
        """Declare the hole lost: drop the partial message before it and resync after it."""
        first = min(st.ooo, key=lambda x: _after(x, st.next_seq))  # type: ignore[arg-type]
        missing = _after(first, st.next_seq)  # type: ignore[arg-type]
        out.append(Anomaly("tcp_gap", seg.ts, seg.no, f"{missing} bytes never seen", seg.source))
        if st.mode is Mode.SIP:
            self._frame(st, seg, out)  # complete messages before the hole still count
        if st.buf:
            self._skip("tcp_gap_discarded_bytes", len(st.buf))
        self._held -= len(st.buf)
        st.restart_at(first)
        self._drain_ooo(st, out)

    def _discard_ooo(self, st: _Direction, seg: Datagram, out: list[Datagram | Anomaly]) -> None:
        """Drop every held segment and resync after the newest: a direction with holes between
        hundreds of segments (hostile, or a capture losing most packets) cannot be repaired, and
        walking its table per segment was quadratic. Amortised O(1): half the bound must refill."""
        newest = max(st.ooo, key=lambda x: _after(x, st.next_seq))  # type: ignore[arg-type]
        end = (newest + len(st.ooo[newest][0])) & 0xFFFFFFFF
        out.append(Anomaly("tcp_gap", seg.ts, seg.no, f"{len(st.ooo)} out-of-order segments dropped", seg.source))
        self._skip("tcp_gap_discarded_bytes", st.ooo_bytes + len(st.buf))
        self._held -= st.ooo_bytes + len(st.buf)
        st.ooo.clear()
        st.ooo_bytes = 0
        st.restart_at(end)

    def _frame(self, st: _Direction, seg: Datagram, out: list[Datagram | Anomaly]) -> None:
        buf = st.buf
        before = len(buf)
        if st.mode is Mode.UNKNOWN:
            self._identify(st, seg)
        if st.mode is Mode.SIP:
            self._frame_sip(st, seg, out)
        elif st.mode is Mode.WEBSOCKET:
            self._frame_ws(st, seg, out)
        elif st.mode is not Mode.UNKNOWN:  # NOT_SIP or TLS
            self._skip("tcp_not_sip_bytes" if st.mode is Mode.NOT_SIP else "tls_encrypted_bytes", len(buf))
            buf.clear()
            st.cut()
        self._held -= before - len(buf)

    def _identify(self, st: _Direction, seg: Datagram) -> None:
        """Decide what a direction carries from its first bytes; stays UNKNOWN until it can tell."""
        buf = st.buf
        st.cut()
        self._strip_keepalives(buf)
        if not buf:
            return
        if len(buf) >= 3 and buf[0] in _TLS_RECORDS and buf[1] == 3 and buf[2] <= 4:  # a TLS record header
            self._set_mode(st, Mode.TLS, "tls")
            return
        if _HTTP_START.match(buf):
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self.max_message:
                    self._set_mode(st, Mode.NOT_SIP, "not_sip")
                return
            if buf[9:12] == b"101" or _HTTP_UPGRADE.search(buf, 0, end):
                del buf[: end + 4]
                st.ws = wsframe.WsDecoder(self.max_message)
                self._set_mode(st, Mode.WEBSOCKET, "websocket")
            else:
                self._set_mode(st, Mode.NOT_SIP, "not_sip")
            return
        if wsframe.looks_like_ws_sip(buf):  # the capture started after the upgrade
            st.ws = wsframe.WsDecoder(self.max_message)
            self._set_mode(st, Mode.WEBSOCKET, "websocket")
            return
        if _is_start(buf):
            st.resync = False
            self._set_mode(st, Mode.SIP, "sip")
            return
        m = _START.search(buf)  # mid-stream start, or junk first: look for a start line further on
        if m is None:
            if len(buf) > RESYNC_TAIL:  # keep a tail: a start line may be split across segments
                dropped = len(buf) - RESYNC_TAIL
                del buf[:dropped]
                self._junk(st, dropped)
            return
        del buf[: m.start(1)]
        self._junk(st, m.start(1))
        st.resync = False
        self._set_mode(st, Mode.SIP, "sip")

    def _set_mode(self, st: _Direction, mode: Mode, name: str) -> None:
        st.mode = mode
        self.counters.streams[name] += 1

    def _frame_sip(self, st: _Direction, seg: Datagram, out: list[Datagram | Anomaly]) -> None:
        buf = st.buf
        limit = self.max_message
        while buf:
            if st.need and len(buf) < st.need:  # the front message's body is still arriving
                return
            if (buf[0] == 0x0D or buf[0] == 0x0A) and not st.resync:  # line ends inside junk are not pings
                self._strip_keepalives(buf)
                st.cut()
                continue
            if st.resync or not _is_start(buf):
                st.cut()
                m = _START.search(buf)
                if m is None:  # nothing SIP yet; keep a tail, a start line may be split across segments
                    if len(buf) > RESYNC_TAIL:
                        dropped = len(buf) - RESYNC_TAIL
                        del buf[:dropped]
                        self._junk(st, dropped)
                    return
                skip = m.start(1)
                if skip:
                    del buf[:skip]
                    self._junk(st, skip)
                    if not st.resync:
                        out.append(Anomaly("tcp_resync", seg.ts, seg.no, f"{skip} bytes before a SIP start line",
                                           seg.source))
                st.resync = False
                continue
            end = buf.find(b"\r\n\r\n", st.scanned, limit)
            if end < 0:
                if len(buf) >= limit:
                    out.append(Anomaly("tcp_message_too_long", seg.ts, seg.no, f"no header end in {limit} bytes",
                                       seg.source))
                    self._drop_start_line(st)
                    continue
                st.scanned = max(0, len(buf) - 3)  # a "\r\n\r\n" split across segments is still found
                return
            m = _CLEN.search(buf, 0, end + 2)
            if m is None:
                out.append(Anomaly("tcp_no_content_length", seg.ts, seg.no, "assumed 0 (RFC 3261 §18.3)", seg.source))
                clen = 0
            else:
                digits = m.group(1)
                if len(digits) > MAX_DIGITS:  # never int() a digit string a packet made long
                    digits = digits.lstrip(b"0") or b"0"
                clen = int(digits) if len(digits) <= MAX_DIGITS else limit + 1
            total = end + 4 + clen
            if total > limit:
                shown = m.group(1)[:12].decode() + ("..." if m is not None and len(m.group(1)) > 12 else "") \
                    if m is not None else str(clen)
                out.append(Anomaly("tcp_message_too_long", seg.ts, seg.no,
                                   f"Content-Length {shown} (limits.max_sip_message {limit})", seg.source))
                self._drop_start_line(st)
                continue
            if len(buf) < total:
                st.need = total
                return
            out.append(Datagram(seg.ts, seg.no, Transport.TCP, seg.src, seg.sport, seg.dst, seg.dport,
                                bytes(buf[:total]), seg.encap, seg.source))
            del buf[:total]
            st.cut()
            st.junk = 0

    def _drop_start_line(self, st: _Direction) -> None:
        """A message too long to frame: give up its start line and resync on the next one.

        Dropping one byte resynced on the rest of the same start line ("NVITE sip:..."): one
        oversized message was counted up to five times."""
        buf = st.buf
        nl = buf.find(b"\n", 0, 4200)
        n = nl + 1 if nl >= 0 else 1
        del buf[:n]
        self._skip("tcp_not_sip_bytes", n)
        st.cut()
        st.resync = True

    def _strip_keepalives(self, buf: bytearray) -> None:
        """RFC 5626 keep-alives between messages: "\\r\\n\\r\\n" ping, "\\r\\n" pong."""
        n = len(buf) - len(buf.lstrip(b"\r\n"))
        if n:
            self.counters.keepalives += buf[:n].count(b"\r\n\r\n") + (n % 4 == 2)
            del buf[:n]

    def _junk(self, st: _Direction, n: int) -> None:
        st.junk += n
        self._skip("tcp_not_sip_bytes", n)
        if st.junk > NOT_SIP_BYTES and st.mode is Mode.UNKNOWN:
            self._set_mode(st, Mode.NOT_SIP, "not_sip")
            self._skip("tcp_not_sip_bytes", len(st.buf))
            st.buf.clear()
            st.cut()

    def _frame_ws(self, st: _Direction, seg: Datagram, out: list[Datagram | Anomaly]) -> None:
        assert st.ws is not None
        messages, problems = st.ws.feed(st.buf)
        for name in problems:
            out.append(Anomaly(name, seg.ts, seg.no, "", seg.source))
        for m in messages:
            m = m.lstrip(b"\r\n")
            if not m:
                self.counters.keepalives += 1
                continue
            out.append(Datagram(seg.ts, seg.no, Transport.WS, seg.src, seg.sport, seg.dst, seg.dport,
                                m, seg.encap, seg.source))

    def _drop(self, key: Key, st: _Direction, seg: Datagram, out: list[Datagram | Anomaly], why: str,
              name: str = "tcp_incomplete_message") -> None:
        if st.mode is Mode.SIP and st.buf.strip(b"\r\n"):
            out.append(Anomaly(name, seg.ts, seg.no, f"{len(st.buf)} bytes buffered ({why})", seg.source))
        elif st.mode is Mode.UNKNOWN and st.buf:
            self._skip("tcp_not_sip_bytes", len(st.buf))
        elif name == "tcp_stream_evicted":
            out.append(Anomaly(name, seg.ts, seg.no, why, seg.source))
        self._forget(key, st)

    def _forget(self, key: Key, st: _Direction) -> None:
        self._held -= len(st.buf) + st.ooo_bytes
        self.streams.pop(key, None)

    def advance(self, now: float) -> list[Datagram | Anomaly]:
        """Close holes that waited too long and forget idle directions (packet time).

        Holes are few and checked each call; the idle sweep walks every stream, so it runs
        only every IDLE_SWEEP seconds.
        """
        out: list[Datagram | Anomaly] = []
        for key in [k for k, st in self._holes.items() if now - st.ooo_since > GAP_WAIT]:
            st = self._holes.pop(key)
            if st.ooo and self.streams.get(key) is st:
                self._close_gap(st, _marker(now, key), out)
        if now >= self._next_sweep:
            self._next_sweep = now + IDLE_SWEEP
            for key, st in list(self.streams.items()):
                if now - st.last_ts > IDLE_TIMEOUT:
                    self._drop(key, st, _marker(now, key), out, "idle")
        return out

    def finish(self) -> list[Datagram | Anomaly]:
        out: list[Datagram | Anomaly] = []
        for key, st in list(self.streams.items()):
            seg = _marker(st.last_ts, key)
            if st.ooo:
                self._close_gap(st, seg, out)
            self._drop(key, st, seg, out, "end of input")
        return out

    @property
    def held(self) -> int:
        return self._held


def _marker(ts: float, key: Key) -> Datagram:
    """A segment-shaped time mark for work the clock (not a packet) triggers."""
    return Datagram(ts, 0, Transport.TCP, key[0], key[1], key[2], key[3], b"", (), "")


def _is_start(buf: bytearray) -> bool:
    """Does the buffer begin with a SIP start line (or could, if more bytes come)?"""
    if buf[:8] == b"SIP/2.0 ":
        return True
    nl = buf.find(b"\n", 0, 4200)
    if nl < 0:
        sp = buf.find(b" ", 0, 21)
        return sp > 0 and bytes(buf[:sp]).isupper() and len(buf) < 4200
    return _START.match(buf, 0, nl + 1) is not None
