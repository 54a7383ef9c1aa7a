"""Red team on --metrics: a hostile network must not be able to grow the label values of the
Prometheus endpoint without bound (each new value is a new time series in the scraper's
database), and a storm of scrapes must not slow or leak the run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.builders import sip_request
from tests.ops.calls import UAC, UAS, _frame, filler, finish, header, send, start, wait_reading_stdin
from tests.ops.test_metrics import free_port, scrape

HOST = "127.0.10.1"  #: S10's loopback addresses

if not Path("/proc/self/syscall").exists():
    pytest.skip("needs Linux's /proc/PID/syscall to see the run waiting for input", allow_module_level=True)


def hostile(i: int, t: float) -> bytes:
    """A request with a made-up method (any RFC 3261 token is a method) that nobody answers."""
    method = f"X{i:04d}EVIL"
    return _frame(t, sip_request(method, call_id=f"h{i}", branch=f"z9hG4bK-h{i}", from_tag=f"f{i}"), UAC, UAS)


def test_made_up_methods_do_not_grow_label_values(tmp_path: Path) -> None:
    port = free_port(HOST)
    proc = start(tmp_path, "--log", "none", "--metrics", f"{HOST}:{port}")
    try:
        send(proc, header() + b"".join(hostile(i, 1000 + i * 0.001) for i in range(300)))
        send(proc, b"".join(filler(1000 + s) for s in range(1, 80, 2)))  # past every transaction timer
        wait_reading_stdin(proc)
        values = scrape_any(port)
    finally:
        finish(proc)
    timed_out = {dict(lbl).get("method") for (name, lbl) in values if name == "sipsniff_transactions_timed_out_total"}
    assert sum(v for (name, _), v in values.items() if name == "sipsniff_transactions_timed_out_total") == 300
    assert len(timed_out) <= 20, sorted(timed_out)[:30]
    every_label = {v for (_, lbl) in values for (_, v) in lbl}
    assert not any("EVIL" in v for v in every_label)


def scrape_any(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    import tests.ops.test_metrics as tm
    old, tm.HOST = tm.HOST, HOST
    try:
        return scrape(port)
    finally:
        tm.HOST = old


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_scrape_storm_neither_leaks_nor_stalls(tmp_path: Path) -> None:
    """1,000 scrapes while the run works: RSS grows by less than 8 MB between the 200th and the
    1,000th scrape (a leak per scrape would show), and the run still takes its input at once."""
    port = free_port(HOST)
    proc = start(tmp_path, "--log", "none", "--metrics", f"{HOST}:{port}")
    try:
        send(proc, header() + b"".join(hostile(i, 1000 + i * 0.001) for i in range(50)))
        wait_reading_stdin(proc)
        deadline = time.monotonic() + 60
        for _ in range(200):
            scrape_any(port)
        base = rss_kb(proc.pid)
        for _ in range(800):
            scrape_any(port)
        assert time.monotonic() < deadline
        grown = rss_kb(proc.pid) - base
        t0 = time.monotonic()
        send(proc, b"".join(filler(1001 + s * 0.01) for s in range(200)))
        wait_reading_stdin(proc)
        took = time.monotonic() - t0
    finally:
        rc = finish(proc)
    assert rc == 0, (tmp_path / "stderr").read_text()
    assert grown < 8 * 1024, f"RSS grew {grown} kB over 800 scrapes"
    assert took < 5, took
    print(f"RSS growth over 800 scrapes: {grown} kB; 200 frames after the storm taken in {took:.2f} s")


def test_made_up_methods_do_not_grow_the_summary(tmp_path: Path) -> None:
    """The summary's 'given up without a final reply' line named every made-up method: 300
    requests made a 4 kB line (a month of them, megabytes). Now the tracker keys them all
    as "other" (sipmethods.py): one entry."""
    proc = start(tmp_path, "--log", "none")
    send(proc, header() + b"".join(hostile(i, 1000 + i * 0.001) for i in range(300)))
    send(proc, b"".join(filler(1000 + s) for s in range(1, 80, 2)))
    assert finish(proc) == 0
    err = (tmp_path / "stderr").read_text()
    line = next(x for x in err.splitlines() if "given up without a final reply" in x)
    assert len(line) < 400, line
    assert "300 other" in line, line
