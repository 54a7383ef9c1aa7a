"""Capture filters: tcpdump's BPF language compiled by the system's libpcap, for SO_ATTACH_FILTER.

libpcap is called through ctypes (``pcap_open_dead`` + ``pcap_compile``): no capture handle,
no root, no scapy import (0.6 s) on every start. The compiled program runs in the kernel, so
what it rejects never reaches the ring, and never counts as a kernel drop either.

Two wrappers are added to every program, on purpose:

* **IP fragments always pass.** ``udp port 5060`` matches only the first fragment of a big
  INVITE (the later ones carry no UDP header), so a user's filter ``F`` becomes
  ``(F) or (ip[6:2] & 0x3fff != 0) or (ip6[6] == 44)``: every IPv4 fragment (MF set or an
  offset) and every IPv6 packet whose first extension header is a Fragment header. The
  reassembly stage drops the pieces of datagrams that turn out not to be SIP.
* **Without ``-f``, RTP/RTCP is dropped in the kernel**: ``not (ip and udp and udp[8] &
  0xc0 == 0x80) and not (ip6 and ip6[6] == 17 and ip6[48] & 0xc0 == 0x80)``: a UDP payload
  whose first byte has version bits ``10`` (RTP/RTCP version 2; libpcap's ``udp[]`` covers
  IPv4 only, so IPv6 without extension headers is spelt out). A SIP
  message starts with an ASCII letter (``01`` bits), a keep-alive with CR/LF, STUN with
  ``00``: all still pass, on any port. Fragments pass as above.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import struct
from functools import lru_cache
from typing import Final

FRAGMENTS: Final = "(ip[6:2] & 0x3fff != 0) or (ip6[6] == 44)"
#: RTP/RTCP version 2 (RFC 3550: the first two bits are 2); SIP's first byte is a letter.
NOT_RTP: Final = ("not (ip and udp and udp[8] & 0xc0 == 0x80) "
                   "and not (ip6 and ip6[6] == 17 and ip6[48] & 0xc0 == 0x80)")
SNAPLEN: Final = 262144
PCAP_NETMASK_UNKNOWN: Final = 0xFFFFFFFF
DLT_EN10MB: Final = 1
DLT_RAW: Final = 12  #: libpcap's DLT for raw IP (its LINKTYPE is 101)


class FilterError(ValueError):
    """The expression does not compile (libpcap's own message), or libpcap is missing."""


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.c_void_p)]


@lru_cache(maxsize=1)
def _libpcap() -> ctypes.CDLL | None:
    """The system libpcap (Debian: libpcap0.8, a dependency of tcpdump), or None."""
    for name in (ctypes.util.find_library("pcap"), "libpcap.so.0.8", "libpcap.so.1", "libpcap.so"):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.pcap_open_dead.restype = ctypes.c_void_p
        lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.pcap_compile.restype = ctypes.c_int
        lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(_BpfProgram), ctypes.c_char_p,
                                     ctypes.c_int, ctypes.c_uint32]
        lib.pcap_geterr.restype = ctypes.c_char_p
        lib.pcap_geterr.argtypes = [ctypes.c_void_p]
        lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
        lib.pcap_close.argtypes = [ctypes.c_void_p]
        lib.pcap_offline_filter.restype = ctypes.c_int
        lib.pcap_offline_filter.argtypes = [ctypes.POINTER(_BpfProgram), ctypes.c_void_p, ctypes.c_char_p]
        return lib
    return None


def have_libpcap() -> bool:
    return _libpcap() is not None


def compile_raw(expression: str, dlt: int = DLT_EN10MB) -> bytes:
    """``expression`` compiled as is (optimised): the kernel's ``struct sock_filter`` array."""
    lib = _libpcap()
    if lib is None:
        raise FilterError("libpcap is not installed (Debian: libpcap0.8), needed to compile capture filters")
    handle = lib.pcap_open_dead(dlt, SNAPLEN)
    if not handle:
        raise FilterError("libpcap: pcap_open_dead failed")
    prog = _BpfProgram()
    try:
        if lib.pcap_compile(handle, ctypes.byref(prog), expression.encode(), 1, PCAP_NETMASK_UNKNOWN) != 0:
            raise FilterError((lib.pcap_geterr(handle) or b"syntax error").decode(errors="replace"))
        try:
            return ctypes.string_at(prog.bf_insns, prog.bf_len * 8)
        finally:
            lib.pcap_freecode(ctypes.byref(prog))
    finally:
        lib.pcap_close(handle)


def wrap(user: str | None) -> str:
    """The expression actually compiled: the user's (or the default RTP drop) plus fragments."""
    base = NOT_RTP if user is None else f"({user})"
    return f"{base} or {FRAGMENTS}"


def compile_filter(user: str | None, dlt: int = DLT_EN10MB) -> bytes:
    """The program attached to each capture socket; a bad ``user`` expression is checked on
    its own first, so libpcap's message is about what the user wrote, not our wrapper."""
    if user is not None:
        if not user.strip():
            raise FilterError("empty expression")
        compile_raw(user, dlt)
    return compile_raw(wrap(user), dlt)


def sock_fprog(program: bytes) -> tuple[bytes, ctypes.Array[ctypes.c_char]]:
    """``struct sock_fprog`` for SO_ATTACH_FILTER, and the buffer it points to (keep it alive
    until setsockopt returns: the kernel copies it)."""
    buf = ctypes.create_string_buffer(program, len(program))
    return struct.pack("HxxxxxxP", len(program) // 8, ctypes.addressof(buf)), buf


# --- does a filter let SIP through? ----------------------------------------------------------

USUAL_SIP_PORTS: Final = (5060, 5061, 5080)
_SIP = b"INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1\r\n\r\n"


class _PcapPkthdr(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long), ("caplen", ctypes.c_uint32),
                ("len", ctypes.c_uint32)]


def _probes(ports: list[int], dlt: int, hosts: list[bytes]) -> list[bytes]:
    """A SIP request to and from each port (and IPv4 host), over UDP and TCP, in IPv4 and
    IPv6, untagged and 802.1Q-tagged (link header as ``dlt`` has it)."""
    out = []
    pairs = [(bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))]
    pairs += [(h, bytes([192, 0, 2, 1])) for h in hosts] + [(bytes([192, 0, 2, 1]), h) for h in hosts]
    for port, (src4, dst4) in ((p, a) for p in ports for a in pairs):
        for sport, dport in ((40000, port), (port, 40000)):
            for proto in (17, 6):
                l4 = (struct.pack("!HHHH", sport, dport, 8 + len(_SIP), 0) if proto == 17 else
                      struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 0x50, 0x18, 65535, 0, 0)) + _SIP
                v4 = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                                 src4, dst4) + l4
                v6 = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, b"\x20\x01\x0d\xb8" + bytes(11) + b"\x01",
                                 b"\x20\x01\x0d\xb8" + bytes(11) + b"\x02") + l4
                for ip, etype in ((v4, 0x0800), (v6, 0x86DD)):
                    if dlt == DLT_RAW:
                        out.append(ip)
                        continue
                    macs = bytes(6) + bytes([2, 0, 0, 0, 0, 1])
                    out.append(macs + struct.pack("!H", etype) + ip)
                    out.append(macs + struct.pack("!HHH", 0x8100, 100, etype) + ip)
    return out


def admits_sip(user: str, dlt: int = DLT_EN10MB) -> bool | None:
    """Whether the expression ``user`` lets a plain SIP request through on any usual SIP port
    (5060, 5061, 5080) or any port number written in it; None when libpcap cannot say. A
    filter libpcap accepts may still exclude all SIP (``icmp``, ``not udp``, a typo'd
    port): the capture would run for months and account nothing."""
    lib = _libpcap()
    if lib is None:
        return None
    ports = sorted({*USUAL_SIP_PORTS, *(int(n) for n in re.findall(r"\b\d{1,5}\b", user) if 0 < int(n) < 65536)})
    hosts = [bytes(int(x) for x in a.split(".")) for a in re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", user)
             if all(int(x) < 256 for x in a.split("."))]
    handle = lib.pcap_open_dead(dlt, SNAPLEN)
    if not handle:
        return None
    prog = _BpfProgram()
    try:
        if lib.pcap_compile(handle, ctypes.byref(prog), user.encode(), 1, PCAP_NETMASK_UNKNOWN) != 0:
            return None
        try:
            for frame in _probes(ports[:32], dlt, hosts[:8]):
                hdr = _PcapPkthdr(0, 0, len(frame), len(frame))
                if lib.pcap_offline_filter(ctypes.byref(prog), ctypes.addressof(hdr), frame):
                    return True
            return False
        finally:
            lib.pcap_freecode(ctypes.byref(prog))
    finally:
        lib.pcap_close(handle)
