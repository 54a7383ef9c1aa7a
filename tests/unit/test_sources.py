"""sources/pcapfile.py: pcap, pcapng, gzip, stdin, damage handling."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sipsniff_acc.sources import CaptureReader, SourceError, open_captures
from tests.builders import ether, ip4_udp, pcap_bytes, sip_request

FRAMES = [(1000.0 + i, ether(ip4_udp(sip_request(call_id=f"c{i}")))) for i in range(5)]


def read(path: Path) -> list[tuple[float, int, bytes, int]]:
    return [(f.ts, f.linktype, f.data, f.no) for f in CaptureReader(path)]


@pytest.mark.parametrize("nanos", [False, True])
def test_pcap_micro_and_nano(tmp_path: Path, nanos: bool) -> None:
    p = tmp_path / "a.pcap"
    p.write_bytes(pcap_bytes([(ts + 0.25, d) for ts, d in FRAMES], nanos=nanos))
    got = read(p)
    assert [g[2] for g in got] == [d for _, d in FRAMES]
    assert [g[0] for g in got] == [ts + 0.25 for ts, _ in FRAMES] and [g[3] for g in got] == [1, 2, 3, 4, 5]


def test_big_endian_pcap(tmp_path: Path) -> None:
    hdr = struct.pack(">IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    rec = struct.pack(">IIII", 5, 500000, 4, 4) + b"abcd"
    (tmp_path / "be.pcap").write_bytes(hdr + rec)
    assert read(tmp_path / "be.pcap") == [(5.5, 1, b"abcd", 1)]


def test_gzip(tmp_path: Path) -> None:
    p = tmp_path / "a.pcap.gz"
    p.write_bytes(gzip.compress(pcap_bytes(FRAMES)))
    assert len(read(p)) == 5


def test_truncated_gzip_keeps_what_came_before(tmp_path: Path) -> None:
    big = [(1000.0 + i, ether(ip4_udp(sip_request(call_id=f"c{i}")))) for i in range(2000)]
    data = gzip.compress(pcap_bytes(big))
    p = tmp_path / "cut.pcap.gz"
    p.write_bytes(data[: len(data) // 2])
    got = []
    with pytest.raises(SourceError) as err:
        for f in CaptureReader(p):
            got.append(f)
    assert 0 < len(got) < 2000 and "cut.pcap.gz" in str(err.value)


def test_huge_caplen_is_corruption_not_a_memory_blowup(tmp_path: Path) -> None:
    data = pcap_bytes(FRAMES[:2]) + struct.pack("<IIII", 1, 0, 0x7FFFFFFF, 0x7FFFFFFF) + b"junk"
    (tmp_path / "c.pcap").write_bytes(data)
    reader = CaptureReader(tmp_path / "c.pcap")
    got = []
    with pytest.raises(SourceError) as err:
        got.extend(reader)
    assert len(got) == 2 and "corrupt record header" in str(err.value)
    assert err.value.offset == len(pcap_bytes(FRAMES[:2]))


def test_not_a_capture(tmp_path: Path) -> None:
    (tmp_path / "x.pcap").write_bytes(b"hello world, not a pcap")
    with pytest.raises(SourceError, match="not a pcap or pcapng file"):
        list(CaptureReader(tmp_path / "x.pcap"))


def test_empty_file_is_not_a_capture(tmp_path: Path) -> None:
    """A 0-byte file is an input error (tcpdump and tshark refuse it too); an idle stdin is not."""
    (tmp_path / "e.pcap").write_bytes(b"")
    with pytest.raises(SourceError, match="empty file"):
        read(tmp_path / "e.pcap")
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "messages", "-q", "-"], input=b"",
                         capture_output=True, timeout=60)
    assert res.returncode == 0 and res.stdout == b""


def test_merge_in_time_order_and_errors_collected(tmp_path: Path) -> None:
    (tmp_path / "a.pcap").write_bytes(pcap_bytes(FRAMES[0::2]))
    (tmp_path / "b.pcap").write_bytes(pcap_bytes(FRAMES[1::2]))
    (tmp_path / "c.pcap").write_bytes(b"garbage!")
    errors: list[SourceError] = []
    frames = list(open_captures([CaptureReader(tmp_path / n) for n in ("a.pcap", "b.pcap", "c.pcap")], errors))
    assert [f.ts for f in frames] == [ts for ts, _ in FRAMES]
    assert len(errors) == 1 and "c.pcap" in str(errors[0])


def test_pcapng_big_endian_section_and_simple_packet_block(tmp_path: Path) -> None:
    def block(btype: int, body: bytes) -> bytes:
        body += b"\0" * (-len(body) % 4)
        return struct.pack(">II", btype, len(body) + 12) + body + struct.pack(">I", len(body) + 12)
    data = FRAMES[0][1]
    out = block(0x0A0D0D0A, struct.pack(">IHHq", 0x1A2B3C4D, 1, 0, -1))
    out += block(1, struct.pack(">HHI", 1, 0, 65535))
    out += block(6, struct.pack(">IIIII", 0, 0, 3_000_000, len(data), len(data)) + data)
    out += block(3, struct.pack(">I", len(data)) + data)
    out += block(5, b"\0" * 8)  # an interface statistics block: skipped
    (tmp_path / "be.pcapng").write_bytes(out)
    got = read(tmp_path / "be.pcapng")
    assert got == [(3.0, 1, data, 1), (3.0, 1, data, 2)]


def test_stdin(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "messages", "-"], input=pcap_bytes(FRAMES),
                         capture_output=True, timeout=60)
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 5
