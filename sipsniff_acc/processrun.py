"""Wiring for ``sipsniff-acc process``: frames → messages → transactions → acc records → emitters.

``AccPipeline`` is the pure part (SIP messages in, records out); ``run`` drives it from a
frame source and hands each batch of records to every emitter, in event order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sipsniff_acc.acc import AccEngine
from sipsniff_acc.emitters import Emitter
from sipsniff_acc.events import Counters, Frame
from sipsniff_acc.pipeline import MessagePipeline
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import RulesFile, parse_address
from sipsniff_acc.sip import SipMessage
from sipsniff_acc.tracker import TransactionTracker


class AccPipeline:
    """SIP messages in capture order → acc records. Pure."""

    def __init__(self, rules: RulesFile, open_as_408: bool = False) -> None:
        self.rules = rules
        self.open_as_408 = open_as_408
        self.tracker = TransactionTracker(
            [parse_address(a) for a in rules.proxy.addresses], rules.tm.wait_timer, rules.tm.fr_timer,
            rules.tm.fr_inv_timer)
        self.engine = AccEngine(rules)

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
    acc: AccPipeline | None = None


def run(frames: Iterable[Frame], rules: RulesFile, emitters: Sequence[Emitter], counters: Counters,
        open_as_408: bool = False, result: RunResult | None = None) -> RunResult:
    """Drive the pipeline; ``result`` (if given) is filled in place, so a caller interrupted by
    a signal still has the counts of what was delivered to the emitters."""
    messages = MessagePipeline(counters)
    acc = AccPipeline(rules, open_as_408)
    result = result if result is not None else RunResult()
    result.acc = acc

    def deliver(records: list[AccRecord]) -> None:
        for r in records:
            result.records[r.kind] += 1
            result.by_backend.update(r.backends)
        for e in emitters:
            e.emit(records)

    feed = acc.feed
    for frame in frames:
        for item in messages.feed(frame):
            if item.__class__ is SipMessage:
                recs = feed(item)
                if recs:
                    deliver(recs)
    for item in messages.finish():
        if item.__class__ is SipMessage:
            recs = feed(item)
            if recs:
                deliver(recs)
    recs = acc.finish()
    if recs:
        deliver(recs)
    return result
