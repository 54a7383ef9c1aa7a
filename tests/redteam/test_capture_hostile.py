"""Red team on live capture options: a -f that libpcap accepts but that lets no SIP through
is said at the start (one warning line) instead of a service that accounts nothing for
months; ring sizes at and past the bounds; a filter naming the SIP port or address is
not warned about."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sipsniff_acc.sources import bpf

if not bpf.have_libpcap():
    pytest.skip("libpcap missing: filters cannot be compiled", allow_module_level=True)


@pytest.mark.parametrize(("expr", "admits"), [
    ("icmp", False), ("arp", False), ("not port 5060 and not port 5061 and not port 5080", False),
    ("udp port 5060", True), ("tcp port 5061", True), ("port 5088", True), ("host 10.1.1.1 and udp", True),
    ("vlan and udp port 5060", True), ("net 10.1.0.0/16", True), ("udp portrange 5060-5070", True),
])
def test_admits_sip(expr: str, admits: bool) -> None:
    if expr.startswith("not"):  # on Ethernet, 802.1Q-tagged SIP does pass (libpcap looks inside only after 'vlan')
        assert bpf.admits_sip(expr) is True
    else:
        assert bpf.admits_sip(expr) is admits
    if expr not in ("arp",) and "vlan" not in expr:  # (not valid on raw-IP links)
        assert bpf.admits_sip(expr, bpf.DLT_RAW) is admits


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", "-i", "lo", "--no-db", "--log", "none",
                           *args], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(os.geteuid() != 0, reason="live capture needs root or CAP_NET_RAW")
def test_a_filter_that_excludes_sip_is_said_at_the_start() -> None:
    res = run("-f", "icmp", "--duration", "0.3")
    assert res.returncode == 0, res.stderr
    first = res.stderr.splitlines()[0]
    assert first.startswith("warning: -f 'icmp' lets no SIP request through"), res.stderr
    ok = run("-f", "udp port 5060", "--duration", "0.3")
    assert ok.returncode == 0 and "warning" not in ok.stderr, ok.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="live capture needs root or CAP_NET_RAW")
@pytest.mark.parametrize(("size", "ok"), [("0.5", False), ("1", True), ("4096", True), ("4097", False),
                                          ("nan", False), ("inf", False), ("-1", False)])
def test_ring_sizes_at_the_bounds(size: str, ok: bool) -> None:
    res = run("--ring-size", size, "--duration", "0.2")
    if ok:
        assert res.returncode == 0, res.stderr
        assert "Traceback" not in res.stderr
    else:
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "--ring-size" in lines[0], res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_an_interface_renamed_while_capturing_keeps_being_captured() -> None:
    """Renaming needs the link down: the socket saw ENETDOWN, looked the old name up in
    /sys/class/net, found nothing and ended the capture as if the interface were gone."""
    import subprocess as sp

    from sipsniff_acc.events import Frame
    from sipsniff_acc.sources.live import LiveCapture
    from tests.builders import sip_request
    from tests.capture.links import Links, require_root

    require_root()
    links = Links(1)
    iface = links.capture[0]
    renamed = f"s10r{os.getpid() % 100000}"[:15]
    try:
        cap = LiveCapture([iface], duration=15)
        cap.open()
        it = iter(cap)
        links.send(0, [sip_request(call_id="before@s10")], 5060)
        got: list[str] = []
        for ev in it:
            if isinstance(ev, Frame):
                got.append("before")
                break
        for cmd in (["link", "set", iface, "down"], ["link", "set", iface, "name", renamed],
                    ["link", "set", renamed, "up"]):
            sp.run(["ip", *cmd], check=True, timeout=10)
        links.capture[0] = renamed  # (close() deletes it by its new name)
        import time
        time.sleep(0.3)
        links.send(0, [sip_request(call_id="after@s10")], 5060)
        idles = 0
        for ev in it:  # and on, a few heartbeats: the socket's ENETDOWN is read in them
            if isinstance(ev, Frame) and b"after@s10" in ev.data:
                got.append("after")
            idles += type(ev).__name__ == "Idle"
            if got[-1:] == ["after"] and idles >= 5:
                break
        downs = cap.stats()[iface]["link_down"]
        cap.close()
    finally:
        links.close()
    assert got == ["before", "after"]
    assert downs >= 1  # the link did go down under the capture
