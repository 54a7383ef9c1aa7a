#!/usr/bin/env python3
"""Records/s through NATS JetStream (sensor → stream → 1, 2, 4 workers) beside one offline
``process -j 0`` of the same capture, and what the bus costs per SIP message.

A real ``nats-server -js`` on loopback (temp store). Each round: the offline run; then for each
worker count a fresh stream, one sensor (``capture -r``) publishing the whole capture, then the
workers (partitions split evenly) consuming it with JSON lines out (``--no-db``: the bus is
measured, not a database); done when their JSON lines hold every record of the offline run.
Configurations are interleaved round by round; medians; the load average is printed with
every run (the machine is shared). CPU seconds come from each process's rusage (wait4).

Figures: ``wall`` from the workers' start to the last record (includes their ~1 s start-up
and the reorder window, 200 ms by default); ``records/s`` = records / wall; ``µs/msg`` =
(sensor CPU + workers' CPU − offline CPU) / SIP messages: the bus's cost per message.

usage: bench_nats.py [--calls 3000] [--runs 3] [--workers 1 2 4] [--partitions 4] [--workdir benchmarks/out]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOST = "127.0.13.1"
CLI = [sys.executable, "-m", "sipsniff_acc"]


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def cpu_wait(proc: subprocess.Popen[bytes], timeout: float = 600) -> tuple[int, float]:
    """Exit status and CPU seconds (user + system) of a child, from wait4's rusage."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, ru.ru_utime + ru.ru_stime
        time.sleep(0.02)
    proc.kill()
    raise SystemExit(f"{proc.args} did not end within {timeout} s")


def lines(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        try:
            with open(p, "rb") as f:
                n += sum(1 for _ in f)
        except FileNotFoundError:
            pass
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def split(partitions: int, workers: int) -> list[str]:
    per = [list(range(partitions))[k::workers] for k in range(workers)]
    return [",".join(map(str, p)) for p in per]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--workdir", default=str(HERE / "out"))
    a = ap.parse_args()
    if max(a.workers) > a.partitions:
        raise SystemExit("--partitions must be at least the largest --workers")
    server = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not os.path.exists(server):
        raise SystemExit("nats-server is not installed")
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    pcap = work / f"nats-{a.calls}.pcap"
    if not pcap.exists():
        subprocess.run([sys.executable, str(HERE / "gen_workload.py"), str(pcap), "--calls", str(a.calls),
                        "--window", str(max(60, a.calls // 20)), "--seed", "11"], check=True, capture_output=True)
    store = Path(tempfile.mkdtemp(prefix="bench-nats-"))
    port = free_port()
    url = f"nats://{HOST}:{port}"
    nats = subprocess.Popen([server, "-js", "-a", HOST, "-p", str(port), "-sd", str(store)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    results: dict[str, list[tuple[float, float, float]]] = {}  #: config -> (wall, records/s, cpu)
    sip_messages = records = 0
    try:
        for rnd in range(a.runs):
            # offline, one process: the reference figure and the record count
            out = work / "offline.jsonl"
            t0 = time.monotonic()
            p = subprocess.Popen([*CLI, "process", str(pcap), "-j", "0", "--no-db", "--log", "none", "--jsonl",
                                  str(out), "-q", "--no-progress", "--stats", str(work / "offline.json")])
            rc, cpu = cpu_wait(p)
            wall = time.monotonic() - t0
            import json
            stats = json.loads((work / "offline.json").read_text())
            sip_messages = stats["sip_messages"]
            records = lines([out])
            results.setdefault("offline -j 0", []).append((wall, records / wall, cpu))
            print(f"round {rnd}: offline -j 0: {wall:.2f} s, {records / wall:.0f} records/s, cpu {cpu:.2f} s, "
                  f"load {load()}", file=sys.stderr)
            for k in a.workers:
                stream = f"b{rnd}w{k}"
                t0 = time.monotonic()
                s = subprocess.Popen([*CLI, "capture", "-r", str(pcap), "--publish", url, "--sensor-id", "bench",
                                      "--partitions", str(a.partitions), "--stream", stream, "-q"])
                rc, s_cpu = cpu_wait(s)
                s_wall = time.monotonic() - t0
                if rc != 0:
                    raise SystemExit(f"capture exited {rc}")
                outs = [work / f"w{k}-{i}.jsonl" for i in range(k)]
                for o in outs:
                    o.unlink(missing_ok=True)
                procs = []
                t0 = time.monotonic()
                for i, parts in enumerate(split(a.partitions, k)):
                    state = work / f"w{k}-{i}.state"
                    for f in (state, state.with_name(state.name + ".nats")):
                        f.unlink(missing_ok=True)
                    procs.append(subprocess.Popen([*CLI, "process", "--consume", url, "--stream", stream,
                                                   "--partitions", parts, "--durable", f"d{i}", "--state", str(state),
                                                   "--no-db", "--log", "none", "--jsonl", str(outs[i]), "-q"]))
                deadline = time.monotonic() + 600
                while lines(outs) < records and time.monotonic() < deadline:
                    time.sleep(0.05)
                wall = time.monotonic() - t0
                got = lines(outs)
                cpu = 0.0
                for q in procs:
                    q.send_signal(signal.SIGTERM)
                for q in procs:
                    cpu += cpu_wait(q)[1]
                if got != records:
                    print(f"  {k} workers: {got} of {records} records", file=sys.stderr)
                results.setdefault(f"NATS, {k} worker(s)", []).append((wall, records / wall, cpu + s_cpu))
                print(f"round {rnd}: sensor {s_wall:.2f} s ({sip_messages / s_wall:.0f} msg/s, cpu {s_cpu:.2f} s); "
                      f"{k} worker(s): {wall:.2f} s, {records / wall:.0f} records/s, cpu {cpu:.2f} s, load {load()}",
                      file=sys.stderr)
    finally:
        nats.send_signal(signal.SIGTERM)
        nats.wait(20)
        shutil.rmtree(store, ignore_errors=True)
    base_cpu = statistics.median(c for _w, _r, c in results["offline -j 0"])
    print(f"\n{a.calls} calls, {sip_messages} SIP messages, {records} records; {os.cpu_count()} CPUs, "
          f"{a.runs} interleaved round(s), medians; load at the end {load()}")
    print(f"{'configuration':24} {'wall s':>8} {'records/s':>10} {'CPU s':>8} {'bus µs/msg':>11}")
    for name, rs in results.items():
        wall = statistics.median(w for w, _r, _c in rs)
        rate = statistics.median(r for _w, r, _c in rs)
        cpu = statistics.median(c for _w, _r, c in rs)
        extra = "" if name.startswith("offline") else f"{(cpu - base_cpu) / sip_messages * 1e6:11.1f}"
        print(f"{name:24} {wall:8.2f} {rate:10.0f} {cpu:8.2f} {extra}")


if __name__ == "__main__":
    main()
