"""LiveCapture on real kernels: frames, timestamps, several interfaces, BPF filters, fragments,
the default RTP drop, exact drop accounting, promiscuous mode (root; veth pairs of our own)."""

from __future__ import annotations

import mmap
import struct
import subprocess
import time
from collections.abc import Callable

import pytest

from sipsniff_acc.events import CaptureGap, Frame, Idle
from sipsniff_acc.sources import live
from sipsniff_acc.sources.live import LiveCapture, promiscuity
from tests.builders import SDP, sip_request
from tests.capture.links import Links

Event = Frame | Idle | CaptureGap


def collect(cap: LiveCapture, done: Callable[[list[Event]], bool]) -> list[Event]:
    """Events until ``done`` says so (the capture's own --duration bounds the wait)."""
    events: list[Event] = []
    for ev in cap:
        events.append(ev)
        if done(events):
            break
    return events


def frames(events: list[Event]) -> list[Frame]:
    return [e for e in events if isinstance(e, Frame)]


def n_frames(n: int) -> Callable[[list[Event]], bool]:
    return lambda evs: len(frames(evs)) >= n


def then_idle(n: int) -> Callable[[list[Event]], bool]:
    """``n`` frames, then 100 ms of silence (anything later would have come by then)."""
    return lambda evs: len(frames(evs)) >= n and isinstance(evs[-1], Idle)


def udp_dport(frame: Frame) -> int:
    """Destination port of an Ethernet/IPv4/UDP frame (first fragment)."""
    ihl = (frame.data[14] & 0x0F) * 4
    return int.from_bytes(frame.data[14 + ihl + 2:14 + ihl + 4], "big")


def test_frames_arrive_with_kernel_timestamps(links: Links) -> None:
    iface = links.capture[0]
    cap = LiveCapture([iface], duration=10)
    cap.open()
    t0 = time.time()
    sent = links.send(0, [sip_request(call_id=f"ts-{i}@s1") for i in range(5)], 5060)
    t1 = time.time()
    got = frames(collect(cap, n_frames(5)))
    assert sent == 5 and len(got) == 5
    assert [f.no for f in got] == [1, 2, 3, 4, 5]
    assert {f.source for f in got} == {f"live:{iface}"} and {f.linktype for f in got} == {1}
    assert all(t0 - 0.001 <= f.ts <= t1 + 0.001 for f in got), (t0, [f.ts for f in got], t1)
    assert [f.ts for f in got] == sorted(f.ts for f in got)
    assert all(f"ts-{i}@s1".encode() in got[i].data for i in range(5))
    st = cap.stats()[iface]
    assert (st["packets"], st["frames"], st["dropped"]) == (5, 5, 0)


def test_silence_yields_idle_heartbeats_at_most_100ms_apart(links: Links) -> None:
    cap = LiveCapture([links.capture[0]], duration=0.6)
    start = time.time()
    idles = [e for e in collect(cap, lambda evs: False) if isinstance(e, Idle)]
    assert len(idles) >= 4
    gaps = [b.ts - a.ts for a, b in zip(idles, idles[1:])]
    assert max(gaps) < 0.2 and idles[0].ts >= start - 0.05


def test_several_interfaces_make_one_stream(links: Links) -> None:
    a, b = links.capture
    cap = LiveCapture([a, b], duration=10)
    cap.open()
    links.send(0, [sip_request(call_id=f"a-{i}@s1") for i in range(3)], 5060)
    links.send(1, [sip_request(call_id=f"b-{i}@s1") for i in range(4)], 5060)
    got = frames(collect(cap, n_frames(7)))
    assert sorted(f.source for f in got) == [f"live:{a}"] * 3 + [f"live:{b}"] * 4
    assert [f.no for f in got if f.source == f"live:{b}"] == [1, 2, 3, 4]
    assert {k: v["frames"] for k, v in cap.stats().items()} == {a: 3, b: 4}


def test_a_filter_admits_and_rejects_in_the_kernel(links: Links) -> None:
    iface = links.capture[0]
    cap = LiveCapture([iface], duration=10, bpf_filter="udp dst port 5060")
    cap.open()
    links.send(0, [sip_request(call_id="other@s1")] * 3, 5070)
    links.send(0, [sip_request(call_id="sip@s1")] * 3, 5060)
    got = frames(collect(cap, then_idle(3)))
    assert [udp_dport(f) for f in got] == [5060] * 3
    assert cap.stats()[iface]["packets"] == 3  # the others never reached the ring
    assert links.rx_packets(0) >= 6


def test_fragments_of_a_big_invite_pass_a_port_filter(links: Links) -> None:
    """3000 bytes over a 1500-byte MTU: three IPv4 fragments; only the first has UDP ports,
    yet all three pass ``udp port 5060`` (the filter is wrapped to admit fragments)."""
    iface = links.capture[0]
    invite = sip_request(call_id="big@s1", body=SDP + b"a=x-pad:" + b"p" * 2600 + b"\r\n")
    assert len(invite) > 3000
    cap = LiveCapture([iface], duration=10, bpf_filter="udp port 5060")
    cap.open()
    links.send(0, [invite], 5060)
    got = frames(collect(cap, n_frames(3)))
    offsets = [struct.unpack_from("!H", f.data, 14 + 6)[0] & 0x1FFF for f in got]
    assert len(got) == 3 and offsets[0] == 0 and all(o > 0 for o in offsets[1:])
    # the bare expression, as libpcap compiles it, would have admitted the first piece only
    from sipsniff_acc.sources import bpf
    assert bpf.compile_raw("udp port 5060") != bpf.compile_filter("udp port 5060")


def test_default_filter_drops_rtp_in_the_kernel(links: Links) -> None:
    iface = links.capture[0]
    rtp = [bytes([0x80, 0x00]) + struct.pack("!HI", i, i * 160) + b"\x00" * 4 + b"\xff" * 160 for i in range(60)]
    rtcp = [bytes([0x81, 0xC8]) + b"\x00\x06" + b"\x00" * 24] * 5
    sip = [sip_request(call_id=f"keep-{i}@s1") for i in range(5)]
    before = links.rx_packets(0)
    cap = LiveCapture([iface], duration=10)
    cap.open()
    sent = links.send(0, rtp + sip + rtcp, 40000)
    got = frames(collect(cap, then_idle(5)))
    assert sent == 70 and links.rx_packets(0) - before == 70
    assert len(got) == 5 and all(b"INVITE sip:" in f.data for f in got)
    assert cap.stats()[iface]["packets"] == 5  # RTP/RTCP never reached the ring: dropped by the kernel's BPF


def test_drops_are_counted_exactly(links: Links) -> None:
    """A 1 MB ring, nobody reading, a burst 4x its size: every packet that reached the link
    is either read or reported lost, and the reports equal the kernel's tp_drops."""
    iface = links.capture[0]
    payload = b"OPTIONS sip:x SIP/2.0\r\n" + b"x" * 560
    before = links.rx_packets(0)
    cap = LiveCapture([iface], duration=20, ring_mb=1)
    cap.open()
    sent = links.send(0, [payload], 5060, repeat=6000)
    reached = links.rx_packets(0) - before
    quiet = 0

    def drained(evs: list[Event]) -> bool:
        nonlocal quiet
        quiet = quiet + 1 if isinstance(evs[-1], Idle) else 0
        return quiet >= 3  # 300 ms of silence after the ring was read

    events = collect(cap, drained)
    cap.close()
    seen = len(frames(events))
    reported = sum(e.dropped for e in events if isinstance(e, CaptureGap))
    st = cap.stats()[iface]
    assert sent == 6000 and reached >= 3000  # (a veth may drop a few in its backlog: those never reached the link)
    assert reported > 0 and seen > 0
    assert reported == st["dropped"] == reached - seen, (reported, st, reached, seen)
    assert st["packets"] == reached and st["frames"] == seen
    assert {e.interface for e in events if isinstance(e, CaptureGap)} == {iface}


def _ip_promiscuity(iface: str) -> int:
    out = subprocess.run(["ip", "-d", "link", "show", iface], capture_output=True, text=True, timeout=10).stdout
    return int(out.split("promiscuity ")[1].split()[0])


def test_promiscuous_mode_on_while_capturing_and_undone(links: Links) -> None:
    iface = links.capture[0]
    assert _ip_promiscuity(iface) == 0
    cap = LiveCapture([iface], duration=1)
    cap.open()
    assert _ip_promiscuity(iface) == 1 and promiscuity(iface) == 1 and cap.stats()[iface]["promisc"] is True
    cap.close()
    assert _ip_promiscuity(iface) == 0 and promiscuity(iface) == 0
    off = LiveCapture([iface], duration=1, promisc=False)
    off.open()
    assert _ip_promiscuity(iface) == 0 and off.stats()[iface]["promisc"] is False
    off.close()


def _block(packets: list[tuple[bytes, int, int, int]]) -> mmap.mmap:
    """Two ring blocks; the second holds ``packets`` (data, pkttype, status, vlan tci) as the
    kernel lays them out (tpacket3_hdr + sockaddr_ll, 16-byte aligned)."""
    ring = mmap.mmap(-1, 2 * live.BLOCK_SIZE)
    off = live.BLOCK_SIZE
    pos = 48
    struct.pack_into("<IIII", ring, off + 8, live.TP_STATUS_USER, len(packets), pos, 0)
    for i, (data, pkttype, status, tci) in enumerate(packets):
        mac = 48 + 32
        size = (mac + len(data) + 15) & ~15
        nxt = size if i < len(packets) - 1 else 0
        struct.pack_into("<IIIIIIHHIIH", ring, off + pos, nxt, 1700000000 + i, 123456789, len(data), len(data),
                         status, mac, mac + 14, 0, tci, 0x88A8 if status & live.TP_STATUS_VLAN_TPID_VALID else 0)
        ring[off + pos + 58] = pkttype
        ring[off + pos + mac:off + pos + mac + len(data)] = data
        pos += size
    return ring


def test_c_and_python_block_walks_agree() -> None:
    if live._walk_c is None:
        pytest.skip("_ring not built (no compiler at install): the Python walk is the only one")
    eth = bytes(range(12)) + b"\x08\x00" + b"E" * 40
    ring = _block([(eth, 0, 0, 0), (eth[:30], live.PACKET_OUTGOING, 0, 0),
                   (eth, 3, live.TP_STATUS_VLAN_VALID, 0x2064),
                   (eth, 0, live.TP_STATUS_VLAN_VALID | live.TP_STATUS_VLAN_TPID_VALID, 7)])
    for skip in (False, True):
        c = live._walk_c(ring, live.BLOCK_SIZE, Frame, "live:x", 1, 10, skip)
        py = live._walk_py(ring, live.BLOCK_SIZE, Frame, "live:x", 1, 10, skip)
        assert c == py
    frames_, filtered, _n, _cut = live._walk_py(ring, live.BLOCK_SIZE, Frame, "live:x", 1, 10, True)
    assert filtered == 1 and [f.no for f in frames_] == [11, 12, 13]
    assert frames_[1].data[12:16] == b"\x81\x00\x20\x64" and frames_[2].data[12:16] == b"\x88\xa8\x00\x07"
    assert frames_[0].ts == pytest.approx(1700000000.123456789)


def test_a_link_going_down_and_up_is_counted_and_capture_resumes(links: Links) -> None:
    iface = links.capture[0]
    cap = LiveCapture([iface], duration=15)
    cap.open()
    links.send(0, [sip_request(call_id="before@s1")], 5060)
    events: list[Event] = []
    it = iter(cap)
    for ev in it:
        events.append(ev)
        if frames(events):
            break
    subprocess.run(["ip", "link", "set", iface, "down"], check=True, timeout=10)
    t0 = time.process_time()
    n = 0
    for ev in it:  # 0.5 s of a link down: heartbeats go on, no busy loop on the socket error
        n += 1
        if isinstance(ev, Idle) and n >= 5:
            break
    cpu = time.process_time() - t0
    subprocess.run(["ip", "link", "set", iface, "up"], check=True, timeout=10)
    time.sleep(0.2)
    links.send(0, [sip_request(call_id="after@s1")], 5060)
    for ev in it:
        events.append(ev)
        if len(frames(events)) >= 2:
            break
    it.close()
    assert [b"before@s1" in f.data or b"after@s1" in f.data for f in frames(events)] == [True, True]
    assert cap.stats()[iface]["link_down"] >= 1 and cpu < 0.3


def test_an_interface_that_disappears_ends_the_capture_with_an_input_error(links: Links) -> None:
    iface = links.capture[1]
    cap = LiveCapture([iface], duration=15)
    events: list[Event] = []
    with pytest.raises(live.LiveCaptureError, match="disappeared"):
        for ev in cap:
            events.append(ev)
            if len(events) == 2:
                subprocess.run(["ip", "link", "del", iface], check=True, timeout=10)
    assert len(events) < 30  # within a few heartbeats
