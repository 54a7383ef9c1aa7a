"""Scale-out on NATS JetStream with real servers: two sensors (``capture --publish``) each
publish one leg of a generated capture, three workers (``process --consume``) account their
partitions into one PostgreSQL; one worker is SIGKILLed mid-run and restarted. The rows must
be exactly those of one offline ``process`` of the whole capture: none missing, none twice."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.nats.natsserver import NatsServer, nats_server  # noqa: F401 - fixture
from tests.servers import Postgres, postgres, stop_process  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[2]
WAIT = 180.0  #: seconds any one wait may take on 2 busy cores (generous: never a timing assertion)
PARTITIONS = 6


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sipsniff_acc", *args]


def generate(out: Path, calls: int, window: float, seed: int = 7) -> None:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gen_workload.py"), str(out), "--calls", str(calls),
                    "--window", str(window), "--seed", str(seed)], check=True, capture_output=True, timeout=120)


def split_pcap(src: Path, outs: dict[str, Path], which: Callable[[float, bytes], str]) -> dict[str, int]:
    """Classic pcap ``src`` → one file per key of ``outs``; ``which(ts, frame)`` picks the file."""
    data = src.read_bytes()
    head, off = data[:24], 24
    assert struct.unpack_from("<I", head)[0] == 0xA1B2C3D4  # gen_workload: µs, little-endian
    files = {k: open(p, "wb") for k, p in outs.items()}
    counts = dict.fromkeys(outs, 0)
    try:
        for f in files.values():
            f.write(head)
        while off + 16 <= len(data):
            sec, usec, incl, _orig = struct.unpack_from("<IIII", data, off)
            rec = data[off:off + 16 + incl]
            k = which(sec + usec / 1e6, data[off + 16:off + 16 + incl])
            files[k].write(rec)
            counts[k] += 1
            off += 16 + incl
    finally:
        for f in files.values():
            f.close()
    return counts


def uac_side(frame: bytes) -> bool:
    """Leg A (UACs 10.1.0.0/16 <-> proxy) or leg B (proxy <-> UASes): by the IPv4 addresses."""
    assert frame[12:14] == b"\x08\x00"
    return frame[26] == 10 and frame[27] == 1 or frame[30] == 10 and frame[31] == 1


def pcap_times(src: Path) -> list[float]:
    data, off, out = src.read_bytes(), 24, []
    while off + 16 <= len(data):
        sec, usec, incl, _ = struct.unpack_from("<IIII", data, off)
        out.append(sec + usec / 1e6)
        off += 16 + incl
    return out


def create_db(pg: Postgres, name: str) -> str:
    import psycopg
    with psycopg.connect(f"host=127.0.0.1 port={pg.port} user=sipsniff dbname=acc", autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    return pg.url.rsplit("/", 1)[0] + "/" + name


def rows(pg: Postgres, db: str, table: str) -> list[tuple[object, ...]]:
    import psycopg
    with psycopg.connect(f"host=127.0.0.1 port={pg.port} user=sipsniff dbname={db}") as con:
        cols = [r[0] for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s AND column_name <> 'id' "
            "ORDER BY column_name", (table,)).fetchall()]
        if not cols:
            return []
        return sorted(con.execute(f"SELECT {', '.join(cols)} FROM {table}").fetchall(), key=repr)


def count(pg: Postgres, db: str) -> int:
    try:
        return len(rows(pg, db, "acc")) + len(rows(pg, db, "missed_calls"))
    except Exception:  # noqa: BLE001 - tables not made yet
        return 0


def calls_in_state(path: Path) -> int:
    """Dialogs held in a worker's state file (read from a copy: a load renames a bad file)."""
    from sipsniff_acc.cli import _rules_or_exit
    from sipsniff_acc.processrun import AccPipeline
    from sipsniff_acc.state import load_state

    if not path.exists():
        return 0
    copy = path.with_name(path.name + ".peek")
    copy.write_bytes(path.read_bytes())
    acc = AccPipeline(_rules_or_exit(None))
    load_state(copy, acc)
    return len(acc.tracker.dialogs)


def own_rows(pg: Postgres, parts: tuple[int, ...]) -> int:
    """Rows of the calls in these partitions (the Call-ID hash the sensors partition by)."""
    try:
        ids = [r[0] for r in Postgres.query(pg, "SELECT callid FROM acc UNION ALL SELECT callid FROM missed_calls")]
    except Exception:  # noqa: BLE001 - tables not made yet
        return 0
    return sum(1 for c in ids if zlib.crc32(str(c).encode()) % PARTITIONS in parts)


class Worker:
    def __init__(self, tmp: Path, name: str, parts: str, nats: str, db: str) -> None:
        self.name, self.tmp = name, tmp
        self.args = cli("process", "--consume", nats, "--partitions", parts, "--state", str(tmp / f"{name}.state"),
                        "--spool", str(tmp / f"{name}.spool"), "--db-url", db, "--log", "none",
                        "--reorder-window", "3000", "--durable", "acc")
        self.logs: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.tmp / f"{self.name}.{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(self.args, stdout=f, stderr=subprocess.STDOUT, cwd=self.tmp)

    def text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs)


def sensors(tmp: Path, nats: str, files: dict[str, Path]) -> None:
    """One sensor process per file, all at once; each must publish everything (exit 0)."""
    procs = {}
    for sensor, f in files.items():
        log = open(tmp / f"sensor-{f.stem}.log", "wb")
        procs[sensor] = (subprocess.Popen(cli("capture", "-r", str(f), "--publish", nats, "--sensor-id", sensor,
                                              "--partitions", str(PARTITIONS), "--stream", "sip"),
                                          stdout=log, stderr=subprocess.STDOUT), log, f)
    for sensor, (p, log, f) in procs.items():
        rc = p.wait(WAIT)
        log.close()
        assert rc == 0, (tmp / f"sensor-{f.stem}.log").read_text()


def wait_for(cond: Callable[[], bool], what: str, procs: list[Worker]) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if cond():
            return
        for w in procs:
            if w.proc is not None and w.proc.poll() is not None:
                pytest.fail(f"worker {w.name} exited {w.proc.returncode} while waiting for {what}: {w.text()}")
        time.sleep(0.2)
    pytest.fail(f"not within {WAIT} s: {what} (last: {cond.__doc__}); " + " | ".join(w.text()[-800:] for w in procs))


@pytest.mark.parametrize("kill_when", ["rows", "state"])
def test_two_sensors_three_workers_one_killed(tmp_path: Path, nats_server: NatsServer, postgres: Postgres,
                                              kill_when: str) -> None:
    """``rows``: killed once its first records are in PostgreSQL (maybe before the state that
    goes with them: the replay makes them again, inserted once); ``state``: once its state holds
    open calls (the restart must carry them on)."""
    capture = tmp_path / "all.pcap"
    generate(capture, calls=150, window=40)
    times = sorted(pcap_times(capture))
    mid = times[len(times) // 2]  # calls open across the middle carry state over the kill
    names = {k: tmp_path / f"{k}.pcap" for k in ("a1", "b1", "a2", "b2")}
    counts = split_pcap(capture, names, lambda ts, fr: ("a" if uac_side(fr) else "b") + ("1" if ts < mid else "2"))
    assert all(counts.values()), counts

    offline_db = create_db(postgres, "offline")
    done = subprocess.run(cli("process", str(capture), "--db-url", offline_db, "--spool", str(tmp_path / "off.spool"),
                              "--log", "none", "-q"), capture_output=True, timeout=WAIT, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    expected = {t: rows(postgres, "offline", t) for t in ("acc", "missed_calls")}
    total = sum(len(v) for v in expected.values())
    assert total > 100

    # phase 1: both sensors publish the first half of their leg; then the workers start
    sensors(tmp_path, nats_server.url, {"span-a": names["a1"], "span-b": names["b1"]})
    workers = [Worker(tmp_path, f"w{i}", f"{2 * i}-{2 * i + 1}", nats_server.url, postgres.url) for i in range(3)]
    try:
        for w in workers:
            w.start()
        victim = workers[1]
        # mid-run: it has checkpointed and its calls have rows (open calls in its state), more is coming
        if kill_when == "rows":
            wait_for(lambda: (tmp_path / "w1.state.nats").exists() and own_rows(postgres, (2, 3)) > 0,
                     "w1's first rows and checkpoint", workers)
        else:
            wait_for(lambda: calls_in_state(tmp_path / "w1.state") > 0, "w1's state with calls", workers)
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(WAIT)
        # phase 2 while w1 is dead: its partitions wait on the bus
        sensors(tmp_path, nats_server.url, {"span-a": names["a2"], "span-b": names["b2"]})
        victim.start()
        def enough() -> bool:
            n = count(postgres, "acc")
            enough.__doc__ = f"{n} rows"
            return n >= total
        wait_for(enough, f"{total} rows", workers)
        time.sleep(3)  # anything extra (a record twice, or a wrong one) would land now
        for w in workers:
            assert w.proc is not None
            w.proc.send_signal(signal.SIGTERM)
        for w in workers:
            assert w.proc is not None
            assert w.proc.wait(WAIT) == 128 + signal.SIGTERM, w.text()
    finally:
        for w in workers:
            stop_process(w.proc, signal.SIGKILL)
    got = {t: rows(postgres, "acc", t) for t in ("acc", "missed_calls")}
    for t in expected:
        missing = [r for r in expected[t] if r not in got[t]]
        extra = [r for r in got[t] if r not in expected[t]]
        assert not missing and not extra, (t, missing[:3], extra[:3])
        assert got[t] == expected[t]  # the same multiset: none twice
    restarted = victim.logs[-1].read_text()
    assert "restored" in restarted, restarted  # it resumed from its state
    if kill_when == "state":
        assert "restored 0 transactions, 0 dialogs" not in restarted, restarted  # and the calls in it
    for w in workers:
        assert " 0 bad" in w.text(), w.text()


def test_late_sensor_is_counted(tmp_path: Path, nats_server: NatsServer) -> None:
    """A sensor whose messages reach the worker after the window, behind the other leg's later
    messages: they are fed anyway and counted (anomaly nats_reorder_late), never dropped."""
    capture = tmp_path / "all.pcap"
    generate(capture, calls=20, window=10)
    names = {k: tmp_path / f"{k}.pcap" for k in ("a", "b")}
    split_pcap(capture, names, lambda _ts, fr: "a" if uac_side(fr) else "b")
    sensors(tmp_path, nats_server.url, {"span-a": names["a"]})
    stats = tmp_path / "stats.json"
    w = Worker(tmp_path, "late", "0-5", nats_server.url, "sqlite:///" + str(tmp_path / "acc.db"))
    w.args += ["--stats", str(stats)]
    w.args[w.args.index("--reorder-window") + 1] = "0"
    try:
        w.start()
        # leg A is released (its messages acknowledged) before leg B is even published
        wait_for(lambda: (tmp_path / "late.state.nats").exists() and "floor\": 0" not in
                 (tmp_path / "late.state.nats").read_text(), "leg A consumed", [w])
        sensors(tmp_path, nats_server.url, {"span-b": names["b"]})
        time.sleep(3)
        assert w.proc is not None
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(WAIT) == 128 + signal.SIGTERM, w.text()
    finally:
        stop_process(w.proc, signal.SIGKILL)
    import json
    doc = json.loads(stats.read_text())
    assert doc["anomalies"].get("nats_reorder_late", 0) > 0, doc["anomalies"]
    assert doc["sip_messages"] == sum(1 for _ in pcap_times(capture))  # every message fed, late or not
