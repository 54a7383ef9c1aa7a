"""--calls in the service loop (processrun.run): a live source's Idle ends calls by their timers
in silence and the lines go out then; a CaptureGap inside a call marks it. Real pipeline, real
emitters, frames as sources/live.py yields them."""

from __future__ import annotations

import io
import json

from sipsniff_acc.calls import INVITE_WAIT, SESSION_GRACE
from sipsniff_acc.emitters.calls import CallsOutput
from sipsniff_acc.events import CaptureGap, Counters, Frame, Idle
from sipsniff_acc.processrun import run
from sipsniff_acc.rules import RulesFile
from sipsniff_acc.sip import SipMessage
from tests.builders import ether, ip4_udp
from tests.flows import C, PROXY, UAC, answered_call
from tests.flows import Call as Flow

T = 1000.0


def frames_of(msgs: list[SipMessage]) -> list[Frame]:
    return [Frame(m.ts, 1, ether(ip4_udp(m.raw, m.src, m.dst, m.sport, m.dport, ident=i)), i)
            for i, m in enumerate(sorted(msgs, key=lambda m: m.ts), 1)]


class Lines(io.BytesIO):
    """A stream that remembers how many lines had been flushed at each flush."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[int] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue().count(b"\n"))


def test_idle_ends_a_session_timer_call_and_a_gap_marks_the_call_it_falls_in() -> None:
    f = Flow(call_id="st", ftag="st-tag")
    se = "Session-Expires: 90;refresher=uac\n"
    timer_call = [f.request("INVITE", T, UAC, PROXY, [C], extra=se),
                  f.reply(200, "OK", T + 1, PROXY, UAC, [C], to_tag="b", extra=se)]
    bye_call = answered_call(Flow(call_id="plain", ftag="p-tag"), t=T + 10)  # BYE at T + 70
    out = Lines()
    calls = CallsOutput(out)
    frames = frames_of(timer_call + bye_call)
    stream: list[object] = [*frames[:4], CaptureGap(T + 5, "eth0", 3), *frames[4:]]
    expiry = T + 1 + 90 + SESSION_GRACE
    stream += [Idle(expiry - 1), Idle(expiry + 0.5), Idle(T + INVITE_WAIT * 2)]
    run(stream, RulesFile(), [calls], Counters(), calls=calls)  # type: ignore[arg-type]
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["call_id"], r["ended_how"], r["capture_gaps"]) for r in rows] == [
        ("plain", "bye", False), ("st", "session_timer", True)]
    assert rows[1]["end"] == T + 91 and rows[1]["billable"] == 90.0
    assert 2 in out.flushed  # the timer's call was flushed at an Idle, not only at the close
    calls.close()
    assert out.getvalue().count(b"\n") == 2


def test_open_calls_at_the_end_are_written_as_open() -> None:
    f = Flow(call_id="o", ftag="o-tag")
    out = Lines()
    calls = CallsOutput(out)
    run(frames_of([f.request("INVITE", T, UAC, PROXY, [C])]), RulesFile(), [calls], Counters(), calls=calls)
    calls.close()
    [row] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert (row["outcome"], row["ended_how"], row["end"]) == ("open", "open", None)
