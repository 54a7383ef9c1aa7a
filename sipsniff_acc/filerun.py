"""``process -j N`` on capture files: every worker reads the files itself.

Why: with the front reading, decoding and pickling every SIP candidate to the workers, the
front was the third busy process on two cores (50k calls: front 6.6 CPU s, each worker 5.9)
and the candidates crossed a pipe twice. The capture stage is deterministic, so every worker
that reads the same files sees the same candidates and Ticks in the same order and numbers
them alike: worker k parses and accounts only the candidates whose Call-ID shard is k, fires
the same timers at the same Ticks, and sends back only its records, each tagged with the
sequence position that made it. The front merges the rounds into the -j 0 order (as the
round loop of processrun does) and delivers them. Each worker pays the capture stage
(~2.6 CPU s for 50k calls, pure Python) instead of the front paying it plus the pickling.

Only for what can be read twice: capture files (not stdin, not a live interface), with no
TLS key log, --hep-out tap or --state (those need the one front; processrun's round loop
serves them). Capture counters come from worker 0 (every worker counts the same), parse and
tracker counters are summed, source errors come from worker 0.
"""

from __future__ import annotations

import operator
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields
from typing import Any

from sipsniff_acc import stopping
from sipsniff_acc.events import Counters, Frame
from sipsniff_acc.messagerun import Tail, Tick, add_counters, timed_candidates
from sipsniff_acc.pipeline import CaptureStage, SipParser
from sipsniff_acc.collector import collect_rarely
from sipsniff_acc.processrun import AccPipeline, Control, PartResult, RunResult, _deliver_rounds
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import RulesFile
from sipsniff_acc.shard import BATCH, Inbox, streamed_map
from sipsniff_acc.sip import call_id_line
from sipsniff_acc.sources.pcapfile import CaptureChanged, SourceError
from sipsniff_acc.tracker import TrackerStats

#: a worker's round: processrun's PartResult with each record as the tuple of its fields
Shipped = tuple[list[tuple[int, tuple[Any, ...]]], int, dict[str, int], TrackerStats | None, dict[str, int]]

#: a record crosses the pipe as the tuple of its fields: a slots dataclass pickles through
#: dataclasses' Python __getstate__/__setstate__ (fields() per record): 3.4 % of a worker
_record_values = operator.attrgetter(*(f.name for f in fields(AccRecord)))

def _producer(frames: Iterable[Frame], k: int, workers: int, rules: RulesFile, open_as_408: bool,
              errors: list[SourceError]) -> Callable[[Inbox], Iterator[tuple[Shipped, Tail]]]:
    """Worker k's run: the whole capture stage, the parse and accounting of shard k."""
    round_size = BATCH * workers  #: candidates (of every shard) per round: ~BATCH of this worker's

    def produce(inbox: Inbox) -> Iterator[tuple[Shipped, Tail]]:
        collect_rarely(forked=True)  # the per-message path makes no cycles (collector.GC_YOUNG)
        capture_counters = Counters()
        capture = CaptureStage(capture_counters, limits=getattr(rules, "limits", None))
        counters = Counters()
        parser = SipParser(counters)
        acc = AccPipeline(rules, open_as_408, workers, ticked=True)  # advance() at timed_candidates' Ticks
        message, feed, advance, crc32, values = parser.message, acc.feed, acc.advance, zlib.crc32, _record_values
        out: list[tuple[int, tuple[Any, ...]]] = []
        seq = n = reported = 0
        first = True

        def part() -> Shipped:
            nonlocal out, n, reported
            done = (out, counters.sip_messages - reported, dict(counters.anomalies), None,
                    dict(counters.sip_by_kind))
            reported = counters.sip_messages
            counters.anomalies.clear()
            counters.sip_by_kind.clear()
            out, n = [], 0
            return done

        for item in timed_candidates(frames, capture):
            if item.__class__ is tuple:
                if first:  # $TS: the first packet of the whole run, as processrun's round loop sets it
                    first = False
                    if not acc.engine.start:
                        acc.engine.start = item[0]
                cid = call_id_line(item[7])  # processrun.shard_of, inlined
                if crc32(cid.strip() if cid is not None else b"") % workers == k:
                    msg = message(*item)
                    if msg is not None:
                        for r in feed(msg):
                            out.append((seq, values(r)))
                seq += 1
                n += 1
                if n >= round_size:
                    yield part(), None
                    rules_now = inbox()  # a SIGHUP reload the front passed on (looked for once a
                    if rules_now is not None:  # round: a look per Tick cost 5 % of a worker)
                        acc.replace_rules(rules_now)
            elif item.__class__ is Tick:  # the timers, at the same packet time as with -j 0
                for r in advance(item.ts):
                    out.append((seq, values(r)))
                seq += 1
        yield part(), None
        last: Shipped = ([(1 << 62, values(r)) for r in acc.finish()], 0, {}, acc.tracker.stats, {})
        yield last, ((capture_counters, [(e.path, e.offset, e.reason) for e in errors]) if k == 0 else None)

    return produce


def run_files(open_frames: Callable[[int], Iterable[Frame]], errors: list[SourceError], rules: RulesFile,
              deliver: Callable[[list[AccRecord]], None], counters: Counters, open_as_408: bool, workers: int,
              result: RunResult, control: Control | None = None) -> None:
    """Fork ``workers`` readers of the files and deliver their records in the -j 0 order."""
    stop = stopping.STATE

    def reload() -> RulesFile | None:  # SIGHUP: each worker takes the new rules at its next round
        new = control.pending_rules() if control is not None else None
        if new is not None:
            result.rule_reloads += 1
        return new

    produces = [_producer(open_frames(k), k, workers, rules, open_as_408, errors) for k in range(workers)]

    stream = streamed_map(produces, control=reload, fatal=(CaptureChanged,))

    def parts() -> Iterator[list[PartResult]]:
        for round_ in stream:
            for _part, tail in round_:
                if tail is not None:
                    capture_counters, errs = tail
                    add_counters(counters, capture_counters)
                    errors.extend(SourceError(*e) for e in errs)
            yield [([(seq, AccRecord(*v)) for seq, v in recs], parsed, anomalies, stats, kinds)
                   for (recs, parsed, anomalies, stats, kinds), _tail in round_]

    try:
        _deliver_rounds(parts(), deliver, counters, result, stop)
    finally:
        stream.close()  # now, not when the traceback is freed: a stop kills the workers at once
