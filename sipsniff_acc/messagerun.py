"""Wiring for ``sipsniff-acc messages``: frames → text lines, in one process or several."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from sipsniff_acc.events import Datagram, Frame
from sipsniff_acc.messagelog import to_jsonl, to_table_row
from sipsniff_acc.events import Counters
from sipsniff_acc.pipeline import CaptureStage, SipParser
from sipsniff_acc.shard import batched, ordered_map
from sipsniff_acc.sip import SipMessage

Formatter = Callable[[SipMessage], str]
#: what crosses the process boundary: a Datagram as a plain tuple (cheaper to pickle)
Candidate = tuple[float, int, str, bytes, int, bytes, int, bytes, tuple[str, ...], str]


def formatter(fmt: str) -> Formatter:
    return to_jsonl if fmt == "jsonl" else to_table_row


def _candidates(frames: Iterable[Frame], capture: CaptureStage) -> Iterator[Candidate]:
    feed = capture.feed
    for frame in frames:
        for d in feed(frame):
            if d.__class__ is Datagram:
                yield (d.ts, d.no, d.transport.value, d.src, d.sport, d.dst, d.dport,  # type: ignore[union-attr]
                       d.payload, d.encap, d.source)  # type: ignore[union-attr]
    for d in capture.finish():  # messages that only end of input completes (TCP after a gap)
        if d.__class__ is Datagram:
            yield (d.ts, d.no, d.transport.value, d.src, d.sport, d.dst, d.dport,  # type: ignore[union-attr]
                   d.payload, d.encap, d.source)  # type: ignore[union-attr]


def _format_batch(fmt: Formatter) -> Callable[[list[Candidate]], tuple[str, dict[str, object]]]:
    def work(batch: list[Candidate]) -> tuple[str, dict[str, object]]:
        parser = parsers[0]
        before_msgs = parser.counters.sip_messages
        before = dict(parser.counters.anomalies)
        parse = parser.parse
        lines = []
        for c in batch:
            for item in parse(*c):
                if item.__class__ is SipMessage:
                    lines.append(fmt(item))  # type: ignore[arg-type]
        after = parser.counters.anomalies
        return "".join(lines), {"sip_messages": parser.counters.sip_messages - before_msgs,
                                "anomalies": {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}}
    parsers = [SipParser()]  # one per worker process (forked), so its address cache lives on
    return work


def message_text(frames: Iterable[Frame], fmt: Formatter, workers: int, counters: Counters) -> Iterator[str]:
    """Chunks of output text for every SIP message in ``frames``, in capture order."""
    capture = CaptureStage(counters)
    if workers <= 0:
        parse = SipParser(counters).parse
        for c in _candidates(frames, capture):
            for item in parse(*c):
                if item.__class__ is SipMessage:
                    yield fmt(item)  # type: ignore[arg-type]
        return
    for text, delta in ordered_map(batched(_candidates(frames, capture)), _format_batch(fmt), workers):
        counters.sip_messages += delta["sip_messages"]  # type: ignore[operator]
        counters.anomalies.update(delta["anomalies"])  # type: ignore[arg-type]
        yield text
