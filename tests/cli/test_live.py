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
from typing import IO

import pytest

from tests.builders import SDP, sip_request, sip_response


def _require_capture_rights() -> None:
    if os.geteuid() != 0:
        reason = "live capture needs root (AF_PACKET)"
        if os.environ.get("SIPSNIFF_REQUIRE_SERVERS") == "1":
            pytest.fail(f"{reason}, and SIPSNIFF_REQUIRE_SERVERS=1 forbids skipping")
        pytest.skip(reason)


LISTEN_TIMEOUT = 60.0  #: bound on the wait for the capture socket (a loaded machine starts Python slowly)
DURATION = "8"  #: counted from the moment the socket is bound, so only the sending must fit in it


class LiveRun:
    """A live `sipsniff-acc` run whose stdout/stderr are drained by threads, so the test can
    wait for the "listening on lo" line (the socket is bound: from now on every packet is
    seen) instead of sleeping a fixed time and hoping."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "sipsniff_acc", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.listening = threading.Event()
        self.threads = [threading.Thread(target=self._drain, args=(self.proc.stdout, self.out), daemon=True),
                        threading.Thread(target=self._drain, args=(self.proc.stderr, self.err), daemon=True)]
        for t in self.threads:
            t.start()

    def _drain(self, stream: IO[str], into: list[str]) -> None:
        for line in stream:
            into.append(line)
            if line.startswith("listening on "):
                self.listening.set()
        self.listening.set()  # the process ended (an error): stop waiting

    def wait_listening(self) -> None:
        assert self.listening.wait(LISTEN_TIMEOUT), f"no 'listening on' within {LISTEN_TIMEOUT} s"
        assert self.proc.poll() is None, "".join(self.err)

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        for t in self.threads:
            t.join(10)
        return rc, "".join(self.out), "".join(self.err)


def test_live_capture_on_loopback_sees_udp_and_tcp_sip(tmp_path: Path) -> None:
    _require_capture_rights()
    stats = tmp_path / "s.json"
    live = LiveRun("messages", "-i", "lo", "--duration", DURATION, "--stats", str(stats), "-j", "0")
    try:
        live.wait_listening()
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
                conn.recv(1)  # until the client has read both and closed (bounded by the timeout)

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(sip_request(call_id="live-tcp@test"))
            got = b""
            while got.count(b"SIP/2.0 ") < 2:  # both replies arrived (each is a bounded wait)
                chunk = c.recv(65535)
                if not chunk:
                    break
                got += chunk
        t.join(10)
        server.close()
    finally:
        rc, out, err = live.finish()
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    seen = {(r["call_id"], r["transport"], r["method"] or r["status"]) for r in rows}
    assert {(f"live-udp-{i}@test", "UDP", "INVITE") for i in range(3)} <= seen
    assert {("live-tcp@test", "TCP", "INVITE"), ("live-tcp@test", "TCP", 180), ("live-tcp@test", "TCP", 200)} <= seen
    assert len([r for r in rows if r["call_id"] == "live-udp-0@test"]) == 1  # loopback's outgoing copy dropped
    assert json.loads(stats.read_text())["sip_messages"] == len(rows)


def test_live_capture_is_exclusive_with_files() -> None:
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "messages", "-i", "lo", "-c", "1", "x.pcap"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "not both" in res.stderr


def test_unknown_interface_is_one_line_before_the_work() -> None:
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "messages", "-i", "nosuchif0", "-c", "1"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and res.stderr == "error: -i nosuchif0: no such interface (`ip link` lists them)\n"


def test_live_process_accounts_a_call_on_loopback(tmp_path: Path) -> None:
    """`process -i lo`: a call sent by this test over UDP is accounted while the capture runs."""
    _require_capture_rights()
    live = LiveRun("process", "-i", "lo", "--duration", DURATION, "--no-db", "--log", "-", "--jsonl",
                   str(tmp_path / "r.jsonl"))
    try:
        live.wait_listening()
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
    finally:
        rc, out, err = live.finish()
    assert rc == 0, err
    lines = [ln for ln in out.splitlines() if "call_id=live-acc@test" in ln]
    assert [ln.split("method=")[1].split(";")[0] for ln in lines] == ["INVITE", "BYE"]
    assert "answered" in err.split("acc: ")[1].split("\n")[0]  # (other loopback traffic may add records)
