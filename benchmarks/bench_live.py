#!/usr/bin/env python3
"""Live capture at line rate: the highest replay rate with 0 drops and the offline records.

For each configuration (``-j 0`` / ``-j 2`` × SIP only / SIP + RTP, the RTP dropped by the
capture's default kernel filter), a bounded search over tcpreplay rates (packets/s): the
rate goes up ×``--step`` while a trial passes, then is bisected ``--refine`` times between
the last pass and the first failure. A trial replays ``--seconds`` worth of a generated
workload (the first rate×seconds frames, so a 32 MB ring cannot hide a slow reader) into a
veth pair between two namespaces of our own (tests/live/netns.py) and passes when

* the kernel's link counters say every frame reached the capturing interface,
* the run reports 0 drops and read every frame the filter admits, and
* its records equal ``process`` on the same frames offline (times aside), and
* its records came out within ``--max-p99`` (1 s) of their deciding packet at the 99th
  percentile: a reader slower than the rate passes a short replay only because the 32 MB
  ring holds the backlog, and would drop in a long one.

Rounds interleave the configurations (load drift hits them alike); the 1-minute load
average is recorded before each trial; the table gives the median over rounds. For the
passing trial at the highest rate, record latency (p50/p99: a record's JSON line visible in
its file, minus its deciding packet's kernel timestamp) and the peak RSS of the sniffer's
process tree. ``--minutes M`` then runs one soak at ``--soak-pps`` (the workload looped) and
prints RSS each ``--sample`` seconds: the memory curve.

usage: sudo bench_live.py [--rounds 3] [--seconds 8] [--configs j0-sip,j2-sip,j0-rtp,j2-rtp]
                          [--minutes 30 --soak-pps 20000 --soak-workers 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.live.netns import (PYTHON, Sniffer, VethPair, cli_options, comparable, generate,  # noqa: E402
                              load_records, missing_tools, replay, stats_drops)
from tests.live.watch import FileWatcher  # noqa: E402

PCAP_HDR = 24
REC = struct.Struct("<IIII")


# --- workloads ---------------------------------------------------------------------------

@dataclass
class Prefix:
    """The first ``frames`` frames of a workload, with what a correct live run must give."""

    path: Path
    frames: int
    rtp: int  #: frames the default kernel filter drops (UDP payload starting with RTP version 2)
    reference: list[str]  #: comparable() of the offline records


class Workload:
    """A generated capture; prefixes of it are cut and accounted offline once each."""

    def __init__(self, name: str, work: Path, calls: int, rtp: bool) -> None:
        self.name = name
        self.work = work
        self.path = work / f"{name}.pcap"
        extra = ["--rtp", "--talk-mean", "10", "--max-talk", "40"] if rtp else []
        t0 = time.monotonic()
        self.meta = generate(self.path, calls, 1100 + calls, *extra)
        self.frames: int = int(self.meta["frames"])  # type: ignore[call-overload]
        print(f"# workload {name}: {calls} calls, {self.frames} frames ({time.monotonic() - t0:.0f} s to generate)",
              flush=True)
        self._prefixes: dict[int, Prefix] = {}

    def prefix(self, frames: int) -> Prefix:
        frames = min(frames, self.frames)
        frames = self._round(frames)
        if frames in self._prefixes:
            return self._prefixes[frames]
        out = self.work / f"{self.name}-{frames}.pcap"
        rtp = _cut(self.path, out, frames)
        res = subprocess.run([PYTHON, "-m", "sipsniff_acc", "process", str(out), "--no-db", "--log", "none", "-q",
                              "-j", "0", "--jsonl", str(out) + ".jsonl", "--spool", str(self.work / "offline.spool")],
                             capture_output=True, text=True, timeout=3600, cwd=self.work,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        if res.returncode != 0:
            raise SystemExit(f"offline process of {out} failed: {res.stderr[-800:]}")
        p = Prefix(out, frames, rtp, comparable(load_records(Path(str(out) + ".jsonl"))))
        self._prefixes[frames] = p
        return p

    def _round(self, frames: int) -> int:
        """Few distinct prefixes (each costs an offline run): 2 significant digits."""
        if frames >= self.frames:
            return int(self.frames)
        mag = int(10 ** max(0, len(str(frames)) - 2))
        return max(mag, frames // mag * mag)


def _cut(src: Path, dst: Path, frames: int) -> int:
    """Copy the first ``frames`` records of a pcap; how many are RTP/RTCP (version 2 first byte)."""
    rtp = 0
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read(PCAP_HDR))
        for _ in range(frames):
            hdr = f.read(16)
            if len(hdr) < 16:
                break
            n = REC.unpack(hdr)[2]
            data = f.read(n)
            g.write(hdr)
            g.write(data)
            # Ethernet + IPv4 (IHL) + UDP: the kernel filter's test, on the generator's frames
            if len(data) > 42 and data[12:14] == b"\x08\x00" and data[23] == 17:
                ihl = (data[14] & 0x0F) * 4
                off = 14 + ihl + 8
                if len(data) > off and data[off] & 0xC0 == 0x80:
                    rtp += 1
    return rtp


# --- one trial ---------------------------------------------------------------------------

@dataclass
class Trial:
    config: str
    pps_asked: float
    pps_sent: float = 0.0
    frames: int = 0
    expected: int = 0  #: frames the capture must read (RTP removed by the kernel filter)
    seen: int = 0
    drops: int | None = None
    delivered: int = 0
    identical: bool = False
    ok: bool = False
    load: float = 0.0
    why: str = ""
    latency_p50: float | None = None
    latency_p99: float | None = None
    rss_peak_mb: float = 0.0
    frames_per_cpu_s: float | None = None  #: frames read per CPU-second of the sniffer's tree (load-independent)


def tree_usage(pid: int) -> tuple[int, dict[int, int]]:
    """VmRSS (KiB) of ``pid`` and all its descendants (the -j workers), and each one's CPU
    time so far (utime + stime, clock ticks)."""
    total = 0
    ticks: dict[int, int] = {}
    todo = [pid]
    while todo and len(ticks) < 256:
        p = todo.pop()
        if p in ticks:
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks[p] = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError, IndexError):
            continue
    return total, ticks


class RssSampler:
    """RSS and CPU time of a process tree every ``every`` seconds, in a thread (stopped by
    ``stop()``). The CPU seconds used since the first sample give a load-independent figure:
    frames per CPU-second, what one idle core would sustain."""

    def __init__(self, pid: int, every: float) -> None:
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int]] = []
        self._base: dict[int, int] | None = None
        self._last: dict[int, int] = {}
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            kb, ticks = tree_usage(self.pid)
            if kb:
                self.samples.append((time.monotonic() - self._t0, kb))
                if self._base is None:
                    self._base = dict(ticks)
                self._last.update(ticks)
            self._stop.wait(self.every)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join(10)
        return self.samples

    def cpu_seconds(self) -> float:
        base = self._base or {}
        return sum(t - base.get(p, 0) for p, t in self._last.items()) / os.sysconf("SC_CLK_TCK")


def trial(pair: VethPair, wl: Workload, workers: int, pps: float, seconds: float, work: Path,
          kernel_filter: bool, max_p99: float) -> Trial:
    pre = wl.prefix(int(pps * seconds))
    t = Trial(f"-j {workers} {wl.name}", pps, frames=pre.frames, load=os.getloadavg()[0])
    t.expected = pre.frames - (pre.rtp if kernel_filter else 0)
    run = work / "run"
    run.mkdir(exist_ok=True)
    jsonl, stats = run / "live.jsonl", run / "live.json"
    for f in (jsonl, stats):
        f.unlink(missing_ok=True)
    before = pair.link_stats()["rx_packets"]
    live = Sniffer(["process", "-i", pair.rx_dev, "--count", str(t.expected), "--duration", str(seconds * 3 + 120),
                    "-j", str(workers), "--no-db", "--log", "none", "--jsonl", str(jsonl), "--stats", str(stats),
                    "--spool", str(run / "spool")], netns=pair.rx_ns, cwd=run)
    watcher = rss = None
    try:
        live.wait_listening()
        watcher = FileWatcher(jsonl)
        rss = RssSampler(live.proc.pid, 0.2)
        sent = replay(pair, pre.path, pps=pps, timeout=seconds * 10 + 300)
        t.pps_sent = sent.pps
        try:  # --count ends it once every admitted frame is read; a run that lost some never gets there
            live.proc.wait(max(10.0, seconds))
            rc = live.finish(timeout=30)
        except subprocess.TimeoutExpired:
            rc = live.finish(timeout=120, sig=signal.SIGINT)
    finally:
        live.kill()
        lines = watcher.stop() if watcher else []
        samples = rss.stop() if rss else []
    t.delivered = pair.link_stats()["rx_packets"] - before
    t.rss_peak_mb = max((kb for _, kb in samples), default=0) / 1024
    cpu = rss.cpu_seconds() if rss else 0.0
    if rc not in (0, 130):
        t.why = f"exit {rc}: {live.stderr.strip().splitlines()[-1:]}"
        return t
    st = json.loads(stats.read_text()) if stats.exists() else {}
    t.seen = int(st.get("frames", 0))
    t.drops = stats_drops(st)
    records = load_records(jsonl)
    t.identical = comparable(records) == pre.reference
    t.frames_per_cpu_s = t.seen / cpu if cpu > 0 else None
    lat = sorted(when - float(json.loads(line)["ts"]) for when, line in lines if line.startswith("{"))
    if lat:
        t.latency_p50 = statistics.median(lat)
        t.latency_p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    problems = []
    if t.delivered != pre.frames:
        problems.append(f"link got {t.delivered}/{pre.frames}")
    if t.drops:
        problems.append(f"{t.drops} dropped")
    if t.seen != t.expected:
        problems.append(f"read {t.seen}/{t.expected}")
    if not t.identical:
        problems.append(f"records differ ({len(records)} vs {len(pre.reference)})")
    if max_p99 and (t.latency_p99 is None or t.latency_p99 > max_p99):
        problems.append(f"p99 latency {t.latency_p99 or 0:.2f} s > {max_p99:g} s (the ring hid a slow reader)")
    t.ok = not problems
    t.why = ", ".join(problems)
    return t


# --- the search --------------------------------------------------------------------------

def search(pair: VethPair, wl: Workload, workers: int, args: argparse.Namespace, work: Path,
           kernel_filter: bool, log: list[Trial]) -> Trial | None:
    """The best passing trial of a bounded search over rates (×step up, then bisection)."""
    best: Trial | None = None
    fail: float | None = None
    rate = args.rtp_start_pps if wl.name == "rtp" else args.start_pps
    for _ in range(args.max_trials):
        tr = trial(pair, wl, workers, rate, args.seconds, work, kernel_filter, args.max_p99)
        log.append(tr)
        per_cpu = f"{tr.frames_per_cpu_s:>7.0f}/CPU-s" if tr.frames_per_cpu_s else " " * 13
        print(f"  {tr.config:14} {rate:>9.0f} asked {tr.pps_sent:>9.0f} sent  load {tr.load:4.2f} {per_cpu}  "
              f"{'ok' if tr.ok else 'FAIL: ' + tr.why}", flush=True)
        if tr.ok:
            best = tr if best is None or tr.pps_sent > best.pps_sent else best
            if tr.pps_sent < rate * 0.9:  # tcpreplay itself cannot go faster on this machine
                break
        else:
            fail = rate if fail is None else min(fail, rate)
        if fail is None:
            if rate >= args.max_pps:
                break
            rate = min(args.max_pps, rate * args.step)
        else:
            low = best.pps_asked if best else 0.0
            if fail - low <= max(1000.0, fail * 0.05):
                break
            rate = (low + fail) / 2 if low else fail / args.step
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="j0-sip,j2-sip,j0-rtp,j2-rtp")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0, help="replay length of a trial")
    ap.add_argument("--start-pps", type=float, default=10000)
    ap.add_argument("--rtp-start-pps", type=float, default=40000, help="first rate of the RTP-mix searches")
    ap.add_argument("--max-p99", type=float, default=1.0,
                    help="a trial also fails when records lag more than this (s, p99): the reader is not keeping "
                         "up and only the ring's 32 MB hide it in a short replay (0: drops and records only)")
    ap.add_argument("--max-pps", type=float, default=600000)
    ap.add_argument("--step", type=float, default=2.0)
    ap.add_argument("--max-trials", type=int, default=8, help="per search")
    ap.add_argument("--sip-calls", type=int, default=50000, help="SIP-only workload (~15 frames a call)")
    ap.add_argument("--rtp-calls", type=int, default=1500, help="RTP-mix workload (talk 10 s mean)")
    ap.add_argument("--minutes", type=float, default=0.0, help="soak run length for the RSS curve (0: none)")
    ap.add_argument("--soak-pps", type=float, default=20000)
    ap.add_argument("--soak-workers", type=int, default=0)
    ap.add_argument("--soak-config", default="sip", choices=["sip", "rtp"])
    ap.add_argument("--sample", type=float, default=30.0, help="seconds between RSS samples of the soak")
    ap.add_argument("--json", type=Path, help="write every trial and the table here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    # started in the background, SIGINT may be ignored: both signals unwind through the
    # finally blocks (our sniffer stopped by its PID, our namespaces deleted)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    missing = missing_tools()
    if missing:
        raise SystemExit(f"bench_live needs {', '.join(missing)}")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in ("j0-sip", "j2-sip", "j0-rtp", "j2-rtp"):
            raise SystemExit(f"--configs: unknown {c!r} (j0-sip, j2-sip, j0-rtp, j2-rtp)")
    kernel_filter = "-f" in cli_options("process")  # the capture drops RTP in the kernel by default
    work = Path(tempfile.mkdtemp(prefix="s6-bench-live-"))
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} cpus {os.cpu_count()} load {os.getloadavg()} "
          f"kernel RTP filter: {kernel_filter}; work {work}", flush=True)
    workloads: dict[str, Workload] = {}
    if any(c.endswith("sip") for c in configs) or args.minutes and args.soak_config == "sip":
        workloads["sip"] = Workload("sip", work, args.sip_calls, rtp=False)
    if any(c.endswith("rtp") for c in configs) or args.minutes and args.soak_config == "rtp":
        workloads["rtp"] = Workload("rtp", work, args.rtp_calls, rtp=True)
    results: dict[str, list[Trial]] = {c: [] for c in configs}
    log: list[Trial] = []
    soak: list[tuple[float, int]] = []
    with VethPair() as pair:
        try:
            for r in range(args.rounds if configs else 0):  # --configs ',': the soak alone
                order = configs[r % len(configs):] + configs[:r % len(configs)]  # interleaved, rotated
                print(f"# round {r + 1}/{args.rounds}: {' '.join(order)}", flush=True)
                for c in order:
                    best = search(pair, workloads[c[3:]], int(c[1]), args, work, kernel_filter, log)
                    if best is not None:
                        results[c].append(best)
            if args.minutes > 0:
                soak = run_soak(pair, workloads[args.soak_config], args, work)
        finally:
            if not args.keep:
                subprocess.run(["rm", "-rf", str(work)], check=False)
    table = print_table(configs, results, args)
    if soak:
        print(f"\nRSS over a {args.minutes:g}-minute soak at {args.soak_pps:.0f} packets/s "
              f"(-j {args.soak_workers}, {args.soak_config}):")
        for sec, kb in soak:
            print(f"  {sec / 60:6.1f} min  {kb / 1024:7.1f} MB")
    if args.json:
        args.json.write_text(json.dumps({"table": table, "trials": [asdict(t) for t in log],
                                         "soak_rss_kb": soak}, indent=1))


def print_table(configs: list[str], results: dict[str, list[Trial]],
                args: argparse.Namespace) -> list[dict[str, object]]:
    """The table: median over rounds of each configuration's best passing trial."""
    def med(xs: list[float | None]) -> float | None:
        vals = [x for x in xs if x is not None]
        return statistics.median(vals) if vals else None

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1000:.0f}"

    rows: list[dict[str, object]] = []
    print(f"\nhighest rate with 0 drops, identical records and p99 latency <= {args.max_p99:g} s "
          f"(median of {args.rounds} rounds; {args.seconds:g} s replays)")
    print(f"{'config':10} {'pps (median)':>13} {'rounds':>28} {'lat p50 ms':>11} {'lat p99 ms':>11} "
          f"{'RSS MB':>7} {'load':>5} {'frames/CPU-s':>13}")
    for c in configs:
        got = results[c]
        rate = med([t.pps_sent for t in got])
        row: dict[str, object] = {"config": c, "pps": rate, "rounds": [round(t.pps_sent) for t in got],
               "latency_p50": med([t.latency_p50 for t in got]), "latency_p99": med([t.latency_p99 for t in got]),
               "rss_mb": med([t.rss_peak_mb for t in got]), "load": med([t.load for t in got]),
               "frames_per_cpu_s": med([t.frames_per_cpu_s for t in got])}
        rows.append(row)
        print(f"{c:10} {'-' if rate is None else f'{rate:,.0f}':>13} {str(row['rounds']):>28} "
              f"{ms(row['latency_p50']):>11} {ms(row['latency_p99']):>11} "  # type: ignore[arg-type]
              f"{'-' if row['rss_mb'] is None else format(row['rss_mb'], '.0f'):>7} "
              f"{'-' if row['load'] is None else format(row['load'], '.2f'):>5} "
              f"{'-' if row['frames_per_cpu_s'] is None else format(row['frames_per_cpu_s'], ',.0f'):>13}")
    return rows


def run_soak(pair: VethPair, wl: Workload, args: argparse.Namespace, work: Path) -> list[tuple[float, int]]:
    """The workload looped at a fixed rate for ``--minutes``; RSS of the sniffer's tree sampled."""
    run = work / "soak"
    run.mkdir(exist_ok=True)
    seconds = args.minutes * 60
    live = Sniffer(["process", "-i", pair.rx_dev, "--duration", str(seconds + 600), "-j", str(args.soak_workers),
                    "--no-db", "--log", "none", "--jsonl", str(run / "soak.jsonl"), "--stats", str(run / "soak.json"),
                    "--spool", str(run / "spool")], netns=pair.rx_ns, cwd=run)
    print(f"# soak: {args.minutes:g} min at {args.soak_pps:.0f} packets/s", flush=True)
    rss = None
    try:
        live.wait_listening()
        rss = RssSampler(live.proc.pid, args.sample)
        subprocess.run(["ip", "netns", "exec", pair.tx_ns, "tcpreplay", "-K", "-i", pair.tx_dev,
                        f"--pps={args.soak_pps:g}", "--loop=0", f"--duration={int(seconds)}", str(wl.path)],
                       capture_output=True, timeout=seconds + 600, check=False)
        time.sleep(3)
        live.finish(timeout=300, sig=signal.SIGINT)
    finally:
        live.kill()
        samples = rss.stop() if rss else []
    st = json.loads((run / "soak.json").read_text()) if (run / "soak.json").exists() else {}
    print(f"# soak: {st.get('frames')} frames read, drops {stats_drops(st)}, records {st.get('records')}", flush=True)
    return samples


if __name__ == "__main__":
    main()
