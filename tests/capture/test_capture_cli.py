"""The live-capture options end to end: a service run until SIGTERM, -f mistakes, fragments
through a port filter, several -i (root; loopback 127.0.1.x and veth pairs of our own)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.builders import SDP, sip_request, sip_response
from tests.capture.links import Links, require_root
from tests.cli.test_live import LiveRun

UAC, UAS = "127.0.1.7", "127.0.1.8"  #: slice S1's loopback addresses


def _call(call_id: str) -> None:
    """A whole call over loopback, UAC ↔ UAS: INVITE/200/ACK/BYE/200."""
    uac = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    uac.bind((UAC, 0))
    uas = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    uas.bind((UAS, 0))
    a, b = uac.getsockname(), uas.getsockname()
    call = {"call_id": call_id}
    for sock, dest, data in [
        (uac, b, sip_request("INVITE", branch="z9hG4bK-s1i", **call)),
        (uas, a, sip_response(200, "OK", branch="z9hG4bK-s1i", **call)),
        (uac, b, sip_request("ACK", branch="z9hG4bK-s1a", to_tag="ttag1", **call)),
        (uac, b, sip_request("BYE", cseq=2, branch="z9hG4bK-s1b", to_tag="ttag1", **call)),
        (uas, a, sip_response(200, "OK", cseq=2, cseq_method="BYE", branch="z9hG4bK-s1b", **call)),
    ]:
        sock.sendto(data, dest)
        time.sleep(0.02)
    uac.close()
    uas.close()


def test_without_count_or_duration_it_runs_until_sigterm(tmp_path: Path) -> None:
    require_root()
    stats = tmp_path / "s.json"
    live = LiveRun("process", "-i", "lo", "-f", f"host {UAC}", "--no-db", "--log", "-", "--jsonl",
                   str(tmp_path / "r.jsonl"), "--stats", str(stats), "-j", "0")
    try:
        live.wait_listening()
        _call("until-stopped@s1")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("method=BYE" in ln for ln in live.out):
            time.sleep(0.1)  # records go out while the capture runs (or the stop flushes them)
        assert live.proc.poll() is None, "the run ended by itself: it must run until stopped"
        live.proc.send_signal(signal.SIGTERM)
    finally:
        rc, out, err = live.finish()
    assert rc == 143, err
    records = [json.loads(ln) for ln in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records if r["call_id"] == "until-stopped@s1"] == ["INVITE", "BYE"]
    cap = json.loads(stats.read_text())["capture"]
    lo = cap["interfaces"]["lo"]
    assert lo["frames"] == 5 and lo["dropped"] == 0 and cap["kernel_drops"] == 0 and cap["filter"] == f"host {UAC}"
    assert "capture lo: 5 packets passed the kernel filter, 0 dropped, 5 read" in err


def test_a_bad_filter_is_one_line_before_anything_opens(tmp_path: Path) -> None:
    require_root()
    out = tmp_path / "r.jsonl"
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", "-i", "lo", "-f", "udp prot 5060",
                          "--no-db", "--jsonl", str(out)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr == "error: -f 'udp prot 5060': can't parse filter expression: syntax error\n"
    assert not out.exists() and not (tmp_path / "acc.db").exists()
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "messages", "-i", "lo", "-f", "port 70000", "-c", "1"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.startswith("error: -f 'port 70000': ") and res.stderr.count("\n") == 1


def test_a_big_invite_in_fragments_passes_a_port_filter_and_is_reassembled(links: Links, tmp_path: Path) -> None:
    invite = sip_request(call_id="frag@s1", body=SDP + b"a=x-pad:" + b"p" * 2600 + b"\r\n")
    live = LiveRun("messages", "-i", links.capture[0], "-f", "udp port 5060", "-c", "3", "-j", "0",
                   "--stats", str(tmp_path / "s.json"))
    try:
        live.wait_listening()
        links.send(0, [invite], 5060)
    finally:
        rc, out, err = live.finish()
    assert rc == 0, err
    rows = [json.loads(ln) for ln in out.splitlines()]
    assert [(r["call_id"], r["method"]) for r in rows] == [("frag@s1", "INVITE")]
    st = json.loads((tmp_path / "s.json").read_text())
    assert st["fragments"] == 3 and st["datagrams_reassembled"] == 1


def test_several_interfaces_on_the_command_line(links: Links, tmp_path: Path) -> None:
    a, b = links.capture
    live = LiveRun("messages", "-i", a, "-i", b, "-c", "2", "-j", "0", "--stats", str(tmp_path / "s.json"),
                   "--no-promisc")
    try:
        live.wait_listening()
        links.send(0, [sip_request(call_id="on-a@s1")], 5060)
        links.send(1, [sip_request(call_id="on-b@s1")], 5060)
    finally:
        rc, out, err = live.finish()
    assert rc == 0, err
    assert sorted(json.loads(ln)["call_id"] for ln in out.splitlines()) == ["on-a@s1", "on-b@s1"]
    per_if = json.loads((tmp_path / "s.json").read_text())["capture"]["interfaces"]
    assert {i: (s["frames"], s["promisc"]) for i, s in per_if.items()} == {a: (1, False), b: (1, False)}
    assert f"listening on {a},{b}" in err


def test_kernel_drops_are_a_loud_summary_line_and_exact_in_stats(links: Links, tmp_path: Path) -> None:
    """A 1 MB ring and a stopped reader: the summary says DROPPED, --stats has the kernel's count,
    and it equals what reached the link minus what was read."""
    iface = links.capture[0]
    before = links.rx_packets(0)
    live = LiveRun("messages", "-i", iface, "--ring-size", "1", "--duration", "6", "-j", "0", "-o", "/dev/null",
                   "--stats", str(tmp_path / "s.json"))
    try:
        live.wait_listening()
        live.proc.send_signal(signal.SIGSTOP)
        try:
            links.send(0, [b"OPTIONS sip:x SIP/2.0\r\nCall-ID: d@s1\r\n\r\n" + b"x" * 520], 5060, repeat=5000)
        finally:
            live.proc.send_signal(signal.SIGCONT)
    finally:
        rc, _out, err = live.finish()
    reached = links.rx_packets(0) - before
    assert rc == 0, err
    st = json.loads((tmp_path / "s.json").read_text())
    cap = st["capture"]
    assert cap["kernel_drops"] > 0 and cap["kernel_drops"] == reached - st["frames"] == cap["interfaces"][iface]["dropped"]
    assert f"WARNING: the kernel DROPPED {cap['kernel_drops']} packet(s) ({cap['kernel_drops']} on {iface})" in err


def test_capture_rights_cap_net_raw_is_enough_and_its_absence_is_one_line(tmp_path: Path) -> None:
    """As nobody: CAP_NET_RAW alone captures (promiscuous mode included); without it, one line, exit 2."""
    require_root()
    import shutil
    if shutil.which("setpriv") is None:
        import pytest
        pytest.skip("setpriv (util-linux) is missing")
    drop = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    cmd = [sys.executable, "-m", "sipsniff_acc", "messages", "-i", "lo", "-f", f"host {UAC}", "--duration", "0.5",
           "-j", "0"]
    res = subprocess.run([*drop, "--inh-caps=-all,+net_raw", "--ambient-caps=-all,+net_raw",
                          "--bounding-set=-all,+net_raw", *cmd], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0 and "(promiscuous, ring 32 MB)" in res.stderr, res.stderr
    res = subprocess.run([*drop, "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", *cmd],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2 and res.stderr == "error: -i: capturing needs root or the CAP_NET_RAW capability\n"
