"""``_capture.pcap_shard``: -j N worker k's walk of classic pcap chunks (fileworker._Walk), which
keeps other shards' plain UDP SIP, keep-alives and RTP out of Python.

Held against a model built from the C pieces already held to their Python twins (pcap_frames,
sip_udp, shard) on generated, damaged and random records over every linktype it takes; and,
whole, against the worker's Python path: fileworker.produce with and without the walk gives the
same rounds, sequence numbers, records and counters, for every worker of 1-3."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipsniff_acc import fileworker, pipeline
from sipsniff_acc.events import Datagram, Frame, Transport
from sipsniff_acc.rules import load_rules
from sipsniff_acc.sources import pcapfile
from sipsniff_acc.sources.pcapfile import CaptureReader, SourceError, open_captures
from tests.property.test_capture_speedups import frames as frame_strategy

speedups = pytest.importorskip("sipsniff_acc._capture")

LINKTYPES = [1, 113, 276, 101, 12, 228, 229, 0, 147]
#: SIP with Call-IDs of different shards (and none), besides frame_strategy's bodies
BODIES = tuple(f"{m} sip:a@b SIP/2.0\r\nVia: x\r\n{h}: {cid}\r\n\r\n".encode()
               for m in ("INVITE", "BYE") for h, cid in (("Call-ID", "a1"), ("i", "b2"), ("call-id", "zz@h"),
                                                         ("Call-ID", "c3")))


@st.composite
def chunks(draw: st.DrawFn) -> tuple[bytes, bool, float, int]:
    """Records of classic pcap (either byte order), the chunk cut anywhere, some records damaged:
    a length past the chunk or past MAX_RECORD, random bytes."""
    big = draw(st.booleans())
    unit = draw(st.sampled_from([1e-6, 1e-9]))
    lt = draw(st.sampled_from(LINKTYPES))
    order = ">" if big else "<"
    out = []
    sec = draw(st.integers(0, 2**32 - 100))
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.integers(0, 5)):
            data = draw(frame_strategy(linktype=lt, bodies=BODIES)).data
        else:
            data = draw(st.binary(max_size=80))
        caplen = len(data) if draw(st.integers(0, 15)) else draw(st.sampled_from([len(data) + 1, 1 << 21, 0xFFFFFFFF]))
        sec += draw(st.sampled_from([0, 0, 0, 1, 2]))
        frac = draw(st.integers(0, 999_999))
        out.append(struct.pack(order + "IIII", sec, frac, caplen, len(data)) + data)
    blob = b"".join(out)
    cut = draw(st.integers(0, 30))
    return (blob[: len(blob) - cut] if draw(st.booleans()) else blob), big, unit, lt


def model(buf: bytes, big: bool, unit: float, lt: int, k: int, shards: int, started: bool, next_tick: float,
          tick: float, next_advance: float, every: float) -> tuple[Any, ...]:
    """What pcap_shard must return, from pcap_frames, sip_udp and shard (each held to Python)."""
    frames, pos, no = speedups.pcap_frames(buf, 0, big, unit, lt, 0, "x.pcap")
    items: list[Any] = []
    tallies = [0, 0, 0, 0]
    for f in frames:
        due = False
        if f.ts >= next_tick:
            next_tick, due = f.ts + tick, True
        if f.ts >= next_advance:
            next_advance, due = f.ts + every, True
        kind = speedups.sip_udp(f)
        if kind is None or (kind.__class__ is Datagram and kind.transport is not Transport.UDP):
            items.append(f)
            continue
        mine = kind.__class__ is Datagram and pipeline._shard_py(kind.payload, shards) == k
        if kind.__class__ is Datagram and not mine and not started:
            items.append(f)  # another shard's before the first SIP ($TS): the worker's Python path
            continue
        tallies[0] += 1
        tallies[1] += len(f.data)
        if mine:
            items.append(kind)
            continue
        if kind.__class__ is not Datagram:
            tallies[2 if kind == 1 else 3] += 1
        if due:
            items.append((f.no, f.ts))
    return (items, pos, no, next_tick, next_advance, *tallies)


def _fields(item: Any) -> Any:
    if item.__class__ is Frame:
        return ("F", item.ts, item.linktype, item.data, item.no, item.source)
    return item


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks(), st.integers(1, 3), st.data())
def test_walk_equals_the_model(chunk: tuple[bytes, bool, float, int], shards: int, data: st.DataObject) -> None:
    buf, big, unit, lt = chunk
    k = data.draw(st.integers(0, shards - 1))
    started = data.draw(st.booleans())
    next_tick = data.draw(st.sampled_from([float("-inf"), 0.0, 2e9, 5e9]))
    next_advance = data.draw(st.sampled_from([0.0, 2e9, 5e9]))
    args = (k, shards, started, next_tick, 0.05, next_advance, 1.0)
    got = speedups.pcap_shard(buf, 0, big, unit, lt, 0, "x.pcap", *args)
    want = model(buf, big, unit, lt, *args)
    assert [_fields(i) for i in got[0]] == [_fields(i) for i in want[0]]
    assert got[1:] == want[1:]
    for item in got[0]:
        if item.__class__ is Datagram:
            assert type(item.payload) is bytes and type(item.src) is bytes and type(item.encap) is tuple


def test_walk_refuses_bad_arguments() -> None:
    with pytest.raises(TypeError):
        speedups.pcap_shard(b"", 0)
    with pytest.raises(ValueError):
        speedups.pcap_shard(b"", 0, False, 1e-6, 1, 0, "x", 0, 0, True, 0.0, 0.05, 0.0, 1.0)
    with pytest.raises(ValueError):
        speedups.pcap_shard(b"", -1, False, 1e-6, 1, 0, "x", 0, 1, True, 0.0, 0.05, 0.0, 1.0)
    assert speedups.pcap_shard(bytearray(10), 0, False, 1e-6, 1, 0, "x", 0, 1, True, 0.0, 0.05, 0.0, 1.0)[:3] == \
        ([], 0, 0)


# -- the whole worker: with and without the walk ----------------------------------------------

def _sip(method: str, cid: str, cseq: int, status: str | None = None) -> bytes:
    first = f"SIP/2.0 {status}" if status else f"{method} sip:bob@b.example SIP/2.0"
    return (f"{first}\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK{cid}{cseq}{method}\r\n"
            f"From: <sip:alice@a.example>;tag=f{cid}\r\nTo: <sip:bob@b.example>{';tag=t' + cid if status or method == 'BYE' else ''}\r\n"
            f"Call-ID: {cid}\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n").encode()


CALLS = [c for cid in ("k1", "k2", "k3", "k4", "k5") for c in (
    _sip("INVITE", cid, 1), _sip("INVITE", cid, 1, "200 OK"), _sip("BYE", cid, 2), _sip("BYE", cid, 2, "200 OK"))]


def _udp_eth(payload: bytes, ipid: int) -> bytes:
    udp = struct.pack("!HHHH", 5060, 5060, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), ipid, 0, 64, 17, 0, b"\x0a\x00\x00\x01",
                     b"\x0a\x00\x00\x02") + udp
    return bytes(12) + b"\x08\x00" + ip


@st.composite
def captures(draw: st.DrawFn) -> bytes:
    """A capture of calls (SIP in order per call, mirror copies), RTP, keep-alives, frames the
    walk leaves to Python (TCP, fragments, damage), times close to the Ticks and timers."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)]
    t = draw(st.integers(0, 10**6)) * 1e-3
    pending = {cid: [m for m in CALLS if f"Call-ID: {cid}\r\n".encode() in m] for cid in ("k1", "k2", "k3", "k4", "k5")}
    for _ in range(draw(st.integers(0, 60))):
        t += draw(st.sampled_from([0.0, 0.001, 0.02, 0.049, 0.05, 0.051, 0.3, 1.0, 1.7, 40.0]))
        what = draw(st.integers(0, 9))
        if what < 5:
            cid = draw(st.sampled_from(sorted(pending)))
            data = _udp_eth(pending[cid].pop(0) if pending[cid] else CALLS[0], draw(st.integers(0, 3)))
            copies = draw(st.sampled_from([1, 1, 2]))
        elif what < 9:
            data = draw(frame_strategy(linktype=1, bodies=BODIES)).data
            copies = 1
        else:
            data = draw(st.binary(max_size=60))
            copies = 1
        for _ in range(copies):
            sec = int(t)
            out.append(struct.pack("<IIII", sec, int(round((t - sec) * 1e6)) % 1_000_000, len(data), len(data)) + data)
        for cid in [c for c, left in pending.items() if not left]:
            del pending[cid]
        if not pending:
            pending = {"k9": []}
    blob = b"".join(out)
    return blob[: len(blob) - draw(st.sampled_from([0, 0, 0, 7]))]


def _worker_runs(path: Path, workers: int, round_frames: int) -> list[Any]:
    rules = load_rules(None)
    runs = []
    for k in range(workers):
        errors: list[SourceError] = []
        stream = open_captures([CaptureReader(path)], errors)
        runs.append(list(fileworker.produce(stream, k, workers, rules, False, errors, lambda: None, round_frames)))
    return [[(shipped, None if tail is None else (tail[0].as_dict(), tail[1])) for shipped, tail in run]
            for run in runs]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(captures(), st.integers(1, 3), st.sampled_from([1, 3, 7, 4096]))
def test_workers_with_the_walk_equal_workers_without(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capture: bytes, workers: int, round_frames: int) -> None:
    path = tmp_path / "w.pcap"
    path.write_bytes(capture)
    walked = _worker_runs(path, workers, round_frames)
    with monkeypatch.context() as m:
        m.setattr(pcapfile.CaptureStream, "walk_with", lambda self, walker: False)
        plain = _worker_runs(path, workers, round_frames)
    assert walked == plain
    assert len({len(run) for run in walked}) == 1  # every worker as many rounds


REPO = Path(__file__).resolve().parents[2]
REAL = [REPO / "tests" / "conformance" / "cases" / "volume_mixed" / "capture.pcap", REPO / "tests" / "pcaps" / "sample.pcap",
        REPO / "tests" / "pcaps" / "sipp_tcp.pcap", REPO / "tests" / "pcaps" / "dup_ipid.pcap",
        REPO / "tests" / "pcaps" / "frag4_outoforder.pcap"]


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.parent.name if p.name == "capture.pcap" else p.name)
@pytest.mark.parametrize("workers", [2, 3])
def test_workers_on_real_captures_with_and_without_the_walk(path: Path, workers: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[bool] = []
    real = pcapfile.CaptureStream.walk_with

    def spy(self: pcapfile.CaptureStream, walker: Any) -> bool:
        taken.append(real(self, walker))
        return taken[-1]

    monkeypatch.setattr(pcapfile.CaptureStream, "walk_with", spy)
    walked = _worker_runs(path, workers, 5)
    assert taken == [True] * workers  # the walk was taken
    monkeypatch.setattr(pcapfile.CaptureStream, "walk_with", lambda self, walker: False)
    plain = _worker_runs(path, workers, 5)
    assert walked == plain
    if path.parent.name == "volume_mixed":
        assert sum(len(shipped[0]) for run in walked for shipped, _tail in run) > 20
