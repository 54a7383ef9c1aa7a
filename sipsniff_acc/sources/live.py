"""Live capture from network interfaces (Linux AF_PACKET, TPACKET_V3 rings), as frames for the pipeline.

Why a ring of our own and not libpcap through a binding (measured with
``benchmarks/bench_capture.py``, 500-byte datagrams flooded on loopback by a second process,
reader CPU per frame including the Frame object): ``_ring.c`` 0.62 µs (142 k/s seen, the
sender's limit, 0 drops, load 1.6), the pure-Python walk 1.32 µs, libpcap 1.10 through ctypes
(pcap_dispatch + a callback per packet, what a ctypes binding does) 2.1-2.8 µs, and libpcap
sees loopback's outgoing copies too (its direction filter is in user space). libpcap reads
the same TPACKET_V3 ring; the per-packet call into Python is what costs. The kernel does the rest:

* **BPF in the kernel** (``bpf.py``, compiled by libpcap): without ``-f`` RTP/RTCP never
  reaches the ring; with ``-f`` the user's filter, IP fragments always admitted. Measured
  (RTP flood on loopback): the reader alone spends 0.04 µs per RTP packet sent with the
  default filter against 0.95 µs without; ``messages -i -j 0`` ~4 µs per RTP packet without
  it (decode + SIP detection), nothing with it: 200 k RTP packets/s would cost 0.8 core.
* **Blocks, not packets.** The kernel fills 128 KiB blocks and hands one over when it is full
  or ``RETIRE_TOV`` ms after its first packet; we poll (≤ 100 ms), copy a block's frames out,
  give the block back, then yield them.
* **Drops are counted, never silent.** ``PACKET_STATISTICS`` (tpacket_stats_v3: packets,
  drops, queue freezes; the read resets the kernel's counters, we keep totals) is read every
  250 ms while frames flow, at every wake-up in silence, at once when a block says
  ``TP_STATUS_LOSING`` or half the ring was waiting, and at the end; every
  increase is yielded as a ``CaptureGap(ts, interface, dropped, "kernel")``.
* **Silence is time too.** After 100 ms without a frame an ``Idle(ts)`` is yielded; its
  ``ts`` is the wall clock minus ``RETIRE_TOV`` (a frame still in the kernel's open block is
  at most that old), so the stream's time never goes backwards.
* **Loopback** shows every packet leaving and arriving: ``PACKET_IGNORE_OUTGOING`` keeps the
  outgoing copy out of the ring (Linux ≥ 4.20; older kernels: dropped here, counted as
  ``filtered``), as libpcap does.
* **Promiscuous mode** through ``PACKET_ADD_MEMBERSHIP``/``PACKET_MR_PROMISC``: the kernel
  counts it per socket and undoes it when the socket closes, even on SIGKILL.

Timestamps are the kernel's (tp_sec/tp_nsec), the same packet clock as in a pcap. Without a
``count`` or a ``duration`` a capture runs until it is stopped (SIGTERM/SIGINT, stopping.py).
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import Final

from sipsniff_acc.events import CaptureGap, Frame, Idle
from sipsniff_acc.sources import bpf
from sipsniff_acc.sources.pcapfile import SourceError

try:  # the optional C block walker (setup.py builds it when a compiler is there)
    from sipsniff_acc import _ring
    _walk_c: Callable[..., tuple[list[Frame], int, int, int]] | None = _ring.walk
except ImportError:  # pragma: no cover - depends on the build
    _walk_c = None

ETH_P_ALL: Final = 0x0003
SOL_PACKET: Final = 263
PACKET_ADD_MEMBERSHIP: Final = 1
PACKET_MR_PROMISC: Final = 1
PACKET_RX_RING: Final = 5
PACKET_STATISTICS: Final = 6
PACKET_VERSION: Final = 10
PACKET_IGNORE_OUTGOING: Final = 23
TPACKET_V3: Final = 2
SO_ATTACH_FILTER: Final = 26
PACKET_OUTGOING: Final = 4
TP_STATUS_KERNEL: Final = 0
TP_STATUS_USER: Final = 1
TP_STATUS_LOSING: Final = 4
TP_STATUS_VLAN_VALID: Final = 0x10
TP_STATUS_VLAN_TPID_VALID: Final = 0x40

BLOCK_SIZE: Final = 128 << 10  #: holds a 64 KiB GSO/GRO packet; power of two (the kernel allocates by order)
FRAME_SIZE: Final = 2048  #: only a divisor the kernel checks in V3 (packets are packed in the block)
RETIRE_TOV: Final = 20  #: ms after which the kernel hands over a block that is not full (latency bound)
DEFAULT_RING_MB: Final = 32  #: per interface; perf-notes: 0 % loss at 200 k packets/s with 32 MB
MAX_RING_MB: Final = 4096
IDLE_AFTER: Final = 0.1  #: seconds without a frame before an Idle heartbeat (events.Idle: at most 100 ms)
STATS_EVERY: Final = 0.25  #: seconds between PACKET_STATISTICS reads while frames flow (a ~1 µs getsockopt)

LINKTYPE_ETHERNET: Final = 1
LINKTYPE_RAW: Final = 101
#: ARPHRD_* (/sys/class/net/IF/type) → (pcap LINKTYPE of our frames, libpcap DLT to compile filters for)
_LINKTYPES: Final = {1: (LINKTYPE_ETHERNET, bpf.DLT_EN10MB), 772: (LINKTYPE_ETHERNET, bpf.DLT_EN10MB),
                     65534: (LINKTYPE_RAW, bpf.DLT_RAW), 768: (LINKTYPE_RAW, bpf.DLT_RAW),
                     769: (LINKTYPE_RAW, bpf.DLT_RAW), 776: (LINKTYPE_RAW, bpf.DLT_RAW)}

_HDR = struct.Struct("<IIIIIIHHIIH")  # tpacket3_hdr: next, sec, nsec, snaplen, len, status, mac, net, rxhash, tci, tpid
_SLL_PKTTYPE: Final = 48 + 10  #: sockaddr_ll.sll_pkttype, after the 48-byte aligned tpacket3_hdr


class LiveCaptureError(SourceError):
    """The interface cannot be opened (not permitted, not Linux, gone)."""

    def __init__(self, interface: str, reason: str) -> None:
        super().__init__(f"live:{interface}", 0, reason)


class CaptureUsageError(ValueError):
    """A mistake in what the user asked (no such interface, a bad filter, a bad ring size):
    one line naming what to fix, found before anything opens."""


def link_of(interface: str) -> tuple[int, int]:
    """(LINKTYPE of the frames, DLT for the filter) of ``interface``, from sysfs: no socket."""
    try:
        with open(f"/sys/class/net/{interface}/type") as f:
            arphrd = int(f.read().strip())
    except (OSError, ValueError):
        if "/" in interface or not interface or interface in (".", ".."):
            raise CaptureUsageError(f"-i {interface!r}: not an interface name") from None
        raise CaptureUsageError(f"-i {interface}: no such interface (`ip link` lists them)") from None
    if arphrd not in _LINKTYPES:
        raise CaptureUsageError(f"-i {interface}: link type ARPHRD {arphrd} is not supported "
                                "(Ethernet, loopback and raw-IP tunnels are)")
    return _LINKTYPES[arphrd]


def _check_rights() -> None:
    """A socket that receives nothing (protocol 0): the rights are checked before the work."""
    if not hasattr(socket, "AF_PACKET"):
        raise CaptureUsageError("-i: live capture needs Linux (AF_PACKET); read `tcpdump -w -` through stdin")
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close()
    except PermissionError:
        raise CaptureUsageError("-i: capturing needs root or the CAP_NET_RAW capability") from None


def _walk_py(ring: mmap.mmap, off: int, frame: type[Frame], source: str, linktype: int, no: int,
             skip_outgoing: bool) -> tuple[list[Frame], int, int, int]:
    """The frames of the block at ``off`` (copied out), how many were left out (outgoing
    copies), their bytes, and how many were cut (truncated by the kernel: larger than a ring
    frame; or a header pointing outside the block). ``_ring.walk`` does the same in C (a test compares them)."""
    num, first = struct.unpack_from("<II", ring, off + 12)
    pos = off + first
    end = off + BLOCK_SIZE
    out: list[Frame] = []
    filtered = nbytes = cut = 0
    hdr = _HDR.unpack_from
    for _ in range(num):
        if pos + 64 > end:
            break
        nxt, sec, nsec, snap, wire, status, mac, _net, _hash, tci, tpid = hdr(ring, pos)
        if skip_outgoing and ring[pos + _SLL_PKTTYPE] == PACKET_OUTGOING:
            filtered += 1
        elif pos + mac + snap > end:
            cut += 1
        else:
            cut += snap < wire
            data = ring[pos + mac:pos + mac + snap]
            if status & TP_STATUS_VLAN_VALID and linktype == LINKTYPE_ETHERNET and snap >= 12:
                tpid = tpid if status & TP_STATUS_VLAN_TPID_VALID and tpid else 0x8100
                data = data[:12] + struct.pack("!HH", tpid, tci & 0xFFFF) + data[12:]  # as libpcap re-inserts it
            no += 1
            nbytes += len(data)
            out.append(frame(sec + nsec * 1e-9, linktype, data, no, source))
        if not nxt:
            break
        pos += nxt
    return out, filtered, nbytes, cut


_walk = _walk_c or _walk_py


class _Ring:
    """One interface: its socket, its mmapped ring, and its counters (totals since open)."""

    def __init__(self, interface: str, linktype: int, program: bytes | None, promisc: bool, ring_bytes: int) -> None:
        self.interface = interface
        self.source = f"live:{interface}"
        self.linktype = linktype
        self.nblocks = max(2, ring_bytes // BLOCK_SIZE)
        self.block = 0
        self.no = 0
        self.packets = self.dropped = self.freezes = self.frames = self.filtered = self.bytes = self.losing = 0
        self.truncated = 0  #: frames cut short (larger than a ring frame): their SIP may be incomplete
        self.link_down = 0  #: times the interface went down under us (the socket resumes when it comes back)
        self.promisc = False
        self.index = 0  #: the interface's index (set once bound)
        self.skip_outgoing = False
        try:
            # protocol 0: nothing is queued before the filter and the ring are in place (as libpcap)
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError as exc:
            raise LiveCaptureError(interface, f"capturing needs root or CAP_NET_RAW ({exc.strerror})") from exc
        try:
            self._setup(program, promisc)
        except OSError as exc:
            self.sock.close()
            raise LiveCaptureError(interface, f"cannot capture: {exc.strerror or exc}") from exc

    def _setup(self, program: bytes | None, promisc: bool) -> None:
        s = self.sock
        if program is not None:
            fprog, _keep = bpf.sock_fprog(program)
            s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        if self.interface == "lo":
            try:
                s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            except OSError:
                self.skip_outgoing = True  # kernel < 4.20: dropped in the walk instead
        s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        nframes = BLOCK_SIZE // FRAME_SIZE * self.nblocks
        s.setsockopt(SOL_PACKET, PACKET_RX_RING,
                     struct.pack("7I", BLOCK_SIZE, self.nblocks, FRAME_SIZE, nframes, RETIRE_TOV, 0, 0))
        self.ring = mmap.mmap(s.fileno(), BLOCK_SIZE * self.nblocks, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        s.bind((self.interface, ETH_P_ALL))
        self.index = index = socket.if_nametoindex(self.interface)  # the socket is bound to it, not to the name
        if promisc:
            s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, struct.pack("iHH8s", index, PACKET_MR_PROMISC, 0, b""))
            self.promisc = True

    def ready(self) -> bool:
        return self.ring[self.block * BLOCK_SIZE + 8] & TP_STATUS_USER != 0

    def take(self) -> tuple[list[Frame], bool]:
        """The frames of the current block (the block is handed back to the kernel before
        they are yielded), and whether the kernel flagged it as losing packets."""
        off = self.block * BLOCK_SIZE
        status = self.ring[off + 8]
        frames, filtered, nbytes, cut = _walk(self.ring, off, Frame, self.source, self.linktype, self.no,
                                              self.skip_outgoing)
        self.truncated += cut
        struct.pack_into("<I", self.ring, off + 8, TP_STATUS_KERNEL)
        self.block = (self.block + 1) % self.nblocks
        self.no += len(frames)
        self.frames += len(frames)
        self.filtered += filtered
        self.bytes += nbytes
        losing = bool(status & TP_STATUS_LOSING)
        self.losing += losing
        return frames, losing

    def read_stats(self) -> int:
        """Fold the kernel's counters (reset by the read) into the totals; the new drops."""
        try:
            raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)
        except OSError:
            return 0
        packets, drops, freezes = (int(x) for x in struct.unpack("3I", raw))
        self.packets += packets  # the kernel's tp_packets already includes tp_drops
        self.dropped += drops
        self.freezes += freezes
        return drops

    def stats(self) -> dict[str, int | bool]:
        return {"packets": self.packets, "dropped": self.dropped, "freezes": self.freezes,
                "frames": self.frames, "bytes": self.bytes, "filtered": self.filtered,
                "losing_blocks": self.losing, "truncated": self.truncated, "link_down": self.link_down, "ring_bytes": self.nblocks * BLOCK_SIZE, "promisc": self.promisc}

    def close(self) -> None:
        self.read_stats()
        try:
            self.ring.close()
        except BufferError:  # pragma: no cover - a walk still holds it (cannot happen: walks copy)
            pass
        self.sock.close()  # the kernel undoes the promiscuous membership with the socket


class LiveCapture:
    """Frames from one or more interfaces, with ``Idle`` heartbeats and ``CaptureGap`` drop
    reports in the same stream; until ``count`` frames, ``duration`` seconds, or a stop."""

    def __init__(self, interfaces: list[str] | str, count: int | None = None, duration: float | None = None,
                 bpf_filter: str | None = None, promisc: bool = True, ring_mb: float = DEFAULT_RING_MB,
                 on_open: Callable[[str], None] | None = None, kernel_filter: bool = True) -> None:
        """Everything the user gave is checked here, before anything opens (``CaptureUsageError``:
        no such interface, a filter libpcap refuses, a bad ring size). ``on_open`` is told
        (the interface names, comma-separated) once every socket is bound: from then on every
        packet is seen, and the ``duration`` clock starts (tcpdump's "listening on").
        ``kernel_filter=False`` attaches no default filter (RTP then reaches the walk)."""
        self.interfaces = [interfaces] if isinstance(interfaces, str) else list(interfaces)
        if not self.interfaces:
            raise CaptureUsageError("-i: give at least one interface")
        if len(set(self.interfaces)) != len(self.interfaces):
            raise CaptureUsageError("-i: an interface is given twice (each packet would be counted twice)")
        if count is not None and count < 1 or duration is not None and not duration > 0:
            raise CaptureUsageError("--count and --duration must be positive")
        if not 1 <= ring_mb <= MAX_RING_MB:
            raise CaptureUsageError(f"--ring-size {ring_mb:g}: use 1 to {MAX_RING_MB} (MB per interface)")
        self.links = {i: link_of(i) for i in self.interfaces}
        _check_rights()
        self.programs: dict[str, bytes | None] = {}
        self.filter_note = ""
        for iface, (_lt, dlt) in self.links.items():
            if bpf_filter is None and not kernel_filter:
                self.programs[iface] = None
                continue
            try:
                self.programs[iface] = bpf.compile_filter(bpf_filter, dlt)
            except bpf.FilterError as e:
                if bpf_filter is None:  # no libpcap: the default RTP drop is an optimisation, not a must
                    self.programs[iface] = None
                    self.filter_note = f"no kernel filter ({e}): RTP reaches the reader"
                    continue
                raise CaptureUsageError(f"-f {bpf_filter!r}: {e}") from None
            if bpf_filter is not None and not self.filter_note and bpf.admits_sip(bpf_filter, dlt) is False:
                # libpcap accepts it, yet it lets no SIP through: said at the start (and in the
                # summary), not refused: SIP on some port we cannot guess may be meant
                self.filter_note = (f"-f {bpf_filter!r} lets no SIP request through on ports "
                                    f"{', '.join(map(str, bpf.USUAL_SIP_PORTS))} or any port or address it names: "
                                    "nothing may be accounted (tcpdump -d shows the program)")
                print(f"warning: {self.filter_note}", file=sys.stderr)
        self.count, self.duration = count, duration
        self.bpf_filter, self.promisc, self.ring_mb = bpf_filter, promisc, ring_mb
        self.on_open = on_open
        self.path = "live:" + ",".join(self.interfaces)
        self.size = 0  #: unknown ahead: no progress bar
        self.rings: list[_Ring] = []
        self.opened_at = 0.0

    # -- FrameSource protocol
    @property
    def bytes_read(self) -> int:
        return sum(r.bytes for r in self.rings)

    @property
    def frames(self) -> int:
        return sum(r.frames for r in self.rings)

    def stats(self) -> dict[str, dict[str, int | bool]]:
        """Totals per interface since the capture opened (cheap: no syscall; the kernel's
        counters are folded in every 250 ms and at every wake-up in silence): ``packets`` (the kernel's tp_packets:
        passed the filter, drops included), ``dropped`` (tp_drops: the ring was full),
        ``freezes`` (tp_freeze_q_cnt), ``frames``/``bytes`` (yielded), ``filtered`` (left out
        by the reader: loopback's outgoing copies on old kernels), ``losing_blocks``, ``link_down``,
        ``ring_bytes``, ``promisc``."""
        return {r.interface: r.stats() for r in self.rings}

    def open(self) -> None:
        """Open every ring (idempotent); ``__iter__`` calls it. A failure closes what opened."""
        if self.rings:
            return
        if not hasattr(socket, "AF_PACKET"):
            raise LiveCaptureError(self.interfaces[0], "live capture needs Linux (AF_PACKET); "
                                   "read `tcpdump -w -` through stdin")
        try:
            for iface in self.interfaces:
                self.rings.append(_Ring(iface, self.links[iface][0], self.programs[iface], self.promisc,
                                        int(self.ring_mb * (1 << 20))))
        except BaseException:
            self.close()
            raise
        self.opened_at = time.monotonic()
        if self.on_open is not None:
            self.on_open(",".join(self.interfaces))

    def close(self) -> None:
        """Close every socket (final statistics folded in); the rings' totals stay readable."""
        for r in self.rings:
            if r.sock.fileno() >= 0:
                r.close()

    def __iter__(self) -> Iterator[Frame | Idle | CaptureGap]:
        if self.rings and self.rings[0].sock.fileno() < 0:
            raise RuntimeError("this capture was closed: open a new LiveCapture")
        self.open()
        try:
            yield from self._frames()
        finally:
            self.close()

    def _link_error(self, fd: int) -> None:
        """The kernel flagged a socket (ENETDOWN: the link went down): the error is read, which
        clears it (else every poll returns at once), and counted; the socket captures again
        when the link comes back up. An interface that is gone ends the capture (exit 1)."""
        for r in self.rings:
            if r.sock.fileno() == fd:
                r.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                r.link_down += 1
                # by index: an interface renamed (it must go down for that) is the same one,
                # still bound to our socket; only one that is gone ends the capture
                try:
                    socket.if_indextoname(r.index)
                except OSError:
                    raise LiveCaptureError(r.interface, "the interface disappeared during the capture") from None

    def _gaps(self) -> Iterator[CaptureGap]:
        now = time.time()
        for r in self.rings:
            if r.sock.fileno() >= 0 and (n := r.read_stats()):
                yield CaptureGap(now, r.interface, n, "kernel")

    def _frames(self) -> Iterator[Frame | Idle | CaptureGap]:
        rings = self.rings
        poller = select.poll()
        for r in rings:
            poller.register(r.sock.fileno(), select.POLLIN | select.POLLERR)
        deadline = None if self.duration is None else self.opened_at + self.duration
        left = self.count
        clock = time.monotonic
        last_out = next_stats = clock()
        next_stats += STATS_EVERY
        last_ts = 0.0
        while True:
            now = clock()
            if deadline is not None and now >= deadline:
                break
            batch: list[Frame] = []
            losing = False
            sources = 0
            for r in rings:
                taken = 0
                while r.ready() and taken < r.nblocks:  # every block handed over, oldest first
                    frames, lost = r.take()
                    batch += frames
                    losing |= lost
                    taken += 1
                sources += taken > 0
                losing |= taken * 2 >= r.nblocks  # half the ring was full: drops are likely, look now
            # Read after the blocks were taken, yielded after their frames: the packets in the
            # ring arrived before the ones the kernel had to drop, so the calls open once the
            # batch is accounted are the ones that may have lost messages.
            gaps: list[CaptureGap] = []
            if losing or now >= next_stats or not batch:
                gaps = list(self._gaps())
                next_stats = now + STATS_EVERY
            if batch:
                if sources > 1:
                    batch.sort(key=_ts)  # several interfaces: one time line (each ring is in order)
                if left is not None and len(batch) >= left:
                    yield from batch[:left]
                    yield from gaps
                    break
                if left is not None:
                    left -= len(batch)
                yield from batch
                yield from gaps
                last_ts = batch[-1].ts
                last_out = clock()
                continue
            yield from gaps
            wait = IDLE_AFTER - (now - last_out)
            if wait <= 0:
                # a frame still in an open block is at most RETIRE_TOV old: time never goes back
                yield Idle(max(last_ts, time.time() - RETIRE_TOV / 1000))
                last_out = now
                wait = IDLE_AFTER
            if deadline is not None:
                wait = min(wait, deadline - now)
            for fd, what in poller.poll(max(0, int(wait * 1000) + 1)):
                if what & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    self._link_error(fd)
        yield from self._gaps()  # drops of the last second are reported before the end


def _ts(frame: Frame) -> float:
    return frame.ts


def promiscuity(interface: str) -> int:
    """The kernel's promiscuity count of ``interface`` (``ip -d link`` shows it), or -1."""
    try:
        with open(f"/sys/class/net/{interface}/flags") as f:
            return 1 if int(f.read(), 16) & 0x100 else 0  # IFF_PROMISC
    except (OSError, ValueError):
        return -1


__all__ = ["CaptureUsageError", "LiveCapture", "LiveCaptureError", "DEFAULT_RING_MB", "link_of", "promiscuity"]
