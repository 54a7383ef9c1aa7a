"""The duplicate filter decides a datagram by its own payload's entry alone: filtering only one
shard's datagrams (what each -j N worker does since it skips other shards' frames in C) drops
exactly the copies that filtering all of them drops, as long as packet time does not go back
and the table does not overflow (a flood)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sipsniff_acc.events import Datagram, Transport
from sipsniff_acc.pipeline import Deduplicator

PAYLOADS = [b"A" * 10, b"B" * 10, b"C" * 10, b"D" * 12, b"E" * 12]  #: same lengths: same keys
SHARD = {p: i % 2 for i, p in enumerate(PAYLOADS)}


def _d(ts: float, payload: bytes, ipid: int, port: int) -> Datagram:
    return Datagram(ts, 1, Transport.UDP, b"\x01\x02\x03\x04", port, b"\x05\x06\x07\x08", 5060, payload,
                    ("ip4",), "x", ipid)


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.0, 0.001, 0.005, 0.019, 0.02, 0.021, 0.3]),
                          st.sampled_from(PAYLOADS), st.integers(0, 3), st.sampled_from([5060, 5060, 5061])),
                max_size=40))
def test_one_shard_filtered_alone_drops_the_same_copies(stream: list[tuple[float, bytes, int, int]]) -> None:
    t = 100.0
    datagrams = []
    for gap, payload, ipid, port in stream:
        t += gap
        datagrams.append(_d(t, payload, ipid, port))
    every = Deduplicator()
    dropped_all = [every.duplicate(d) for d in datagrams]
    for shard in (0, 1):
        one = Deduplicator()
        mine = [i for i, d in enumerate(datagrams) if SHARD[d.payload] == shard]
        assert [one.duplicate(datagrams[i]) for i in mine] == [dropped_all[i] for i in mine]


def test_a_datagram_between_an_original_and_its_copy_does_not_hide_the_copy() -> None:
    dedup = Deduplicator()
    assert not dedup.duplicate(_d(1.0, b"A" * 10, 7, 5060))
    assert not dedup.duplicate(_d(1.001, b"B" * 10, 8, 5060))  # same flow and length, another payload
    assert dedup.duplicate(_d(1.002, b"A" * 10, 7, 5060))  # the mirror copy of the first
    assert dedup.duplicate(_d(1.003, b"B" * 10, 8, 5060))
    assert not dedup.duplicate(_d(1.004, b"A" * 10, 9, 5060))  # a resend: a new IP ID
    assert dedup.duplicate(_d(1.005, b"A" * 10, 7, 5060)) and dedup.duplicate(_d(1.006, b"A" * 10, 9, 5060))
    assert dedup.retransmissions == 1
    assert not dedup.duplicate(_d(1.1, b"A" * 10, 7, 5060))  # past the window
