"""Wiring for ``sipsniff-acc messages``: frames → output lines, in one process or several.

The reading process runs the capture stage and ships SIP candidates, in batches, to
``format_batch``; with ``workers=0`` the same function runs in the reading process, so
both modes share one code path and give byte-identical output.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from sipsniff_acc import sip
from sipsniff_acc.events import Counters, Datagram, Frame, Transport
from sipsniff_acc.messagelog import jsonl, table
from sipsniff_acc.pipeline import AddressText, CaptureStage
from sipsniff_acc.shard import batched, ordered_map

#: what crosses the process boundary: a Datagram as a plain tuple (cheaper to pickle)
Candidate = tuple[float, int, str, bytes, int, bytes, int, bytes, tuple[str, ...], str]
Delta = tuple[int, dict[str, int]]  #: SIP messages parsed, anomalies by name

_TEXT = {t: t.value for t in Transport}  # an Enum's .value is a property: ~5x a dict lookup


def as_candidate(d: Datagram) -> Candidate:
    return (d.ts, d.no, _TEXT[d.transport], d.src, d.sport, d.dst, d.dport, d.payload, d.encap, d.source)


def candidates(frames: Iterable[Frame], capture: CaptureStage) -> Iterator[Candidate]:
    feed = capture.feed
    text = _TEXT
    for frame in frames:
        for d in feed(frame):
            if d.__class__ is Datagram:  # as_candidate, inlined: this loop runs per packet
                yield (d.ts, d.no, text[d.transport], d.src, d.sport, d.dst, d.dport,
                       d.payload, d.encap, d.source)
    for d in capture.finish():  # messages that only end of input completes (TCP after a gap)
        if d.__class__ is Datagram:
            yield as_candidate(d)


def format_batch(fmt: str) -> Callable[[list[Candidate]], tuple[bytes, Delta]]:
    """A function that parses a batch of candidates and formats each message as one line."""
    line = jsonl if fmt == "jsonl" else table
    addr = AddressText()
    encaps: dict[tuple[str, ...], str] = {}
    parse, SipError = sip.parse, sip.SipError

    def work(batch: list[Candidate]) -> tuple[bytes, Delta]:
        anomalies: Counter[str] = Counter()
        lines = []
        for ts, no, transport, src, sport, dst, dport, payload, encap, _source in batch:
            try:
                m = parse(payload)
            except SipError as err:
                anomalies[err.name] += 1
                continue
            if m.defects:
                anomalies.update(m.defects)
            lines.append(line(
                ts, no, addr(src), sport, addr(dst), dport, transport,
                encaps.get(encap) or encaps.setdefault(encap, "/".join(encap)), m,
            ))
        return b"".join(lines), (len(lines), dict(anomalies))

    return work


def candidate_time(c: Candidate) -> float:
    return c[0]


def message_lines(
    frames: Iterable[Frame], fmt: str, workers: int, counters: Counters, extra: Iterable[Datagram] = (),
) -> Iterator[bytes]:
    """Chunks of output for every SIP message in ``frames``, in capture order.

    ``extra`` holds messages found another way (decrypted TLS), in time order; they are
    merged into the stream by timestamp.
    """
    capture = CaptureStage(counters)
    cands: Iterator[Candidate] = candidates(frames, capture)
    extra = list(extra)
    if extra:
        cands = heapq.merge(cands, map(as_candidate, extra), key=candidate_time)
    work = format_batch(fmt)
    batches = batched(cands)
    results = map(work, batches) if workers <= 0 else ordered_map(batches, work, workers)
    for text, (parsed, anomalies) in results:
        counters.sip_messages += parsed
        counters.anomalies.update(anomalies)
        yield text
