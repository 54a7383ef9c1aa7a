"""--metrics HOST:PORT: scraped with real HTTP during a `process -` run fed through a pipe; the
values equal the run's own summary (--stats); bad addresses are one line, exit 2, before any
output is opened; the endpoint listens only where told, and only while the run lasts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PCAPS
from tests.ops.calls import (
    settled, call, cmd, env, filler, finish, header, invite, records, send, start, wait_for_text, wait_reading_stdin,
)
from tests.ops.test_reload import OLD

HOST = "127.0.3.1"  #: this slice's loopback addresses: no collision with other tests' servers

if not Path("/proc/self/syscall").exists():
    pytest.skip("needs Linux's /proc/PID/syscall to see the run waiting for input", allow_module_level=True)


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as r:  # noqa: S310 - our own test server
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_scraped_values_match_the_summary(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    settled(rules, OLD)
    port = free_port()
    proc = start(tmp_path, "-m", str(rules), "--jsonl", "records.jsonl", "--log", "none",
                 "--metrics", f"{HOST}:{port}", "--stats", "stats.json")
    err = tmp_path / "stderr"
    try:
        send(proc, header())
        wait_reading_stdin(proc)
        first = scrape(port)
        assert first[("sipsniff_packets_total", ())] == 0
        send(proc, call("A", 1000) + call("B", 1003) + invite("C", 1006) + filler(1007))
        wait_reading_stdin(proc)
        during = scrape(port)
        os.kill(proc.pid, signal.SIGHUP)  # the same file again: a reload that succeeds
        send(proc, filler(1008))
        wait_for_text(err, "notice: rules reloaded")
        wait_reading_stdin(proc)
        last = scrape(port)
    finally:
        status = finish(proc)
    assert status == 0, err.read_text()
    stats = json.loads((tmp_path / "stats.json").read_text())
    # every frame (10 SIP + INVITE C + 2 fillers) and every SIP message, as the summary counts them
    assert last[("sipsniff_packets_total", ())] == stats["frames"] == 13
    assert last[("sipsniff_bytes_total", ())] == stats["bytes"]
    assert last[("sipsniff_sip_messages_total", ())] == stats["sip_messages"] == 11
    assert during[("sipsniff_packets_total", ())] == 12
    # records by kind: A and B answered; C (open) is not accounted before the end of input
    assert last[("sipsniff_records_total", (("kind", "answered"),))] == stats["records"]["answered"] == 2
    assert len(records(tmp_path / "records.jsonl")) == 2
    assert last[("sipsniff_records_flagged_total", (("backend", "log"),))] == stats["records_by_backend"]["log"]
    for role, n in stats["tracker"]["transactions"].items():
        assert last[("sipsniff_transactions_total", (("role", role),))] == n
    assert during.get(("sipsniff_rule_reloads_total", (("result", "ok"),))) == 0
    assert last[("sipsniff_rule_reloads_total", (("result", "ok"),))] == 1
    assert last[("sipsniff_rule_reloads_total", (("result", "refused"),))] == 0
    # the endpoint went away with the run
    with pytest.raises(OSError):
        socket.create_connection((HOST, port), timeout=2).close()


def test_listens_only_where_told(tmp_path: Path) -> None:
    port = free_port()
    proc = start(tmp_path, "--log", "none", "--metrics", f"{HOST}:{port}")
    try:
        send(proc, header())
        wait_reading_stdin(proc)
        scrape(port)
        with pytest.raises(OSError):  # 127.0.0.1: the same port, another address: nothing there
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        assert finish(proc) == 0


@pytest.mark.parametrize(("address", "why"), [
    ("nonsense", "use HOST:PORT"),
    (f"{HOST}:0", "the port must be 1 to 65535"),
    (f"{HOST}:70000", "the port must be 1 to 65535"),
    ("192.0.2.77:9466", "cannot listen: Cannot assign requested address"),
    ("no-such-host.invalid:9466", "cannot resolve"),
])
def test_bad_address_is_one_line_before_any_output(tmp_path: Path, address: str, why: str) -> None:
    res = subprocess.run(cmd("process", str(PCAPS / "sample.pcap"), "--no-db", "--jsonl", "out.jsonl",
                             "--metrics", address), cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert len(res.stderr.splitlines()) == 1 and why in res.stderr, res.stderr
    assert res.stderr.startswith("error: --metrics ")
    assert not (tmp_path / "out.jsonl").exists()


def test_port_taken_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        port = s.getsockname()[1]
        res = subprocess.run(cmd("process", str(PCAPS / "sample.pcap"), "--no-db", "--jsonl", "out.jsonl",
                                 "--metrics", f"{HOST}:{port}"), cwd=tmp_path, env=env(), capture_output=True,
                             text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr == f"error: --metrics {HOST}:{port}: cannot listen: Address already in use\n"
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="live capture needs root or CAP_NET_RAW")
def test_live_capture_counters(tmp_path: Path) -> None:
    """`process -i lo` until SIGTERM: the kernel's packet and drop counters per interface, the
    promiscuous flag and the SIP messages, scraped while it runs, equal its --stats at the end."""
    port = free_port()
    err = tmp_path / "stderr"
    proc = subprocess.Popen(cmd("process", "-i", "lo", "-f", "udp port 5060 and host 127.0.3.2", "--no-db",
                                "--log", "none", "--metrics", f"{HOST}:{port}", "--stats", "stats.json"),
                            cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=err.open("wb"))
    try:
        wait_for_text(err, "listening on lo")
        options = (b"OPTIONS sip:probe@127.0.3.2 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.3.1:5062;branch=z9hG4bK-m\r\n"
                   b"From: <sip:s3@127.0.3.1>;tag=m\r\nTo: <sip:probe@127.0.3.2>\r\nCall-ID: s3-metrics\r\n"
                   b"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.3.1", 0))
            for _ in range(20):
                s.sendto(options, ("127.0.3.2", 5060))
        deadline = time.monotonic() + 20
        got: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        while time.monotonic() < deadline:  # the kernel's counters are folded in at least every second
            got = scrape(port)
            if got.get(("sipsniff_capture_kernel_packets_total", (("interface", "lo"),)), 0) >= 20 \
                    and got[("sipsniff_sip_messages_total", ())] >= 20:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert status == 128 + signal.SIGTERM, err.read_text()
    stats = json.loads((tmp_path / "stats.json").read_text())
    lo = stats["capture"]["interfaces"]["lo"]
    # the filter lets IP fragments through (other tests' traffic on lo may add some): at least
    # ours, and never more than the run's own final count
    assert 20 <= got[("sipsniff_capture_kernel_packets_total", (("interface", "lo"),))] <= lo["packets"]
    assert got[("sipsniff_capture_dropped_total", (("interface", "lo"), ("where", "kernel")))] == lo["dropped"] == 0
    assert got[("sipsniff_capture_promiscuous", (("interface", "lo"),))] == 1
    assert 20 <= got[("sipsniff_sip_messages_total", ())] <= stats["sip_messages"]
    assert got[("sipsniff_packets_total", ())] <= stats["frames"]
    assert not any(name == "sipsniff_capture_gaps_total" for name, _l in got)  # no drop report: no gap
