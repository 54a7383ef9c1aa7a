"""diameter_mode: disc — acc_diameter's legacy DISC format, byte for byte against a real Kamailio.

tests/aaa/kamailio_acc_diameter.pcap holds a call (INVITE/200/ACK, BYE/200) through Kamailio
5.6.3 with acc_diameter, and the two DISC requests it wrote (recorded for the team in
../shared/aaa; the RFC 6733 peer it talked to closed the connections: no real DISC server
exists any more, so the peer here is a scripted one that answers as acc_diameter expects).
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sipsniff_acc.decode import decode
from sipsniff_acc.emitters import diameter as d
from sipsniff_acc.events import Datagram
from sipsniff_acc.sources import CaptureReader
from tests.servers import free_port

CAPTURE = Path(__file__).resolve().parent / "kamailio_acc_diameter.pcap"


def kamailio_requests() -> list[bytes]:
    out = []
    for frame in CaptureReader(str(CAPTURE)):
        dg = decode(frame)
        if isinstance(dg, Datagram) and dg.dport == 13869:
            data = dg.payload[(dg.payload[12] >> 4) * 4 :]  # TCP segments come whole: skip the header
            if data:
                out.append(data)
    return out


def disc_peer(port: int, got: list[bytes], answers: int, codes: tuple[int, ...] = ()) -> threading.Thread:
    """Answers ``answers`` requests as acc_diameter expects, with ``codes[i]`` (default 2001)."""
    srv = socket.create_server(("127.0.3.20", port))

    def run() -> None:
        conn, _ = srv.accept()
        conn.settimeout(10)
        buf = b""
        for i in range(answers):
            while len(buf) < 4 or len(buf) < int.from_bytes(buf[1:4], "big"):
                buf += conn.recv(65536)
            n = int.from_bytes(buf[1:4], "big")
            buf_request, buf = buf[:n], buf[n:]
            req = d.parse(buf_request)
            got.append(buf_request)
            msgid = req.first(d.DISC_MSGID) or b""
            conn.sendall(d.message(d.ACR, 0, d.DISC_APP, 0, 0, [
                d.avp(d.DISC_MSGID, msgid, mandatory=False), d.avp(d.DISC_SERVICE_TYPE, b"9"),
                d.u32(d.RESULT_CODE, codes[i] if i < len(codes) else 2001)]))
        conn.close()
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def avps(raw: bytes) -> list[tuple[int, int, bytes]]:
    """(code, flags, data) in wire order, the message id's data blanked (Kamailio's internal counter)."""
    out, pos = [], 20
    while pos + 8 <= len(raw):
        code, flags = struct.unpack(">IB", raw[pos : pos + 5])
        length = int.from_bytes(raw[pos + 5 : pos + 8], "big")
        data = raw[pos + 8 : pos + length]
        out.append((code, flags, b"" if code == d.DISC_MSGID else data))
        pos += length + (-length % 4)
    return out


def test_disc_requests_equal_kamailios(tmp_path: Path) -> None:
    theirs = kamailio_requests()
    assert len(theirs) == 2
    port = free_port()
    got: list[bytes] = []
    peer = disc_peer(port, got, 2)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        'proxy: {addresses: ["127.0.3.2:13862"]}\n'
        "acc: {log_flag: 1, failed_transaction_flag: 3, diameter_flag: 1, diameter_missed_flag: 2,\n"
        f"      diameter_mode: disc, diameter_client_host: 127.0.3.20, diameter_client_port: {port}}}\n"
        "route:\n  - if: {in_dialog: true, method: [BYE, INVITE, UPDATE]}\n    setflag: [1, 3]\n"
        "  - if: {in_dialog: true}\n    stop: true\n  - if: {method: CANCEL}\n    stop: true\n  - setflag: [1, 2, 3]\n")
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", str(CAPTURE), "--rules", str(rules),
                          "--no-db", "--log", "none", "--spool", str(tmp_path / "spool")],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    peer.join(10)
    assert res.returncode == 0, res.stderr
    assert re.search(r"diameter(:\S+)?: 2 records delivered", res.stderr)
    assert len(got) == 2
    for ours, kam in zip(got, theirs, strict=True):
        assert ours[:20] == kam[:20]  # version, length, flags 0x80, cmd 271, app 1, ids 0
        assert avps(ours) == avps(kam)


def test_failed_calls_are_counted_not_sent() -> None:
    from sipsniff_acc.records import AccRecord
    r = AccRecord("missed", 1.0, "INVITE", "f", "t", "c", "486", "Busy Here", ("diameter",), realm="example.com")
    assert d.disc_status(r) is None and d.disc_message(r, 1) is None
    ok = AccRecord("answered", 1.0, "MESSAGE", "f", "t", "c", "200", "OK", ("diameter",), realm="example.com")
    assert d.disc_status(ok) == "1" and d.disc_message(ok, 1) is not None
    empty = AccRecord("answered", 1.0, "INVITE", "f", None, "c", "200", "OK", ("diameter",), realm="example.com")
    assert d.disc_message(empty, 1) is None  # an empty value aborts the message in acc_diameter


def test_a_permanent_refusal_rejects_that_record_only() -> None:
    """Before: any answer but 2001 was retried, then BackendDown: a 5004 blocked the spool for good."""
    from sipsniff_acc.emitters.spool import BackendDown, RecordRejected
    from sipsniff_acc.records import AccRecord
    from sipsniff_acc.rules import parse_rules
    port = free_port()
    got: list[bytes] = []
    peer = disc_peer(port, got, 4, codes=(2001, 5004, 2001, 4002))
    rules = parse_rules("acc: {diameter_flag: 1, diameter_mode: disc, diameter_client_host: 127.0.3.20, "
                        f"diameter_client_port: {port}, diameter_timeout: 3}}\n")
    em = d.DiscEmitter(rules)
    recs = [AccRecord("answered", 1.0, "INVITE", "f", "t", f"c{i}", "200", "OK", ("diameter",), realm="example.com",
                      record_id=f"{i:016x}") for i in range(4)]
    with pytest.raises(RecordRejected) as e:
        em.deliver(recs)
    assert e.value.index == 1 and "Result-Code 5004 (INVALID_AVP_VALUE)" in e.value.reason
    em.deliver(recs[2:3])
    with pytest.raises(BackendDown) as down:  # 4002 OUT_OF_SPACE: transient, kept
        em.deliver(recs[3:])
    assert down.value.delivered == 0 and "4002" in str(down.value)
    em.close()
    peer.join(10)
    assert em.sent == 2 and em.rejected == 1 and len(got) == 4
