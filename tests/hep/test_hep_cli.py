"""`process --hep-listen` as a service, with real processes on loopback: mistakes are one line
and exit 2 before the work; drops are counted by reason in /metrics; SIGTERM saves --state
like -i does, and the restarted run accounts the call it left open; --duration ends it."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sipsniff_acc.sources.hep import encode
from tests.hep.kamailio_hep import jsonl, start_ours, stop
from tests.servers import free_port

HOST = "127.0.12.1"
A, B = socket.inet_aton("127.0.12.2"), socket.inet_aton("127.0.12.3")


def _msg(kind: str) -> bytes:
    head = {"INVITE": "INVITE sip:bob@127.0.12.3 SIP/2.0", "200": "SIP/2.0 200 OK",
            "ACK": "ACK sip:bob@127.0.12.3 SIP/2.0"}[kind]
    cseq = "1 ACK" if kind == "ACK" else "1 INVITE"
    branch = "z9hG4bK-ack" if kind == "ACK" else "z9hG4bK-inv"
    to_tag = "" if kind == "INVITE" else ";tag=callee1"
    return (f"{head}\r\nVia: SIP/2.0/UDP 127.0.12.2:5060;branch={branch}\r\nFrom: <sip:alice@127.0.12.2>;tag=caller1\r\n"
            f"To: <sip:bob@127.0.12.3>{to_tag}\r\nCall-ID: hep-state-1\r\nCSeq: {cseq}\r\n"
            "Contact: <sip:x@127.0.12.2>\r\nContent-Length: 0\r\n\r\n").encode()


def _send(port: int, kind: str, password: bytes | None = b"pw") -> None:
    src, dst, sport, dport = (B, A, 5060, 5060) if kind == "200" else (A, B, 5060, 5060)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(encode(time.time(), "UDP", src, sport, dst, dport, _msg(kind), 77, password), (HOST, port))


def _port(err: Path) -> int:
    return int(re.search(r"listening on udp://[\d.]+:(\d+)", err.read_text()).group(1))  # type: ignore[union-attr]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args, says", [
    (["--hep-listen", "http://127.0.12.1:9060"], "use udp://ADDR:PORT or tcp://ADDR:PORT"),
    (["--hep-listen", "udp://127.0.12.1"], "use udp://ADDR:PORT"),
    (["--hep-listen", "udp://127.0.12.1:0", "--consume", "nats://127.0.12.1:14222"], "--hep-listen or --consume"),
    (["--hep-listen", "udp://127.0.12.1:0", "tests/pcaps/sample.pcap"], "not two of them"),
    (["--hep-listen", "udp://127.0.12.1:0", "-f", "udp"], "go with --interface, not --hep-listen"),
    (["--hep-listen", "udp://127.0.12.1:0", "--hep-reorder", "20000"], "--hep-reorder 20000 ms: use 0 to 10000"),
    (["--hep-listen", "udp://127.0.12.1:0", "--duration", "0"], "--count and --duration must be positive"),
    (["tests/pcaps/sample.pcap", "--hep-out", "udp://127.0.12.1:0"], "the port must be 1 to 65535"),
    (["tests/pcaps/sample.pcap", "--hep-out", "udp://127.0.12.1:9060", "--hep-agent-id", "-1"], "--hep-agent-id -1"),
    (["tests/pcaps/sample.pcap", "--hep-out", "sctp://127.0.12.1:9060"], "--hep-out"),
])
def test_mistakes_are_one_line_and_exit_2(args: list[str], says: str, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", "--no-db", "--log", "none", *args],
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert says in res.stderr
    assert "Traceback" not in res.stderr


def test_an_address_taken_is_a_usage_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, 0))
        res = _run("--no-db", "--log", "none", "--hep-listen", f"udp://{HOST}:{taken.getsockname()[1]}")
    assert res.returncode == 2 and "cannot listen" in res.stderr and res.stderr.count("\n") == 1


def test_sigterm_saves_the_state_and_the_next_run_accounts_the_call(tmp_path: Path) -> None:
    """The INVITE reaches the first run, SIGTERM stops it (143) with the open call saved;
    the 200 and ACK reach the second: one answered record, made of both runs' messages."""
    common = ["--hep-listen", f"udp://{HOST}:0", "--hep-password", "pw", "--no-db", "--log", "none",
              "--state", str(tmp_path / "state"), "--hep-reorder", "20"]
    metrics = free_port()
    first = start_ours([*common, "--jsonl", str(tmp_path / "a.jsonl"), "--metrics", f"127.0.0.1:{metrics}"],
                       tmp_path, "first")
    try:
        _send(_port(tmp_path / "first.err"), "INVITE")
        deadline = time.monotonic() + 30  # until the INVITE is in the tracker (a busy machine: no fixed sleep)
        while time.monotonic() < deadline and "sipsniff_open_transactions 1.0" not in urllib.request.urlopen(
                f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode():
            time.sleep(0.1)
    finally:
        status = stop(first)
    assert status == 128 + signal.SIGTERM, (tmp_path / "first.err").read_text()
    assert (tmp_path / "state").exists()
    assert jsonl(tmp_path / "a.jsonl") == []
    second = start_ours([*common, "--jsonl", str(tmp_path / "b.jsonl"), "--stats", str(tmp_path / "b.json")],
                        tmp_path, "second")
    try:
        port = _port(tmp_path / "second.err")
        _send(port, "200")
        time.sleep(0.05)
        _send(port, "ACK")
        deadline = time.monotonic() + 20
        while not jsonl(tmp_path / "b.jsonl") and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop(second)
    records = jsonl(tmp_path / "b.jsonl")
    assert [(r["kind"], r["method"], r["code"], r["call_id"], r["capture_agent"]) for r in records] == [
        ("answered", "INVITE", "200", "hep-state-1", "77")]


def test_drops_by_reason_in_metrics_and_duration_ends_the_run(tmp_path: Path) -> None:
    port = free_port()
    started = time.monotonic()
    proc = start_ours(["--hep-listen", f"udp://{HOST}:0", "--hep-password", "pw", "--no-db", "--log", "none",
                       "--metrics", f"127.0.0.1:{port}", "--duration", "6", "--stats", str(tmp_path / "s.json")],
                      tmp_path)
    try:
        hep_port = _port(tmp_path / "ours.err")
        _send(hep_port, "INVITE", password=b"wrong")
        _send(hep_port, "INVITE", password=None)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"HEP3\x00\xff", (HOST, hep_port))
        deadline = time.monotonic() + 20
        text = ""
        while time.monotonic() < deadline and 'reason="hep_truncated"' not in text:
            time.sleep(0.2)
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'sipsniff_skipped_total{reason="hep_auth_wrong"} 1.0' in text
        assert 'sipsniff_skipped_total{reason="hep_auth_missing"} 1.0' in text
        assert 'sipsniff_skipped_total{reason="hep_truncated"} 1.0' in text
        assert proc.wait(60) == 0  # --duration: the end of a run, not a stop
    finally:
        stop(proc)
    assert time.monotonic() - started >= 6
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["hep"]["dropped"] == {"auth_missing": 1, "auth_wrong": 1, "truncated": 1}
    assert "dropped: auth_missing 1, auth_wrong 1, truncated 1" in (tmp_path / "ours.err").read_text()


CAPTURE = Path(__file__).resolve().parents[1] / "conformance" / "cases" / "tcp_caller" / "capture.pcap"


def test_hep_out_over_tcp_and_a_relay_keep_every_message_as_it_was(tmp_path: Path) -> None:
    """process FILE --hep-out tcp:// → process --hep-listen tcp:// --hep-out udp:// → a collector:
    every SIP message of the capture arrives once, with its addresses, ports, transport and time
    (µs) as in the capture, and the relay's agent id."""
    from sipsniff_acc.sources.hep import decode

    msgs = [json.loads(ln) for ln in subprocess.run(
        [sys.executable, "-m", "sipsniff_acc", "messages", "-q", str(CAPTURE)], capture_output=True, text=True,
        timeout=120, check=True).stdout.splitlines()]
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind((HOST, 0))
    collector.settimeout(0.5)
    with collector:
        relay = start_ours(["--hep-listen", f"tcp://{HOST}:0", "--no-db", "--log", "none", "--hep-out",
                            f"udp://{HOST}:{collector.getsockname()[1]}", "--hep-agent-id", "31"], tmp_path, "relay")
        try:
            port = int(re.search(r"listening on tcp://[\d.]+:(\d+)", (tmp_path / "relay.err").read_text()).group(1))  # type: ignore[union-attr]
            res = _run(str(CAPTURE), "--no-db", "--log", "none", "-j", "0", "--hep-out", f"tcp://{HOST}:{port}",
                       "--hep-agent-id", "30", "--stats", str(tmp_path / "sender.json"))
            assert res.returncode == 0, res.stderr
            got = []
            deadline = time.monotonic() + 30
            while len(got) < len(msgs) and time.monotonic() < deadline:
                try:
                    got.append(decode(collector.recv(65536)))
                except TimeoutError:
                    continue
        finally:
            stop(relay)
    assert json.loads((tmp_path / "sender.json").read_text())["hep_out"]["lost"] == {}
    want = sorted((round(m["ts"] * 1e6), m["src"], m["sport"], m["dst"], m["dport"], m["transport"]) for m in msgs)
    names = {17: "UDP", 6: "TCP"}
    assert sorted((p.ts_sec * 1_000_000 + p.ts_usec, socket.inet_ntoa(p.src), p.sport, socket.inet_ntoa(p.dst),
                   p.dport, names[p.proto]) for p in got) == want
    assert {p.agent_id for p in got} == {31}
    assert {m["transport"] for m in msgs} == {"UDP", "TCP"}


def test_messages_lists_what_hep_senders_mirror(tmp_path: Path) -> None:
    """`messages --hep-listen`: one line per SIP message, with the sender's addresses and time."""
    err = open(tmp_path / "m.err", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "sipsniff_acc", "messages", "--hep-listen", f"udp://{HOST}:0",
                             "--hep-password", "pw", "--duration", "4", "-o", str(tmp_path / "m.jsonl"),
                             "--stats", str(tmp_path / "m.json")], stderr=err)
    try:
        deadline = time.monotonic() + 60
        while "listening on" not in (tmp_path / "m.err").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        port = _port(tmp_path / "m.err")
        for kind in ("INVITE", "200", "ACK"):
            _send(port, kind)
            time.sleep(0.01)
        _send(port, "ACK", password=b"bad")
        assert proc.wait(60) == 0
    finally:
        stop(proc)
        err.close()
    lines = [json.loads(ln) for ln in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [(m["method"], m["status"], m["src"], m["dst"]) for m in lines] == [
        ("INVITE", None, "127.0.12.2", "127.0.12.3"), (None, 200, "127.0.12.3", "127.0.12.2"),
        ("ACK", None, "127.0.12.2", "127.0.12.3")]
    assert json.loads((tmp_path / "m.json").read_text())["hep"]["dropped"] == {"auth_wrong": 1}
