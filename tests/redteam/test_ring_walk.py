"""Red team on the ring walk: blocks the kernel would never write (random headers, offsets
past the block, a `next` that wraps a 32-bit position, 0-length and truncated frames,
VLAN-offloaded tags on tiny frames) must neither crash the C walk nor make it disagree
with the Python one; and reading a reused ring must not grow memory."""

from __future__ import annotations

import mmap
import resource
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipsniff_acc.events import Frame
from sipsniff_acc.sources import live

if live._walk_c is None:
    pytest.skip("_ring not built: the Python walk is the only one", allow_module_level=True)

B = live.BLOCK_SIZE
u32 = st.integers(0, 2**32 - 1)
header = st.fixed_dictionaries({
    "next": st.one_of(st.integers(0, 4096), st.sampled_from([2**32 - 16, 2**32 - B, B, B - 64]), u32),
    "sec": u32, "nsec": st.integers(0, 999_999_999),
    "snap": st.one_of(st.integers(0, 2000), st.sampled_from([B, B - 80, 2**32 - 1]), u32),
    "status": st.sampled_from([0, live.TP_STATUS_VLAN_VALID, live.TP_STATUS_VLAN_VALID | live.TP_STATUS_VLAN_TPID_VALID]),
    "mac": st.integers(0, 0xFFFF), "tci": u32, "tpid": st.integers(0, 0xFFFF),
    "pkttype": st.integers(0, 7),
})


def build(first: int, num: int, hdrs: list[dict[str, int]], fill: bytes) -> mmap.mmap:
    """Two blocks; the second one hostile: its headers wherever their `next` puts them."""
    ring = mmap.mmap(-1, 2 * B)
    ring[B:B + len(fill)] = fill
    struct.pack_into("<IIII", ring, B + 8, live.TP_STATUS_USER, num, first, 0)
    pos = first
    for h in hdrs:
        if pos + 64 > B:
            break
        struct.pack_into("<IIIIIIHHIIH", ring, B + pos, h["next"], h["sec"], h["nsec"], h["snap"], h["snap"],
                         h["status"], h["mac"], 0, 0, h["tci"], h["tpid"])
        ring[B + pos + 58] = h["pkttype"]
        if not h["next"]:
            break
        pos = (pos + h["next"]) % 2**32
    return ring


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=st.one_of(st.integers(0, 256), st.sampled_from([B - 64, B - 63, B, 2**32 - 8]), u32),
       num=st.one_of(st.integers(0, 12), u32), hdrs=st.lists(header, max_size=10),
       fill=st.binary(max_size=512), linktype=st.sampled_from([1, 101]), skip=st.booleans())
def test_c_walk_equals_python_walk_on_hostile_blocks(first: int, num: int, hdrs: list[dict[str, int]],
                                                      fill: bytes, linktype: int, skip: bool) -> None:
    ring = build(first, num, hdrs, fill)
    c = live._walk_c(ring, B, Frame, "live:x", linktype, 0, skip)
    py = live._walk_py(ring, B, Frame, "live:x", linktype, 0, skip)
    assert c == py


def test_a_wrapping_next_does_not_revisit_the_block() -> None:
    """A `next` that wraps the 32-bit position back to the block's start: the C walk read the
    same frames again (up to `num` times); the Python walk stops."""
    ring = build(48, 1000, [dict(next=2**32 - 16, sec=1, nsec=0, snap=20, status=0, mac=80, tci=0, tpid=0,
                                 pkttype=0)] * 1, b"")
    struct.pack_into("<I", ring, B + 32, 48)  # whatever lands at 32: a header pointing back to 48
    c = live._walk_c(ring, B, Frame, "live:x", 1, 0, False)
    py = live._walk_py(ring, B, Frame, "live:x", 1, 0, False)
    assert len(py[0]) == 1
    assert c == py


def test_walking_a_reused_ring_keeps_memory_flat() -> None:
    """200,000 walks of a full block (the ring reused as the kernel would): max RSS grows < 4 MB
    after the first 20,000 (the frames are dropped each time, as the reader does)."""
    eth = bytes(range(12)) + b"\x08\x00" + b"E" * 200
    hdrs = [dict(next=320, sec=1, nsec=i, snap=len(eth), status=live.TP_STATUS_VLAN_VALID, mac=80, tci=5, tpid=0,
                 pkttype=0) for i in range(30)]
    hdrs[-1]["next"] = 0
    ring = build(48, 30, hdrs, b"")
    for i in range(30):
        ring[B + 48 + i * 320 + 80:B + 48 + i * 320 + 80 + len(eth)] = eth
    for _ in range(20_000):
        live._walk_c(ring, B, Frame, "live:x", 1, 0, False)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(180_000):
        frames, _f, _n, _cut = live._walk_c(ring, B, Frame, "live:x", 1, 0, False)
    assert len(frames) == 30 and frames[0].data[12:16] == b"\x81\x00\x00\x05"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base < 4096


def test_frames_cut_short_are_counted() -> None:
    """A frame the kernel truncated (tp_snaplen < tp_len: larger than a ring frame, e.g. a
    BIG TCP super-packet) and a header whose data would leave the block: counted as cut by
    both walks (they were passed on, or dropped, without a word)."""
    eth = bytes(range(12)) + b"\x08\x00" + b"E" * 100
    hdrs = [dict(next=320, sec=1, nsec=0, snap=len(eth), status=0, mac=80, tci=0, tpid=0, pkttype=0),
            dict(next=320, sec=1, nsec=1, snap=len(eth), status=0, mac=80, tci=0, tpid=0, pkttype=0),
            dict(next=0, sec=1, nsec=2, snap=B, status=0, mac=80, tci=0, tpid=0, pkttype=0)]
    ring = build(48, 3, hdrs, b"")
    struct.pack_into("<I", ring, B + 48 + 320 + 16, 200_000)  # the second: 200,000 bytes on the wire
    for walk in (live._walk_c, live._walk_py):
        frames, _f, _n, cut = walk(ring, B, Frame, "live:x", 1, 0, False)
        assert len(frames) == 2 and cut == 2
