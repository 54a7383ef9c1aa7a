#!/usr/bin/env python3
"""Peak RSS of `sipsniff-acc process` under the floods of issue 10, at the default limits.

Each flood is generated into a temporary directory (removed after its run), then run as

    sipsniff-acc process -j 0 --no-db --log none --quiet --no-progress --rules R FLOOD.pcap

and the child's own peak RSS (``os.wait4``'s ``ru_maxrss``) is printed beside the figure
issue 10 measured before the state was bounded, with the peak PSS of the whole process
tree (sampled with psutil: with ``-j N`` each worker holds the calls of its shard). The record-id flood has no capture: a small
driver (this file, ``--ids-driver``) numbers N records through ``RecordIds`` in a child.

    invites    500k unanswered INVITEs, 5,000/s (all inside fr_inv_timer: none times out)
    big        20k unanswered INVITEs of 30 KB (the bulk in header lines, so no body trim helps)
    headers    1000 answered INVITEs of 10k header lines, rules with $hdr(X-Foo) in log_extra
    ids        10M records' ids, 1,000 records a second of packet time
    answered   100k answered INVITEs never hung up (200 OK, ACK, no BYE), 200-byte Call-IDs,
               10,000 calls a second: dialogs, completed transactions, ACKs and record ids

usage: bench_floods.py [--only invites big headers ids answered] [--scale 1.0] [-j N] [--tree DIR] [--workdir DIR]

``--scale 0.1`` runs every flood at a tenth of its size (a quick check); ``--tree DIR`` runs
another checkout (e.g. a ``git worktree`` of the commit before the bounds) to see the old figures.
Generated files are bounded (about 300 MB for the largest, one at a time) and time-bounded
(each run is killed after --timeout seconds).
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import psutil  # type: ignore[import-untyped]

HERE = Path(__file__).resolve().parent
EPOCH0 = 1709629200.0
UAC, PROXY = "10.1.0.1", "10.0.0.10"

#: What issue 10 measured before the bounds (MB of peak RSS).
OLD_MB = {"invites": 1500, "big": 707, "headers": 602, "ids": 910, "answered": 425}

RULES = """profile: kamailio-5.6
proxy: {addresses: []}
acc: {log_flag: 1, log_missed_flag: 2, db_flag: 1, db_missed_flag: 2%s}
route:
  - if: {method: INVITE, in_dialog: false}
    setflag: [1, 2]
"""


class Pcap:
    """A classic little-endian pcap of Ethernet/IPv4/UDP frames, written in order."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.ipid = 0
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))

    def udp(self, ts: float, src: str, dst: str, payload: bytes) -> None:
        self.ipid = (self.ipid + 1) & 0xFFFF
        udp = struct.pack("!HHHH", 5060, 5060, 8 + len(payload), 0) + payload
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), self.ipid, 0x4000, 64, 17, 0,
                         bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))))
        frame = b"\x02\x00" + bytes(map(int, dst.split("."))) + b"\x02\x00" + bytes(map(int, src.split("."))) \
            + b"\x08\x00" + ip + udp
        sec = int(ts)
        self.f.write(struct.pack("<IIII", sec, int((ts - sec) * 1e6), len(frame), len(frame)))
        self.f.write(frame)


def invite(i: int, extra: str = "", body: str = "") -> bytes:
    return (f"INVITE sip:+49301{i:07d}@sip.example.net SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {UAC}:5060;branch=z9hG4bK-{i:08x}-flood\r\nMax-Forwards: 70\r\n"
            f"From: \"+4930200\" <sip:+4930200@sip.example.net>;tag=f{i:08x}\r\n"
            f"To: <sip:+49301{i:07d}@sip.example.net>\r\nCall-ID: flood-{i:08x}@{UAC}\r\nCSeq: 1 INVITE\r\n"
            f"Contact: <sip:+4930200@{UAC}:5060>\r\nUser-Agent: flood/1.0\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n{body}").encode()


def ok(req: bytes, i: int) -> bytes:
    """A 200 OK for the INVITE (headers copied as a UAS does: Via, From, To + tag, Call-ID, CSeq)."""
    head = req.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    keep = [h for h in head[1:] if h.split(b":", 1)[0].lower() in (b"via", b"from", b"call-id", b"cseq")]
    to = [h for h in head if h.lower().startswith(b"to:")][0] + f";tag=t{i:08x}".encode()
    return b"\r\n".join([b"SIP/2.0 200 OK", *keep, to, b"Content-Length: 0", b"", b""])


def gen_invites(path: Path, scale: float) -> str:
    n = int(500_000 * scale)
    with path.open("wb") as f:
        w = Pcap(f)
        for i in range(n):
            w.udp(EPOCH0 + i / 5000, UAC, PROXY, invite(i))
    return RULES % ""


def gen_big(path: Path, scale: float) -> str:
    n = int(20_000 * scale)
    pad = "".join(f"X-Pad-{k}: {'p' * 990}\r\n" for k in range(30))  # 30 lines of 1 KB: 30 KB of headers
    with path.open("wb") as f:
        w = Pcap(f)
        for i in range(n):
            w.udp(EPOCH0 + i / 500, UAC, PROXY, invite(i, pad))
    return RULES % ""


def gen_headers(path: Path, scale: float) -> str:
    n = int(1000 * scale)
    many = "X:0\r\n" * (10_000 - 1) + "X-Foo: the-one\r\n"  # 5-byte lines: 10k fit one datagram
    with path.open("wb") as f:
        w = Pcap(f)
        for i in range(n):
            req = invite(i, many)
            w.udp(EPOCH0 + i / 50, UAC, PROXY, req)
            w.udp(EPOCH0 + i / 50 + 0.01, PROXY, UAC, ok(req, i))
    return RULES % ', log_extra: "foo=$hdr(X-Foo)"'


def gen_answered(path: Path, scale: float) -> str:
    n = int(100_000 * scale)
    pad = "X" * 200
    with path.open("wb") as f:
        w = Pcap(f)
        for i in range(n):
            ts = EPOCH0 + i / 10_000
            req = invite(i).replace(f"Call-ID: flood-{i:08x}@".encode(), f"Call-ID: flood-{i:08x}-{pad}@".encode())
            w.udp(ts, UAC, PROXY, req)
            w.udp(ts + 0.00002, PROXY, UAC, ok(req, i))
            ack = req.replace(b"INVITE sip:", b"ACK sip:", 1).replace(b"CSeq: 1 INVITE", b"CSeq: 1 ACK") \
                .replace(b"-flood\r\n", b"-ack\r\n", 1).replace(b"\r\nTo: <sip:+49301%07d@sip.example.net>" % i,
                                                                b"\r\nTo: <sip:+49301%07d@sip.example.net>;tag=t%08x" % (i, i))
            w.udp(ts + 0.00004, UAC, PROXY, ack)
    return RULES % ""


GENERATORS: dict[str, Callable[[Path, float], str]] = {"invites": gen_invites, "big": gen_big, "headers": gen_headers,
                                                       "answered": gen_answered}


def ids_driver(n: int) -> None:
    """Number n records (1,000 a second of packet time, every 1,000th with an exact twin)."""
    from sipsniff_acc.records import ANSWERED, AccRecord, RecordIds

    ids = RecordIds()
    t0 = time.perf_counter()
    for i in range(n):
        ts = EPOCH0 + i / 1000
        r = AccRecord(ANSWERED, ts, "INVITE", f"f{i:08x}", f"t{i:08x}", f"flood-{i:08x}@{UAC}", "200", "OK", ("log",))
        ids.assign(r)
        if i % 1000 == 0:
            twin = AccRecord(ANSWERED, ts, "INVITE", f"f{i:08x}", f"t{i:08x}", f"flood-{i:08x}@{UAC}", "200", "OK",
                             ("log",))
            if ids.assign(twin) == r.record_id:
                raise SystemExit("a twin got its first's id")
    print(f"{n} ids in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def tree_rss(pid: int) -> int:
    """Bytes of PSS of a process and its children now (with -j N the workers hold the calls;
    PSS shares the pages forked workers still have in common with the front, RSS counts them twice)."""
    try:
        p = psutil.Process(pid)
        return sum(q.memory_full_info().pss for q in [p, *p.children(recursive=True)])
    except psutil.Error:
        return 0


def run(cmd: list[str], env: dict[str, str], timeout: float, cwd: str) -> tuple[float, int, int, int]:
    """Wall seconds, peak RSS in MB (the child's own ru_maxrss), peak RSS of the process tree
    in MB (PSS, sampled every 0.2 s) and exit status."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
    deadline = t0 + timeout
    tree = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        tree = max(tree, tree_rss(proc.pid))
        time.sleep(0.2)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code not in (0,):
        print(f"  exit {code}: {err.strip()[-400:]}", file=sys.stderr)
    return time.perf_counter() - t0, usage.ru_maxrss // 1024, tree >> 20, code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", default=["invites", "big", "headers", "ids", "answered"],
                    choices=["invites", "big", "headers", "ids", "answered"])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--tree", default=str(HERE.parent), help="the checkout to run (PYTHONPATH)")
    ap.add_argument("--workdir", default=None, help="where to generate (default: a new temporary directory)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("-j", "--workers", type=int, default=0, help="process -j (default 0: one process)")
    ap.add_argument("--ids-driver", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.ids_driver:
        ids_driver(a.ids_driver)
        return
    env = {**os.environ, "PYTHONPATH": a.tree}
    rows = []
    with tempfile.TemporaryDirectory(prefix="floods-", dir=a.workdir) as tmp:
        for name in a.only:
            if name == "ids":
                n = int(10_000_000 * a.scale)
                what = f"{n:,} records' ids"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--ids-driver", str(n)]
            else:
                pcap, rules = Path(tmp) / f"{name}.pcap", Path(tmp) / f"{name}.yaml"
                rules.write_text(GENERATORS[name](pcap, a.scale))
                what = f"{name} ({pcap.stat().st_size / 1e6:.0f} MB capture)"
                cmd = [sys.executable, "-m", "sipsniff_acc", "process", "-j", str(a.workers), "--no-db", "--log", "none",
                       "--quiet", "--no-progress", "--rules", str(rules), str(pcap)]
            wall, mb, tree, code = run(cmd, env, a.timeout, a.tree)  # cwd too: -m puts it first on sys.path
            for leftover in Path(tmp).iterdir():
                leftover.unlink()
            rows.append((name, what, wall, mb, tree, code))
            print(f"{name}: {mb} MB peak RSS, {tree} MB tree, {wall:.1f} s, exit {code}", file=sys.stderr, flush=True)
    print(f"{'flood':<9} {'what':<34} {'seconds':>8} {'peak RSS MB':>11} {'tree PSS':>8} {'before (issue 10)':>17} "
          f"{'exit':>4}")
    for name, what, wall, mb, tree, code in rows:
        old = str(OLD_MB[name]) if a.scale == 1.0 else "-"
        print(f"{name:<9} {what:<34} {wall:>8.1f} {mb:>11} {tree:>8} {old:>17} {code:>4}")


if __name__ == "__main__":
    main()
