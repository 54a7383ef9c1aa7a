"""Wiring for ``sipsniff-acc process``: frames → messages → transactions → acc records → emitters.

``AccPipeline`` is the pure part (SIP messages in, records out); ``run`` drives it from a
frame source and hands each batch of records to every emitter, in event order.

As a service (issue 11) the frame stream also carries a live source's ``Idle`` (silence: the
timers fire from its wall-clock time, the outputs flush, the spool delivers) and
``CaptureGap`` (drops: records spanning one are marked ``capture_gaps``). Timers also fire
every TICK of packet time (frames without SIP count), at the same frames with -j 0 and -j N,
so a file and a live capture of the same traffic give the same records.
"""

from __future__ import annotations

import gc
import heapq
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sipsniff_acc.acc import AccEngine
from sipsniff_acc.cdr import CdrEngine
from sipsniff_acc.collector import collect_rarely
from sipsniff_acc.emitters import Emitter
from sipsniff_acc.events import CaptureGap, Counters, Datagram, Frame, Idle
from sipsniff_acc.limits import Limits
from sipsniff_acc.messagerun import TICK, Candidate, Tick, as_candidate, file_frames, item_time, timed_candidates
from sipsniff_acc.pipeline import CaptureStage, MessagePipeline, SipParser, shard_of
from sipsniff_acc import stopping
from sipsniff_acc.shard import BATCH, sharded_map
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import RulesFile, parse_address
from sipsniff_acc.sip import SipMessage
from sipsniff_acc.tracker import AckIn, Event, RequestIn, TrackerStats, TransactionTracker


class Observer(Protocol):
    """Sees what an AccPipeline is fed, before its engine (--calls' builder, emitters/calls.py)."""

    def feed(self, msg: SipMessage) -> None: ...
    def advance(self, now: float) -> None: ...
    def gap(self, ts: float) -> None: ...
    def finish(self) -> None: ...


class AccPipeline:
    """SIP messages in capture order → acc records. Pure."""

    def __init__(self, rules: RulesFile, open_as_408: bool = False, shards: int = 1, ticked: bool = False) -> None:
        """``shards``: the number of workers sharing the calls (-j N); each keeps 1/N of the limits.
        ``ticked``: the owner calls ``advance`` at the Ticks of packet time (TransactionTracker's)."""
        self.rules = rules
        self.open_as_408 = open_as_408
        limits = (getattr(rules, "limits", None) or Limits()).shard(shards)  # rules.yaml's limits:, if any
        self.tracker = TransactionTracker(
            [parse_address(a) for a in rules.proxy.addresses], rules.tm.wait_timer, rules.tm.fr_timer,
            rules.tm.fr_inv_timer, limits, open_as_408, ticked)
        self.engine = AccEngine(rules, limits, self.tracker.stats)  # one set of counters for the summary
        cdr = CdrEngine(rules, self.engine)  # dialog CDRs (cdr.py): only when rules.yaml enables them
        self.cdr: CdrEngine | None = cdr if cdr.enabled else None
        #: times of the last capture gaps (packets dropped): records spanning one are marked
        self.gaps: deque[float] = deque(maxlen=GAPS_KEPT)
        self.observer: Observer | None = None

    def feed(self, msg: SipMessage) -> list[AccRecord]:
        if self.observer is not None:
            self.observer.feed(msg)
        cdr = self.cdr
        out: list[AccRecord] = [] if cdr is None else cdr.seen(msg)  # CDR timers due, the proxy's 100s
        engine = self.engine
        for ev in self.tracker.feed(msg):
            recs = engine.feed(ev)
            if cdr is not None:
                recs = cdr.feed(ev, recs)  # the event's CDR in its place among the acc records
            if recs:
                if self.gaps:
                    self._mark(ev, recs)
                out.extend(recs)
        if out and msg.source[:4] == "hep:":  # provenance: the HEP capture agent that saw the message
            agent = msg.source[4:]
            for r in out:
                r.capture_agent = agent
        return out

    def advance(self, now: float) -> list[AccRecord]:
        """Packet time is ``now`` and no message came (a live source's Idle, frames without
        SIP): the records the timers make (--open-as-408's timer 408s)."""
        if self.observer is not None:
            self.observer.advance(now)
        cdr = self.cdr
        out: list[AccRecord] = [] if cdr is None else cdr.advance(now)  # expired dialogs
        for ev in self.tracker.advance(now):
            recs = self.engine.feed(ev)
            if cdr is not None:
                recs = cdr.feed(ev, recs)
            if recs:
                if self.gaps:
                    self._mark(ev, recs)
                out.extend(recs)
        return out

    def gap(self, ts: float) -> None:
        """Packets were dropped at ``ts`` (CaptureGap): records of calls open then are marked."""
        if self.observer is not None:
            self.observer.gap(ts)
        self.gaps.append(ts)

    def replace_rules(self, rules: RulesFile) -> None:
        """A reloaded rules.yaml: transactions created from now on follow it (proxy addresses,
        timers, route, acc modparams); open ones keep the flags and AVPs they got."""
        self.rules = rules
        self.engine.replace_rules(rules)
        if self.cdr is not None or rules.acc.cdr_backends:  # dialog CDRs: tracked dialogs go on
            self.cdr = self.cdr or CdrEngine(rules, self.engine)
            self.cdr.replace_rules(rules)
        t = self.tracker
        t.proxies = [parse_address(a) for a in rules.proxy.addresses]
        t.wait_timer, t.fr_timer, t.fr_inv_timer = rules.tm.wait_timer, rules.tm.fr_timer, rules.tm.fr_inv_timer

    def _mark(self, ev: Event, recs: list[AccRecord]) -> None:
        """``capture_gaps`` on the records when a gap fell after their transaction began (for a
        record in a dialog: after the dialog began, if the dialog is still known)."""
        if isinstance(ev, RequestIn):
            start = ev.msg.ts
        elif isinstance(ev, AckIn):
            start = ev.invite.created if ev.invite is not None else ev.msg.ts
        else:
            start = ev.txn.created
        dialogs = self.tracker.dialogs
        gaps = self.gaps
        for r in recs:
            began = start
            if r.in_dialog and r.call_id is not None:
                for tag in (r.from_tag, r.to_tag):
                    d = dialogs.get((r.call_id, tag or ""))
                    if d is not None and d.created < began:
                        began = d.created
            ts = r.ts
            if any(began < g <= ts for g in gaps):
                r.capture_gaps = True

    def finish(self) -> list[AccRecord]:
        if self.observer is not None:
            self.observer.finish()
        out: list[AccRecord] = []
        cdr = self.cdr
        for ev in self.tracker.finish(self.open_as_408):
            recs = self.engine.feed(ev)
            if cdr is not None:
                recs = cdr.feed(ev, recs)
            if recs and self.gaps:
                self._mark(ev, recs)
            out.extend(recs)
        if cdr is not None:
            out.extend(cdr.finish())
        return out


GAPS_KEPT = 64  #: capture gaps remembered for the marking (a record spanning an older one spans these too)


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
    capture_gaps: int = 0  #: records made while packets were being dropped (marked ``capture_gaps``)
    gaps: int = 0  #: CaptureGap reports in the stream
    dropped: int = 0  #: packets those reports said were lost
    rule_reloads: int = 0  #: rules.yaml replaced during the run (``control.pending_rules()``)
    #: what the run's state holds now (-j 0: the tracker's tables); set by ``run``
    held: Callable[[], dict[str, float]] | None = field(default=None, repr=False, compare=False)

    def gauges(self) -> dict[str, float]:
        """Gauges for /metrics (metrics.py): transactions and dialogs held, open transactions
        (no final reply yet). Read from another thread: copies, no iteration of a live dict."""
        return self.held() if self.held is not None else {}


class Control(Protocol):
    """What the service (SIGHUP) hands the run loop; read at safe points (every Idle and
    every TICK of packet time): a cheap call."""

    def pending_rules(self) -> RulesFile | None: ...


FLUSH_EVERY = 0.1  #: wall seconds: copy outputs (log lines, JSON lines) are flushed at most this late
TIMER_EVERY = 1.0  #: wall seconds: the spooled backends get a delivery (retry) chance at least this often


class Outputs:
    """The emitters' clock: records out within 1 s whatever the traffic.

    After a delivery the outputs are flushed at once if the last flush of records is
    FLUSH_EVERY old (a record after a quiet spell goes out now; a burst costs one flush per
    FLUSH_EVERY: a flush per record measured 4 µs to a file, ~0.5 µs a message); otherwise at
    the next Tick of packet time or Idle. In silence a live source's Idle ticks every emitter
    (a spool also retries a backend that is down); a capture on a pipe that goes silent
    right after a burst keeps its last lines until the next packet. An emitter takes part
    with a ``tick()`` method (flush a stream, commit and deliver a spool's buffer)."""

    def __init__(self, emitters: Sequence[Emitter], clock: Callable[[], float] = time.monotonic) -> None:
        self.tickers: list[Callable[[], None]] = [t for e in emitters if (t := getattr(e, "tick", None)) is not None]
        self.clock = clock
        self.flushed = float("-inf")  #: the last flush after records (the first record goes out at once)
        self.ticked = float("-inf")  #: the last tick of any kind
        self.dirty = False

    def written(self) -> None:
        if self.tickers:
            now = self.clock()
            self.dirty = True
            if now - self.flushed >= FLUSH_EVERY:
                self.tick(now)

    def poll(self) -> None:
        """Packet time went on (a Tick): flush what waits, and give the spool its timer."""
        if self.tickers:
            now = self.clock()
            if (self.dirty and now - self.flushed >= FLUSH_EVERY) or now - self.ticked >= TIMER_EVERY:
                self.tick(now)

    def tick(self, now: float | None = None) -> None:
        stop = stopping.STATE
        stop.guarded += 1  # as a delivery: a stop signal waits for the flush/commit to finish
        try:
            for t in self.tickers:
                t()
        finally:
            stop.guarded -= 1
        self.ticked = now = self.clock() if now is None else now
        if self.dirty:  # records went out with this tick
            self.flushed = now
        self.dirty = False
        if stop.signum:
            stopping.check()


def run(frames: Iterable[Frame | Idle | CaptureGap], rules: RulesFile, emitters: Sequence[Emitter],
        counters: Counters, open_as_408: bool = False, result: RunResult | None = None, workers: int = 0,
        extra: Sequence[Datagram] = (), control: Control | None = None, live: bool | None = None,
        state: str | None = None, calls: Any = None, tap: Tap | None = None) -> RunResult:
    """Drive the pipeline; ``result`` (if given) is filled in place, so a caller interrupted by
    a signal still has the counts of what was delivered to the emitters. ``extra``: SIP found
    another way (TLS decrypted by tshark), in time order, merged in by timestamp.

    ``frames`` may carry a live source's ``Idle`` (timers fire, outputs flush) and
    ``CaptureGap`` (records of calls open then are marked). ``control``: rules reloads.
    ``live``: -j N rounds close after LIVE_ROUND_SPAN of packet time (None: once an Idle is
    seen). ``state``: the state file (sipsniff_acc.state) loaded at the start and saved on a stop.
    ``calls``: --calls (emitters/calls.py CallsOutput), attached to the pipeline (-j 0 only).
    ``tap``: told every SIP candidate (time, transport, addresses, ports, payload) before its
    parse, in stream order (--hep-out: emitters/hep.py)."""
    result = result if result is not None else RunResult()
    result.open_as_408 = open_as_408

    stop = stopping.STATE
    outputs = Outputs(emitters)

    def deliver(records: list[AccRecord]) -> None:
        # Guarded: a stop signal waits for the records to be with every output (and its raise
        # cannot land inside a driver or between the spool's commit and its bookkeeping).
        stop.guarded += 1
        try:
            kinds, backends = result.records, result.by_backend
            for r in records:
                kinds[r.kind] += 1
                for b in r.backends:  # (Counter.update's Python checks cost more than the counting)
                    backends[b] += 1
                if r.capture_gaps:
                    result.capture_gaps += 1
            for e in emitters:
                e.emit(records)
        finally:
            stop.guarded -= 1
        outputs.written()
        if stop.signum:
            stopping.check()

    if workers > 0:
        _run_sharded(frames, rules, deliver, counters, open_as_408, workers, result, extra, outputs, control,
                     live, state, tap)
        return result
    messages = MessagePipeline(counters, limits=getattr(rules, "limits", None))  # limits.max_sip_message
    if tap is not None:
        messages.parser = _Tapped(messages.parser, tap)
    acc = AccPipeline(rules, open_as_408, ticked=True)  # the loop's timers() at every Tick, Idle
    if calls is not None:  # the per-call builder sees what the engine sees (AccPipeline.observer)
        calls.attach(acc)
    result.tracker = acc.tracker.stats
    result.held = _held(acc.tracker)
    if state:
        _load_state(state, acc, time.time() if live else None)
    bind = getattr(frames, "bind", None)
    if bind is not None:  # a source that checkpoints what it fed (sources/nats.py: state, then acks)
        bind(acc)

    feed = acc.feed  # (the Idle and finish paths; the frame loop calls acc.feed: a native call)
    items: Iterable[Frame | Datagram | Idle | CaptureGap] = frames
    if extra:
        items = heapq.merge(frames, extra, key=_ts)

    def timers(now: float, idle: bool) -> None:
        recs = acc.advance(now)
        if recs:
            deliver(recs)
        if control is not None:
            rules = control.pending_rules()
            if rules is not None:
                acc.replace_rules(rules)
                result.rule_reloads += 1
        if idle:
            outputs.tick()
        else:
            outputs.poll()

    next_tick = float("-inf")
    release = getattr(messages.capture, "advance", None)  # the capture stage's timers, if it has them
    if state:  # a stop is taken at a safe point only (a frame's end, or waiting on the source), so that
        stop.guarded += 1  # the calls are saved whole
        items = stopping.waiting_on(items)
    gc_thresholds = collect_rarely()
    try:
        for frame in items:
            if stop.signum:  # a safe point: the handler's own raise may have been swallowed
                if state:
                    _save_state(state, acc, time.time() if live else None)
                    stop.guarded -= 1
                    state = None
                stopping.check()
            cls = frame.__class__
            if cls is Frame:
                ts = frame.ts
                if ts >= next_tick:  # the Ticks of timed_candidates, at the same frames
                    if next_tick != float("-inf"):
                        timers(ts, False)
                    next_tick = ts + TICK
                found = messages.feed(frame)  # type: ignore[arg-type]
            elif cls is Datagram:  # a whole message: decrypted TLS (extra), or a source that frames them (HEP)
                if not extra:  # a message source's time drives the timers as frames do (TLS rides on its frames')
                    ts = frame.ts
                    if ts >= next_tick:
                        if next_tick != float("-inf"):
                            timers(ts, False)
                        next_tick = ts + TICK
                found = messages.parser.feed(frame)  # type: ignore[arg-type]
            elif cls is Idle:
                live = True
                if release is not None:  # silence: what the capture stage held for later (a TCP hole) goes
                    for d in release(frame.ts):
                        if d.__class__ is Datagram:
                            for item in messages.parser.feed(d):
                                if item.__class__ is SipMessage:
                                    recs = feed(item)
                                    if recs:
                                        deliver(recs)
                timers(frame.ts, True)
                continue
            elif cls is Tick:  # type: ignore[comparison-overlap]  # a Datagram source's packet time (sources/nats.py)
                timers(frame.ts, False)
                continue
            else:  # CaptureGap
                _gap(frame, result)  # type: ignore[arg-type]
                acc.gap(frame.ts)
                continue
            for item in found:
                if item.__class__ is SipMessage:
                    recs = acc.feed(item)
                    if recs:
                        deliver(recs)
        if stop.signum and state:
            _save_state(state, acc, time.time() if live else None)
    except stopping.Stopped:  # taken while waiting on the source: nothing in flight, the calls are whole
        if state and not stop.forced:  # (forced: a second signal may have cut a message short)
            _save_state(state, acc, time.time() if live else None)
        raise
    finally:
        gc.set_threshold(*gc_thresholds)
        if state:
            stop.guarded -= 1
    stopping.check()
    for item in messages.finish():
        if item.__class__ is SipMessage:
            recs = feed(item)
            if recs:
                deliver(recs)
    if state:  # --state: the traffic goes on after this run; its open calls are saved, not ended
        _save_state(state, acc, time.time() if live else None)
        return result
    recs = acc.finish()
    if recs:
        deliver(recs)
    return result



#: (ts, transport, src, sport, dst, dport, payload) of a SIP candidate, for a copy of every message
Tap = Callable[[float, str, bytes, int, bytes, int, bytes], None]


class _Tapped(SipParser):
    """A SipParser whose every candidate is first handed to the tap (-j 0). A subclass, not a
    wrapper: mypyc's compiled MessagePipeline holds a SipParser and checks it."""

    def __init__(self, parser: SipParser, tap: Tap) -> None:
        super().__init__(parser.counters)
        self.tap = tap

    def feed(self, d: Datagram) -> list[Any]:
        self.tap(d.ts, d.transport.value, d.src, d.sport, d.dst, d.dport, d.payload)
        return super().feed(d)


def _held(tracker: Any) -> Callable[[], dict[str, float]]:
    """The tracker's table sizes, for a scrape: len() of its own tables (O(1), atomic), where
    ``_open`` already holds the transactions without a final reply."""

    def held() -> dict[str, float]:
        return {"tracked_transactions": len(tracker.txns), "open_transactions": len(tracker._open),
                "tracked_dialogs": len(tracker.dialogs)}

    return held


def _gap(gap: CaptureGap, result: RunResult) -> None:
    result.gaps += 1
    result.dropped += gap.dropped


def _state_module() -> Any:
    """sipsniff_acc.state (restarts lose no call), imported only when a state file is used."""
    from sipsniff_acc import state as st  # noqa: PLC0415 - imported only with --state
    return st


def _load_state(path: str, acc: AccPipeline, now: float | None, shard: int = 0, shards: int = 1) -> None:
    """Shard ``shard`` of ``shards`` (-j N: one file per worker) from the state file. ``now``:
    the wall clock for a live capture (state past its timers is dropped), None for a file."""
    st = _state_module()
    st.load_state(st.shard_path(path, shard, shards), acc, now, shard, shards)


def _save_state(path: str, acc: AccPipeline, now: float | None, shard: int = 0, shards: int = 1) -> None:
    st = _state_module()
    st.save_state(st.shard_path(path, shard, shards), acc, now, shard, shards)


# --- several processes: shards by Call-ID ------------------------------------------------

#: a round's share for one worker: (first packet time of the run, [(sequence, candidate, or a
#: Tick's time: advance the timers)], control or None); None: finish. Control keys, applied
#: before the items: "gap": [times] (CaptureGap), "rules": RulesFile (reload); after them: "save": (path, now) (state)
Part = tuple[float, list[tuple[int, Candidate | float]], dict[str, Any] | None] | None
#: a part's result: (sequence, record)s, SIP messages parsed, anomalies, the tracker's stats
#: (at the finish), SIP messages by kind (Counters.sip_by_kind)
PartResult = tuple[list[tuple[int, AccRecord]], int, dict[str, int], TrackerStats | None, dict[str, int]]


def _ts(item: Frame | Datagram | Idle | CaptureGap) -> float:
    return item.ts


ROUND_SPAN = 1.0  #: seconds of packet time a round of a file may span
LIVE_ROUND_SPAN = 0.1  #: the same for a live capture: with TICK, records ≤ ~200 ms later than with -j 0
LIVE_POLL = 0.02  #: live: seconds of packet time between looks for results already back


def acc_worker(rules: RulesFile, open_as_408: bool, shards: int = 1, state: str | None = None,
               shard: int = 0, live: bool | None = None) -> Callable[[Part], PartResult]:
    """A worker's state: a parser and an AccPipeline for the calls of its shard (1/shards of
    the memory limits, so N workers together hold what one process would). ``state``: the
    state file; this worker's shard of it is loaded before its first part."""
    counters = Counters()
    parser = SipParser(counters)
    acc = AccPipeline(rules, open_as_408, shards, ticked=True)  # the front's Ticks come in the parts
    loaded = [False]

    def work(part: Part) -> PartResult:
        out: list[tuple[int, AccRecord]] = []
        if not loaded[0]:  # in the worker process (the pool forks before the first part)
            loaded[0] = True
            collect_rarely(forked=True)
            if state is not None:
                _load_state(state, acc, time.time() if live else None, shard, shards)
        if part is None:
            if state:  # --state: the open calls are saved (the front said so), not ended
                return out, 0, {}, acc.tracker.stats, {}
            out = [(1 << 62, r) for r in acc.finish()]
            return out, 0, {}, acc.tracker.stats, {}
        first, items, control = part
        if control:
            _apply(control, acc, shard, shards)
        if not acc.engine.start:
            acc.engine.start = first  # $TS: the first packet of the whole run, not of this shard
        before = counters.sip_messages
        counters.anomalies.clear()
        counters.sip_by_kind.clear()
        feed, message, advance = acc.feed, parser.message, acc.advance
        for seq, c in items:
            if c.__class__ is float:  # a Tick: the timers, at the same packet time as with -j 0
                for r in advance(c):
                    out.append((seq, r))
                continue
            msg = message(*c)  # type: ignore[misc]
            if msg is not None:
                for r in feed(msg):
                    out.append((seq, r))
        if control and control.get("save"):  # after the items: the round is the last before the save
            path, now = control["save"]
            _save_state(path, acc, now, shard, shards)
        return out, counters.sip_messages - before, dict(counters.anomalies), None, dict(counters.sip_by_kind)

    return work


def _apply(control: dict[str, Any], acc: AccPipeline, shard: int, shards: int) -> None:
    """A round's control, in a worker: before its items, as at that point of the stream."""
    for ts in control.get("gap", ()):
        acc.gap(ts)
    rules = control.get("rules")
    if rules is not None:
        acc.replace_rules(rules)


def merge_stats(into: TrackerStats, other: TrackerStats) -> None:
    into.merge(other)


def _run_sharded(frames: Iterable[Frame | Idle | CaptureGap], rules: RulesFile,
                 deliver: Callable[[list[AccRecord]], None], counters: Counters, open_as_408: bool, workers: int,
                 result: RunResult, extra: Sequence[Datagram] = (), outputs: Outputs | None = None,
                 control: Control | None = None, live: bool | None = None, state: str | None = None,
                 tap: Tap | None = None) -> None:
    """The front reads and reassembles; workers parse and account their calls. Records of a
    round are put back in the order of the messages that caused them: the output is the
    single-process run's, record for record (a Tick's records: worker by worker).

    A round closes at BATCH messages or ROUND_SPAN of packet time (LIVE_ROUND_SPAN live), at
    a live source's Idle (then its records are waited for: nothing else is coming) and at a
    rules reload. Ticks of packet time go to every worker, in sequence with the messages.

    Capture files with nothing else that needs the one front (TLS, --hep-out, --state): every
    worker reads them itself instead (filerun.py)."""
    if not (extra or tap or state or live):
        files = file_frames(frames)
        if files is not None:
            from sipsniff_acc import filerun  # noqa: PLC0415 - filerun imports this module
            filerun.run_files(files[0], files[1], rules, deliver, counters, open_as_408, workers, result, control)
            return
    capture = CaptureStage(counters, limits=getattr(rules, "limits", None))  # limits.max_sip_message
    stop = stopping.STATE

    def rounds() -> Iterator[tuple[list[Part] | None, bool]]:
        seq = 0
        first = 0.0
        span = LIVE_ROUND_SPAN if live else ROUND_SPAN
        poll_every = LIVE_POLL if live else float("inf")
        next_poll = 0.0
        source = stopping.waiting_on(frames) if state else frames  # a stop taken while the source is quiet
        stream: Iterator[Candidate | Idle | CaptureGap | Tick] = timed_candidates(source, capture)
        if extra:
            stream = heapq.merge(stream, map(as_candidate, extra), key=item_time)
        if state:
            stream = _until_stopped(stream)
        parts: list[list[tuple[int, Candidate | float]]] = [[] for _ in range(workers)]
        n = 0  #: candidates in the round
        start = 0.0
        ctl: dict[str, Any] = {}
        told = not state  #: the workers know their index (for their state file)

        def close(extra_ctl: Callable[[int], dict[str, Any]] | None = None) -> list[Part]:
            nonlocal parts, n, ctl, told
            ctls: list[dict[str, Any] | None] = [ctl or None] * workers
            if not told or extra_ctl is not None:
                ctls = [{**ctl, **({} if told else {"worker": k}), **(extra_ctl(k) if extra_ctl else {})}
                        for k in range(workers)]
                told = True
            out: list[Part] = [(first, p, c) for p, c in zip(parts, ctls)]
            parts, n, ctl = [[] for _ in range(workers)], 0, {}
            return out

        def reload() -> bool:
            new = control.pending_rules() if control is not None else None
            if new is None:
                return False
            ctl["rules"] = new
            result.rule_reloads += 1
            return True

        for item in stream:
            if item.__class__ is tuple:
                ts = item[0]
                if n and (n >= BATCH or ts - start >= span):
                    if stop.signum:
                        break
                    yield close(), False
                if not n:
                    start = ts
                    if not first:
                        first = ts
                parts[shard_of(item[7], workers)].append((seq, item))
                if tap is not None:
                    tap(ts, item[2], item[3], item[4], item[5], item[6], item[7])
                seq += 1
                n += 1
                if ts >= next_poll:  # live: results already back are handed on while packets flow
                    next_poll = ts + poll_every
                    yield None, False
                continue
            if stop.signum:
                break
            assert not isinstance(item, tuple)
            cls = item.__class__
            if cls is CaptureGap:
                _gap(item, result)  # type: ignore[arg-type]
                ctl.setdefault("gap", []).append(item.ts)
                continue
            tick = item.ts
            for p in parts:
                p.append((seq, tick))
            seq += 1
            if cls is Idle:  # silence: the round goes now and its records are waited for
                span, poll_every = LIVE_ROUND_SPAN, LIVE_POLL
                if reload() and n:  # the messages before keep the old rules: their round goes first
                    rules_ctl = ctl.pop("rules")
                    yield close(), False
                    ctl["rules"] = rules_ctl
                yield close(), True
                if outputs is not None:
                    outputs.tick()
                continue
            if reload():
                rules_ctl = ctl.pop("rules")
                yield close(), False
                ctl["rules"] = rules_ctl
            elif n and tick - start >= span:
                yield close(), False
            else:
                yield None, False  # a poll: results already back are handed on
            if outputs is not None:
                outputs.poll()
        if stop.signum:
            if state:  # the open calls to the state file, each worker its share, then the stop
                saved = (state, time.time() if span == LIVE_ROUND_SPAN else None)
                yield close(lambda _k: {"save": saved}), True
                release()
            stopping.check()
            raise stopping.Stopped(stop.signum)
        if state:  # --state: the traffic goes on after this run; each worker saves its open calls
            saved = (state, time.time() if span == LIVE_ROUND_SPAN else None)
            yield close(lambda _k: {"save": saved}), True
        elif n or ctl or any(parts):
            yield close(), False
        yield [None] * workers, False

    held = [False]

    def release() -> None:
        if held[0]:
            held[0] = False
            stop.guarded -= 1

    if state:  # a stop is taken at a safe point only, so that the workers can save their calls
        stop.guarded += 1
        held[0] = True
    work = acc_worker(rules, open_as_408, workers)
    if state:
        work = _per_worker_state(rules, open_as_408, workers, state, live)
    try:
        results_of = sharded_map(rounds(), work, workers)
        try:
            _deliver_rounds(results_of, deliver, counters, result, stop)
        finally:
            results_of.close()  # now, not when the traceback is freed: a stop kills the workers at once
    finally:
        release()


def _until_stopped(stream: Iterator[Any]) -> Iterator[Any]:
    """``stream`` until a stop taken while the front waits on its source (stopping.waiting_on):
    it just ends, and the round loop's stop path has the workers save their calls. A forced
    stop (a second signal, maybe mid-frame) goes on up as before."""
    try:
        yield from stream
    except stopping.Stopped:
        if stopping.STATE.forced:
            raise


def _per_worker_state(rules: RulesFile, open_as_408: bool, workers: int, state: str,
                      live: bool | None) -> Callable[[Part], PartResult]:
    """Worker k loads shard k of the state file: the pool forks every worker from this one
    function, so the first part a worker gets tells it its index ("worker" in its control)."""
    made: list[Callable[[Part], PartResult]] = []

    def work(part: Part) -> PartResult:
        if not made:
            k = part[2].get("worker", 0) if part is not None and part[2] else 0
            made.append(acc_worker(rules, open_as_408, workers, state, k, live))
        return made[0](part)

    return work


def _order(sr: tuple[int, AccRecord]) -> tuple[int, float]:
    return sr[0], sr[1].ts


def _deliver_rounds(results_of: Iterator[list[PartResult]], deliver: Callable[[list[AccRecord]], None],
                    counters: Counters, result: RunResult, stop: stopping.StopState) -> None:
    for results in results_of:
        if stop.signum:
            stopping.check()
        merged: list[tuple[int, AccRecord]] = []
        for recs, parsed, anomalies, stats, kinds in results:
            merged.extend(recs)
            counters.sip_messages += parsed
            counters.anomalies.update(anomalies)
            counters.sip_by_kind.update(kinds)
            if stats is not None:
                merge_stats(result.tracker, stats)
        if merged:
            # stable: records of one message keep their order (their times never go back); the
            # timers' records of one Tick, from every worker, come in time order as with -j 0
            merged.sort(key=_order)
            deliver([r for _seq, r in merged])
