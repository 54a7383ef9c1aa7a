#!/usr/bin/env python3
"""The live capture reader alone: packets/s and CPU per packet, our ring vs libpcap (root).

A second process floods UDP datagrams (SIP-sized, or RTP-like with --rtp) on loopback to
127.0.1.1 for --seconds; the reader under test counts the frames it gets through a BPF
``udp dst port P`` filter (other traffic on lo is not ours), building a Frame per packet as
the pipeline needs. Readers:

* ``ring-c``: LiveCapture (TPACKET_V3 ring, _ring.c block walk)
* ``ring-py``: the same with the pure-Python walk
* ``libpcap``: libpcap 1.10 through ctypes (what a ctypes binding does): pcap_dispatch with a
  Python callback per packet, same filter, same buffer size
* ``default-filter``: no -f: the default kernel filter (with --rtp: RTP dropped in the kernel)
* ``no-filter``: no kernel filter at all (with --rtp: every RTP packet reaches the walk); the
  reader's CPU per packet *sent* is what the default filter saves (other loopback traffic is
  counted too: run on a quiet machine)

Prints per reader: packets sent, frames seen, kernel drops, packets/s seen, CPU µs per frame
(user+sys of the reader process, divided by frames).

usage: bench_capture.py [--seconds 3] [--payload 500] [--rtp] [--readers ring-c ring-py libpcap]
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import resource
import select
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sipsniff_acc.events import CaptureGap, Frame  # noqa: E402
from sipsniff_acc.sources import bpf, live  # noqa: E402

DEST = "127.0.1.1"


def flood(port: int, seconds: float, payload: bytes, sent: "mp.Value[int]", go: "mp.Event") -> None:  # type: ignore[name-defined]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    go.wait(10)
    n = 0
    end = time.monotonic() + seconds
    send = s.sendto
    addr = (DEST, port)
    while True:
        for _ in range(256):
            try:
                send(payload, addr)
                n += 1
            except OSError:
                pass
        if time.monotonic() >= end:
            break
    sent.value = n


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def read_ring(port: int, seconds: float, walk_c: bool, filt: str | None,
              kernel_filter: bool = True) -> tuple[int, int, float, int]:
    saved = live._walk
    live._walk = live._walk_c if walk_c and live._walk_c else live._walk_py
    try:
        cap = live.LiveCapture(["lo"], duration=seconds + 1.0, bpf_filter=filt, promisc=False,
                               kernel_filter=kernel_filter)
        cap.open()
        yield_ready()
        c0 = cpu()
        frames = drops = 0
        for ev in cap:
            if type(ev) is Frame:
                frames += 1
            elif isinstance(ev, CaptureGap):
                drops += ev.dropped
        return frames, drops, cpu() - c0, cap.stats()["lo"]["packets"]
    finally:
        live._walk = saved


class PcapPkthdr(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long), ("caplen", ctypes.c_uint32),
                ("len", ctypes.c_uint32)]


def read_libpcap(port: int, seconds: float) -> tuple[int, int, float, int]:
    lib = ctypes.CDLL("libpcap.so.0.8")
    lib.pcap_create.restype = ctypes.c_void_p
    lib.pcap_create.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    for name in ("pcap_set_snaplen", "pcap_set_buffer_size", "pcap_set_timeout", "pcap_set_immediate_mode",
                 "pcap_activate", "pcap_setfilter", "pcap_dispatch", "pcap_stats", "pcap_setdirection", "pcap_setnonblock", "pcap_get_selectable_fd"):
        getattr(lib, name).argtypes = None
    err = ctypes.create_string_buffer(256)
    h = ctypes.c_void_p(lib.pcap_create(b"lo", err))
    lib.pcap_set_snaplen(h, 262144)
    lib.pcap_set_buffer_size(h, live.DEFAULT_RING_MB << 20)
    lib.pcap_set_timeout(h, 20)
    assert lib.pcap_activate(h) >= 0
    lib.pcap_setdirection(h, 1)  # PCAP_D_IN: loopback's outgoing copy left out, as ours
    prog = bpf._BpfProgram()
    lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(bpf._BpfProgram), ctypes.c_char_p, ctypes.c_int,
                                 ctypes.c_uint32]
    assert lib.pcap_compile(h, ctypes.byref(prog), f"udp dst port {port}".encode(), 1, 0xFFFFFFFF) == 0
    lib.pcap_setfilter(h, ctypes.byref(prog))
    count = [0]

    CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(PcapPkthdr), ctypes.POINTER(ctypes.c_ubyte))

    def cb(_u: int, hdr: "ctypes._Pointer[PcapPkthdr]", data: "ctypes._Pointer[ctypes.c_ubyte]") -> None:
        hd = hdr.contents
        count[0] += 1
        Frame(hd.tv_sec + hd.tv_usec * 1e-6, 1, ctypes.string_at(data, hd.caplen), count[0], "live:lo")

    cbf = CB(cb)
    yield_ready()
    c0 = cpu()
    end = time.monotonic() + seconds + 1.0
    lib.pcap_setnonblock(h, 1, err)  # its blocking read waits for ever on a silent link (TPACKET_V3)
    fd = lib.pcap_get_selectable_fd(h)
    while time.monotonic() < end:
        if lib.pcap_dispatch(h, -1, cbf, None) == 0:
            select.select([fd], [], [], 0.1)
    used = cpu() - c0
    st = (ctypes.c_uint * 4)()
    lib.pcap_stats(h, st)
    return count[0], st[1], used, st[0]


_ready: "mp.Event | None" = None  # type: ignore[name-defined]


def yield_ready() -> None:
    assert _ready is not None
    _ready.set()


def one(reader: str, port: int, seconds: float, payload: bytes) -> str:
    global _ready
    _ready = mp.Event()
    sent = mp.Value("q", 0)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a bound port: no ICMP unreachable per datagram
    sink.bind((DEST, port))
    p = mp.Process(target=flood, args=(port, seconds, payload, sent, _ready))
    p.start()
    if reader == "libpcap":
        frames, drops, used, kpk = read_libpcap(port, seconds)
    elif reader == "default-filter":
        frames, drops, used, kpk = read_ring(port, seconds, True, None)
    elif reader == "no-filter":
        frames, drops, used, kpk = read_ring(port, seconds, True, None, kernel_filter=False)
    else:
        frames, drops, used, kpk = read_ring(port, seconds, reader == "ring-c", f"udp dst port {port}")
    p.join(30)
    sink.close()
    n = sent.value
    return (f"{reader:15s} sent {n:9d}  seen {frames:9d}  kernel drops {drops:7d}  kernel packets {kpk:9d}  "
            f"{frames / seconds / 1000:7.1f} k/s seen  {used / max(frames, 1) * 1e6:6.2f} µs CPU/frame  "
            f"{used / max(n, 1) * 1e6:6.2f} µs CPU/packet sent")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--payload", type=int, default=500)
    ap.add_argument("--rtp", action="store_true", help="RTP-like payloads (first byte 0x80)")
    ap.add_argument("--readers", nargs="+", default=["ring-c", "ring-py", "libpcap"])
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_capture.py needs root (AF_PACKET)")
    first = b"\x80" if a.rtp else b"I"
    payload = first + b"x" * (a.payload - 1)
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average) on {os.cpu_count()} CPUs; "
          f"{a.payload}-byte {'RTP' if a.rtp else 'SIP-like'} datagrams; libpcap={bpf.have_libpcap()}")
    for reader in a.readers:
        port = 40000 + os.getpid() % 5000
        print(one(reader, port, a.seconds, payload), flush=True)


if __name__ == "__main__":
    main()
