#!/usr/bin/env python3
"""Time `sipsniff-acc process` (the acc engine) against tshark on the same captures, same run.

The peer is what a tshark user does to get call records out of a capture: every final
reply to an INVITE or BYE as (time, Call-ID, status) lines (`-Y ... -T fields`). We do
more (transactions, both proxy legs, flags, missed calls, records in Kamailio's format),
so this is a floor for the comparison, not a like-for-like. Our runs: log lines only
(`--no-db --log -`) with -j 0 and -j 2, and -j 2 with SQLite rows (a fresh file each run).
`--acceptance` adds issue 13's `messages -j 0` against `tshark -q -z sip,stat`.

Every command runs once per round, the order rotated each round, the load average recorded
before each run (the machine is shared). Prints each run as it ends (stderr), then per
capture size: medians, spreads (min-max), peak RSS, the load range, and per-round ratios.

usage: bench_process.py [--calls 10000 50000] [--runs 3] [--tcp-share 0] [--acceptance] [--workdir benchmarks/out]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_messages import interleaved, report, workload  # noqa: E402 - shared with the messages benchmark

TSHARK_FILTER = 'sip.Status-Code >= 200 && (sip.CSeq.method == "INVITE" || sip.CSeq.method == "BYE")'


def _lines(out: str) -> int:
    """Lines of an output as run() keeps it (whole, or "<N lines, sha256 ...>")."""
    if out.startswith("<") and " lines, sha256 " in out:
        return int(out[1:].split(" ", 1)[0])
    return len(out.splitlines())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, nargs="+", default=[10000, 50000])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tcp-share", type=float, default=0.0)
    ap.add_argument("--acceptance", action="store_true", help="also messages -j 0 against tshark -z sip,stat")
    ap.add_argument("--no-tshark", action="store_true", help="our commands only (the memory check of big files)")
    ap.add_argument("--workdir", default=str(HERE / "out"))
    a = ap.parse_args()
    if a.runs < 1:
        raise SystemExit("--runs must be at least 1")
    tshark = shutil.which("tshark") or ""
    if not tshark and not a.no_tshark:
        raise SystemExit("tshark is not installed: the benchmark compares against it (or pass --no-tshark)")
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rules = HERE.parent / "rules.yaml"
    db = work / "bench.db"
    base = [sys.executable, "-m", "sipsniff_acc", "process", "--quiet", "--no-progress", "--rules", str(rules)]
    msgs = [sys.executable, "-m", "sipsniff_acc", "messages", "--quiet", "--no-progress", "-o", os.devnull]
    for calls in a.calls:
        pcap, meta = workload(work, calls, a.tcp_share)
        cmds = {
            "process -j 0 (log)": [*base, "-j", "0", "--no-db", "--log", "-", str(pcap)],
            "process -j 2 (log)": [*base, "-j", "2", "--no-db", "--log", "-", str(pcap)],
            "process -j 2 + sqlite": [*base, "-j", "2", "--db-url", f"sqlite:///{db}", "--log", os.devnull, str(pcap)],
        }
        pairs: list[tuple[str, str]] = []  # (faster, slower): slower/faster is printed
        if not a.no_tshark:
            cmds["tshark listing"] = [tshark, "-n", "-r", str(pcap), "-Y", TSHARK_FILTER, "-T", "fields",
                                      "-e", "frame.time_epoch", "-e", "sip.Call-ID", "-e", "sip.Status-Code"]
            pairs += [("process -j 0 (log)", "tshark listing"), ("process -j 2 (log)", "tshark listing"),
                      ("process -j 2 + sqlite", "tshark listing")]
        pairs += [("process -j 2 (log)", "process -j 0 (log)"), ("process -j 2 (log)", "process -j 2 + sqlite")]
        if a.acceptance:
            cmds["messages -j 0"] = [*msgs, "-j", "0", str(pcap)]
            if not a.no_tshark:
                cmds["tshark sip,stat"] = [tshark, "-n", "-q", "-z", "sip,stat", "-r", str(pcap)]
                pairs.append(("messages -j 0", "tshark sip,stat"))
        print(f"== {calls} calls: {meta['frames']} frames, {os.path.getsize(pcap) >> 20} MB, {a.runs} rounds", flush=True)
        res = interleaved(cmds, a.runs, before=lambda name: db.unlink(missing_ok=True))
        records = _lines(res["process -j 0 (log)"][0][3])
        same = all(r[3] == res["process -j 0 (log)"][0][3] for n in ("process -j 0 (log)", "process -j 2 (log)")
                   for r in res[n])
        finals = _lines(res["tshark listing"][0][3]) if "tshark listing" in res else -1
        print(f"records {records} (-j 0 and -j 2 logs identical: {same}); tshark finals {finals}")
        report(res, pairs)
    db.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
