#!/usr/bin/env python3
"""Rows/s into SQLite, PostgreSQL and MariaDB, through the durable spool, batched.

The records of a generated workload (default 50k calls) are made once with `process
--no-db --jsonl`; then, per database (servers started on loopback as the tests do), the
same records go through SpooledEmitter → SqlEmitter with the CLI's batching, and the
wall time is measured (spool append + fsync, INSERT ... IGNORE per batch, spool ack). A
second pass re-delivers everything (all ids exist): the cost of an idempotent retry.
The engine's own record rate on the same file is printed beside it.

usage: bench_sql.py [--calls 50000] [--workdir benchmarks/out] [--batch 500]   (root, or a postgres user)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sipsniff_acc.emitters.spool import DurableSpool, SpooledEmitter, from_json  # noqa: E402
from sipsniff_acc.emitters.sql import SqlEmitter  # noqa: E402
from sipsniff_acc.records import AccRecord  # noqa: E402
from sipsniff_acc.rules import load_rules  # noqa: E402
from tests.servers import MariaDB, Postgres  # noqa: E402 - the same loopback servers as the tests

sys.path.insert(0, str(HERE))
from bench_messages import workload  # noqa: E402


def records_of(pcap: Path, rules: Path, work: Path) -> tuple[list[AccRecord], float]:
    out = work / "bench-records.jsonl"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", str(pcap), "--rules", str(rules), "--no-db",
                    "--log", "none", "--jsonl", str(out), "-q", "--no-progress"], check=True)
    wall = time.perf_counter() - t0
    recs = [from_json(line) for line in out.read_bytes().splitlines()]
    out.unlink()
    return recs, wall


def load(url: str, recs: list[AccRecord], rules_path: Path, spool: Path, batch: int) -> float:
    rules = load_rules(rules_path)
    em = SpooledEmitter(SqlEmitter(url, rules), DurableSpool(spool), batch=batch)
    t0 = time.perf_counter()
    for i in range(0, len(recs), 1000):  # the engine hands records over in small groups
        em.emit(recs[i : i + 1000])
    em.close()
    wall = time.perf_counter() - t0
    assert em.pending == 0 and em.delivered == len(recs), (em.pending, em.delivered)
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=50000)
    ap.add_argument("--workdir", default=str(HERE / "out"))
    ap.add_argument("--batch", type=int, default=500)
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    pcap, _meta = workload(work, a.calls)
    rules = HERE.parent / "rules.yaml"
    recs, engine_wall = records_of(pcap, rules, work)
    n = sum(1 for r in recs if "db" in r.backends)
    print(f"{len(recs)} records from {pcap.name}; engine alone: {engine_wall:.1f} s = {len(recs) / engine_wall:.0f} records/s")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        pg, my = Postgres(t), MariaDB(t)
        try:
            rows = []
            for name, url in (("sqlite", f"sqlite:///{t / 'acc.db'}"), ("postgresql", pg.url), ("mariadb", my.url)):
                first = load(url, recs, rules, t / f"{name}.spool", a.batch)
                again = load(url, recs, rules, t / f"{name}.spool2", a.batch)
                rows.append((name, first, again))
        finally:
            pg.stop()
            my.stop()
            import shutil
            shutil.rmtree(pg.dir, ignore_errors=True)
    print(f"{'database':>10} {'rows':>8} {'first load s':>12} {'rows/s':>8} {'re-delivery s':>13} {'rows/s':>8}")
    for name, first, again in rows:
        print(f"{name:>10} {n:>8} {first:>12.2f} {n / first:>8.0f} {again:>13.2f} {n / again:>8.0f}")
    print(json.dumps({name: round(n / first) for name, first, _ in rows}))


if __name__ == "__main__":
    main()
