"""Wiring for ``sipsniff-acc messages``: frames → text lines, in one process or several."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator

from sipsniff_acc.events import Counters, Datagram, Frame, Transport
from sipsniff_acc.messagelog import to_jsonl, to_table_row
from sipsniff_acc.pipeline import CaptureStage, SipParser
from sipsniff_acc.shard import batched, ordered_map
from sipsniff_acc.sip import SipMessage

Formatter = Callable[[SipMessage], str]
#: what crosses the process boundary: a Datagram as a plain tuple (cheaper to pickle)
Candidate = tuple[float, int, str, bytes, int, bytes, int, bytes, tuple[str, ...], str]


def formatter(fmt: str) -> Formatter:
    return to_jsonl if fmt == "jsonl" else to_table_row


_TEXT = {t: t.value for t in Transport}  # an Enum's .value is a property: ~5x a dict lookup


def _candidates(frames: Iterable[Frame], capture: CaptureStage) -> Iterator[Candidate]:
    feed = capture.feed
    text = _TEXT
    for frame in frames:
        for d in feed(frame):
            if d.__class__ is Datagram:
                yield (d.ts, d.no, text[d.transport], d.src, d.sport, d.dst, d.dport,  # type: ignore[union-attr]
                       d.payload, d.encap, d.source)  # type: ignore[union-attr]
    for d in capture.finish():  # messages that only end of input completes (TCP after a gap)
        if d.__class__ is Datagram:
            yield (d.ts, d.no, text[d.transport], d.src, d.sport, d.dst, d.dport,  # type: ignore[union-attr]
                   d.payload, d.encap, d.source)  # type: ignore[union-attr]


def _format_batch(fmt: Formatter) -> Callable[[list[Candidate]], tuple[str, dict[str, object]]]:
    def work(batch: list[Candidate]) -> tuple[str, dict[str, object]]:
        parser = parsers[0]
        before_msgs = parser.counters.sip_messages
        before = dict(parser.counters.anomalies)
        message = parser.message
        lines = []
        for c in batch:
            msg = message(*c)
            if msg is not None:
                lines.append(fmt(msg))
        after = parser.counters.anomalies
        return "".join(lines), {"sip_messages": parser.counters.sip_messages - before_msgs,
                                "anomalies": {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}}
    parsers = [SipParser()]  # one per worker process (forked), so its address cache lives on
    return work


def _as_candidate(d: Datagram) -> Candidate:
    return (d.ts, d.no, _TEXT[d.transport], d.src, d.sport, d.dst, d.dport, d.payload, d.encap, d.source)


def _first(c: Candidate) -> float:
    return c[0]


def message_text(
    frames: Iterable[Frame], fmt: Formatter, workers: int, counters: Counters, extra: Iterable[Datagram] = (),
) -> Iterator[str]:
    """Chunks of output text for every SIP message in ``frames``, in capture order.

    ``extra`` holds messages found another way (decrypted TLS), in time order; they are
    merged into the stream by timestamp.
    """
    capture = CaptureStage(counters)
    candidates: Iterator[Candidate] = _candidates(frames, capture)
    extra = list(extra)
    if extra:
        candidates = heapq.merge(candidates, map(_as_candidate, extra), key=_first)
    if workers <= 0:
        message = SipParser(counters).message
        for c in candidates:
            msg = message(*c)
            if msg is not None:
                yield fmt(msg)
        return
    for text, delta in ordered_map(batched(candidates), _format_batch(fmt), workers):
        counters.sip_messages += delta["sip_messages"]  # type: ignore[operator]
        counters.anomalies.update(delta["anomalies"])  # type: ignore[arg-type]
        yield text
