#!/usr/bin/env python3
"""Time `sipsniff-acc process` (the acc engine) against tshark on the same captures, same run.

The peer is what a tshark user does to get call records out of a capture: every final
reply to an INVITE or BYE as (time, Call-ID, status) lines (`-Y ... -T fields`). We do
more (transactions, both proxy legs, flags, missed calls, records in Kamailio's format),
so this is a floor for the comparison, not a like-for-like. Our runs: log lines only
(`--no-db --log /dev/null`) and log + SQLite rows (a fresh file each run).

Prints, per capture size: median wall time of --runs interleaved runs, records/s, peak RSS.

usage: bench_process.py [--calls 10000 50000] [--runs 3] [--tcp-share 0] [--workdir benchmarks/out]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_messages import run, workload  # noqa: E402 - shared with the messages benchmark

TSHARK_FILTER = 'sip.Status-Code >= 200 && (sip.CSeq.method == "INVITE" || sip.CSeq.method == "BYE")'


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, nargs="+", default=[10000, 50000])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tcp-share", type=float, default=0.0)
    ap.add_argument("--workdir", default=str(HERE / "out"))
    a = ap.parse_args()
    tshark = shutil.which("tshark")
    if not tshark:
        raise SystemExit("tshark is not installed: the benchmark compares against it")
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rules = HERE.parent / "rules.yaml"
    db = work / "bench.db"
    base = [sys.executable, "-m", "sipsniff_acc", "process", "--quiet", "--no-progress", "--rules", str(rules)]
    rows = []
    for calls in a.calls:
        pcap, meta = workload(work, calls, a.tcp_share)
        log_only = [*base, "--no-db", "--log", "-", str(pcap)]
        with_db = [*base, "--db-url", f"sqlite:///{db}", "--log", os.devnull, str(pcap)]
        peer = [tshark, "-n", "-r", str(pcap), "-Y", TSHARK_FILTER, "-T", "fields", "-e", "frame.time_epoch",
                "-e", "sip.Call-ID", "-e", "sip.Status-Code"]
        t_log, t_db, t_peer = [], [], []
        records = finals = 0
        for _ in range(a.runs):
            wall, rss_log, out = run(log_only)
            t_log.append((wall, rss_log))
            records = len(out.splitlines())
            db.unlink(missing_ok=True)
            t_db.append(run(with_db)[:2])
            wall, rss, out = run(peer)
            t_peer.append((wall, rss))
            finals = len(out.splitlines())
        med = [statistics.median(w for w, _ in t) for t in (t_log, t_db, t_peer)]
        rss = [max(r for _, r in t) for t in (t_log, t_db, t_peer)]
        rows.append((calls, meta["frames"], records, finals, *med, *rss))
    db.unlink(missing_ok=True)
    print(f"{'calls':>7} {'frames':>9} {'records':>8} {'tshark finals':>13} {'ours log s':>10} {'ours +sqlite s':>14} "
          f"{'tshark s':>8} {'ours/tshark':>11} {'records/s':>9} {'RSS ours MB':>11} {'RSS tshark MB':>13}")
    for calls, frames, rec, fin, tl, td, tp, rl, _rd, rp in rows:
        print(f"{calls:>7} {frames:>9} {rec:>8} {fin:>13} {tl:>10.2f} {td:>14.2f} {tp:>8.2f} {tp / tl:>10.2f}x "
              f"{rec / tl:>9.0f} {rl:>11} {rp:>13}")


if __name__ == "__main__":
    main()
