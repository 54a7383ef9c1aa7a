"""SIP over TLS (tests/pcaps/tls.pcap + tls.keys, recorded by make_tls_pcap.py with real TLS)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import PCAPS, our_keys, our_messages, require_program, tshark_sip_keys

PCAP, KEYS = PCAPS / "tls.pcap", PCAPS / "tls.keys"


def test_without_keys_tls_is_counted_and_said_unreadable(tmp_path: Path) -> None:
    rows, res = our_messages(PCAP, args=("--stats", str(tmp_path / "s.json")))
    stats = json.loads((tmp_path / "s.json").read_text())
    assert res.returncode == 0 and rows == []
    assert stats["streams"]["tls"] == 2 and stats["tls_unreadable"] == 2
    assert "2 directions not readable (give --tls-keylog to decrypt)" in res.stderr


def test_with_keys_every_message_is_read_like_tshark(tmp_path: Path) -> None:
    require_program("tshark")
    for workers in ("0", "2"):
        rows, res = our_messages(PCAP, args=("--tls-keylog", str(KEYS), "-j", workers,
                                             "--stats", str(tmp_path / "s.json")))
        assert res.returncode == 0, res.stderr
        assert [r["method"] or r["status"] for r in rows] == ["INVITE", 100, 200, "ACK", "BYE", 200]
        assert {r["transport"] for r in rows} == {"TLS"} and {r["encap"] for r in rows} == {"tls"}
        assert json.loads((tmp_path / "s.json").read_text())["tls_unreadable"] == 0
    assert our_keys(rows) == tshark_sip_keys(PCAP, ("-o", f"tls.keylog_file:{KEYS}"))


def test_missing_keylog_file_is_a_usage_error() -> None:
    _, res = our_messages(PCAP, args=("--tls-keylog", "/nonexistent.keys"))
    assert res.returncode == 2 and "no such file" in res.stderr
