"""One fuzz input through every pure stage: decode → reassembly → parse → tracker → engine,
and the formatting of what comes out (message lines, ACC lines, JSON records).

An input is a little capture: byte 0 picks the link type, then frames follow as
``[u16 length][u8 time step in 10 ms][bytes]`` (a short last frame takes what is left).
Packet time advances by the steps, so the timers (TCP gaps, fragment timeouts, tm's
fr_timer) fire too. ``encode`` turns real captures into such inputs (the seed corpus).

``run_one`` raises whatever a stage raises: past a stage boundary every exception is a
bug (the stages turn bad input into anomalies). It checks invariants besides: records
only come from parsed messages; every record can be written (JSON line, ACC line: a
record that can't be written is lost) and is one line; and no record is lost or added
when a SPAN port mirrors every frame twice (the copies must be recognised: UDP duplicate
filter, TCP retransmission, SCTP TSN, exact IP fragment).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from sipsniff_acc import sip
from sipsniff_acc.emitters.jsonl import record_line
from sipsniff_acc.events import Counters, Frame
from sipsniff_acc.messagelog import jsonl, table
from sipsniff_acc.pipeline import MessagePipeline
from sipsniff_acc.processrun import AccPipeline
from sipsniff_acc.rules import RulesFile, load_rules, parse_rules
from sipsniff_acc.sysloglines import payload

#: the link types a capture of ours can carry (decode.py)
LINKTYPES: tuple[int, ...] = (1, 113, 276, 101, 0, 108, 228, 229, 12)
T0 = 1_700_000_000.0
MAX_FRAMES = 64  #: frames per input: enough for a call over TCP, small enough to run fast

#: The built-in rules, and a set that reaches every pseudo-variable family and both tables.
RULES: tuple[RulesFile, ...] = (
    load_rules(None),
    parse_rules("""
acc: {log_flag: 1, log_missed_flag: 2, db_flag: 1, db_missed_flag: 2, failed_transaction_flag: 3,
      report_ack: true, report_cancels: true, detect_direction: true,
      log_extra: "ua=$ua;ru=$ru;ci=$ci;cs=$cs;fu=$fu;tu=$tu;rr=$rr;xf=$hdr(X-Foo);av=$(avp(x)[*])",
      db_extra: "src_ip=$si;src_port=$sp;dst=$ru;from_user=$fU;to_user=$tU;callee=$rU"}
route:
  - if: {method: INVITE, in_dialog: false}
    setflag: [1, 2, 3]
  - if: {method: INVITE}
    set_avp: {x: "$fU"}
  - if: {method: "BYE|CANCEL|MESSAGE|REGISTER|OPTIONS"}
    setflag: [1, 3]
""", "fuzz.yaml"),
)


def frames_of(data: bytes) -> Iterator[Frame]:
    """The frames an input describes (see the module docstring)."""
    if not data:
        return
    linktype = LINKTYPES[data[0] % len(LINKTYPES)]
    at, ts, no = 1, T0, 0
    while at < len(data) and no < MAX_FRAMES:
        if at + 3 <= len(data):
            n, step = struct.unpack_from("!HB", data, at)
            at += 3
        else:
            n, step = len(data), 0
        ts += step * 0.01
        no += 1
        yield Frame(ts, linktype, data[at : at + n], no, "fuzz")
        at += n


def encode(linktype: int, frames: Iterable[tuple[float, bytes]]) -> bytes:
    """A fuzz input from real frames (times rounded to 10 ms steps, at most 2.55 s apart)."""
    out = [bytes([LINKTYPES.index(linktype) if linktype in LINKTYPES else 0])]
    last: float | None = None
    for ts, frame in frames:
        step = 0 if last is None else max(0, min(255, round((ts - last) * 100)))
        last = ts
        frame = frame[:0xFFFF]
        out.append(struct.pack("!HB", len(frame), step) + frame)
    return b"".join(out)


def _one_line(line: bytes | str, what: str) -> None:
    text = line if isinstance(line, str) else line.decode("utf-8", "replace")
    body = text[:-1] if text.endswith("\n") else text
    if "\n" in body or "\r" in body:
        raise AssertionError(f"{what} is not one line: {body[:200]!r}")


def _messages(frames: list[Frame]) -> list[sip.SipMessage]:
    mp = MessagePipeline(Counters())
    messages: list[sip.SipMessage] = []
    for f in frames:
        messages.extend(m for m in mp.feed(f) if isinstance(m, sip.SipMessage))
    messages.extend(m for m in mp.finish() if isinstance(m, sip.SipMessage))
    return messages


def _record_ids(messages: list[sip.SipMessage], rules: RulesFile) -> list[str]:
    acc = AccPipeline(rules, open_as_408=True)
    out = [r for m in messages for r in acc.feed(m)]
    out.extend(acc.finish())
    return [r.record_id for r in out]


def run_one(data: bytes) -> int:
    """Feed one input through everything; return the number of records (raises on a bug)."""
    frames = list(frames_of(data))
    messages = _messages(frames)
    for m in messages:
        m.headers  # noqa: B018 - the lazy parse must hold too
        m.vias()
        _one_line(jsonl(m.ts, m.no, m.src, m.sport, m.dst, m.dport, m.transport, "/".join(m.encap), m), "message line")
        table(m.ts, m.no, m.src, m.sport, m.dst, m.dport, m.transport, "/".join(m.encap), m)
    records = 0
    for rules in RULES:
        acc = AccPipeline(rules, open_as_408=True)
        out = []
        for m in messages:
            out.extend(acc.feed(m))
        out.extend(acc.finish())
        if out and not messages:
            raise AssertionError("records without any SIP message")
        for r in out:
            _one_line(record_line(r), "JSON record")
            _one_line(payload(r), "ACC line")
        records += len(out)
    mirrored = [c for f in frames for c in (f, Frame(f.ts, f.linktype, f.data, f.no, f.source))]
    plain, twice = _record_ids(messages, RULES[0]), _record_ids(_messages(mirrored), RULES[0])
    if plain != twice:
        raise AssertionError(f"mirrored frames changed the records: {len(plain)} -> {len(twice)}")
    return records
