"""The capture half of the pipeline: frames in, SIP messages and anomalies out.

    Frame ─ decode ─┬─ Datagram(UDP) ───────────────────────┬─ sip.parse ─ SipMessage
                    └─ Fragment ─ ipfrag ─ Reassembled ─ decode.transport ┘

This is the one place that knows the order of the stages. It is pure: the packet
timestamp is the only clock (fragment timeouts fire in ``advance``), and it does no I/O,
so tests feed it frames directly. Counters say what every frame became.
"""

from __future__ import annotations

import socket
from collections import Counter
from dataclasses import dataclass, field

from sipsniff_acc import decode as dec
from sipsniff_acc import sip
from sipsniff_acc.events import Anomaly, Datagram, Fragment, Frame, Transport
from sipsniff_acc.ipfrag import FragmentReassembler, Reassembled

#: Fire timers at most this often (packet time): a heap/dict walk per frame is wasted work.
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


def ip_text(addr: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(addr) == 4 else socket.AF_INET6, addr)


class MessagePipeline:
    """Feed frames, get SIP messages; ``finish`` at end of input."""

    def __init__(self) -> None:
        self.counters = Counters()
        self.frags = FragmentReassembler()
        self._next_advance = 0.0

    def feed(self, frame: Frame) -> list[sip.SipMessage | Anomaly]:
        c = self.counters
        c.frames += 1
        c.bytes += len(frame.data)
        out: list[sip.SipMessage | Anomaly] = []
        if frame.ts >= self._next_advance:
            self._next_advance = frame.ts + ADVANCE_EVERY
            if self.frags.pending:
                self._note(out, self.frags.advance(frame.ts))
        item = dec.decode(frame)
        if item.__class__ is Datagram:
            self._datagram(item, out)  # type: ignore[arg-type]
        elif item is None:
            c.skipped["not_ip_or_unsupported"] += 1
        elif item.__class__ is Fragment:
            c.fragments += 1
            for res in self.frags.feed(item):  # type: ignore[arg-type]
                if isinstance(res, Reassembled):
                    c.datagrams_reassembled += 1
                    self._reassembled(res, frame, out)
                else:
                    self._note(out, (res,))
        else:
            self._note(out, (item,))  # type: ignore[arg-type]
        return out

    def _reassembled(self, res: Reassembled, frame: Frame, out: list[sip.SipMessage | Anomaly]) -> None:
        proxy = Frame(res.ts, 0, res.payload, res.no, res.source)
        try:
            item = dec.transport(res.proto, res.src, res.dst, res.payload, 0, len(res.payload), proxy, res.encap)
        except dec._Bad as bad:  # noqa: SLF001 - the same boundary as decode()
            item = Anomaly(bad.name, res.ts, res.no, bad.detail, res.source)
        if item.__class__ is Datagram:
            self._datagram(item, out)  # type: ignore[arg-type]
        elif item is None:
            self.counters.skipped["not_ip_or_unsupported"] += 1
        elif isinstance(item, Anomaly):
            self._note(out, (item,))
        else:  # a fragment inside a reassembled datagram (fragmented tunnel inside a fragment)
            self.counters.skipped["nested_fragment"] += 1

    def _datagram(self, d: Datagram, out: list[sip.SipMessage | Anomaly]) -> None:
        c = self.counters
        if d.transport is not Transport.UDP:
            # TCP/SCTP reassembly is the next stage to be built (issue 3); counted, not guessed at.
            c.skipped[f"{d.transport.value.lower()}_not_reassembled"] += 1
            return
        payload = d.payload
        if not sip.looks_like_sip(payload):
            if sip.is_keepalive(payload):
                c.keepalives += 1
            else:
                c.skipped["udp_not_sip"] += 1
            return
        try:
            msg = sip.parse(payload)
        except sip.SipError as err:
            self._note(out, (Anomaly(err.name, d.ts, d.no, err.detail, d.source),))
            return
        msg.ts = d.ts
        msg.no = d.no
        msg.src = ip_text(d.src)
        msg.sport = d.sport
        msg.dst = ip_text(d.dst)
        msg.dport = d.dport
        msg.transport = "UDP"
        msg.encap = d.encap
        msg.source = d.source
        c.sip_messages += 1
        if msg.defects:
            for name in msg.defects:
                c.anomalies[name] += 1
                out.append(Anomaly(name, d.ts, d.no, msg.first_line[:80], d.source))
        out.append(msg)

    def _note(self, out: list[sip.SipMessage | Anomaly], items: tuple[Anomaly, ...] | list[Anomaly]) -> None:
        for a in items:
            self.counters.anomalies[a.name] += 1
            out.append(a)

    def finish(self) -> list[sip.SipMessage | Anomaly]:
        out: list[sip.SipMessage | Anomaly] = []
        self._note(out, self.frags.finish())
        return out
