"""The run loop as a service (issue 11): Idle and CaptureGap in the frame stream, timers in
silence, outputs flushed within 1 s, -j N rounds closed at an Idle, rules replaced mid-run.

Sources here are plain generators of Frames / Idle / CaptureGap (what sources/live.py yields),
fed to the real pipeline and real emitters: no mocks.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sipsniff_acc.emitters.jsonl import JsonlEmitter
from sipsniff_acc.emitters.syslog import LogEmitter
from sipsniff_acc.events import CaptureGap, Counters, Frame, Idle
from sipsniff_acc.processrun import AccPipeline, RunResult, run
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import RulesFile, parse_rules
from sipsniff_acc.sip import SipMessage
from tests.builders import ether, ip4_udp
from tests.flows import PROXY, UAC, UAS, C, Call, P, answered_call

RULES = """
proxy: {addresses: ["10.0.0.10:5060"]}
tm: {fr_inv_timer: %s, fr_timer: 2}
acc: {log_flag: 1, log_missed_flag: 2, db_flag: 1, db_missed_flag: 2, failed_transaction_flag: 3}
route:
  - if: {method: BYE, in_dialog: true}
    setflag: [1, 3]
  - if: {in_dialog: true}
    stop: true
  - if: {method: INVITE}
    setflag: %s
"""


def rules(fr_inv: int = 3, flags: str = "[1, 2, 3]") -> RulesFile:
    return parse_rules(RULES % (fr_inv, flags))


def frames_of(msgs: list[SipMessage], start_no: int = 1) -> list[Frame]:
    """What a capture of these messages holds: Ethernet/IPv4/UDP frames, in time order."""
    return [Frame(m.ts, 1, ether(ip4_udp(m.raw, m.src, m.dst, m.sport, m.dport, ident=i)), i)
            for i, m in enumerate(sorted(msgs, key=lambda m: m.ts), start_no)]


def unanswered_invite(call: str, t: float) -> list[SipMessage]:
    """An INVITE the proxy forwards; the callee never answers (the proxy's timer will send a 408)."""
    c = Call(call_id=call, ftag=f"{call}-tag")
    return [c.request("INVITE", t, UAC, PROXY, [C]), c.request("INVITE", t + 0.002, PROXY, UAS, [P, C])]


class Recorder:
    """An emitter that remembers what it got and when (``position``: items the source had
    handed out at that moment) and how often the run's clock ticked it."""

    def __init__(self, position: list[int]) -> None:
        self.position = position
        self.records: list[tuple[int, AccRecord]] = []
        self.ticks: list[int] = []

    def emit(self, records: list[AccRecord]) -> None:
        self.records += [(self.position[0], r) for r in records]

    def tick(self) -> None:
        self.ticks.append(self.position[0])

    def close(self) -> None:
        pass


def counted(items: list[Any], position: list[int]) -> Iterator[Any]:
    for item in items:
        position[0] += 1
        yield item


def brief(rs: list[AccRecord]) -> list[tuple[str, str, str, str | None, float]]:
    return [(r.kind, r.method, r.code, r.call_id, round(r.ts, 6)) for r in rs]


# --- timers in silence ---------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_timer_408_comes_out_at_the_idle_after_the_timer(workers: int) -> None:
    """INVITE, then silence: the 408 (and the missed call) is out at the first Idle past
    fr_inv_timer + grace, before the source is read any further."""
    position = [0]
    items: list[Any] = frames_of(unanswered_invite("c1", 1000.0))
    idles = [Idle(1000.0 + 0.1 * k) for k in range(1, 60)]  # 0.1 s heartbeats for 5.9 s
    items += idles
    rec = Recorder(position)
    run(counted(items, position), rules(3), [rec], Counters(), open_as_408=True, workers=workers)
    got = [(pos, r.kind, r.code) for pos, r in rec.records]
    assert [(k, c) for _p, k, c in got] == [("missed", "408"), ("answered", "408")]
    # fr_inv_timer 3 s + TIMER_GRACE 0.5 s: the Idle at 1003.5 is item 2 + 35
    assert {p for p, _k, _c in got} == {2 + 35}
    assert all(r.ts == pytest.approx(1003.0) for _p, r in rec.records)  # dated when the timer fired
    assert rec.ticks and rec.ticks[0] <= 3  # the outputs' clock runs from the first Idle


def test_without_open_as_408_silence_makes_no_record() -> None:
    position = [0]
    items: list[Any] = frames_of(unanswered_invite("c1", 1000.0)) + [Idle(1000.0 + k) for k in range(1, 40)]
    rec = Recorder(position)
    result = run(counted(items, position), rules(3), [rec], Counters(), open_as_408=False)
    assert rec.records == []
    assert dict(result.tracker.timed_out) == {"INVITE": 1}  # given up after the timer + 32 s, counted


def test_answered_record_out_before_the_next_item_and_flushed_at_idle() -> None:
    """-j 0: the record goes to the outputs with the deciding packet; a file/pipe is flushed."""
    position = [0]
    msgs = answered_call(Call(call_id="a1"), t=1000.0)[:7]  # INVITE .. 200 OK upstream
    items: list[Any] = [*frames_of(msgs), Idle(1002.2), Idle(1002.3)]
    rec = Recorder(position)
    text = io.StringIO()
    log = LogEmitter(rules(), text)
    run(counted(items, position), rules(), [rec, log], Counters())
    assert [(p, r.kind, r.code) for p, r in rec.records] == [(7, "answered", "200")]
    assert "ACC: transaction answered" in text.getvalue()


def test_offline_equals_live_for_timer_408s() -> None:
    """The same traffic read from a file (packet time runs on with other calls' packets) and
    live (silence, Idles): the same records, and the 408s mid-run in both."""
    calls = unanswered_invite("lost", 1000.0)
    later = answered_call(Call(call_id="later", ftag="later-tag"), t=1010.0)[:7]
    offline = frames_of(calls + later)
    live: list[Any] = frames_of(calls) + [Idle(1000.0 + 0.1 * k) for k in range(1, 80)] + frames_of(later, 10)
    out = {}
    for name, items in (("offline", offline), ("live", live)):
        position = [0]
        rec = Recorder(position)
        run(counted(items, position), rules(3), [rec], Counters(), open_as_408=True)
        out[name] = rec.records
    assert [r.as_dict() for _p, r in out["offline"]] == [r.as_dict() for _p, r in out["live"]]
    assert brief([r for _p, r in out["offline"]]) == [
        ("missed", "INVITE", "408", "lost", 1003.0), ("answered", "INVITE", "408", "lost", 1003.0),
        ("answered", "INVITE", "200", "later", 1012.001)]
    # offline, the 408s came while reading the later call's packets, not at the end of input
    assert out["offline"][0][0] <= 3


def test_open_as_408_at_the_end_unchanged_for_calls_still_in_their_timer() -> None:
    """A capture that ends inside the timer: finish() accounts the 408 as before."""
    position = [0]
    rec = Recorder(position)
    result = run(counted(frames_of(unanswered_invite("c1", 1000.0)), position), rules(120), [rec], Counters(),
                 open_as_408=True)
    assert brief([r for _p, r in rec.records]) == [("missed", "INVITE", "408", "c1", 1120.0),
                                                  ("answered", "INVITE", "408", "c1", 1120.0)]
    assert dict(result.tracker.open_at_end) == {"INVITE": 1}


def test_a_real_reply_after_the_timer_408_is_absorbed() -> None:
    c = Call(call_id="slow", ftag="slow-tag")
    msgs = unanswered_invite("slow", 1000.0)
    late = [c.reply(200, "OK", 1005.0, UAS, PROXY, [P, C], to_tag="b"), c.reply(200, "OK", 1005.001, PROXY, UAC, [C], to_tag="b")]
    acc = AccPipeline(rules(3), open_as_408=True)
    out = [r for m in msgs for r in acc.feed(m)]
    out += acc.advance(1003.6)
    out += [r for m in late for r in acc.feed(m)]
    out += acc.finish()
    assert [(r.kind, r.code) for r in out] == [("missed", "408"), ("answered", "408")]
    assert acc.tracker.stats.replies_after_timer_408 == 1
    assert dict(acc.tracker.stats.timer_408) == {"INVITE": 1}


def test_j0_and_j2_give_the_same_records_in_the_same_order_with_timers() -> None:
    msgs: list[SipMessage] = []
    for k in range(12):
        msgs += unanswered_invite(f"u{k}", 1000.0 + 0.37 * k)
        msgs += answered_call(Call(call_id=f"a{k}", ftag=f"a{k}-tag"), t=1000.2 + 0.41 * k)
    frames = frames_of(msgs)
    got = {}
    for workers in (0, 2):
        position = [0]
        rec = Recorder(position)
        run(counted(frames, position), rules(3), [rec], Counters(), open_as_408=True, workers=workers)
        got[workers] = [r.as_dict() for _p, r in rec.records]
    assert got[0] == got[2]
    assert sum(1 for d in got[0] if d["code"] == "408") == 24


# --- -j 2: rounds close at an Idle -----------------------------------------------------------

def test_j2_round_closes_at_idle_and_its_records_are_out_before_the_next_read() -> None:
    position = [0]
    msgs = answered_call(Call(call_id="j2", ftag="j2-tag"), t=1000.0)[:7]
    seen_when_read: list[int] = []
    rec = Recorder(position)

    def source() -> Iterator[Any]:
        yield from frames_of(msgs)
        position[0] = 100
        yield Idle(1002.2)
        seen_when_read.append(len(rec.records))  # the source is asked for more only now
        position[0] = 200
        yield Idle(1002.3)

    run(source(), rules(), [rec], Counters(), workers=2)
    assert seen_when_read == [1]
    assert [(p, r.kind, r.code) for p, r in rec.records] == [(100, "answered", "200")]


def test_j2_live_rounds_close_on_the_clock_while_traffic_goes_on() -> None:
    """Traffic never stops (no Idle; a frame every 10 ms, packet time = wall time as in a live
    capture), yet the record is out ≤ 0.2 s after its deciding packet was read."""
    msgs = answered_call(Call(call_id="busy", ftag="busy-tag"), t=1000.0)[:7]  # 200 upstream at 1002.001
    bg = []  # OPTIONS from elsewhere, not flagged: no records
    for k in range(150):
        c = Call(call_id=f"bg{k}", ftag=f"bg{k}")
        bg.append(c.request("OPTIONS", 1001.5 + 0.01 * k + 0.005, "10.0.0.5", PROXY, [("10.0.0.5", f"z9hG4bK-o{k}")]))
    frames = frames_of(msgs + bg)
    read_at: dict[float, float] = {}
    emitted: list[tuple[float, AccRecord]] = []

    class Clocked:
        def emit(self, records: list[AccRecord]) -> None:
            emitted.extend((time.monotonic(), r) for r in records)

        def close(self) -> None:
            pass

    def paced() -> Iterator[Frame]:
        start_wall, start_ts = time.monotonic(), frames[0].ts
        for f in frames:
            delay = (f.ts - start_ts) - (time.monotonic() - start_wall)
            if delay > 0:
                time.sleep(delay if f.ts >= 1001.5 else 0)  # real time only where it matters
            read_at[f.ts] = time.monotonic()
            yield f

    run(paced(), rules(), [Clocked()], Counters(), workers=2, live=True)
    [(when, r)] = [(w, r) for w, r in emitted if r.method == "INVITE"]
    assert when - read_at[r.ts] <= 0.2


# --- capture gaps ---------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_records_spanning_a_capture_gap_are_marked_and_counted(workers: int) -> None:
    position = [0]
    spanning = answered_call(Call(call_id="spans", ftag="s-tag"), t=1000.0)  # INVITE 1000, 200 1002, BYE 1060
    before = answered_call(Call(call_id="before", ftag="b-tag"), t=900.0)[:7]  # all done before the gap
    after = answered_call(Call(call_id="after", ftag="f-tag"), t=1100.0)[:7]  # all after it
    items: list[Any] = [f for f in frames_of(before + spanning + after)]
    at = next(i for i, f in enumerate(items) if f.ts > 1001.0)
    items.insert(at, CaptureGap(1001.0, "eth0", 17))
    rec = Recorder(position)
    result = RunResult()
    text = io.BytesIO()
    jsonl = JsonlEmitter(text)
    run(counted(items, position), rules(), [rec, jsonl], Counters(), result=result, workers=workers)
    marks = {(r.call_id, r.method): r.capture_gaps for _p, r in rec.records}
    assert marks == {("before", "INVITE"): False, ("spans", "INVITE"): True, ("spans", "BYE"): True,
                     ("after", "INVITE"): False}
    assert result.capture_gaps == 2 and result.gaps == 1 and result.dropped == 17
    assert text.getvalue().count(b'"capture_gaps":true') == 2


def test_bye_in_a_dialog_begun_before_the_gap_is_marked() -> None:
    """The BYE's own transaction starts after the gap; its dialog started before it."""
    acc = AccPipeline(rules())
    msgs = answered_call(Call(call_id="d", ftag="d-tag"), t=1000.0)
    out = [r for m in msgs[:9] for r in acc.feed(m)]
    acc.gap(1030.0)
    out += [r for m in msgs[9:] for r in acc.feed(m)]
    assert [(r.method, r.capture_gaps) for r in out] == [("INVITE", False), ("BYE", True)]


# --- rules replaced mid-run -------------------------------------------------------------------

class Reload:
    """The service's control (S3's SIGHUP): hands new rules over once, when armed."""

    def __init__(self) -> None:
        self.rules: RulesFile | None = None

    def pending_rules(self) -> RulesFile | None:
        new, self.rules = self.rules, None
        return new


@pytest.mark.parametrize("workers", [0, 2])
def test_replace_rules_new_transactions_use_new_rules_open_ones_keep_their_flags(workers: int) -> None:
    """Call A's INVITE before the reload (flags 1,2,3), answered after it; call B entirely
    after it, with new rules that set no flag on INVITEs: A is accounted, B is not."""
    control = Reload()
    a = answered_call(Call(call_id="A", ftag="A-tag"), t=1000.0)[:7]
    b = answered_call(Call(call_id="B", ftag="B-tag"), t=1010.0)[:7]
    position = [0]
    rec = Recorder(position)

    def source() -> Iterator[Any]:
        fa = frames_of(a)
        yield from fa[:3]  # A's INVITE in and forwarded
        yield Idle(1000.5)
        control.rules = rules(flags="[]")
        yield Idle(1000.6)  # the reload is applied here
        yield from fa[3:]
        yield from frames_of(b, 20)
        yield Idle(1013.0)

    result = run(source(), rules(), [rec], Counters(), workers=workers, control=control)
    assert [(r.call_id, r.kind, r.code) for _p, r in rec.records] == [("A", "answered", "200")]
    assert result.rule_reloads == 1


def test_replace_rules_on_the_pipeline() -> None:
    acc = AccPipeline(rules())
    a = answered_call(Call(call_id="A", ftag="A-tag"), t=1000.0)
    out = [r for m in a[:3] for r in acc.feed(m)]
    acc.replace_rules(rules(flags="[]"))
    out += [r for m in a[3:] for r in acc.feed(m)]
    out += [r for m in answered_call(Call(call_id="B", ftag="B-tag"), t=2000.0) for r in acc.feed(m)]
    # A's INVITE keeps its flags; BYEs follow the route, which the new rules still flag
    assert [(r.call_id, r.method) for r in out] == [("A", "INVITE"), ("A", "BYE"), ("B", "BYE")]


# --- messages: Idle closes a batch ------------------------------------------------------------

def test_messages_prints_a_live_message_at_the_next_idle_and_ignores_gaps() -> None:
    from sipsniff_acc.messagerun import message_lines

    msgs = answered_call(Call(call_id="m1", ftag="m-tag"), t=1000.0)[:3]
    asked_after_idle: list[int] = []
    chunks: list[bytes] = []

    def source() -> Iterator[Any]:
        yield from frames_of(msgs)
        yield CaptureGap(1000.05, "eth0", 3)
        yield Idle(1000.2)
        asked_after_idle.append(len(chunks))
        yield Idle(1000.3)

    for chunk in message_lines(source(), "table", 0, Counters()):
        chunks.append(chunk)
    assert asked_after_idle == [1]
    assert chunks[0].count(b"\n") == 3
