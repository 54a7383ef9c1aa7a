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
serves them). Capture counters come from worker 0 (every worker counts the same), but for the
duplicate filter's (each worker filters its own shard's datagrams: fileworker); parse and
tracker counters are summed, source errors come from worker 0.

On a single classic pcap file the workers skip other shards' frames in C (fileworker._Walk);
the records and counters are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from sipsniff_acc import fileworker, stopping
from sipsniff_acc.events import Counters, Frame
from sipsniff_acc.fileworker import Shipped
from sipsniff_acc.messagerun import Tail, add_counters
from sipsniff_acc.processrun import Control, PartResult, RunResult, _deliver_rounds
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import RulesFile
from sipsniff_acc.shard import Inbox, streamed_map
from sipsniff_acc.sources.pcapfile import CaptureChanged, SourceError


#: frames per round (fileworker.ROUND_FRAMES; tests make rounds small to cross their boundaries)
ROUND_FRAMES = fileworker.ROUND_FRAMES


def _producer(frames: Iterable[Frame], k: int, workers: int, rules: RulesFile, open_as_408: bool,
              errors: list[SourceError]) -> Callable[[Inbox], Iterator[tuple[Shipped, Tail]]]:
    """Worker k's run: the whole capture stage, the parse and accounting of shard k (fileworker)."""

    def produce(inbox: Inbox) -> Iterator[tuple[Shipped, Tail]]:
        return fileworker.produce(frames, k, workers, rules, open_as_408, errors, inbox, ROUND_FRAMES)

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
