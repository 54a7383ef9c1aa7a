#!/usr/bin/env python3
"""Time `sipsniff-acc messages` against `tshark -q -z sip,stat` on the same captures, same run.

Prints, per capture size: wall time (median of --runs, the two tools' runs interleaved so
both see the same machine noise), SIP messages/s, the ratio to tshark, and the peak RSS of
each process (os.wait4's ru_maxrss, the child's own peak).
Two sizes show whether memory stays flat as the file grows.

usage: bench_messages.py [--calls 10000 50000] [--runs 3] [--tcp-share 0] [--workdir benchmarks/out]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent


KEEP_OUTPUT = 1 << 20  #: stdout kept whole up to this size; past it, its line count and digest


def _scratch() -> str:
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = tempfile.mkdtemp(prefix="sipsniff-bench-")
    return _SCRATCH


_SCRATCH: str | None = None


def run(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS in MB, and stdout of one run (a long one as "<N lines, sha256 ...>":
    a parent holding megabytes of earlier outputs inflates every later child's peak RSS, since
    the fork copies the parent before the exec)."""
    t0 = time.perf_counter()
    # in a scratch folder: a run's default files (the spool, acc.db) never land in the checkout
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=_scratch())
    digest, lines, kept, size = hashlib.sha256(), 0, [], 0
    for chunk in iter(lambda: proc.stdout.read(1 << 16) if proc.stdout else b"", b""):
        digest.update(chunk)
        lines += chunk.count(b"\n")
        size += len(chunk)
        if size <= KEEP_OUTPUT:
            kept.append(chunk)
    out = b"".join(kept).decode() if size <= KEEP_OUTPUT else f"<{lines} lines, sha256 {digest.hexdigest()}>"
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed ({status}): {' '.join(cmd)}")
    return wall, usage.ru_maxrss // 1024, out


def workload(work: Path, calls: int, tcp_share: float = 0.0) -> tuple[Path, dict[str, int]]:
    """The seeded workload capture (generated once, in its own process: a big parent would
    inflate the children's peak RSS) and its ground truth."""
    pcap = work / f"workload-{calls}-tcp{tcp_share}.pcap"
    if not pcap.exists():
        subprocess.run([sys.executable, str(HERE / "gen_workload.py"), str(pcap), "--calls", str(calls),
                        "--tcp-share", str(tcp_share)], check=True, stdout=subprocess.DEVNULL)
    return pcap, json.loads(Path(str(pcap) + ".meta.json").read_text())


def load() -> float:
    """The 1-minute load average right now (/proc/loadavg): printed with every run, since the
    machine is shared and a figure means little without it."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0


def interleaved(cmds: dict[str, list[str]], rounds: int, before: Callable[[str], None] | None = None,
                verbose: bool = True) -> dict[str, list[tuple[float, int, float, str]]]:
    """Run every command once per round, the order rotated each round (so no command always
    follows the same one), the load recorded before each run. Returns, per command, one
    (wall s, peak RSS MB, load before, stdout) per round, in round order."""
    names = list(cmds)
    out: dict[str, list[tuple[float, int, float, str]]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if before is not None:
                before(name)
            ld = load()
            wall, rss, text = run(cmds[name])
            out[name].append((wall, rss, ld, text))
            if verbose:
                print(f"  round {r + 1}: {name:<28} {wall:7.2f} s  RSS {rss:5} MB  load {ld:.2f}", file=sys.stderr)
    return out


def report(results: dict[str, list[tuple[float, int, float, str]]], pairs: list[tuple[str, str]]) -> None:
    """Medians, spreads (min-max), peak RSS and the load range of each command; then, for each
    (fast, slow) pair, slow/fast per round and the ratio of the medians."""
    print(f"{'command':<28} {'median s':>8} {'min s':>7} {'max s':>7} {'RSS MB':>7} {'load before':>12}")
    for name, runs in results.items():
        walls = [w for w, *_ in runs]
        loads = [ld for _w, _r, ld, _t in runs]
        print(f"{name:<28} {statistics.median(walls):8.2f} {min(walls):7.2f} {max(walls):7.2f} "
              f"{max(r for _w, r, *_ in runs):7} {min(loads):5.2f}-{max(loads):<5.2f}")
    for fast, slow in pairs:
        per = [s[0] / f[0] for f, s in zip(results[fast], results[slow])]
        med = statistics.median(w for w, *_ in results[slow]) / statistics.median(w for w, *_ in results[fast])
        print(f"{slow} / {fast}: median {med:.2f}x; per round " + ", ".join(f"{x:.2f}x" for x in per))


def measure_pair(ours: list[str], theirs: list[str], runs: int) -> tuple[tuple[float, int], tuple[float, int], str]:
    """Median wall time and peak RSS of each, runs interleaved (order rotated) so both see the same machine noise."""
    res = interleaved({"ours": ours, "theirs": theirs}, runs, verbose=False)
    a, b = res["ours"], res["theirs"]
    return ((statistics.median(r[0] for r in a), max(r[1] for r in a)),
            (statistics.median(r[0] for r in b), max(r[1] for r in b)), b[-1][3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, nargs="+", default=[10000, 50000])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tcp-share", type=float, default=0.0)
    ap.add_argument("--workdir", default=str(HERE / "out"))
    ap.add_argument("--workers", type=int, default=None, help="pass --workers N to sipsniff-acc")
    a = ap.parse_args()
    tshark = shutil.which("tshark")
    if not tshark:
        raise SystemExit("tshark is not installed: the benchmark compares against it")
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ours_base = [sys.executable, "-m", "sipsniff_acc", "messages", "--quiet", "--no-progress", "-o", os.devnull]
    if a.workers:
        ours_base += ["--workers", str(a.workers)]
    rows = []
    for calls in a.calls:
        pcap, meta = workload(work, calls, a.tcp_share)
        (ours_t, ours_rss), (their_t, their_rss), out = measure_pair(
            ours_base + [str(pcap)], [tshark, "-n", "-q", "-z", "sip,stat", "-r", str(pcap)], a.runs)
        counted = next((int(line.split(":")[1]) for line in out.splitlines() if "Number of SIP messages" in line), -1)
        # our own count, once, outside the timing
        res = subprocess.run(ours_base[:-2] + ["-o", str(work / "count.jsonl"), str(pcap)], check=False)
        ours_count = sum(1 for _ in open(work / "count.jsonl")) if res.returncode == 0 else -1
        rows.append((calls, meta["frames"], os.path.getsize(pcap) >> 20, ours_count, counted,
                     ours_t, their_t, their_t / ours_t, ours_rss, their_rss))
    print(f"{'calls':>7} {'frames':>9} {'MB':>5} {'msgs ours':>10} {'msgs tshark':>11} {'ours s':>7} "
          f"{'tshark s':>8} {'speedup':>7} {'ours msg/s':>10} {'RSS ours MB':>11} {'RSS tshark MB':>13}")
    for calls, frames, mb, oc, tc, ot, tt, ratio, orss, trss in rows:
        print(f"{calls:>7} {frames:>9} {mb:>5} {oc:>10} {tc:>11} {ot:>7.2f} {tt:>8.2f} {ratio:>6.2f}x "
              f"{oc / ot:>10.0f} {orss:>11} {trss:>13}")


if __name__ == "__main__":
    main()
