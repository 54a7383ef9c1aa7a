"""Real kernel plumbing for the live acceptance tests and ``benchmarks/bench_live.py``.

Two network namespaces of our own joined by a veth pair: tcpreplay sends a capture into one
end, ``sipsniff-acc process -i`` captures on the other. Nothing else lives in those
namespaces (IPv6 is off before the links come up, so not even a router solicitation), so the
capture sees exactly the replayed frames, and the kernel's own link counters say how many
reached the capturing interface. Everything is named ``s6-<pid>-<n>`` and removed by name in
``close()``; every wait is bounded. No pytest here: the benchmark uses it too.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
_SEQ = itertools.count()
MTU = 9000  #: above any generated frame (1.1 KB INVITEs; RTP 214 B), below veth's 64 KB maximum


def missing_tools() -> list[str]:
    """The programs (and rights) the live harness needs that this machine lacks."""
    missing = [p for p in ("ip", "tcpreplay") if shutil.which(p) is None]
    if os.geteuid() != 0:
        missing.append("root (network namespaces, AF_PACKET)")
    return missing


def _run(*cmd: str, timeout: float = 30) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {res.returncode}: {res.stderr.strip()}")
    return res.stdout


class VethPair:
    """Namespaces ``s6-<pid>-<n>-tx`` / ``-rx`` joined by veth ``s6t<pid>x<n>`` / ``s6r<pid>x<n>``.

    Both ends live in namespaces we create, so the host's traffic (and the other helpers')
    never reaches the capture, and deleting the namespaces deletes the pair.
    """

    def __init__(self) -> None:
        n = next(_SEQ)
        tag = f"{os.getpid()}x{n}"
        self.tx_ns, self.rx_ns = f"s6-{tag}-tx", f"s6-{tag}-rx"
        self.tx_dev, self.rx_dev = f"s6t{tag}"[:15], f"s6r{tag}"[:15]
        self._made: list[str] = []
        try:
            for ns in (self.tx_ns, self.rx_ns):
                _run("ip", "netns", "add", ns)
                self._made.append(ns)
                for key in ("all", "default"):  # before any link comes up: no IPv6 chatter at all
                    _run("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
            _run("ip", "-n", self.tx_ns, "link", "add", self.tx_dev, "mtu", str(MTU), "type", "veth",
                 "peer", "name", self.rx_dev, "netns", self.rx_ns, "mtu", str(MTU))
            _run("ip", "-n", self.rx_ns, "link", "set", self.rx_dev, "up")
            _run("ip", "-n", self.tx_ns, "link", "set", self.tx_dev, "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Delete our namespaces by name (the veth pair goes with them)."""
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()

    def __enter__(self) -> VethPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def link_stats(self, rx: bool = True) -> dict[str, int]:
        """The kernel's counters of one end (``ip -s -j link``): rx/tx packets and drops."""
        ns, dev = (self.rx_ns, self.rx_dev) if rx else (self.tx_ns, self.tx_dev)
        info = json.loads(_run("ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev))[0]["stats64"]
        return {"rx_packets": int(info["rx"]["packets"]), "rx_dropped": int(info["rx"]["dropped"]),
                "tx_packets": int(info["tx"]["packets"]), "tx_dropped": int(info["tx"]["dropped"])}


@dataclass
class Replay:
    """What tcpreplay says it did."""

    sent: int  #: "Successful packets"
    failed: int
    seconds: float
    pps: float  #: achieved rate
    output: str


_NUM = r"([0-9][0-9,]*)"


def replay(pair: VethPair, pcap: Path, pps: float | None = None, topspeed: bool = False,
           timeout: float = 600) -> Replay:
    """tcpreplay ``pcap`` into the pair's tx end: at ``pps`` packets/s, or as fast as it can.

    ``-K`` preloads the file so the disk never sets the pace; MACs are left as they are (a raw
    capture takes every frame).
    """
    rate = ["--topspeed"] if topspeed else [f"--pps={pps:g}"] if pps else []
    res = subprocess.run(["ip", "netns", "exec", pair.tx_ns, "tcpreplay", "-K", "-i", pair.tx_dev, *rate, str(pcap)],
                         capture_output=True, text=True, timeout=timeout)
    out = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"tcpreplay exit {res.returncode}: {out.strip()[-800:]}")
    sent = re.search(r"Successful packets:\s+" + _NUM, out)
    failed = re.search(r"Failed packets:\s+" + _NUM, out)
    actual = re.search(r"Actual: " + _NUM + r" packets \(" + _NUM + r" bytes\) sent in ([0-9.]+) seconds", out)
    if sent is None or actual is None:
        raise RuntimeError(f"tcpreplay output not understood: {out.strip()[-800:]}")
    seconds = float(actual.group(3))
    n = int(sent.group(1).replace(",", ""))
    return Replay(n, int(failed.group(1).replace(",", "")) if failed else 0, seconds,
                  n / seconds if seconds > 0 else float("inf"), out)


LISTEN_TIMEOUT = 60.0  #: bound on the wait for the capture socket (Python starts slowly on a loaded machine)


class Sniffer:
    """``sipsniff-acc <args>`` started (optionally inside a namespace) in a session of its own.

    stdout/stderr are drained by threads, each line stamped with the wall clock when it
    arrived (the latency test reads them); ``wait_listening()`` waits for the "listening on"
    line (the socket is bound: every packet from now on is seen).
    """

    def __init__(self, args: list[str], netns: str | None = None, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        cmd = [PYTHON, "-m", "sipsniff_acc", *args]
        if netns is not None:
            cmd = ["ip", "netns", "exec", netns, *cmd]  # ip execs the command: the PID is sipsniff-acc's
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=full_env,
                                     start_new_session=True)
        self.out: list[tuple[float, str]] = []
        self.err: list[tuple[float, str]] = []
        self.listening = threading.Event()
        self._threads = [threading.Thread(target=self._drain, args=(self.proc.stdout, self.out), daemon=True),
                         threading.Thread(target=self._drain, args=(self.proc.stderr, self.err), daemon=True)]
        for t in self._threads:
            t.start()

    def _drain(self, stream: IO[bytes], into: list[tuple[float, str]]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            into.append((time.time(), line))
            if line.startswith("listening on "):
                self.listening.set()
        self.listening.set()  # the process ended: stop waiting

    def wait_listening(self, timeout: float = LISTEN_TIMEOUT) -> None:
        if not self.listening.wait(timeout):
            raise AssertionError(f"no 'listening on' within {timeout} s: {self.stderr[-1500:]}")
        if self.proc.poll() is not None:
            raise AssertionError(f"sipsniff-acc exited {self.proc.returncode}: {self.stderr[-1500:]}")

    def signal(self, sig: int) -> None:
        """Signal the process group we started (ours alone: a session of its own)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def finish(self, timeout: float = 120, sig: int | None = None) -> int:
        """Wait for the end (after ``sig`` if given); SIGKILL past ``timeout``. The exit status."""
        try:
            if sig is not None:
                self.signal(sig)
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)
            raise AssertionError(f"sipsniff-acc did not end within {timeout} s: {self.stderr[-1500:]}") from None
        finally:
            for t in self._threads:
                t.join(10)
        return rc

    def kill(self) -> None:
        """Teardown: make sure our process is gone (by its group, which only it leads)."""
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
            self.proc.wait(10)

    @property
    def stdout(self) -> str:
        return "".join(line for _, line in self.out)

    @property
    def stderr(self) -> str:
        return "".join(line for _, line in self.err)


def generate(out: Path, calls: int, seed: int, *extra: str) -> dict[str, object]:
    """A seeded workload from ``benchmarks/gen_workload.py``; its ground-truth sidecar."""
    subprocess.run([PYTHON, str(ROOT / "benchmarks" / "gen_workload.py"), str(out), "--calls", str(calls),
                    "--seed", str(seed), *extra], check=True, capture_output=True, timeout=600)
    meta = Path(str(out) + ".meta.json")
    return json.loads(meta.read_text()) if meta.exists() else {}


def load_records(path: Path) -> list[dict[str, object]]:
    """The JSON-lines records of a run."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


#: fields that depend on when the packets arrived (the replay rate), not on what they said
TIME_FIELDS = ("id", "ts")


def comparable(records: list[dict[str, object]]) -> list[str]:
    """Records without their times, as sorted canonical JSON: what must match offline and live.

    ``id`` is left out too: it is derived from the record's time.
    """
    return sorted(json.dumps({k: v for k, v in r.items() if k not in TIME_FIELDS}, sort_keys=True)
                  for r in records)


def stats_drops(stats: dict[str, object]) -> int | None:
    """Every packet the run says it lost (``--stats``' capture part: the kernel's drops, and
    our own queue's if the capture ever has one), or None when the stats carry no capture part
    (a capture that cannot report drops)."""
    cap = stats.get("capture")
    if not isinstance(cap, dict) or "kernel_drops" not in cap:
        return None
    return int(cap["kernel_drops"]) + int(cap.get("queue_drops", 0))


@functools.lru_cache(maxsize=None)
def cli_options(command: str) -> frozenset[str]:
    """The options ``sipsniff-acc COMMAND --help`` lists (features land at different times:
    a test uses ``-f`` once the command has it)."""
    res = subprocess.run([PYTHON, "-m", "sipsniff_acc", command, "--help"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    return frozenset(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", res.stdout))


def split_pcap(src: Path, first: Path, rest: Path, frames: int) -> tuple[int, int]:
    """``src``'s first ``frames`` records into ``first``, the others into ``rest`` (classic
    pcap, as gen_workload writes); the two counts."""
    counts = [0, 0]
    with open(src, "rb") as f, open(first, "wb") as a, open(rest, "wb") as b:
        head = f.read(24)
        a.write(head)
        b.write(head)
        while len(hdr := f.read(16)) == 16:
            n = struct.unpack("<IIII", hdr)[2]
            part = 0 if counts[0] < frames else 1
            (a if part == 0 else b).write(hdr + f.read(n))
            counts[part] += 1
    return counts[0], counts[1]
