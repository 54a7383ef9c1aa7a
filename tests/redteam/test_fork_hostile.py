"""Red team on serial forking (tracker.py): one INVITE relayed again and again by a
failure_route that never gives up (each branch answered 486 and ACKed: a new round each time).

Found: every branch stays in its server transaction's ``branches`` list for as long as the
server transaction is open, after the branch itself was evicted from the bounded tables
(``evicted_transactions`` counts it, ``held_bytes`` forgets it): memory grows ~2.3 KB per
branch with no bound (100,000 branches: 250 MB with ``max_transactions: 1000``). Kamailio's tm
itself stops at ``max_branches`` (12 by default, at most 31). Fixed: a server transaction holds
its first branch and the current round's, within ``limits.max_branches`` (32); a branch past
it is counted (``branches_cut``)."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

scapy_all = pytest.importorskip("scapy.all")

UAC, PROXY, UAS = "10.0.9.1", "10.0.9.10", "10.0.9.2"


def _sip(first: str, vias: list[tuple[str, str]], cseq: str, to_tag: str = "") -> bytes:
    via = "".join(f"Via: SIP/2.0/UDP {h}:5060;branch={b}\r\n" for h, b in vias)
    return (f"{first}\r\n{via}From: <sip:alice@{UAC}>;tag=a1\r\nTo: <sip:bob@{UAS}>{';tag=' + to_tag if to_tag else ''}\r\n"
            f"Call-ID: endless-fork\r\nCSeq: {cseq}\r\nContent-Length: 0\r\n\r\n").encode()


def endless_fork(path: Path, branches: int) -> None:
    """A capture (scapy): the caller's INVITE, then ``branches`` serial rounds of the proxy:
    INVITE to the callee with a new branch, 486 back, ACK; never a final reply upstream."""
    ip, udp, ether = scapy_all.IP, scapy_all.UDP, scapy_all.Ether
    c = ("10.0.9.1", "z9hG4bK-caller")
    ts = 1_700_000_000.0
    pkts = []

    def add(src: str, dst: str, payload: bytes) -> None:
        p = ether() / ip(src=src, dst=dst) / udp(sport=5060, dport=5060) / payload
        p.time = ts
        pkts.append(p)

    add(UAC, PROXY, _sip(f"INVITE sip:bob@{UAS} SIP/2.0", [c], "1 INVITE"))
    for i in range(branches):
        ts += 0.0005
        b = (PROXY, f"z9hG4bK-round{i}")
        add(PROXY, UAS, _sip(f"INVITE sip:bob@{UAS} SIP/2.0", [b, c], "1 INVITE"))
        add(UAS, PROXY, _sip("SIP/2.0 486 Busy Here", [b, c], "1 INVITE", f"busy{i}"))
        add(PROXY, UAS, _sip(f"ACK sip:bob@{UAS} SIP/2.0", [b], "1 ACK", f"busy{i}"))
    scapy_all.wrpcap(str(path), pkts)


def peak_rss_mb(tmp_path: Path, capture: Path) -> float:
    rules = tmp_path / "rules.yaml"
    rules.write_text("acc: {log_flag: 1, log_missed_flag: 2}\nlimits: {max_transactions: 500}\n")
    code = ("import resource, subprocess, sys; "
            "r = subprocess.run([sys.executable, '-m', 'sipsniff_acc', 'process', sys.argv[1], '--no-db', '--log', "
            "'none', '--rules', sys.argv[2], '-q'], cwd=sys.argv[3], capture_output=True, text=True); "
            "assert r.returncode == 0 and 'Traceback' not in r.stderr, r.stderr; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(capture), str(rules), str(tmp_path)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip())


def test_an_endless_serial_fork_stays_within_the_bounds(tmp_path: Path) -> None:
    small, big = tmp_path / "small.pcap", tmp_path / "big.pcap"
    endless_fork(small, 1_000)
    endless_fork(big, 20_000)
    grew = peak_rss_mb(tmp_path, big) - peak_rss_mb(tmp_path, small)
    # bounded: 500 transactions are < 2 MB whatever the number of rounds; unbounded: ~45 MB more
    assert grew < 20, f"peak RSS grew {grew:.0f} MB for 19,000 more branches of one INVITE"
