"""A -j N worker's loop over capture files (filerun.py): every frame through the capture stage,
the Call-ID shard of every SIP datagram, the parse and accounting of this worker's own.

Why a module of its own: it runs per frame in every worker and is compiled by mypyc (setup.py
COMPILED), like processrun's -j 0 loop; filerun.py, which tests replace parts of, stays Python
(a compiled caller would call the compiled function directly, past a test's replacement).
"""

from __future__ import annotations

import operator
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields
from itertools import chain
from typing import Any

from sipsniff_acc.collector import collect_rarely
from sipsniff_acc.events import Anomaly, CaptureGap, Counters, Datagram, Frame, Idle, Transport
from sipsniff_acc.messagerun import TICK, Tail
from sipsniff_acc.pipeline import CaptureStage, SipParser
from sipsniff_acc.processrun import AccPipeline
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import RulesFile
from sipsniff_acc.shard import BATCH, Inbox
from sipsniff_acc.sip import call_id_line
from sipsniff_acc.sources.pcapfile import SourceError
from sipsniff_acc.tracker import TrackerStats

#: a worker's round: processrun's PartResult with each record as the tuple of its fields
Shipped = tuple[list[tuple[int, tuple[Any, ...]]], int, dict[str, int], TrackerStats | None, dict[str, int]]

#: a record crosses the pipe as the tuple of its fields: a slots dataclass pickles through
#: dataclasses' Python __getstate__/__setstate__ (fields() per record): 3.4 % of a worker
_record_values = operator.attrgetter(*(f.name for f in fields(AccRecord)))

_TEXT = {t: t.value for t in Transport}  #: a transport's text by a dict (Enum.value is a property)


def _shard_py(payload: bytes, shards: int) -> int:
    cid = call_id_line(payload)  # processrun.shard_of
    return zlib.crc32(cid.strip() if cid is not None else b"") % shards


#: the Call-ID shard of a SIP datagram, asked of every one in the capture by every worker: the C
#: one (_capture.shard: no bytes for the value, no Python call for the CRC) when it is built
shard_of: Callable[[bytes, int], int] = _shard_py
try:
    from sipsniff_acc._capture import shard as _shard_c

    shard_of = _shard_c
except ImportError:  # built without a compiler
    pass


def _shipped(out: list[tuple[int, tuple[Any, ...]]], counters: Counters, reported: int) -> Shipped:
    """A round's result; the round's anomaly and kind counts are taken (cleared)."""
    done = (out, counters.sip_messages - reported, dict(counters.anomalies), None, dict(counters.sip_by_kind))
    counters.anomalies.clear()
    counters.sip_by_kind.clear()
    return done


def produce(frames: Iterable[Frame | Idle | CaptureGap], k: int, workers: int, rules: RulesFile,
            open_as_408: bool, errors: list[SourceError], inbox: Inbox) -> Iterator[tuple[Shipped, Tail]]:
    """filerun._producer's loop: messagerun.timed_candidates inlined (the same candidates, Ticks
    and sequence numbers), a frame's datagrams taken straight from the capture stage and only
    this shard's parsed: no candidate tuple, no generator hop per message (compiled by mypyc,
    like the -j 0 loop in processrun)."""
    collect_rarely(forked=True)  # the per-message path makes no cycles (collector.GC_YOUNG)
    capture_counters = Counters()
    capture = CaptureStage(capture_counters, limits=getattr(rules, "limits", None))
    counters = Counters()
    parser = SipParser(counters)
    acc = AccPipeline(rules, open_as_408, workers, ticked=True)  # advance() at the Ticks, as timed_candidates'
    shard = shard_of
    text = _TEXT
    round_size = BATCH * workers  #: candidates (of every shard) per round: ~BATCH of this worker's
    out: list[tuple[int, tuple[Any, ...]]] = []
    seq = 0  #: candidates and Ticks so far (the merge's order key; every worker counts alike)
    n = 0  #: candidates in this round
    reported = 0  #: counters.sip_messages at the last round
    first = True
    next_tick = float("-inf")
    release = capture.advance  # the capture stage's timers at a live source's Idle (not for files)
    for frame in chain(frames, (None,)):
        found: list[Datagram | Anomaly]
        if isinstance(frame, Frame):
            ts = frame.ts
            if ts >= next_tick:  # before the frame's messages: a timer due fires before a message of its time
                if next_tick != float("-inf"):  # a Tick: the timers, at the same packet time as with -j 0
                    for r in acc.advance(ts):
                        out.append((seq, _record_values(r)))
                    seq += 1
                next_tick = ts + TICK
            found = capture.feed(frame)
        elif frame is None:  # the end: messages that only end of input completes (TCP after a gap)
            found = capture.finish()
        elif isinstance(frame, Idle):
            found = release(frame.ts)
        else:  # CaptureGap: nothing to parse
            continue
        for d in found:
            if not isinstance(d, Datagram):
                continue
            if first:  # $TS: the first packet of the whole run, as processrun's round loop sets it
                first = False
                if not acc.engine.start:
                    acc.engine.start = d.ts
            payload = d.payload
            if shard(payload, workers) == k:
                msg = parser.message(d.ts, d.no, text[d.transport], d.src, d.sport, d.dst, d.dport, payload,
                                     d.encap, d.source)
                if msg is not None:
                    for r in acc.feed(msg):
                        out.append((seq, _record_values(r)))
            seq += 1
            n += 1
            if n >= round_size:
                yield _shipped(out, counters, reported), None
                reported = counters.sip_messages
                out, n = [], 0
                rules_now = inbox()  # a SIGHUP reload the front passed on (looked for once a
                if rules_now is not None:  # round: a look per Tick cost 5 % of a worker)
                    acc.replace_rules(rules_now)
    yield _shipped(out, counters, reported), None
    last: Shipped = ([(1 << 62, _record_values(r)) for r in acc.finish()], 0, {}, acc.tracker.stats, {})
    yield last, ((capture_counters, [(e.path, e.offset, e.reason) for e in errors]) if k == 0 else None)
