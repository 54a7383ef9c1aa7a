"""veth pairs for the capture tests: the capturing ends in the root namespace (no address,
IPv6 off before they come up, so nothing but our frames crosses them), the sending ends in a
namespace of our own, ``s1-<pid>-<n>``. Frames are addressed to a MAC nobody has, so the
root namespace's stack drops them after the capture saw them. ``close()`` deletes the
namespace, which deletes the pairs; every wait is bounded.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest

_SEQ = itertools.count()
NOBODY_MAC = "02:00:00:5e:01:99"

_SENDER = r"""
import json, socket, sys
job = json.load(sys.stdin)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
n = 0
for _ in range(job["repeat"]):
    for p in job["payloads"]:
        s.sendto(bytes.fromhex(p), (job["dst"], job["port"]))
        n += 1
print(n)
"""


def require_root() -> None:
    missing = [p for p in ("ip",) if shutil.which(p) is None]
    if os.geteuid() != 0:
        missing.append("root (AF_PACKET, network namespaces)")
    if missing:
        reason = f"live capture tests need {', '.join(missing)}"
        if os.environ.get("SIPSNIFF_REQUIRE_SERVERS") == "1":
            pytest.fail(f"{reason}, and SIPSNIFF_REQUIRE_SERVERS=1 forbids skipping")
        pytest.skip(reason)


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")


def _sysctl(ns: str | None, key: str, value: str) -> None:
    cmd = ["sysctl", "-q", "-w", f"{key}={value}"]
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    subprocess.run(cmd, capture_output=True, timeout=20, check=True)


class Links:
    """``n`` veth pairs: ``capture[i]`` (root namespace) ↔ a sender end in ``ns`` with
    10.201.i.2/24, whose datagrams to 10.201.i.9 go out as frames to NOBODY_MAC."""

    def __init__(self, n: int = 1, mtu: int = 1500) -> None:
        tag = f"{os.getpid() % 100000}{next(_SEQ)}"
        self.ns = f"s1-{os.getpid()}-{tag}"
        self.capture: list[str] = []
        _ip("netns", "add", self.ns)
        try:
            for i in range(n):
                a, b = f"s1{tag}a{i}"[:15], f"s1{tag}b{i}"[:15]
                _ip("link", "add", a, "mtu", str(mtu), "type", "veth", "peer", "name", b, "mtu", str(mtu),
                    "netns", self.ns)
                self.capture.append(a)
                _sysctl(None, f"net.ipv6.conf.{a}.disable_ipv6", "1")
                _sysctl(self.ns, f"net.ipv6.conf.{b}.disable_ipv6", "1")
                _ip("-n", self.ns, "addr", "add", f"10.201.{i}.2/24", "dev", b)
                _ip("-n", self.ns, "link", "set", b, "up")
                _ip("-n", self.ns, "neigh", "add", f"10.201.{i}.9", "lladdr", NOBODY_MAC, "dev", b)
                _ip("link", "set", a, "up")
        except BaseException:
            self.close()
            raise

    def send(self, i: int, payloads: list[bytes], port: int, repeat: int = 1) -> int:
        """Datagrams sent out of pair ``i`` (by a process in the namespace); how many."""
        job = json.dumps({"dst": f"10.201.{i}.9", "port": port, "repeat": repeat,
                          "payloads": [p.hex() for p in payloads]})
        res = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", _SENDER], input=job,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return int(res.stdout)

    def rx_packets(self, i: int) -> int:
        """The kernel's own count of frames that reached capture end ``i``."""
        with open(f"/sys/class/net/{self.capture[i]}/statistics/rx_packets") as f:
            return int(f.read())

    def close(self) -> None:
        for a in self.capture:
            subprocess.run(["ip", "link", "del", a], capture_output=True, timeout=20)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=20)
