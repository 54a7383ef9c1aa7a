"""Wiring for ``sipsniff-acc messages``: frames → output lines, in one process or several.

The reading process runs the capture stage and ships SIP candidates, in batches, to
``format_batch``; with ``workers=0`` the same function runs in the reading process, so
both modes share one code path and give byte-identical output. On capture files (what
``file_frames`` recognises) every worker reads the files itself instead and formats every
N-th batch: the front only writes (``_reread_lines``; processrun's -j N does the same in
filerun.py).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any

from sipsniff_acc import sip
from sipsniff_acc.collector import collect_rarely
from sipsniff_acc.events import CaptureGap, Counters, Datagram, Frame, Idle, Transport
from sipsniff_acc.messagelog import fast_jsonl, fast_table, jsonl, table
from sipsniff_acc.limits import Limits
from sipsniff_acc.pipeline import AddressText, CaptureStage
from sipsniff_acc.shard import BATCH, Inbox, batched, ordered_map, streamed_map
from sipsniff_acc.sources.pcapfile import CaptureChanged, CaptureStream, SourceError

#: what crosses the process boundary: a Datagram as a plain tuple (cheaper to pickle)
Candidate = tuple[float, int, str, bytes, int, bytes, int, bytes, tuple[str, ...], str]
Delta = tuple[int, dict[str, int]]  #: SIP messages parsed, anomalies by name

_TEXT = {t: t.value for t in Transport}  # an Enum's .value is a property: ~5x a dict lookup


def as_candidate(d: Datagram) -> Candidate:
    return (d.ts, d.no, _TEXT[d.transport], d.src, d.sport, d.dst, d.dport, d.payload, d.encap, d.source)


@dataclass(slots=True)
class Tick:
    """Packet time went on by ``TICK`` seconds since the last tick (frames that carried no SIP
    count too): the accounting's timers fire here, at the same points with -j 0 and -j N."""

    ts: float


TICK = 0.05  #: seconds of packet time between Ticks (a live run's timers and rounds: ≤ 200 ms late)

Marker = Idle | CaptureGap | Tick


def candidates(frames: Iterable[Frame | Idle | CaptureGap], capture: CaptureStage) -> Iterator[Candidate]:
    """The SIP candidates of the frames; a live source's Idle and CaptureGap are skipped."""
    feed = capture.feed
    text = _TEXT
    for frame in frames:
        if frame.__class__ is not Frame:
            continue  # Idle, CaptureGap: nothing to parse
        for d in feed(frame):
            if d.__class__ is Datagram:  # as_candidate, inlined: this loop runs per packet
                yield (d.ts, d.no, text[d.transport], d.src, d.sport, d.dst, d.dport,
                       d.payload, d.encap, d.source)
    for d in capture.finish():  # messages that only end of input completes (TCP after a gap)
        if d.__class__ is Datagram:
            yield as_candidate(d)


def timed_candidates(frames: Iterable[Frame | Idle | CaptureGap], capture: CaptureStage,
                     tick: float = TICK) -> Iterator[Candidate | Marker]:
    """``candidates`` with the passing of time: a Tick before the first frame at or past each
    ``tick`` seconds of packet time, and a live source's Idle and CaptureGap, in stream order."""
    feed = capture.feed
    text = _TEXT
    next_tick = float("-inf")
    release = getattr(capture, "advance", None)  # the capture stage's timers (a TCP hole given up), if it has them
    for frame in frames:
        if frame.__class__ is not Frame:
            if release is not None and frame.__class__ is Idle:
                for d in release(frame.ts):
                    if d.__class__ is Datagram:
                        yield as_candidate(d)
            yield frame  # type: ignore[misc]
            continue
        ts = frame.ts
        if ts >= next_tick:  # before the frame's messages: a timer due fires before a message of its time
            if next_tick != float("-inf"):
                yield Tick(ts)
            next_tick = ts + tick
        for d in feed(frame):
            if d.__class__ is Datagram:
                yield (d.ts, d.no, text[d.transport], d.src, d.sport, d.dst, d.dport,
                       d.payload, d.encap, d.source)
    for d in capture.finish():
        if d.__class__ is Datagram:
            yield as_candidate(d)


def item_time(c: Candidate | Marker) -> float:
    """The time of a candidate or a marker (for heapq.merge with decrypted TLS)."""
    return c[0] if c.__class__ is tuple else c.ts  # type: ignore[union-attr]


def batched_until_idle(frames: Iterable[Frame | Idle | CaptureGap], capture: CaptureStage,
                       size: int = BATCH) -> Iterator[list[Candidate]]:
    """Batches of candidates, also closed at a live source's Idle: ``messages -i`` prints a
    message ≤ 100 ms after silence falls, not when 1000 more have come."""
    batch: list[Candidate] = []
    for item in timed_candidates(frames, capture):
        if item.__class__ is tuple:
            batch.append(item)
            if len(batch) >= size:
                yield batch
                batch = []
        elif item.__class__ is Idle and batch:
            yield batch
            batch = []
    if batch:
        yield batch


def format_batch(fmt: str) -> Callable[[list[Candidate]], tuple[bytes, Delta]]:
    """A function that parses a batch of candidates and formats each message as one line."""
    line = jsonl if fmt == "jsonl" else table
    fast = fast_jsonl if fmt == "jsonl" else fast_table
    addr = AddressText()
    known = addr.known
    encaps: dict[tuple[str, ...], str] = {}
    parse, SipError = sip.parse, sip.SipError

    def work(batch: list[Candidate]) -> tuple[bytes, Delta]:
        anomalies: Counter[str] = Counter()
        lines: list[bytes] = []
        append = lines.append
        for ts, no, transport, src, sport, dst, dport, payload, encap, _source in batch:
            src_text = known.get(src) or addr(src)
            dst_text = known.get(dst) or addr(dst)
            encap_text = encaps.get(encap) or encaps.setdefault(encap, "/".join(encap))
            if fast is not None:  # parse and format in C: see messagelog.fast_jsonl
                text = fast(ts, no, src_text, sport, dst_text, dport, transport, encap_text, payload)
                if text is not None:
                    append(text)
                    continue
            try:
                m = parse(payload)
            except SipError as err:
                anomalies[err.name] += 1
                continue
            if m.defects:
                anomalies.update(m.defects)
            append(line(ts, no, src_text, sport, dst_text, dport, transport, encap_text, m))
        return b"".join(lines), (len(lines), dict(anomalies))

    return work


def candidate_time(c: Candidate) -> float:
    return c[0]


def message_lines(
    frames: Iterable[Frame], fmt: str, workers: int, counters: Counters, extra: Iterable[Datagram] = (),
    limits: Limits | None = None,
) -> Iterator[bytes]:
    """Chunks of output for every SIP message in ``frames``, in capture order.

    ``extra`` holds messages found another way (decrypted TLS), in time order; they are
    merged into the stream by timestamp. ``limits``: rules.yaml's (``max_sip_message``).
    """
    extra = list(extra)
    if workers > 0 and not extra:
        files = file_frames(frames)
        if files is not None:
            yield from _reread_lines(files[0], files[1], fmt, workers, counters, limits)
            return
    capture = CaptureStage(counters, limits=limits)
    work = format_batch(fmt)
    if extra:
        cands: Iterator[Candidate] = heapq.merge(candidates(frames, capture), map(as_candidate, extra),
                                                 key=candidate_time)
        batches = batched(cands)
    else:
        batches = batched_until_idle(frames, capture)
    results = map(work, batches) if workers <= 0 else ordered_map(batches, work, workers)
    for text, (parsed, anomalies) in results:
        counters.sip_messages += parsed
        counters.anomalies.update(anomalies)
        yield text


# --- workers that read the files themselves ------------------------------------------------

#: what a worker's last item carries: its capture counters and source errors as (path, offset,
#: reason) (SourceError does not pickle); None from the other workers, and before the end
Tail = tuple[Counters, list[tuple[str, int, str]]] | None

def file_frames(frames: Iterable[Any]) -> tuple[Callable[[int], Iterable[Frame]], list[SourceError]] | None:
    """If ``frames`` is the command line's unbegun stream over capture files (open_captures'
    CaptureStream, maybe inside cli's progress bar, whose ``inner`` it is): a function giving
    worker k its frames, and the run's error list. A forked worker begins its own copy of the
    stream, and each CaptureReader opens its file when iterated, so every worker reads the
    files afresh: each reads the files as they are now (pinned: a capture still being written
    is read to its present size by every worker alike). Any other shape (stdin, a FIFO, a live
    capture, a consumer, a begun stream): None."""
    inner = getattr(frames, "inner", frames)
    if not isinstance(inner, CaptureStream) or not inner.rereadable or getattr(frames, "started", False):
        return None
    inner.pin()
    return (lambda k: frames if k == 0 else inner), inner.errors  # the progress bar: drawn by worker 0 only


def add_counters(into: Counters, other: Counters) -> None:
    """``into`` += ``other``, field by field (ints and Counters)."""
    for f in fields(Counters):
        mine = getattr(into, f.name)
        if isinstance(mine, int):
            setattr(into, f.name, mine + getattr(other, f.name))
        else:
            mine.update(getattr(other, f.name))


def _line_producer(frames: Iterable[Frame], k: int, workers: int, fmt: str, limits: Limits | None,
                   errors: list[SourceError]) -> Callable[[Inbox], Iterator[tuple[tuple[bytes, Delta], Tail]]]:
    """Worker k of ``messages -j N`` on files: the whole capture stage, batches of BATCH
    candidates (as ``batched_until_idle`` cuts them), and the text of batches k, k + N, ...
    One item per round of N batches (b"" where a round has no batch k), then worker 0's
    capture counters and source errors."""

    def produce(_inbox: Inbox) -> Iterator[tuple[tuple[bytes, Delta], Tail]]:
        collect_rarely(forked=True)  # as a process worker's collector (the forked front's objects frozen)
        capture_counters = Counters()
        capture = CaptureStage(capture_counters, limits=limits)
        work = format_batch(fmt)
        batches = 0
        for batch in batched_until_idle(frames, capture):
            if batches % workers == k:
                yield work(batch), None
            batches += 1
        if 0 < batches % workers <= k:  # the last round ends before batch k: every worker yields as many
            yield (b"", (0, {})), None
        yield (b"", (0, {})), (capture_counters, [(e.path, e.offset, e.reason) for e in errors]) if k == 0 else None

    return produce


def _reread_lines(open_frames: Callable[[int], Iterable[Frame]], errors: list[SourceError], fmt: str,
                  workers: int, counters: Counters, limits: Limits | None) -> Iterator[bytes]:
    """``message_lines`` with workers that read the files themselves: the front only writes.
    Saves the front the capture stage and the pickling of every candidate (50k calls: 370 MB
    of payloads through the pipes, ~1.8 s of system time)."""
    produces = [_line_producer(open_frames(k), k, workers, fmt, limits, errors) for k in range(workers)]
    stream = streamed_map(produces, fatal=(CaptureChanged,))
    try:
        for round_ in stream:
            for (text, (parsed, anomalies)), tail in round_:
                counters.sip_messages += parsed
                counters.anomalies.update(anomalies)
                if tail is not None:
                    capture_counters, errs = tail
                    add_counters(counters, capture_counters)
                    errors.extend(SourceError(*e) for e in errs)
                if text:
                    yield text
    finally:
        stream.close()  # a stop or a closed output: the workers are killed now
