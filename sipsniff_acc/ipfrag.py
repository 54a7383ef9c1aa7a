"""IPv4 and IPv6 fragment reassembly on the packet clock.

Fragments may come in any order, duplicated or overlapping (mirror ports duplicate,
networks reorder). Pieces are kept per datagram key until the one with MF=0 has fixed
the total length and every byte up to it is covered; then the datagram is rebuilt and
returned for transport decoding. Overlapping bytes keep their first copy (what most
stacks do, and RFC 5722 forbids overlap for IPv6 anyway); each overlap is an anomaly.

Memory is bounded by a count of datagrams and a byte budget; the oldest incomplete
datagram is evicted first. Incomplete datagrams time out on packet time.

A SPAN port mirrors every fragment twice; the copy of the fragment that *completed* a
datagram arrives after the datagram was rebuilt. Such copies are recognised for
``DUP_WINDOW`` against the pieces of recently rebuilt datagrams, so they neither start a new
reassembly that times out nor, with a later fragment reusing the IP ID, build a second
datagram (found by the fuzzer's mirrored-frames invariant).
"""

from __future__ import annotations

from typing import Final

from sipsniff_acc.events import Anomaly, Fragment

#: RFC 791 suggests 15 s for the reassembly timer, Linux uses 30 s (ipfrag_time) and
#: VoIPmonitor 5 s; SIP fragments arrive within milliseconds, so 30 s loses nothing real.
FRAG_TIMEOUT: Final = 30.0
MAX_DATAGRAMS: Final = 4096  #: Linux keeps at most a few MB of fragment queues (ipfrag_high_thresh 4 MB)
MAX_BYTES: Final = 64 << 20  #: the total budget for pieces held
MAX_DATAGRAM: Final = 65535  #: no IPv4 datagram, and no non-jumbo IPv6 payload, is longer
#: Pieces held per datagram. The byte budget alone let empty fragments pile up for free, each
#: one walking all the others (20k of them cost 33 s). A 64 KB datagram over a 576-byte path is
#: ~120 pieces; exact duplicates are not held.
MAX_PIECES: Final = 256
DUP_WINDOW: Final = 0.02  #: seconds a rebuilt datagram's pieces are remembered (pipeline.DUP_WINDOW: mirror copies)


class _Pending:
    __slots__ = ("first_ts", "pieces", "total", "held", "first")

    def __init__(self, ts: float) -> None:
        self.first_ts = ts
        self.pieces: list[tuple[int, bytes]] = []
        self.total = -1  #: payload length, known once the last fragment arrived
        self.held = 0
        self.first: Fragment | None = None  #: the offset-0 piece: its encap and frame describe the datagram


class Reassembled:
    """A whole IP payload rebuilt from fragments."""

    __slots__ = ("ts", "no", "proto", "src", "dst", "payload", "encap", "source", "fragments", "ident")

    def __init__(self, last: Fragment, first: Fragment, payload: bytes, fragments: int) -> None:
        self.ts = last.ts  # the datagram exists when its last piece arrives
        self.no = last.no
        self.proto = first.proto
        self.src = first.src
        self.dst = first.dst
        self.payload = payload
        self.encap = first.encap + ("frag",)
        self.source = first.source
        self.fragments = fragments
        self.ident = first.key[2]  #: IP Identification (IPv4 16 bits, IPv6 fragment header 32 bits): a copy keeps it


class FragmentReassembler:
    """Feed fragments, get whole datagrams back; call ``advance`` with packet time."""

    def __init__(
        self, timeout: float = FRAG_TIMEOUT, max_datagrams: int = MAX_DATAGRAMS, max_bytes: int = MAX_BYTES,
    ) -> None:
        self.timeout = timeout
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        self._pending: dict[tuple[bytes, bytes, int, int], _Pending] = {}  # insertion order = age
        #: recently rebuilt datagrams: key -> (time, pieces), insertion order = age; at most max_datagrams
        self._done: dict[tuple[bytes, bytes, int, int], tuple[float, list[tuple[int, bytes]]]] = {}
        self._held = 0
        self.completed = 0

    def feed(self, frag: Fragment) -> list[Reassembled | Anomaly]:
        out: list[Reassembled | Anomaly] = []
        key = frag.key
        pend = self._pending.get(key)
        if pend is None and self._done:
            done = self._done.get(key)
            if done is not None:
                if frag.ts - done[0] <= DUP_WINDOW and (frag.offset, frag.payload) in done[1]:
                    return out  # a mirror copy of a piece of a datagram already rebuilt
                del self._done[key]
        if pend is None:
            out.extend(self._make_room(frag))
            pend = self._pending[key] = _Pending(frag.ts)
        size = len(frag.payload)
        stop = frag.offset + size
        if stop > MAX_DATAGRAM:
            del self._pending[key]
            self._held -= pend.held
            out.append(Anomaly("ip_frag_too_big", frag.ts, frag.no, f"fragment ends at byte {stop}", frag.source))
            return out
        if not frag.more:
            pend.total = stop
        if frag.offset == 0:
            pend.first = frag
        for off, data in pend.pieces:
            if off < stop and frag.offset < off + len(data):
                if off == frag.offset and data == frag.payload:
                    return out  # an exact duplicate (mirrored twice, retransmitted): nothing new
                out.append(Anomaly("ip_frag_overlap", frag.ts, frag.no, f"bytes {frag.offset}-{stop}", frag.source))
                break
        if len(pend.pieces) >= MAX_PIECES:
            del self._pending[key]
            self._held -= pend.held
            out.append(Anomaly("ip_frag_too_many_pieces", frag.ts, frag.no, f"more than {MAX_PIECES} fragments",
                               frag.source))
            return out
        pend.pieces.append((frag.offset, frag.payload))
        pend.held += size
        self._held += size
        if pend.total >= 0 and pend.first is not None:
            whole = _assemble(pend.pieces, pend.total)
            if whole is not None:
                del self._pending[key]
                self._held -= pend.held
                self.completed += 1
                self._remember(key, frag.ts, pend.pieces)
                out.append(Reassembled(frag, pend.first, whole, len(pend.pieces)))
        return out

    def _remember(self, key: tuple[bytes, bytes, int, int], ts: float, pieces: list[tuple[int, bytes]]) -> None:
        """Keep a rebuilt datagram's pieces for DUP_WINDOW; older ones (and beyond the count bound,
        the oldest) are forgotten: only copies arriving later than that could start a new reassembly."""
        done = self._done
        while done:
            first = next(iter(done))
            if ts - done[first][0] <= DUP_WINDOW and len(done) < self.max_datagrams:
                break
            del done[first]
        done[key] = (ts, pieces)

    def _make_room(self, frag: Fragment) -> list[Anomaly]:
        out: list[Anomaly] = []
        while self._pending and (len(self._pending) >= self.max_datagrams or self._held >= self.max_bytes):
            key = next(iter(self._pending))
            old = self._pending.pop(key)
            self._held -= old.held
            out.append(Anomaly("ip_frag_evicted", frag.ts, frag.no, f"{len(old.pieces)} pieces dropped", frag.source))
        return out

    def advance(self, now: float) -> list[Anomaly]:
        """Drop datagrams whose first piece is older than the timeout."""
        out: list[Anomaly] = []
        pending = self._pending
        while pending:
            key = next(iter(pending))
            pend = pending[key]
            if now - pend.first_ts < self.timeout:
                break
            del pending[key]
            self._held -= pend.held
            out.append(Anomaly("ip_frag_timeout", now, 0, f"{len(pend.pieces)} pieces never completed"))
        return out

    def finish(self) -> list[Anomaly]:
        """End of input: whatever is still incomplete never will be."""
        out = [
            Anomaly("ip_frag_timeout", p.first_ts, 0, f"{len(p.pieces)} pieces incomplete at end of input")
            for p in self._pending.values()
        ]
        self._pending.clear()
        self._done.clear()
        self._held = 0
        return out

    @property
    def pending(self) -> int:
        return len(self._pending)


def _assemble(pieces: list[tuple[int, bytes]], total: int) -> bytes | None:
    """The datagram if ``pieces`` cover 0..total, first copy winning; else None."""
    covered = 0
    for off, data in sorted(pieces, key=lambda p: p[0]):
        if off > covered:
            return None
        covered = max(covered, off + len(data))
    if covered < total:
        return None
    buf = bytearray(total)
    for off, data in reversed(pieces):  # later pieces first, so the first copy is written last and wins
        if off < total:
            buf[off : min(off + len(data), total)] = data[: total - off]
    return bytes(buf)
