"""``messages``' C lines (``_speedups.jsonl``, ``_speedups.table``) against the Python path.

Whenever a C call gives a line, it must be the bytes of ``messagelog.jsonl`` (orjson, then
json_safe) or ``messagelog.table`` (escape) on the pure-Python parse; when it declines (None),
the caller takes that Python path.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sipsniff_acc import messagelog, messagerun, sip
from sipsniff_acc.events import Counters
from sipsniff_acc.pipeline import CaptureStage
from sipsniff_acc.sources import CaptureReader
from tests.property.test_properties import BASE_LINES, FILL_LINE, START_LINE

speedups = pytest.importorskip("sipsniff_acc._speedups")

PLAIN = (b"INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK77\r\n"
         b"To: <sip:bob@example.com>\r\nFrom: <sip:a@example.com>;tag=19\r\nCall-ID: a84b@pc33\r\n"
         b"CSeq: 314159 INVITE\r\nContent-Length: 0\r\n\r\n")
PLAIN_RESPONSE = b"SIP/2.0 200 OK" + PLAIN[PLAIN.index(b"\r\n"):].replace(b"<sip:bob@example.com>", b"<sip:b>;tag=9")

#: packet times as a pcap gives them (sec + usec * 1e-6, sec + nsec * 1e-9), and any other float
_PCAP_TS = st.builds(lambda s, u: s + u * 1e-6, st.integers(0, 2**32 - 1), st.integers(0, 999_999))
TS = st.one_of(
    _PCAP_TS, _PCAP_TS, _PCAP_TS, _PCAP_TS,
    st.builds(lambda s, n: s + n * 1e-9, st.integers(0, 2**32 - 1), st.integers(0, 999_999_999)),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(1e-5, 1e17),
    st.sampled_from([0.0, -0.0, 1e-4, 0.0001, 0.5, 1.0, 4294967295.999999, 4294967296.0, 1e16, 9999999999999998.0]),
)
#: address, transport and encapsulation texts: mostly the usual, some that need escapes or are not ASCII
_USUAL = st.sampled_from(["10.0.0.1", "2001:db8::1", "udp", "eth/ipv4/udp", "", 'q"\\'])
TEXT = st.one_of(_USUAL, _USUAL, _USUAL, st.text(max_size=8))
INT = st.one_of(st.integers(0, 65535), st.integers(0, 65535), st.integers(-2**70, 2**70))
#: bytes that JSON escapes, json_safe escapes, or that are not UTF-8, in the fields a line shows
_ODD = st.one_of(st.sampled_from([b'"', b"\\", b"\x7f", b"\xc2\x85", b"\xff", b"\xe2\x80\xa8", b"\t", b"\xc3\xa9",
                                  b"\x01", b"/", b"\xe2\x80\xae"]), st.binary(max_size=4))
ODD_LINE = st.builds(lambda name, a, b: name + b"x" + a + b"y" + b,
                     st.sampled_from([b"Call-ID: ", b"From: <sip:a>;tag=", b"t: <x>;tag=", b"Via: SIP/2.0/UDP h;branch=",
                                      b"CSeq: 5 "]), _ODD, _ODD)
ODD_START = st.builds(lambda a: b"SIP/2.0 200 O" + a + b"K", _ODD)
#: start lines: the usual ones most of the time (else the C path is seldom taken), odd ones too
START = st.one_of(st.sampled_from([b"INVITE sip:a@b SIP/2.0", b"SIP/2.0 200 OK", b"SIP/2.0 180 ", b"SIP/2.0 486"]),
                  START_LINE, ODD_START, ODD_START)


#: each C line and the Python function it stands in for
FORMATS = ((speedups.jsonl, messagelog.jsonl), (speedups.table, messagelog.table))


def python_line(line: Callable[..., bytes], args: tuple, payload: bytes) -> bytes | None:
    """messagelog's line on the pure-Python parse, as format_batch writes it (None: no line)."""
    try:
        m = sip._parse_py(payload)
    except sip.SipError:
        return None
    return line(*args, m)


USUAL_ARGS = (1700000000.123456, 12, "10.0.0.1", 5060, "10.0.0.2", 5060, "udp", "eth/ipv4/udp")


@settings(max_examples=1500, deadline=None)
@example(b"INVITE sip:a@b SIP/2.0", [], [0, 0, 0, 0], b"\r\n\r\n", b"")
@example(b"SIP/2.0 180 ", [], [0, 0, 0, 0], b"\r\n\r\n", b"")
@example(b"SIP/2.0 486", [b"From: <sip:a>;tag=x\xffy"], [0, 0, 0, 0], b"\r\n\r\n", b"")
@given(START, st.lists(st.one_of(FILL_LINE, ODD_LINE, ODD_LINE), max_size=6),
       st.lists(st.integers(0, 20), min_size=4, max_size=4),
       st.sampled_from([b"\r\n\r\n", b"\r\n\r\n", b"\n\n", b"\r\n"]), st.binary(max_size=12))
def test_c_jsonl_line_equals_the_python_line(start: bytes, lines: list[bytes], where: list[int], sep: bytes,
                                             body: bytes) -> None:
    """Any message: the C line, when there is one, is the Python line (and has no defect)."""
    for line, at in zip(BASE_LINES, where):
        if at < 18:  # now and then one is missing
            lines.insert(at % (len(lines) + 1), line)
    payload = start + b"\r\n" + b"\r\n".join(lines) + sep + body
    for fast, line in FORMATS:
        got = fast(*USUAL_ARGS, payload)
        if got is None:
            continue  # the caller parses and formats in Python
        assert got == python_line(line, USUAL_ARGS, payload), payload
        assert not sip._parse_py(payload).defects  # a message with a defect is counted: Python's to do


@settings(max_examples=1000, deadline=None)
@example(0.0001, 2**63 - 1, 'a"\\b', 0, "::1", -1, "udp", "eth", 0)
@given(TS, INT, TEXT, INT, TEXT, INT, TEXT, TEXT, st.integers(0, 1))
def test_c_jsonl_arguments_equal_the_python_line(ts: float, no: int, src: str, sport: int, dst: str, dport: int,
                                                 transport: str, encap: str, which: int) -> None:
    """Any transport facts (floats, big ints, texts to escape or not ASCII) with a plain message."""
    payload = (PLAIN, PLAIN_RESPONSE)[which]
    args = (ts, no, src, sport, dst, dport, transport, encap)
    for fast, line in FORMATS:
        got = fast(*args, payload)
        if got is not None:
            assert got == python_line(line, args, payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 300))
def test_c_jsonl_on_any_bytes(noise: bytes, cut: int) -> None:
    """Random and truncated payloads: a line only where the Python path gives the same one."""
    args = (1.5, 1, "a", 1, "b", 2, "udp", "eth")
    for payload in (noise, PLAIN[:cut], PLAIN[:cut] + noise, PLAIN.replace(b"bob", noise[:20])):
        for fast, line in FORMATS:
            got = fast(*args, payload)
            if got is not None:
                assert got == python_line(line, args, payload)


def test_c_jsonl_takes_the_plain_message_and_writes_repr_times() -> None:
    """The fast path is taken for the usual message, and its ts is repr's for pcap times (the
    table's "%.6f" is Python's own: PyOS_double_to_string)."""
    rnd = random.Random(13)
    for _ in range(20000):
        ts = rnd.randrange(2**32) + rnd.randrange(10**6) * 1e-6
        if ts < 1e-4:
            continue
        got = speedups.jsonl(ts, 7, "10.0.0.1", 5060, "10.0.0.2", 5060, "udp", "eth/ipv4/udp", PLAIN)
        assert got is not None and got.startswith(b'{"ts":%s,' % repr(ts).encode())
    assert speedups.jsonl(math.nan, 7, "a", 1, "b", 2, "udp", "eth", PLAIN) is None  # orjson writes null
    assert speedups.jsonl(1.5, 7, "\u00e9", 1, "b", 2, "udp", "eth", PLAIN) is None  # not ASCII: Python's
    for args in (USUAL_ARGS, ("2001:db8::1", 5060, "10.0.0.2", 65535, "tcp"), ("a", 1, "b", 2, "sctp-x")):
        args = (1700000000.5, 1, *args, "eth") if len(args) == 5 else args
        for payload in (PLAIN, PLAIN_RESPONSE, PLAIN.replace(b"314159 INVITE", b"123456789 INVITE-LONGER-x"),
                        PLAIN_RESPONSE.replace(b"200 OK", b"480 Temporarily Unavailable For Now")):
            assert speedups.table(*args, payload) == python_line(messagelog.table, args, payload), payload


def test_messages_lines_are_the_same_without_the_c_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """format_batch with and without _speedups.jsonl, on every golden capture: the same bytes."""
    from tests.conftest import PCAPS

    batches = []
    for path in sorted(p for p in PCAPS.glob("*.pcap*") if not p.name.endswith(".json")):
        try:
            batches.append(list(messagerun.candidates(CaptureReader(path), CaptureStage(Counters()))))
        except Exception:  # a capture the reader refuses is not this test's matter
            continue
    assert sum(map(len, batches)) > 100
    fast = [messagerun.format_batch(fmt)(b) for fmt in ("jsonl", "table") for b in batches]
    monkeypatch.setattr(messagerun, "fast_jsonl", None)
    monkeypatch.setattr(messagerun, "fast_table", None)
    slow = [messagerun.format_batch(fmt)(b) for fmt in ("jsonl", "table") for b in batches]
    assert fast == slow
