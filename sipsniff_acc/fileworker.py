"""A -j N worker's loop over capture files (filerun.py): every frame through the capture stage,
the Call-ID shard of every SIP datagram, the parse and accounting of this worker's own. On one
classic pcap file the common frames of other shards (and RTP, keep-alives) are only counted, in
C (_Walk): a worker's capture stage was ~38 % of it when every frame came up to Python.

Why a module of its own: it runs per frame in every worker and is compiled by mypyc (setup.py
COMPILED), like processrun's -j 0 loop; filerun.py, which tests replace parts of, stays Python
(a compiled caller would call the compiled function directly, past a test's replacement).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields
from itertools import chain
from typing import Any

from sipsniff_acc.collector import collect_rarely
from sipsniff_acc.events import Anomaly, CaptureGap, Counters, Datagram, Frame, Idle, Transport
from sipsniff_acc.messagerun import TICK, Tail
from sipsniff_acc.decode import speedups
from sipsniff_acc.pipeline import ADVANCE_EVERY, CaptureStage, SipParser, shard_of
from sipsniff_acc.processrun import AccPipeline
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import RulesFile
from sipsniff_acc.shard import Inbox
from sipsniff_acc.sources.pcapfile import CaptureStream, SourceError
from sipsniff_acc.tracker import TrackerStats

#: a worker's round: processrun's PartResult with each record as the tuple of its fields
Shipped = tuple[list[tuple[int, tuple[Any, ...]]], int, dict[str, int], TrackerStats | None, dict[str, int]]

#: a record crosses the pipe as the tuple of its fields: a slots dataclass pickles through
#: dataclasses' Python __getstate__/__setstate__ (fields() per record): 3.4 % of a worker
_record_values = operator.attrgetter(*(f.name for f in fields(AccRecord)))

_TEXT = {t: t.value for t in Transport}  #: a transport's text by a dict (Enum.value is a property)


#: frames per round, the same cut in every worker (the front merges round i of every worker):
#: a round holds the records of the messages and Ticks of its frames
ROUND_FRAMES = 4096


class _Walk:
    """``_capture.pcap_shard`` for worker k as a CaptureReader's walker: other shards' plain UDP SIP,
    keep-alives and RTP are counted in C, never made into Python objects. Follows the worker's
    Tick and the capture stage's timers, so that a skipped frame that is due for them comes out."""

    def __init__(self, walk: Any, k: int, shards: int, next_advance: float) -> None:
        self.walk = walk
        self.k = k
        self.shards = shards
        self.started = False  #: a SIP datagram was seen ($TS): other shards' may be skipped
        self.next_tick = float("-inf")
        self.next_advance = next_advance
        self.no = 0  #: records walked
        self.frames = 0  #: records counted here (not handed on as a Frame), their bytes, ...
        self.bytes = 0
        self.keepalives = 0
        self.not_sip = 0

    def __call__(self, buf: Any, pos: int, big: bool, unit: float, linktype: int, no: int,
                 source: str) -> tuple[list[Any], int, int]:
        (items, pos, no, self.next_tick, self.next_advance, frames, nbytes, keepalives,
         not_sip) = self.walk(buf, pos, big, unit, linktype, no, source, self.k, self.shards, self.started,
                              self.next_tick, TICK, self.next_advance, ADVANCE_EVERY)
        self.no = no
        self.frames += frames
        self.bytes += nbytes
        self.keepalives += keepalives
        self.not_sip += not_sip
        return items, pos, no

    def count(self, counters: Counters) -> None:
        """The records counted here into the capture stage's counters."""
        counters.frames += self.frames
        counters.bytes += self.bytes
        counters.keepalives += self.keepalives
        if self.not_sip:
            counters.skipped["udp_not_sip"] += self.not_sip


def _walker(frames: Iterable[Any], k: int, workers: int, capture: CaptureStage) -> _Walk | None:
    """Worker k's walk of a single classic pcap file in C (_capture.pcap_shard), if it can be
    installed; every worker decides alike (same files, same build)."""
    inner = getattr(frames, "inner", frames)  # cli's progress bar passes the items on
    if speedups is None or not isinstance(inner, CaptureStream):
        return None
    walk = _Walk(speedups.pcap_shard, k, workers, capture.next_advance)
    return walk if inner.walk_with(walk) else None


def _shipped(out: list[tuple[int, tuple[Any, ...]]], counters: Counters, reported: int) -> Shipped:
    """A round's result; the round's anomaly and kind counts are taken (cleared)."""
    done = (out, counters.sip_messages - reported, dict(counters.anomalies), None, dict(counters.sip_by_kind))
    counters.anomalies.clear()
    counters.sip_by_kind.clear()
    return done


def produce(frames: Iterable[Any], k: int, workers: int, rules: RulesFile,
            open_as_408: bool, errors: list[SourceError], inbox: Inbox,
            round_frames: int = ROUND_FRAMES) -> Iterator[tuple[Shipped, Tail]]:
    """filerun._producer's loop: messagerun.timed_candidates inlined (the same candidates and
    Ticks), a frame's datagrams taken straight from the capture stage and only this shard's
    parsed (compiled by mypyc, like the -j 0 loop in processrun).

    On a single classic pcap file the C walk (_Walk) keeps other shards' frames out of Python:
    the items are then Frames (for the capture stage), this shard's Datagrams, and (no, ts) for
    a dropped frame due for a Tick or the capture timers. What every worker numbers alike is
    the frame: a record's sequence number is frame << 32 | j (j 0 its Tick, 1... its datagrams)
    and a round is ``round_frames`` frames, so the front's merge is the -j 0 order."""
    collect_rarely(forked=True)  # the per-message path makes no cycles (collector.GC_YOUNG)
    capture_counters = Counters()
    capture = CaptureStage(capture_counters, limits=getattr(rules, "limits", None), shard=(k, workers))
    counters = Counters()
    parser = SipParser(counters)
    acc = AccPipeline(rules, open_as_408, workers, ticked=True)  # advance() at the Ticks, as timed_candidates'
    shard = shard_of
    text = _TEXT
    walk = _walker(frames, k, workers, capture)
    walking = walk is not None  #: a frame's no is its index in the stream (one file)
    out: list[tuple[int, tuple[Any, ...]]] = []
    frame: int = 0  #: the index of the frame at hand (1...)
    ts: float = 0.0
    round_end = round_frames  #: the last frame of this round
    reported = 0  #: counters.sip_messages at the last round
    first = True
    next_tick = float("-inf")
    release = capture.advance  # the capture stage's timers at a live source's Idle (not for files)
    found: list[Datagram | Anomaly]
    for item in chain(frames, (None,)):
        cls = item.__class__
        if cls is Datagram:  # this shard's plain UDP SIP, decoded and counted by the walk
            frame = item.no
            ts = item.ts
        elif cls is Frame:
            frame = item.no if walking else frame + 1
            ts = item.ts
        elif cls is tuple:  # (no, ts): a frame the walk dropped, due for the Tick or the timers
            frame, ts = item
        elif item is None:  # the end: messages that only end of input completes (TCP after a gap)
            if walk is not None and walk.no > frame:
                frame = walk.no
            frame += 1
            ts = next_tick
        elif cls is Idle:
            frame += 1
            ts = next_tick
        else:  # CaptureGap: nothing to parse
            continue
        while frame > round_end:  # every worker cuts its rounds at the same frames
            yield _shipped(out, counters, reported), None
            reported = counters.sip_messages
            out = []
            round_end += round_frames
            rules_now = inbox()  # a SIGHUP reload the front passed on (looked for once a
            if rules_now is not None:  # round: a look per Tick cost 5 % of a worker)
                acc.replace_rules(rules_now)
        seq = frame << 32
        if item is None:
            found = capture.finish()
        elif cls is Idle:
            found = release(item.ts)
        else:
            if ts >= next_tick:  # before the frame's messages: a timer due fires before a message of its time
                if next_tick != float("-inf"):  # a Tick: the timers, at the same packet time as with -j 0
                    for r in acc.advance(ts):
                        out.append((seq, _record_values(r)))
                next_tick = ts + TICK
            if cls is Datagram:
                found = capture.sip_datagram(item)
            elif cls is Frame:
                found = capture.feed(item)
            else:
                found = capture.passed(ts)
        for d in found:
            if not isinstance(d, Datagram):
                continue
            seq += 1
            if first:  # $TS: the first packet of the whole run, as processrun's round loop sets it
                first = False
                if walk is not None:
                    walk.started = True
                if not acc.engine.start:
                    acc.engine.start = d.ts
            payload = d.payload
            if d is item or shard(payload, workers) == k:  # the walk's Datagram is this shard's
                msg = parser.message(d.ts, d.no, text[d.transport], d.src, d.sport, d.dst, d.dport, payload,
                                     d.encap, d.source)
                if msg is not None:
                    for r in acc.feed(msg):
                        out.append((seq, _record_values(r)))
    yield _shipped(out, counters, reported), None
    if walk is not None:
        walk.count(capture_counters)
    last: Shipped = ([((frame + 1) << 32, _record_values(r)) for r in acc.finish()], 0, {}, acc.tracker.stats, {})
    yield last, (capture_counters, [(e.path, e.offset, e.reason) for e in errors]) if k == 0 else (
        _shard_counts(capture_counters), [])


def _shard_counts(capture: Counters) -> Counters:
    """What worker k > 0 adds to worker 0's capture counters: its shard's duplicates (each worker
    filters only its own shard's; every other count is every worker's alike)."""
    mine = Counters(duplicates=capture.duplicates)
    overflows = capture.anomalies.get("udp_dedup_overflow", 0)
    if overflows:
        mine.anomalies["udp_dedup_overflow"] = overflows
    return mine
