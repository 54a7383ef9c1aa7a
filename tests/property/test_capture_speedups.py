"""The C capture front (sipsniff_acc/_capture.c) against its Python twins, on generated,
truncated, mutated and random frames: the same result whenever C takes a frame, and every
plain UDP frame taken by C (not left to the Python path by mistake)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sipsniff_acc import decode as dec
from sipsniff_acc import sip
from sipsniff_acc.events import Datagram, Frame, Transport
from sipsniff_acc.sources import pcapfile
from sipsniff_acc.sources.pcapfile import CaptureReader, SourceError

speedups = pytest.importorskip("sipsniff_acc._capture")

LINKTYPES = st.sampled_from([0, 1, 12, 101, 108, 113, 147, 228, 229, 276])
TPIDS = [0x8100, 0x88A8, 0x9100, 0x9200]


def _ip4(payload: bytes, hl: int, frag: int, proto: int, ident: int, total_delta: int) -> bytes:
    opts = bytes(4 * (hl - 5)) if hl > 5 else b""
    total = max(0, 4 * hl + len(payload) + total_delta) & 0xFFFF
    return struct.pack("!BBHHHBBH4s4s", 0x40 | hl, 0, total, ident, frag, 64, proto, 0,
                       b"\xc0\x00\x02\x01", b"\xc0\x00\x02\x02") + opts + payload


def _ip6(payload: bytes, nh: int, plen_delta: int) -> bytes:
    plen = max(0, len(payload) + plen_delta) & 0xFFFF
    return struct.pack("!IHBB16s16s", 0x60000000, plen, nh, 64, bytes(15) + b"\x01", bytes(15) + b"\x02") + payload


@st.composite
def frames(draw: st.DrawFn, linktype: int | None = None, bodies: tuple[bytes, ...] = ()) -> Frame:
    """Plain UDP over every link C handles, with every field that makes it not plain drawn too.
    ``linktype``: this one only (a pcap file's); ``bodies``: UDP payloads drawn besides the usual."""
    plain = draw(st.booleans())  # half the frames plain UDP: the case C must take, and equal

    def odd(values: list[object], usual: object) -> object:
        return usual if plain else draw(st.sampled_from(values))

    body = draw(st.sampled_from([b"INVITE sip:a@b SIP/2.0\r\nVia: x\r\n\r\n", b"SIP/2.0 200 OK\r\n\r\n",
                                 b"\x80\x00rtp", b"", b"\r\n\r\n", b" \x00\r\n", b"\r\nx", *bodies]))
    sport, dport = draw(st.sampled_from([5060, 4789, 37008, 1])), draw(st.sampled_from([5060, 4789, 37008, 2]))
    ulen = len(body) + 8 + odd([0, 0, 0, -1, 1, -8, -100], 0)  # type: ignore[operator]
    udp = struct.pack("!HHHH", sport, dport, max(0, ulen) & 0xFFFF, 0) + body
    if draw(st.booleans()):
        ip = _ip4(udp, draw(st.sampled_from([5, 5, 6, 4, 15])) if not plain else draw(st.sampled_from([5, 6])),
                  draw(st.sampled_from([0, 0, 0x4000, 0x2000, 1])) if not plain else draw(st.sampled_from([0, 0x4000])),
                  odd([17, 17, 6, 132, 4, 47], 17), draw(st.integers(0, 0xFFFF)),  # type: ignore[arg-type]
                  odd([0, 0, -1, 1, -20], 0))  # type: ignore[arg-type]
        et = 0x0800
    else:
        ip = _ip6(udp, odd([17, 17, 6, 0, 44, 60], 17), odd([0, 0, -1, 1, -65536], 0))  # type: ignore[arg-type]
        et = 0x86DD
    et = odd([et, 0x0800, 0x86DD, 0x8847, 0x8864, 0x0806], et)  # type: ignore[assignment]
    tags = [(draw(st.sampled_from(TPIDS)), draw(st.integers(0, 0xFFFF))) for _ in range(draw(st.integers(0, 3 if plain else 10)))]
    lt = linktype if linktype is not None else \
        draw(st.sampled_from([1, 1, 113, 276, 101, 12, 228, 229] + ([] if plain else [0, 147])))
    # the EtherType field names the first tag's TPID; each tag holds its TCI and the next type
    link_type = struct.pack("!H", tags[0][0] if tags else et)
    l2_rest = b"".join(struct.pack("!HH", tci, tags[i + 1][0] if i + 1 < len(tags) else et)
                       for i, (_tpid, tci) in enumerate(tags))
    if lt == 1:
        data = bytes(12) + link_type + l2_rest + ip
    elif lt == 113:
        data = bytes(14) + link_type + l2_rest + ip
    elif lt == 276:
        data = link_type + bytes(18) + l2_rest + ip
    else:
        data = ip
    data += bytes(draw(st.sampled_from([0, 0, 6, 20])))  # Ethernet padding
    cut = odd([None, None, None, 1, 10, 14, 20, 30, 40, 50, 60], None)
    if cut is not None:
        data = data[: len(data) - cut] if draw(st.booleans()) else data[:cut]  # type: ignore[operator]
    if not plain and draw(st.booleans()) and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    return Frame(draw(st.floats(0, 2e9, allow_nan=False)), lt, data, draw(st.integers(1, 10**6)), "x.pcap")


def _same(frame: Frame) -> None:
    fast = speedups.udp(frame)
    slow = dec.decode_py(frame)
    if fast is None:
        assert speedups.sip_udp(frame) is None
        # declined: fine unless it was the plainest case of all (C must not miss the bulk)
        if isinstance(slow, Datagram) and frame.linktype == 1 and slow.encap == ("eth", "ip4") \
                and (slow.transport is not Transport.UDP or slow.dport not in (4789, 37008)):
            raise AssertionError(f"C declined a plain Ethernet/IPv4/UDP frame: {frame.data.hex()}")
        return
    assert fast.__class__ is Datagram
    assert fast == slow, (frame, fast, slow)
    assert type(fast.src) is bytes and type(fast.payload) is bytes and type(fast.encap) is tuple
    assert dec.decode(frame) == slow
    # CaptureStage's variant: the content check folded in, no Datagram for what is not SIP
    kind = speedups.sip_udp(frame)
    if slow.transport is not Transport.UDP or sip.looks_like_sip_py(slow.payload):
        assert kind == slow
    else:
        assert kind == (1 if sip.is_keepalive(slow.payload) else 2)


@settings(max_examples=1500)
@given(frames())
def test_c_udp_decode_equals_python(frame: Frame) -> None:
    _same(frame)


@settings(max_examples=500)
@given(LINKTYPES, st.binary(max_size=120))
@example(1, bytes(12) + b"\x08\x00" + b"\x45")
@example(101, b"\x60" + bytes(39))
def test_c_udp_decode_on_random_bytes(lt: int, data: bytes) -> None:
    _same(Frame(1.5, lt, data, 1, ""))


def test_c_udp_declines_what_is_not_a_frame() -> None:
    assert speedups.udp(object()) is None
    assert speedups.udp(Frame(1.0, 1, bytearray(60), 1, "")) is None  # type: ignore[arg-type]
    assert speedups.udp(Frame(1.0, 10**30, bytes(60), 1, "")) is None


@settings(max_examples=1000)
@given(st.binary(max_size=80) | st.sampled_from([
    b"INVITE sip:a SIP/2.0\r\n", b"SIP/2.0 180 Ringing\r\n", b"ACK x SIP/2.0\n", b"A1B sip SIP/2.0\r\r\n",
    b"OPTIONS x SIP/2.0", b"Ab x SIP/2.0\n", b"123 x SIP/2.0\n", b"XYZ \n", b"XYZ  SIP/2.0\n",
    b"XYZ a\nSIP/2.0\n", b"X-Y x SIP/2.0\r\n", b"SIP/2.0", b"XYZ\x00x SIP/2.0\n"]))
@example(b"ABC SIP/2.0\n")
@example(b"ABC \n SIP/2.0")
def test_c_looks_like_sip_equals_python(payload: bytes) -> None:
    assert speedups.looks_like_sip(payload) is sip.looks_like_sip_py(payload)


@given(st.binary(max_size=40), st.integers(0, 9000))
def test_c_looks_like_sip_long_start_lines(head: bytes, pad: int) -> None:
    payload = b"REGISTER " + head + b"x" * pad + b" SIP/2.0\r\n"
    assert speedups.looks_like_sip(payload) is sip.looks_like_sip_py(payload)


@st.composite
def records(draw: st.DrawFn) -> bytes:
    """A classic pcap file, either byte order and unit, its records sometimes corrupt or cut."""
    big = draw(st.booleans())
    nanos = draw(st.booleans())
    order = ">" if big else "<"
    magic = 0xA1B23C4D if nanos else 0xA1B2C3D4
    out = [struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 262144, draw(st.sampled_from([1, 113, 0x10000001])))]
    for _ in range(draw(st.integers(0, 6))):
        data = draw(st.binary(max_size=80))
        caplen = len(data) if draw(st.integers(0, 9)) else draw(st.sampled_from([len(data) + 1, 1 << 21, 0xFFFFFFFF]))
        out.append(struct.pack(order + "IIII", draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)),
                               caplen, len(data)) + data)
    blob = b"".join(out)
    cut = draw(st.integers(0, 30))
    return blob[: len(blob) - cut] if draw(st.booleans()) else blob


def _read(path: Path) -> tuple[list[tuple[float, int, bytes, int, str]], str]:
    out = []
    err = ""
    try:
        for f in CaptureReader(path):
            assert type(f) is Frame and type(f.data) is bytes
            out.append((f.ts, f.linktype, f.data, f.no, f.source))
    except SourceError as e:
        err = str(e)
    return out, err


@settings(max_examples=300)
@given(st.data())
def test_c_pcap_walk_equals_python(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    """Same frames (timestamps to the bit), same error at the same offset, on damaged files too."""
    path = tmp_path_factory.mktemp("walk") / "w.pcap"
    path.write_bytes(data.draw(records()))
    fast = _read(path)
    saved = pcapfile.speedups
    pcapfile.speedups = None
    try:
        slow = _read(path)
    finally:
        pcapfile.speedups = saved
    assert fast == slow


def test_c_pcap_walk_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records cut by the chunk boundary are completed by the next chunk."""
    frames_in = [(1.0 + i / 7, bytes([i % 256]) * (i % 97)) for i in range(500)]
    from tests.builders import pcap_bytes

    path = tmp_path / "c.pcap"
    path.write_bytes(pcap_bytes(frames_in))
    monkeypatch.setattr(pcapfile, "CHUNK", 333)
    fast = _read(path)
    monkeypatch.setattr(pcapfile, "speedups", None)
    assert fast == _read(path)
    assert len(fast[0]) == 500 and not fast[1]


@settings(max_examples=150)
@given(st.data())
def test_pcapng_batches_keep_every_frame_before_the_damage(tmp_path_factory: pytest.TempPathFactory,
                                                            data: st.DataObject) -> None:
    """pcapng frames come in a list per read: any chunk size gives the same frames, and a file cut
    anywhere still gives every whole packet block before the cut, then its error."""
    def block(btype: int, body: bytes) -> bytes:
        body += bytes(-len(body) % 4)
        return struct.pack("<II", btype, len(body) + 12) + body + struct.pack("<I", len(body) + 12)

    payloads = data.draw(st.lists(st.binary(max_size=70), max_size=8))
    blob = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    bounds = [len(blob)]
    blob += block(1, struct.pack("<HHI", 1, 0, 0))
    bounds.append(len(blob))
    ends: list[int] = []
    for i, p in enumerate(payloads):
        blob += block(6, struct.pack("<IIIII", 0, 0, 1000 + i, len(p), len(p)) + p)
        ends.append(len(blob))
    cut = data.draw(st.integers(0, len(blob)))
    path = tmp_path_factory.mktemp("ng") / "n.pcapng"
    path.write_bytes(blob[:cut] if cut >= 4 else blob)
    whole = _read(path)
    if cut >= 4:
        assert len(whole[0]) == sum(1 for e in ends if e <= cut)
        assert bool(whole[1]) == (cut not in bounds + ends)
    saved = pcapfile.CHUNK
    pcapfile.CHUNK = data.draw(st.integers(12, 200))
    try:
        assert _read(path) == whole
    finally:
        pcapfile.CHUNK = saved


@settings(max_examples=300)
@given(st.data())
def test_c_pcapng_walk_equals_python(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    """Packet blocks walked in C: the same frames (timestamps to the bit) and the same error as the
    Python walk, across sections of either byte order, interfaces with their own time units and
    offsets, packet blocks naming no interface, claiming more than they hold, or cut."""
    big = data.draw(st.booleans())
    o = ">" if big else "<"

    def block(btype: int, body: bytes, blen: int | None = None) -> bytes:
        body += bytes(-len(body) % 4)
        n = len(body) + 12 if blen is None else blen
        return struct.pack(o + "II", btype, n) + body + struct.pack(o + "I", n)

    def option(code: int, value: bytes) -> bytes:
        return struct.pack(o + "HH", code, len(value)) + value + bytes(-len(value) % 4)

    blob = block(0x0A0D0D0A, struct.pack(o + "IHHq", 0x1A2B3C4D, 1, 0, -1))
    for lt in data.draw(st.lists(st.sampled_from([1, 113, 101]), min_size=0, max_size=3)):
        opts = b""
        if data.draw(st.booleans()):
            opts += option(9, bytes([data.draw(st.sampled_from([6, 9, 3, 0x80 | 20, 0x80 | 10]))]))
        if data.draw(st.booleans()):
            opts += option(14, struct.pack(o + "q", data.draw(st.integers(-10**9, 10**9))))
        if opts:
            opts += option(0, b"")
        blob += block(1, struct.pack(o + "HHI", lt, 0, 0) + opts)
    for _ in range(data.draw(st.integers(0, 8))):
        p = data.draw(st.binary(max_size=60))
        iface = data.draw(st.sampled_from([0, 0, 0, 1, 2, 5]))
        caplen = len(p) if data.draw(st.integers(0, 7)) else len(p) + data.draw(st.integers(1, 9))
        ticks = data.draw(st.integers(0, 2**64 - 1))
        kind = data.draw(st.sampled_from([6, 6, 6, 6, 3, 5]))
        if kind == 3:
            blob += block(3, struct.pack(o + "I", len(p)) + p)
        else:
            blob += block(kind, struct.pack(o + "IIIII", iface, ticks >> 32, ticks & 0xFFFFFFFF, caplen, len(p)) + p)
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    if data.draw(st.booleans()) and len(blob) > 28:
        i = data.draw(st.integers(28, len(blob) - 1))
        blob = blob[:i] + bytes([data.draw(st.integers(0, 255))]) + blob[i + 1:]
    path = tmp_path_factory.mktemp("ngc") / "c.pcapng"
    path.write_bytes(blob)
    fast = _read(path)
    saved = pcapfile.speedups
    pcapfile.speedups = None
    try:
        assert _read(path) == fast
    finally:
        pcapfile.speedups = saved
