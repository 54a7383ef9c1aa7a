"""Capture filters compiled by the system's libpcap (no root: pcap_open_dead)."""

from __future__ import annotations

import struct

import pytest

from sipsniff_acc.sources import bpf


@pytest.fixture(autouse=True)
def _libpcap() -> None:
    if not bpf.have_libpcap():
        pytest.skip("libpcap (Debian: libpcap0.8) is not installed")


def _insns(program: bytes) -> list[tuple[int, int, int, int]]:
    return [struct.unpack_from("HBBI", program, i) for i in range(0, len(program), 8)]


def test_a_bad_expression_carries_libpcaps_own_message() -> None:
    with pytest.raises(bpf.FilterError, match="syntax error"):
        bpf.compile_filter("udp prot 5060")
    with pytest.raises(bpf.FilterError, match="illegal port number 70000"):
        bpf.compile_filter("port 70000")
    with pytest.raises(bpf.FilterError, match="empty"):
        bpf.compile_filter("  ")


def test_the_users_filter_is_wrapped_to_admit_fragments() -> None:
    assert bpf.wrap("udp port 5060") == "(udp port 5060) or (ip[6:2] & 0x3fff != 0) or (ip6[6] == 44)"
    assert bpf.wrap(None).startswith(bpf.NOT_RTP)
    wrapped, bare = bpf.compile_filter("udp port 5060"), bpf.compile_raw("udp port 5060")
    assert len(wrapped) > len(bare) and len(wrapped) % 8 == 0
    # the IPv4 fragment test (flags+offset mask 0x3fff) is in the program the kernel gets
    assert any(code == 0x45 and k == 0x3FFF for code, _jt, _jf, k in _insns(wrapped))  # jset #0x3fff


def test_raw_ip_links_compile_too() -> None:
    assert bpf.compile_filter("udp port 5060", bpf.DLT_RAW) != bpf.compile_filter("udp port 5060")
    assert bpf.compile_filter(None, bpf.DLT_RAW)


def test_sock_fprog_points_at_the_instructions() -> None:
    prog = bpf.compile_raw("udp")
    fprog, buf = bpf.sock_fprog(prog)
    n, addr = struct.unpack("HxxxxxxP", fprog)
    assert n == len(prog) // 8 and buf.raw == prog and addr != 0
