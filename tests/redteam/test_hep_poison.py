"""Red team, end to end: ``process --hep-listen`` (UDP and TCP) fed every kind of hostile HEP
packet and poisoned SIP between the messages of one real call. Each bad packet is counted by
its reason, none raises, and the call around them is accounted as the same messages alone are."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

from sipsniff_acc.sources.hep import encode
from tests.hep.kamailio_hep import jsonl, start_ours, stop

HOST = "127.0.12.1"
A, B = socket.inet_aton("127.0.12.2"), socket.inet_aton("127.0.12.3")


def call(now: float) -> list[tuple[float, bytes, bytes, bytes]]:
    """INVITE, 200, ACK, BYE, 200 of one call: (time, src, dst, SIP)."""
    def msg(head: str, branch: str, cseq: str, to_tag: bool) -> bytes:
        return (f"{head}\r\nVia: SIP/2.0/UDP 127.0.12.2:5060;branch={branch}\r\nFrom: <sip:alice@127.0.12.2>;tag=a1\r\n"
                f"To: <sip:bob@127.0.12.3>{';tag=b1' if to_tag else ''}\r\nCall-ID: poison-call-1\r\nCSeq: {cseq}\r\n"
                "Contact: <sip:a@127.0.12.2>\r\nContent-Length: 0\r\n\r\n").encode()
    return [(now, A, B, msg("INVITE sip:bob@127.0.12.3 SIP/2.0", "z9hG4bK-i", "1 INVITE", False)),
            (now + 0.1, B, A, msg("SIP/2.0 200 OK", "z9hG4bK-i", "1 INVITE", True)),
            (now + 0.2, A, B, msg("ACK sip:bob@127.0.12.3 SIP/2.0", "z9hG4bK-a", "1 ACK", True)),
            (now + 2.0, A, B, msg("BYE sip:bob@127.0.12.3 SIP/2.0", "z9hG4bK-b", "2 BYE", True)),
            (now + 2.1, B, A, msg("SIP/2.0 200 OK", "z9hG4bK-b", "2 BYE", True))]


def chunk(ctype: int, body: bytes, vendor: int = 0) -> bytes:
    return struct.pack(">HHH", vendor, ctype, 6 + len(body)) + body


def hep3(*chunks: bytes, length: int | None = None) -> bytes:
    body = b"".join(chunks)
    return b"HEP3" + struct.pack(">H", len(body) + 6 if length is None else length) + body


def poison(now: float) -> list[bytes]:
    """Hostile packets: each is refused by the HEP decoder, or is SIP the parser refuses or accounts as nothing."""
    sip = b"OPTIONS sip:x@127.0.12.3 SIP/2.0\r\nCall-ID: p\r\nCSeq: 1 OPTIONS\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK-o\r\n\r\n"
    good = encode(now, "UDP", A, 5060, B, 5060, sip, 5)
    bomb = zlib.compress(b"\0" * (64 << 20), 9)  # 64 MB of zeros in 64 kB
    nested = zlib.compress(zlib.compress(b"A" * (8 << 20)))
    sip_poison = [
        b"INVITE sip:bob@127.0.12.3 SIP/2.0\r\nCall-ID: nul\0call\r\nCSeq: 1 INVITE\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK-n\0\r\n\r\n",
        b"INVITE sip:bob@127.0.12.3 SIP/2.0\rCall-ID: cr-only\rCSeq: 1 INVITE\r\r",
        b"INVITE sip:bob@127.0.12.3 SIP/2.0\r\nCall-ID: big-cseq\r\nCSeq: " + b"9" * 5000 + b" INVITE\r\n"
        b"Via: SIP/2.0/UDP h;branch=z9hG4bK-c\r\nFrom: <sip:a@h>;tag=1\r\nTo: <sip:b@h>\r\n\r\n",
        b"SIP/2.0 200 OK\r\nCall-ID: poison-call-1\r\nCSeq: 1 INVITE\r\nContent-Length: 99999999999999\r\n\r\n",
        b"\x16\x03\x01\x02\x00 TLS hello, not SIP",
        b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP h;branch=" + b"z" * 60000 + b"\r\nCSeq: 1 INVITE\r\n\r\n",
    ]
    return [
        good[:5], good[:30],  # truncated
        hep3(length=3),  # a length shorter than the header
        hep3(*(chunk(99, b"") for _ in range(5000))),  # 5000 zero-length chunks
        hep3(chunk(1, b"")),  # a fixed-size chunk of zero bytes
        good[:4] + struct.pack(">H", len(good) + 500) + good[6:],  # the length lies (more than arrived)
        hep3(chunk(1, b"\x02"), chunk(2, b"\x11"), chunk(5, bytes(16)), chunk(6, bytes(16)), chunk(7, b"\0\1"),
             chunk(8, b"\0\2"), chunk(9, b"\0\0\0\1"), chunk(15, sip)),  # IPv6 chunks, IPv4 family
        hep3(chunk(1, b"\x02"), chunk(2, b"\x11"), chunk(3, A), chunk(4, B), chunk(7, b"\0\1"), chunk(8, b"\0\2"),
             chunk(9, b"\0\0\0\1"), chunk(16, bomb[:60000])),  # a zlib bomb (cut to fit: inflates past the bound)
        hep3(chunk(1, b"\x02"), chunk(2, b"\x11"), chunk(3, A), chunk(4, B), chunk(7, b"\0\1"), chunk(8, b"\0\2"),
             chunk(9, b"\0\0\0\1"), chunk(16, nested)),  # nested: inflated once, it is not SIP
        hep3(chunk(1, b"\x02"), chunk(2, b"\x11"), chunk(3, A), chunk(4, B), chunk(7, b"\0\1"), chunk(8, b"\0\2"),
             chunk(9, b"\0\0\0\1"), chunk(10, b"\xff\xff\xff\xff"), chunk(15, sip)),  # 4 billion microseconds
        encode(now, "UDP", A, 5060, B, 5060, sip, 5)[:6] + b"\xff" * 40,
        b"\x02\x10\x02\x11" + bytes(12),  # HEPv2 with no payload
        *(encode(now, "UDP", A, 5060, B, 5060, p, 6) for p in sip_poison),
    ]


def test_poison_between_the_messages_of_a_call(tmp_path: Path) -> None:
    now = time.time()
    msgs = call(now)
    # the reference: the call's messages alone
    ref = start_ours(["--hep-listen", f"udp://{HOST}:0", "--no-db", "--jsonl", str(tmp_path / "ref.jsonl"),
                      "--duration", "4"], tmp_path, "ref")
    try:
        port = int((tmp_path / "ref.err").read_text().split("listening on udp://")[1].split()[0].rsplit(":", 1)[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for ts, src, dst, sip in msgs:
                s.sendto(encode(ts, "UDP", src, 5060, dst, 5060, sip, 1), (HOST, port))
                time.sleep(0.02)
        assert ref.wait(60) == 0
    finally:
        stop(ref)
    want = jsonl(tmp_path / "ref.jsonl")
    assert want and {r["call_id"] for r in want} == {"poison-call-1"}

    ours = start_ours(["--hep-listen", f"udp://{HOST}:0", "--hep-listen", f"tcp://{HOST}:0", "--no-db",
                       "--jsonl", str(tmp_path / "ours.jsonl"), "--duration", "6", "--stats",
                       str(tmp_path / "stats.json")], tmp_path)
    try:
        text = (tmp_path / "ours.err").read_text()
        line = text.split("listening on ")[1].split("\n")[0]
        uport = int(line.split("udp://")[1].split(",")[0].rsplit(":", 1)[1])
        tport = int(line.split("tcp://")[1].split()[0].rsplit(":", 1)[1])
        bad = poison(now)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, socket.create_connection((HOST, tport)) as t:
            for i, (ts, src, dst, sip) in enumerate(msgs):
                s.sendto(encode(ts, "UDP", src, 5060, dst, 5060, sip, 1), (HOST, uport))
                for pkt in bad[i::len(msgs)]:
                    if len(pkt) <= 65507:
                        s.sendto(pkt, (HOST, uport))
                    t.sendall(pkt)  # over TCP too (the stream resyncs after each)
                time.sleep(0.02)
        assert ours.wait(60) == 0
    finally:
        stop(ours)
    err = (tmp_path / "ours.err").read_text()
    assert "Traceback" not in err, err
    got = jsonl(tmp_path / "ours.jsonl")
    strip = ("capture_agent", "id", "ts", "time", "source")
    assert [{k: v for k, v in r.items() if k not in strip} for r in got if r["call_id"] == "poison-call-1"] == \
        [{k: v for k, v in r.items() if k not in strip} for r in want]
    dropped = json.loads((tmp_path / "stats.json").read_text())["hep"]["dropped"]
    assert set(dropped) >= {"truncated", "bad_length", "bad_chunk", "missing_chunk", "too_big"}, dropped
    assert sum(dropped.values()) >= 2 * 12, dropped  # the 12 malformed HEP packets, over UDP and over TCP
