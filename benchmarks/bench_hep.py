#!/usr/bin/env python3
"""HEP in and out, measured: what ``--hep-listen`` and ``--hep-out`` cost per SIP message.

1. A generated workload (gen_workload.py) is read once to get its SIP messages, encoded as
   HEPv3 (Kamailio's chunk set) and streamed over TCP (backpressure: nothing is dropped) to
   ``process --hep-listen tcp://127.0.12.1:PORT --count N -j 0``. Reported: wall time,
   messages/s, the process's CPU per message, and its records beside ``process FILE -j 0``
   on the same capture (they must be the same number).
2. ``process FILE -j 0`` with and without ``--hep-out udp://...`` (a reader drains the copies):
   the CPU the copy adds per message, and how many copies arrived.

usage: bench_hep.py [--calls 3000] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sipsniff_acc.events import Datagram  # noqa: E402
from sipsniff_acc.pipeline import CaptureStage  # noqa: E402
from sipsniff_acc.sources import CaptureReader  # noqa: E402
from sipsniff_acc.sources.hep import encode  # noqa: E402

HOST = "127.0.12.1"


def messages_of(pcap: Path) -> list[Datagram]:
    stage = CaptureStage()
    out: list[Datagram] = []
    for frame in CaptureReader(str(pcap)):
        out += [d for d in stage.feed(frame) if isinstance(d, Datagram)]
    out += [d for d in stage.finish() if isinstance(d, Datagram)]
    return out


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def run_listen(packets: list[bytes], work: Path) -> tuple[float, float, int]:
    """(wall s, CPU s, records) of process --hep-listen fed every packet over TCP."""
    port = free_port()
    out = work / "hep.jsonl"
    err = open(work / "hep.err", "wb")  # noqa: SIM115
    cpu0 = child_cpu()
    proc = subprocess.Popen([sys.executable, "-m", "sipsniff_acc", "process", "--hep-listen", f"tcp://{HOST}:{port}",
                             "--count", str(len(packets)), "-j", "0", "--no-db", "--log", "none", "--jsonl", str(out)],
                            stderr=err, cwd=work)
    deadline = time.monotonic() + 60
    while "listening on" not in (work / "hep.err").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.perf_counter()
    with socket.create_connection((HOST, port)) as s:
        s.sendall(b"".join(packets))
        proc.wait(600)
    wall = time.perf_counter() - t0
    err.close()
    return wall, child_cpu() - cpu0, sum(1 for _ in out.open())


def run_file(pcap: Path, work: Path, hep_out: str | None = None) -> tuple[float, int]:
    cpu0 = child_cpu()
    out = work / "file.jsonl"
    subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", str(pcap), "-j", "0", "--no-db", "--log", "none",
                    "--jsonl", str(out), "-q", *(["--hep-out", hep_out] if hep_out else [])], check=True, cwd=work,
                   timeout=600)
    return child_cpu() - cpu0, sum(1 for _ in out.open())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pcap = work / "w.pcap"
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "gen_workload.py"), str(pcap), "--calls",
                        str(args.calls)], check=True, capture_output=True)
        msgs = messages_of(pcap)
        packets = [encode(d.ts, d.transport, d.src, d.sport, d.dst, d.dport, d.payload, 2001, b"pw") for d in msgs]
        n = len(packets)
        listen, plain, copied = [], [], []
        got = [0]

        def drain(sock: socket.socket) -> None:
            while True:
                try:
                    sock.recv(65536)
                    got[0] += 1
                except OSError:
                    return

        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sink.bind((HOST, 0))
        threading.Thread(target=drain, args=(sink,), daemon=True).start()
        sink_url = f"udp://{HOST}:{sink.getsockname()[1]}"
        recs = {}
        for _ in range(args.runs):
            wall, cpu, recs["listen"] = run_listen(packets, work)
            listen.append((wall, cpu))
            cpu, recs["file"] = run_file(pcap, work)
            plain.append(cpu)
            got[0] = 0
            cpu, recs["copy"] = run_file(pcap, work, sink_url)
            time.sleep(0.5)
            copied.append((cpu, got[0]))
        sink.close()
        wall = statistics.median(w for w, _c in listen)
        lcpu = statistics.median(c for _w, c in listen)
        fcpu = statistics.median(plain)
        ccpu = statistics.median(c for c, _g in copied)
        print(json.dumps({
            "calls": args.calls, "sip_messages": n, "runs": args.runs, "records": recs,
            "hep_listen": {"wall_s": round(wall, 2), "msgs_per_s": round(n / wall), "cpu_s": round(lcpu, 2),
                           "cpu_us_per_msg": round(lcpu / n * 1e6, 1)},
            "file_j0": {"cpu_s": round(fcpu, 2), "cpu_us_per_msg": round(fcpu / n * 1e6, 1)},
            "file_j0_hep_out": {"cpu_s": round(ccpu, 2), "added_us_per_msg": round((ccpu - fcpu) / n * 1e6, 1),
                                "copies_received": [g for _c, g in copied]},
        }, indent=1))


if __name__ == "__main__":
    main()
