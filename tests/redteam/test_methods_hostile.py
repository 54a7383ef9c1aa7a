"""Red team: a peer inventing a new SIP method with every request. The tracker's counters by
method (timed out, open at the end, the timer's 408, evicted while open) are keyed by the
IANA methods and "other", so they stay a few keys whatever arrives (memory, --stats size)."""

from __future__ import annotations

from collections.abc import Iterator

from sipsniff_acc import sip
from sipsniff_acc.limits import Limits
from sipsniff_acc.sip import SipMessage
from sipsniff_acc.tracker import TransactionTracker
from tests.flows import PROXY

N = 10_000


def made_up(i: int, ts: float) -> SipMessage:
    """A request with a method nobody registered (a valid RFC 3261 token), to the proxy."""
    method = b"X%dCUSTOM" % i
    raw = (b"%s sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.9.0.1:5060;branch=z9hG4bK-m%d\r\n"
           b"From: <sip:m@example.com>;tag=ft%d\r\nTo: <sip:bob@example.com>\r\n"
           b"Call-ID: made-up-%d\r\nCSeq: 1 %s\r\nContent-Length: 0\r\n\r\n" % (method, i, i, i, method))
    m = sip.parse(raw)
    m.ts, m.src, m.sport, m.dst, m.dport, m.transport = ts, "10.9.0.1", 5060, PROXY, 5060, "UDP"
    return m


def requests(n: int, t0: float) -> Iterator[SipMessage]:
    for i in range(n):
        yield made_up(i, t0 + i / 5000)


def test_counters_by_method_stay_bounded_under_made_up_methods() -> None:
    t = TransactionTracker([(PROXY, 5060)], limits=Limits(max_transactions=1000))
    for m in requests(N, 1000.0):
        t.feed(m)
    t.advance(1000.0 + N / 5000 + 3600)  # everything still held times out
    for m in requests(N, 9000.0):
        t.feed(m)
    t.finish()
    late = TransactionTracker([(PROXY, 5060)], open_as_408=True)
    for m in requests(N, 1000.0):
        late.feed(m)
    late.advance(1000.0 + N / 5000 + 3600)
    counters = {"evicted_open": t.stats.evicted_open, "timed_out": t.stats.timed_out,
                "open_at_end": t.stats.open_at_end, "timer_408": late.stats.timer_408}
    for name, c in counters.items():
        assert sum(c.values()) > 0, f"{name}: the flood did not reach it (the test would prove nothing)"
        assert len(c) <= 20, f"{name}: {len(c)} keys"
        assert set(c) == {"other"}, name
