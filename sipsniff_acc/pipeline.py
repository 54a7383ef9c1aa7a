"""The capture half of the pipeline: frames in, SIP messages and anomalies out.

    Frame ─ decode ─┬─ Datagram(UDP) ──────────────────────────────┬─ detect ─ SipParser ─ SipMessage
                    └─ Fragment ─ ipfrag ─ Reassembled ─ transport ┘   (front)   (may run in workers)

``CaptureStage`` (decode, IP reassembly, SIP detection) is the front: cheap, stateful,
one per capture. ``SipParser`` turns a candidate into a ``SipMessage``; it is stateless,
so ``shard.py`` can run it in worker processes. ``MessagePipeline`` chains both in one
process. All of it is pure: the packet timestamp is the only clock (fragment timeouts
fire in ``advance``), no I/O, so tests feed frames directly.
"""

from __future__ import annotations

import socket
from collections import Counter
from dataclasses import dataclass, field

from sipsniff_acc import decode as dec
from sipsniff_acc import sip
from sipsniff_acc.events import Anomaly, Datagram, Fragment, Frame, Transport
from sipsniff_acc.ipfrag import FragmentReassembler, Reassembled

_UDP = Transport.UDP
looks_like_sip = sip.looks_like_sip

ADDR_CACHE = 1 << 16  #: distinct addresses remembered as text before the cache is reset

#: Fire timers at most this often (packet time): a walk of the timer table per frame is wasted work.
ADVANCE_EVERY = 1.0


@dataclass
class Counters:
    """What happened to every frame; the end-of-run summary prints these."""

    frames: int = 0
    bytes: int = 0
    sip_messages: int = 0
    keepalives: int = 0
    fragments: int = 0
    datagrams_reassembled: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  #: not SIP, by reason (not anomalies)
    anomalies: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return {
            "frames": self.frames, "bytes": self.bytes, "sip_messages": self.sip_messages,
            "keepalives": self.keepalives, "fragments": self.fragments,
            "datagrams_reassembled": self.datagrams_reassembled,
            "skipped": dict(sorted(self.skipped.items())), "anomalies": dict(sorted(self.anomalies.items())),
        }


_ntop = socket.inet_ntop
_AF = {4: socket.AF_INET, 16: socket.AF_INET6}


def ip_text(addr: bytes) -> str:
    return _ntop(_AF[len(addr)], addr)


class CaptureStage:
    """Frames in; SIP candidates (``Datagram``s whose payload looks like SIP) and anomalies out."""

    def __init__(self, counters: Counters | None = None) -> None:
        self.counters = counters or Counters()
        self.frags = FragmentReassembler()
        self._next_advance = 0.0

    def feed(self, frame: Frame) -> list[Datagram | Anomaly]:
        c = self.counters
        c.frames += 1
        c.bytes += len(frame.data)
        out: list[Datagram | Anomaly] = []
        if frame.ts >= self._next_advance:
            self._next_advance = frame.ts + ADVANCE_EVERY
            if self.frags.pending:
                self._note(out, self.frags.advance(frame.ts))
        item = dec.decode(frame)
        if item.__class__ is Datagram:
            if item.transport is _UDP and looks_like_sip(item.payload):  # type: ignore[union-attr]
                out.append(item)  # type: ignore[arg-type]
            else:
                self._datagram(item, out)  # type: ignore[arg-type]
        elif item is None:
            c.skipped["not_ip_or_unsupported"] += 1
        elif item.__class__ is Fragment:
            c.fragments += 1
            for res in self.frags.feed(item):  # type: ignore[arg-type]
                if isinstance(res, Reassembled):
                    c.datagrams_reassembled += 1
                    self._reassembled(res, out)
                else:
                    self._note(out, (res,))
        else:
            self._note(out, (item,))  # type: ignore[arg-type]
        return out

    def _reassembled(self, res: Reassembled, out: list[Datagram | Anomaly]) -> None:
        frame = Frame(res.ts, 0, res.payload, res.no, res.source)
        try:
            item = dec.transport(res.proto, res.src, res.dst, res.payload, 0, len(res.payload), frame, res.encap)
        except dec.DecodeError as bad:
            item = Anomaly(bad.name, res.ts, res.no, bad.detail, res.source)
        if item.__class__ is Datagram:
            self._datagram(item, out)  # type: ignore[arg-type]
        elif item is None:
            self.counters.skipped["not_ip_or_unsupported"] += 1
        elif isinstance(item, Anomaly):
            self._note(out, (item,))
        else:  # a fragment inside a reassembled datagram (a fragmented tunnel inside a fragment)
            self.counters.skipped["nested_fragment"] += 1

    def _datagram(self, d: Datagram, out: list[Datagram | Anomaly]) -> None:
        c = self.counters
        if d.transport is not Transport.UDP:
            # TCP/SCTP reassembly is the next stage to be built; counted, not guessed at.
            c.skipped[f"{d.transport.value.lower()}_not_reassembled"] += 1
            return
        payload = d.payload
        if sip.looks_like_sip(payload):
            out.append(d)
        elif sip.is_keepalive(payload):
            c.keepalives += 1
        else:
            c.skipped["udp_not_sip"] += 1

    def _note(self, out: list[Datagram | Anomaly], items: tuple[Anomaly, ...] | list[Anomaly]) -> None:
        for a in items:
            self.counters.anomalies[a.name] += 1
            out.append(a)

    def finish(self) -> list[Datagram | Anomaly]:
        out: list[Datagram | Anomaly] = []
        self._note(out, self.frags.finish())
        return out


class SipParser:
    """A SIP candidate in; a ``SipMessage`` (plus anomalies for its defects) out. Stateless
    but for a cache of address texts (a capture has few distinct addresses; inet_ntop per
    message was a tenth of the parse cost)."""

    def __init__(self, counters: Counters | None = None) -> None:
        self.counters = counters or Counters()
        self._addr: dict[bytes, str] = {}

    def feed(self, d: Datagram) -> list[sip.SipMessage | Anomaly]:
        return self.parse(d.ts, d.no, d.transport.value, d.src, d.sport, d.dst, d.dport, d.payload, d.encap, d.source)

    def parse(
        self, ts: float, no: int, transport: str, src: bytes, sport: int, dst: bytes, dport: int,
        payload: bytes, encap: tuple[str, ...], source: str,
    ) -> list[sip.SipMessage | Anomaly]:
        c = self.counters
        try:
            msg = sip.parse(payload)
        except sip.SipError as err:
            c.anomalies[err.name] += 1
            return [Anomaly(err.name, ts, no, err.detail, source)]
        addr = self._addr
        if len(addr) > ADDR_CACHE:
            addr.clear()
        msg.ts = ts
        msg.no = no
        msg.src = addr.get(src) or addr.setdefault(src, _ntop(_AF[len(src)], src))
        msg.sport = sport
        msg.dst = addr.get(dst) or addr.setdefault(dst, _ntop(_AF[len(dst)], dst))
        msg.dport = dport
        msg.transport = transport
        msg.encap = encap
        msg.source = source
        c.sip_messages += 1
        if not msg.defects:
            return [msg]
        out: list[sip.SipMessage | Anomaly] = []
        for name in msg.defects:
            c.anomalies[name] += 1
            out.append(Anomaly(name, ts, no, msg.first_line[:80], source))
        out.append(msg)
        return out


class MessagePipeline:
    """Capture and parse in one process: feed frames, get SIP messages; ``finish`` at the end."""

    def __init__(self) -> None:
        self.counters = Counters()
        self.capture = CaptureStage(self.counters)
        self.parser = SipParser(self.counters)

    def feed(self, frame: Frame) -> list[sip.SipMessage | Anomaly]:
        out: list[sip.SipMessage | Anomaly] = []
        for item in self.capture.feed(frame):
            if item.__class__ is Datagram:
                out.extend(self.parser.feed(item))  # type: ignore[arg-type]
            else:
                out.append(item)  # type: ignore[arg-type]
        return out

    def finish(self) -> list[sip.SipMessage | Anomaly]:
        return list(self.capture.finish())  # type: ignore[arg-type]
