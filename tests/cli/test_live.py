"""Live capture on loopback (AF_PACKET): real packets sent by this test, seen by the command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.builders import SDP, sip_request, sip_response


def _require_capture_rights() -> None:
    if os.geteuid() != 0:
        reason = "live capture needs root (AF_PACKET)"
        if os.environ.get("SIPSNIFF_REQUIRE_SERVERS") == "1":
            pytest.fail(f"{reason}, and SIPSNIFF_REQUIRE_SERVERS=1 forbids skipping")
        pytest.skip(reason)


def test_live_capture_on_loopback_sees_udp_and_tcp_sip(tmp_path: Path) -> None:
    _require_capture_rights()
    stats = tmp_path / "s.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sipsniff_acc", "messages", "-i", "lo", "--duration", "6", "--stats", str(stats), "-j", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1.5)  # the socket is open well before this
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(3):
            udp.sendto(sip_request(call_id=f"live-udp-{i}@test", body=SDP), ("127.0.0.1", 45060))
        udp.close()
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(5)
                conn.recv(65535)
                conn.sendall(sip_response(180, "Ringing", call_id="live-tcp@test") + sip_response(
                    200, "OK", call_id="live-tcp@test"))
                time.sleep(0.2)

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(sip_request(call_id="live-tcp@test"))
            time.sleep(0.5)
        t.join(5)
        server.close()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    seen = {(r["call_id"], r["transport"], r["method"] or r["status"]) for r in rows}
    assert {(f"live-udp-{i}@test", "UDP", "INVITE") for i in range(3)} <= seen
    assert {("live-tcp@test", "TCP", "INVITE"), ("live-tcp@test", "TCP", 180), ("live-tcp@test", "TCP", 200)} <= seen
    assert len([r for r in rows if r["call_id"] == "live-udp-0@test"]) == 1  # loopback's outgoing copy dropped
    assert json.loads(stats.read_text())["sip_messages"] == len(rows)


def test_live_capture_must_be_bounded_and_exclusive_with_files() -> None:
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "messages", "-i", "lo"], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2 and "--count or --duration" in res.stderr
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "messages", "-i", "lo", "-c", "1", "x.pcap"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "not both" in res.stderr


def test_unknown_interface_is_a_clear_input_error() -> None:
    _require_capture_rights()
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "messages", "-i", "nosuchif0", "-c", "1"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "live:nosuchif0" in res.stderr


def test_live_process_accounts_a_call_on_loopback(tmp_path: Path) -> None:
    """`process -i lo`: a call sent by this test over UDP is accounted while the capture runs."""
    _require_capture_rights()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sipsniff_acc", "process", "-i", "lo", "--duration", "5", "--no-db", "--log", "-",
         "--jsonl", str(tmp_path / "r.jsonl")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        uac = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        uac.bind(("127.0.0.1", 0))
        uas = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        uas.bind(("127.0.0.1", 0))
        a, b = uac.getsockname(), uas.getsockname()
        call = {"call_id": "live-acc@test"}
        flow = [
            (uac, b, sip_request("INVITE", branch="z9hG4bK-li", **call)),
            (uas, a, sip_response(200, "OK", branch="z9hG4bK-li", **call)),
            (uac, b, sip_request("ACK", branch="z9hG4bK-la", to_tag="ttag1", **call)),
            (uac, b, sip_request("BYE", cseq=2, branch="z9hG4bK-lb", to_tag="ttag1", **call)),
            (uas, a, sip_response(200, "OK", cseq=2, cseq_method="BYE", branch="z9hG4bK-lb", **call)),
        ]
        for sock, dest, data in flow:
            sock.sendto(data, dest)
            time.sleep(0.05)
        uac.close()
        uas.close()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = [ln for ln in out.splitlines() if "call_id=live-acc@test" in ln]
    assert [ln.split("method=")[1].split(";")[0] for ln in lines] == ["INVITE", "BYE"]
    assert "answered" in err.split("acc: ")[1].split("\n")[0]  # (other loopback traffic may add records)
