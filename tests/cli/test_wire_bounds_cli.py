"""Issue 10 end to end: a hostile number in one SIP message (CSeq or Content-Length of 5000
digits, CSeq >= 2**64) is counted as malformed and the run goes on, over UDP and TCP, in
``messages`` and in ``process --no-db --jsonl -``: exit 0, no traceback, the good
messages and records around it all out.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sipsniff_acc.sources import CaptureReader
from tests.builders import ether, ip4_udp, pcap_bytes, sip_request

ROOT = Path(__file__).resolve().parents[2]
PCAPS = ROOT / "tests" / "pcaps"
EXE = shutil.which("sipsniff-acc", path=str(Path(sys.executable).parent)) or "sipsniff-acc"
HUGE = "9" * 5000

BAD = {
    "cseq_huge": sip_request(call_id="bad-cseq@x", cseq=1).replace(b"CSeq: 1 ", f"CSeq: {HUGE} ".encode()),
    "cseq_2_64": sip_request(call_id="bad-64@x", cseq=1).replace(b"CSeq: 1 ", f"CSeq: {2**64} ".encode()),
    "clen_huge": sip_request(call_id="bad-clen@x").replace(b"Content-Length: 0", f"Content-Length: {HUGE}".encode()),
}
EXPECT = {"cseq_huge": "sip_bad_cseq", "cseq_2_64": "sip_bad_cseq", "clen_huge": "sip_bad_content_length"}


def _tcp(payload: bytes, seq: int, flags: int = 0x18) -> bytes:
    hdr = struct.pack("!HHIIBBHHH", 40123, 5060, seq, 0, 0x50, flags, 65535, 0, 0)
    return ether(ip4_udp(hdr + payload, src="192.0.2.77", dst="192.0.2.78", proto=6, raw_payload=True))


def _capture(tmp: Path, source: str, bad: bytes, tcp: bool) -> Path:
    """``source`` with the bad message inserted in its middle (a UDP datagram or a TCP stream
    of its own that carries the bad message between two good ones)."""
    frames = [(f.ts, f.data) for f in CaptureReader(PCAPS / source)]
    mid = len(frames) // 2
    t = frames[mid][0] + 1e-6
    if tcp:
        good = sip_request("OPTIONS", call_id="tcp-good-1@x") , sip_request("OPTIONS", call_id="tcp-good-2@x")
        stream = good[0] + bad + good[1]
        extra = [(t, _tcp(b"", 999, 0x02)), (t + 1e-6, _tcp(stream, 1000))]
    else:
        extra = [(t, ether(ip4_udp(bad, src="192.0.2.77", dst="192.0.2.78")))]
    out = tmp / f"hostile-{'tcp' if tcp else 'udp'}.pcap"
    out.write_bytes(pcap_bytes(frames[:mid] + extra + frames[mid:]))
    return out


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_messages_counts_the_bad_one_and_goes_on(tmp_path: Path, case: str, tcp: bool) -> None:
    clean = _run(["messages", "-j", "0", "-q", str(PCAPS / "sample.pcap")], tmp_path)
    assert clean.returncode == 0, clean.stderr
    pcap = _capture(tmp_path, "sample.pcap", BAD[case], tcp)
    for workers in ("0", "2"):
        stats = tmp_path / f"stats-{workers}.json"
        got = _run(["messages", "-j", workers, "--stats", str(stats), str(pcap)], tmp_path)
        assert got.returncode == 0 and "Traceback" not in got.stderr, got.stderr[-2000:]
        lines = [json.loads(x) for x in got.stdout.splitlines()]
        assert {x["call_id"] for x in json.loads("[" + ",".join(clean.stdout.splitlines()) + "]")} <= {
            x["call_id"] for x in lines}
        if tcp:
            assert {"tcp-good-1@x", "tcp-good-2@x"} <= {x["call_id"] for x in lines}
        counted = json.loads(stats.read_text())["anomalies"]
        name = "tcp_message_too_long" if tcp and case == "clen_huge" else EXPECT[case]
        assert counted.get(name, 0) >= 1, counted


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_process_jsonl_counts_the_bad_one_and_keeps_every_record(tmp_path: Path, case: str, tcp: bool) -> None:
    source = "sipp_tcp.pcap" if tcp else "sample.pcap"
    args = ["process", "--no-db", "--log", "none", "--jsonl", "-", "-j", "0"]
    clean = _run([*args, "-q", str(PCAPS / source)], tmp_path)
    assert clean.returncode == 0, clean.stderr
    expected = [json.loads(x)["id"] for x in clean.stdout.splitlines()]
    assert expected
    pcap = _capture(tmp_path, source, BAD[case], tcp)
    stats = tmp_path / "stats.json"
    got = _run([*args, "--stats", str(stats), str(pcap)], tmp_path)
    assert got.returncode == 0 and "Traceback" not in got.stderr, got.stderr[-2000:]
    assert [json.loads(x)["id"] for x in got.stdout.splitlines()] == expected
    counted = json.loads(stats.read_text())["anomalies"]
    name = "tcp_message_too_long" if tcp and case == "clen_huge" else EXPECT[case]
    assert counted.get(name, 0) >= 1, counted
