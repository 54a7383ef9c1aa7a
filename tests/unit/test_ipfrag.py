"""ipfrag.py: reassembly in any order, duplicates, overlaps, timeouts and bounds."""

from __future__ import annotations

from sipsniff_acc.events import Anomaly, Fragment
from sipsniff_acc.ipfrag import FragmentReassembler, Reassembled

PAYLOAD = bytes(range(256)) * 10


def pieces(payload: bytes = PAYLOAD, size: int = 800, ident: int = 1, ts: float = 10.0) -> list[Fragment]:
    out = []
    for i, off in enumerate(range(0, len(payload), size)):
        chunk = payload[off : off + size]
        out.append(Fragment(ts + i * 0.001, i + 1, (b"\x01" * 4, b"\x02" * 4, ident, 17), 4, off,
                            off + size < len(payload), 17, b"\x01" * 4, b"\x02" * 4, chunk, ("eth", "ip4")))
    return out


def run(frags: list[Fragment], r: FragmentReassembler | None = None) -> list[Reassembled | Anomaly]:
    r = r or FragmentReassembler()
    out: list[Reassembled | Anomaly] = []
    for f in frags:
        out.extend(r.feed(f))
    return out


def test_in_order() -> None:
    out = run(pieces())
    assert len(out) == 1 and isinstance(out[0], Reassembled)
    assert out[0].payload == PAYLOAD and out[0].encap == ("eth", "ip4", "frag") and out[0].fragments == 4


def test_out_of_order_takes_the_time_and_frame_of_the_last_piece() -> None:
    ps = pieces()
    out = run([ps[2], ps[0], ps[3], ps[1]])
    assert [type(o) for o in out] == [Reassembled]
    assert out[0].payload == PAYLOAD and out[0].no == ps[1].no  # type: ignore[union-attr]


def test_exact_duplicates_are_ignored() -> None:
    ps = pieces()
    out = run([ps[0], ps[0], ps[1], ps[1], ps[2], ps[3]])
    assert [type(o) for o in out] == [Reassembled]


def test_overlap_keeps_first_copy_and_says_so() -> None:
    ps = pieces()
    bad = Fragment(ps[1].ts, 99, ps[1].key, 4, 700, True, 17, ps[1].src, ps[1].dst, b"\xff" * 200, ps[1].encap)
    out = run([ps[0], bad, ps[1], ps[2], ps[3]])
    assert [a.name for a in out if isinstance(a, Anomaly)] == ["ip_frag_overlap", "ip_frag_overlap"]
    whole = [o for o in out if isinstance(o, Reassembled)][0]
    # 700-800 was already held (ps[0]); 800-900 came first from the overlapping piece
    assert whole.payload[:800] == PAYLOAD[:800] and whole.payload[800:900] == b"\xff" * 100
    assert whole.payload[900:] == PAYLOAD[900:]


def test_interleaved_datagrams_do_not_mix() -> None:
    a, b = pieces(ident=1), pieces(payload=PAYLOAD[::-1], ident=2)
    out = run([x for pair in zip(a, b) for x in pair])
    assert sorted(o.payload for o in out) == sorted([PAYLOAD, PAYLOAD[::-1]])  # type: ignore[union-attr]


def test_timeout_on_packet_clock() -> None:
    r = FragmentReassembler(timeout=5.0)
    ps = pieces()
    run(ps[:2], r)
    assert r.advance(14.0) == [] and r.pending == 1
    out = r.advance(15.1)
    assert [a.name for a in out] == ["ip_frag_timeout"] and r.pending == 0
    assert run(ps[2:], r) == []  # the late pieces alone never complete


def test_memory_is_bounded() -> None:
    r = FragmentReassembler(max_datagrams=3)
    out = run([pieces(ident=i)[0] for i in range(5)], r)
    assert [a.name for a in out if isinstance(a, Anomaly)] == ["ip_frag_evicted", "ip_frag_evicted"]
    assert r.pending == 3


def test_too_big_is_refused() -> None:
    f = pieces()[0]
    big = Fragment(f.ts, 1, f.key, 4, 65528, False, 17, f.src, f.dst, b"x" * 100, f.encap)
    assert [a.name for a in run([big]) if isinstance(a, Anomaly)] == ["ip_frag_too_big"]


def test_finish_reports_incomplete() -> None:
    r = FragmentReassembler()
    run(pieces()[:1], r)
    assert [a.name for a in r.finish()] == ["ip_frag_timeout"]
