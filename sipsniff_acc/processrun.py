"""Wiring for ``sipsniff-acc process``: frames → messages → transactions → acc records → emitters.

``AccPipeline`` is the pure part (SIP messages in, records out); ``run`` drives it from a
frame source and hands each batch of records to every emitter, in event order.
"""

from __future__ import annotations

import heapq
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from sipsniff_acc.acc import AccEngine
from sipsniff_acc.emitters import Emitter
from sipsniff_acc.events import Counters, Datagram, Frame
from sipsniff_acc.limits import Limits
from sipsniff_acc.messagerun import Candidate, as_candidate, candidate_time, candidates
from sipsniff_acc.pipeline import CaptureStage, MessagePipeline, SipParser
from sipsniff_acc import stopping
from sipsniff_acc.shard import BATCH, sharded_map
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import RulesFile, parse_address
from sipsniff_acc.sip import SipMessage
from sipsniff_acc.tracker import TrackerStats, TransactionTracker


class AccPipeline:
    """SIP messages in capture order → acc records. Pure."""

    def __init__(self, rules: RulesFile, open_as_408: bool = False, shards: int = 1) -> None:
        """``shards``: the number of workers sharing the calls (-j N); each keeps 1/N of the limits."""
        self.rules = rules
        self.open_as_408 = open_as_408
        limits = (getattr(rules, "limits", None) or Limits()).shard(shards)  # rules.yaml's limits:, if any
        self.tracker = TransactionTracker(
            [parse_address(a) for a in rules.proxy.addresses], rules.tm.wait_timer, rules.tm.fr_timer,
            rules.tm.fr_inv_timer, limits)
        self.engine = AccEngine(rules, limits, self.tracker.stats)  # one set of counters for the summary

    def feed(self, msg: SipMessage) -> list[AccRecord]:
        out: list[AccRecord] = []
        for ev in self.tracker.feed(msg):
            out.extend(self.engine.feed(ev))
        return out

    def finish(self) -> list[AccRecord]:
        out: list[AccRecord] = []
        for ev in self.tracker.finish(self.open_as_408):
            out.extend(self.engine.feed(ev))
        return out


def records_of(messages: Iterable[SipMessage], rules: RulesFile, open_as_408: bool = False) -> list[AccRecord]:
    acc = AccPipeline(rules, open_as_408)
    out: list[AccRecord] = []
    for m in messages:
        out.extend(acc.feed(m))
    out.extend(acc.finish())
    return out


@dataclass
class RunResult:
    records: Counter[str] = field(default_factory=Counter)  #: by kind
    by_backend: Counter[str] = field(default_factory=Counter)
    tracker: TrackerStats = field(default_factory=TrackerStats)
    open_as_408: bool = False


def run(frames: Iterable[Frame], rules: RulesFile, emitters: Sequence[Emitter], counters: Counters,
        open_as_408: bool = False, result: RunResult | None = None, workers: int = 0,
        extra: Sequence[Datagram] = ()) -> RunResult:
    """Drive the pipeline; ``result`` (if given) is filled in place, so a caller interrupted by
    a signal still has the counts of what was delivered to the emitters. ``extra``: SIP found
    another way (TLS decrypted by tshark), in time order, merged in by timestamp."""
    result = result if result is not None else RunResult()
    result.open_as_408 = open_as_408

    stop = stopping.STATE

    def deliver(records: list[AccRecord]) -> None:
        # Guarded: a stop signal waits for the records to be with every output (and its raise
        # cannot land inside a driver or between the spool's commit and its bookkeeping).
        stop.guarded += 1
        try:
            for r in records:
                result.records[r.kind] += 1
                result.by_backend.update(r.backends)
            for e in emitters:
                e.emit(records)
        finally:
            stop.guarded -= 1
        if stop.signum:
            stopping.check()

    if workers > 0:
        _run_sharded(frames, rules, deliver, counters, open_as_408, workers, result, extra)
        return result
    messages = MessagePipeline(counters)
    acc = AccPipeline(rules, open_as_408)
    result.tracker = acc.tracker.stats

    feed = acc.feed
    items: Iterable[Frame | Datagram] = frames
    if extra:
        items = heapq.merge(frames, extra, key=_ts)
    for frame in items:
        if stop.signum:  # a safe point: the handler's own raise may have been swallowed
            stopping.check()
        found = messages.feed(frame) if frame.__class__ is Frame else messages.parser.feed(frame)  # type: ignore[arg-type]
        for item in found:
            if item.__class__ is SipMessage:
                recs = feed(item)
                if recs:
                    deliver(recs)
    stopping.check()
    for item in messages.finish():
        if item.__class__ is SipMessage:
            recs = feed(item)
            if recs:
                deliver(recs)
    recs = acc.finish()
    if recs:
        deliver(recs)
    return result


# --- several processes: shards by Call-ID ------------------------------------------------

#: Call-ID header line in a raw message (long or compact form): the front process shards on
#: it without parsing the message (a regex search, ~0.5 µs, against ~4 µs for a parse).
_CALL_ID = re.compile(rb"\n(?:call-id|i)[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)

Part = tuple[float, list[tuple[int, Candidate]]] | None  #: (first packet time, [(sequence, candidate)]); None: finish
PartResult = tuple[list[tuple[int, AccRecord]], int, dict[str, int], TrackerStats | None]


def _ts(item: Frame | Datagram) -> float:
    return item.ts


ROUND_SPAN = 1.0  #: seconds of packet time a round may span (a live capture's records are not held longer)


def batched_in_time(cands: Iterable[Candidate], size: int = BATCH) -> Iterator[list[Candidate]]:
    """Rounds of at most ``size`` messages or ROUND_SPAN seconds of packet time."""
    batch: list[Candidate] = []
    start = 0.0
    for c in cands:
        if batch and (len(batch) >= size or c[0] - start >= ROUND_SPAN):
            yield batch
            batch = []
        if not batch:
            start = c[0]
        batch.append(c)
    if batch:
        yield batch


def shard_of(payload: bytes, shards: int) -> int:
    m = _CALL_ID.search(payload)
    return zlib.crc32(m.group(1).strip() if m else b"") % shards


def acc_worker(rules: RulesFile, open_as_408: bool, shards: int = 1) -> Callable[[Part], PartResult]:
    """A worker's state: a parser and an AccPipeline for the calls of its shard (1/shards of
    the memory limits, so N workers together hold what one process would)."""
    counters = Counters()
    parser = SipParser(counters)
    acc = AccPipeline(rules, open_as_408, shards)

    def work(part: Part) -> PartResult:
        out: list[tuple[int, AccRecord]] = []
        if part is None:
            out = [(1 << 62, r) for r in acc.finish()]
            return out, 0, {}, acc.tracker.stats
        first, items = part
        if not acc.engine.start:
            acc.engine.start = first  # $TS: the first packet of the whole run, not of this shard
        before = counters.sip_messages
        counters.anomalies.clear()
        feed, message = acc.feed, parser.message
        for seq, c in items:
            msg = message(*c)
            if msg is not None:
                for r in feed(msg):
                    out.append((seq, r))
        return out, counters.sip_messages - before, dict(counters.anomalies), None

    return work


def merge_stats(into: TrackerStats, other: TrackerStats) -> None:
    into.merge(other)


def _run_sharded(frames: Iterable[Frame], rules: RulesFile, deliver: Callable[[list[AccRecord]], None],
                 counters: Counters, open_as_408: bool, workers: int, result: RunResult,
                 extra: Sequence[Datagram] = ()) -> None:
    """The front reads and reassembles; workers parse and account their calls. Records of a
    round are put back in the order of the messages that caused them: the output is the
    single-process run's, record for record."""
    capture = CaptureStage(counters)
    stop = stopping.STATE

    def rounds() -> Iterator[list[Part]]:
        seq = 0
        first = 0.0
        cands: Iterator[Candidate] = candidates(frames, capture)
        if extra:
            cands = heapq.merge(cands, map(as_candidate, extra), key=candidate_time)
        for batch in batched_in_time(cands):
            if stop.signum:
                stopping.check()
            if not first:
                first = batch[0][0]
            parts: list[list[tuple[int, Candidate]]] = [[] for _ in range(workers)]
            for c in batch:
                parts[shard_of(c[7], workers)].append((seq, c))
                seq += 1
            yield [(first, p) for p in parts]
        yield [None] * workers

    results_of = sharded_map(rounds(), acc_worker(rules, open_as_408, workers), workers)
    try:
        _deliver_rounds(results_of, deliver, counters, result, stop)
    finally:
        results_of.close()  # now, not when the traceback is freed: a stop kills the workers at once


def _deliver_rounds(results_of: Iterator[list[PartResult]], deliver: Callable[[list[AccRecord]], None],
                    counters: Counters, result: RunResult, stop: stopping.StopState) -> None:
    for results in results_of:
        if stop.signum:
            stopping.check()
        merged: list[tuple[int, AccRecord]] = []
        for recs, parsed, anomalies, stats in results:
            merged.extend(recs)
            counters.sip_messages += parsed
            counters.anomalies.update(anomalies)
            if stats is not None:
                merge_stats(result.tracker, stats)
        if merged:
            merged.sort(key=lambda sr: sr[0])  # stable: records of one message keep their order
            deliver([r for _seq, r in merged])
