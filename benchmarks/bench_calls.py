#!/usr/bin/env python3
"""Per-message cost of --calls (calls.CallBuilder) beside the acc pipeline, on a generated workload.

The capture is parsed once (MessagePipeline); then, interleaved --runs times, the messages go
through the acc pipeline alone (tracker + engine, what `process` does per message) and through
CallBuilder alone. CPU time (process_time), so a loaded machine distorts it less than wall time.

usage: bench_calls.py [--calls 10000] [--runs 3] [--workdir benchmarks/out]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sipsniff_acc.calls import CallBuilder  # noqa: E402
from sipsniff_acc.pipeline import MessagePipeline  # noqa: E402
from sipsniff_acc.processrun import AccPipeline  # noqa: E402
from sipsniff_acc.rules import RulesFile  # noqa: E402
from sipsniff_acc.sip import SipMessage  # noqa: E402
from sipsniff_acc.sources.pcapfile import CaptureReader  # noqa: E402


def messages(pcap: Path) -> list[SipMessage]:
    mp = MessagePipeline()
    out = [m for f in CaptureReader(str(pcap)) for m in mp.feed(f) if isinstance(m, SipMessage)]
    return out + [m for m in mp.finish() if isinstance(m, SipMessage)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default=str(HERE / "out"))
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    pcap = work / f"calls-{a.calls}.pcap"
    if not pcap.exists():
        subprocess.run([sys.executable, str(HERE / "gen_workload.py"), str(pcap), "--calls", str(a.calls)], check=True)
    msgs = messages(pcap)
    gc.collect()
    gc.freeze()  # the parsed messages held for the runs are not scanned by every collection (a real run holds none)
    acc_t, calls_t = [], []
    for _ in range(a.runs):
        acc = AccPipeline(RulesFile())
        t = time.process_time()
        for m in msgs:
            acc.feed(m)
        acc.finish()
        acc_t.append(time.process_time() - t)
        b = CallBuilder()
        t = time.process_time()
        n = 0
        for m in msgs:
            n += len(b.feed(m))
        n += len(b.finish())
        calls_t.append(time.process_time() - t)
    per = 1e6 / len(msgs)
    print(f"{len(msgs)} SIP messages, {n} calls, {a.runs} runs (median CPU time)")
    print(f"acc pipeline (tracker + engine): {statistics.median(acc_t) * per:.2f} us/message")
    print(f"CallBuilder (--calls):           {statistics.median(calls_t) * per:.2f} us/message")


if __name__ == "__main__":
    main()
