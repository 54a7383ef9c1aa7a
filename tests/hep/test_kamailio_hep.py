"""Issue 14's HEP acceptance, with real components on loopback (needs root for 127.0.12.x? no:
any user may bind loopback addresses; kamailio and sipp must be installed).

* A real Kamailio 5.6 relays SIPp calls (answered, busy, cancelled) and mirrors every message
  with siptrace (HEPv3, auth key, capture id) to our ``process --hep-listen``: our records
  equal that Kamailio's own acc rows and ACC lines, and name its capture agent.
* A wrong password gets nothing in: no record, every packet counted as ``auth_wrong``.
* Our ``--hep-out`` is received by a real Kamailio ``sipcapture`` (hep_capture_on, SQLite):
  every SIP message of a capture arrives with its addresses, ports, time (µs) and our agent id.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conformance.goldens import comparable, rules_for
from tests.hep.kamailio_hep import (AGENT_ID, HEP_PORT, PROXY, PROXY_PORT, SECRET, SipCapture, jsonl,
                                    relay_with_siptrace, require_kamailio, start_ours, stop)

#: HEP timestamps are taken 0-4.6 ms after the packet (hep-notes); Kamailio reads its clock
#: before it sends. A record whose time (ours) is this close after a second's tick may carry
#: Kamailio's previous second; nowhere else may the seconds differ.
BOUNDARY_SLACK_S = 0.010

CASES = ("answered_bye_from_caller", "busy_486_failed_and_missed", "cancel_after_180")


def _our_args(work: Path, password: str = SECRET) -> list[str]:
    return ["--hep-listen", f"udp://{PROXY}:{HEP_PORT}", "--hep-password", password, "-m", str(work / "rules.yaml"),
            "--db-url", f"sqlite:///{work / 'ours.db'}", "--log", str(work / "ours.log"),
            "--jsonl", str(work / "ours.jsonl"), "--spool", str(work / "ours.spool"), "--stats", str(work / "stats.json")]


def _rules(case: str) -> str:
    return rules_for(case).replace("127.0.9.1:5060", f"{PROXY}:{PROXY_PORT}")


def _our_rows(db: Path) -> dict[str, list[dict[str, object]]]:
    import sqlite3

    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return {t: [dict(r) for r in con.execute(f"SELECT * FROM {t} ORDER BY id")]  # noqa: S608 - fixed names
                for t in ("acc", "missed_calls")}
    finally:
        con.close()


def _lift(kam_second: int, begun: set[int]) -> int:
    """Kamailio's second, or the next one when one of our records began it (boundary slack)."""
    return kam_second + 1 if kam_second + 1 in begun else kam_second


def assert_equal_to_kamailio(work: Path, kam_rows: dict[str, list[dict[str, object]]], kam_lines: list[str],
                             slack_s: float = BOUNDARY_SLACK_S) -> int:
    """Our ACC lines and rows against Kamailio's (time to the second, with the boundary slack);
    returns how many records were compared."""
    records = jsonl(work / "ours.jsonl")
    begun = {int(float(r["ts"])) for r in records if float(r["ts"]) % 1 < slack_s}  # type: ignore[arg-type]

    def kam_line(line: str) -> str:
        text = line.split("ACC: ", 1)[1]
        head, _sep, rest = text.partition("timestamp=")
        num, semi, tail = rest.partition(";")
        return f"{head}timestamp={_lift(int(num), begun)}{semi}{tail}"

    ours = sorted(ln.split("ACC: ", 1)[1] for ln in (work / "ours.log").read_text().splitlines() if "ACC: " in ln)
    assert ours == sorted(map(kam_line, kam_lines))
    rows = _our_rows(work / "ours.db")
    n = 0
    for table in ("acc", "missed_calls"):
        def kam_row(row: dict[str, object]) -> tuple[object, ...]:
            unix = round(86400 * (float(row["time"]) - 2440587.5))  # type: ignore[arg-type]
            if _lift(unix, begun) != unix:
                row = {**row, "time": float(row["time"]) + 1 / 86400}  # type: ignore[arg-type]
            return comparable(row)
        assert sorted(map(comparable, rows[table])) == sorted(map(kam_row, kam_rows[table])), table
        n += len(rows[table])
    assert len(records) == len(kam_lines)
    return n


@pytest.mark.parametrize("case", CASES)
def test_siptrace_mirror_gives_kamailios_records(case: str, tmp_path: Path) -> None:
    require_kamailio("siptrace", "acc", "tm")
    (tmp_path / "rules.yaml").write_text(_rules(case))
    ours = start_ours(_our_args(tmp_path), tmp_path)
    try:
        relayed = relay_with_siptrace(case, tmp_path)
    finally:
        status = stop(ours)
    err = (tmp_path / "ours.err").read_text()
    assert status == 143, err  # stopped by our SIGTERM, 128 + 15, nothing else went wrong
    assert relayed.kam_lines, (tmp_path / "kamailio.log").read_text()[-2000:]
    assert assert_equal_to_kamailio(tmp_path, relayed.kam_rows, relayed.kam_lines) > 0
    records = jsonl(tmp_path / "ours.jsonl")
    assert {r["capture_agent"] for r in records} == {str(AGENT_ID)}  # provenance: Kamailio's hep_capture_id
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["hep"]["packets"] == stats["sip_messages"] > 0
    assert stats["hep"]["dropped"] == {} and stats["hep"]["agents"] == {str(AGENT_ID): stats["hep"]["packets"]}


def test_a_wrong_password_gets_nothing_in(tmp_path: Path) -> None:
    require_kamailio("siptrace", "acc", "tm")
    case = "busy_486_failed_and_missed"
    (tmp_path / "rules.yaml").write_text(_rules(case))
    ours = start_ours(_our_args(tmp_path, password="not-" + SECRET), tmp_path)
    try:
        relayed = relay_with_siptrace(case, tmp_path)
    finally:
        status = stop(ours)
    assert status == 143
    assert len(relayed.kam_lines) == 2  # Kamailio accounted the call...
    assert jsonl(tmp_path / "ours.jsonl") == []  # ...we got nothing in
    assert _our_rows(tmp_path / "ours.db") == {"acc": [], "missed_calls": []}
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["sip_messages"] == 0
    assert stats["hep"]["dropped"] == {"auth_wrong": stats["hep"]["packets"]} and stats["hep"]["packets"] >= 6
    assert "hep_auth_wrong" in (tmp_path / "ours.err").read_text()


CAPTURE = Path(__file__).resolve().parent.parent / "conformance" / "cases" / "answered_bye_from_caller" / "capture.pcap"


@pytest.mark.parametrize("workers", ["0", "2"])
def test_hep_out_reaches_kamailio_sipcapture(workers: str, tmp_path: Path) -> None:
    """Every SIP message of a capture, sent on by `process --hep-out`, is in sipcapture's table
    with the packet's addresses, ports, time to the microsecond, our agent id, and its bytes."""
    require_kamailio("sipcapture")
    capture = SipCapture(tmp_path)
    try:
        res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", str(CAPTURE), "--no-db", "--log", "none",
                              "-j", workers, "--hep-out", capture.url, "--hep-agent-id", "4242", "--hep-password", "pw",
                              "--stats", str(tmp_path / "stats.json")],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        messages = [json.loads(ln) for ln in subprocess.run(
            [sys.executable, "-m", "sipsniff_acc", "messages", "-q", str(CAPTURE)], capture_output=True, text=True,
            timeout=120, check=True).stdout.splitlines()]
        deadline = time.monotonic() + 30
        rows = capture.rows()
        while len(rows) < len(messages) and time.monotonic() < deadline:
            time.sleep(0.2)
            rows = capture.rows()
    finally:
        capture.close()
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["hep_out"]["sent"] == len(messages) > 10 and stats["hep_out"]["lost"] == {}
    want = sorted((round(m["ts"] * 1e6), m["src"], m["sport"], m["dst"], m["dport"], m["call_id"]) for m in messages)
    got = sorted((int(r["micro_ts"]), r["source_ip"], int(r["source_port"]), r["destination_ip"],  # type: ignore[arg-type]
                  int(r["destination_port"]), r["callid"]) for r in rows)
    assert got == want
    assert {r["node"] for r in rows} == {"homer01:4242"}  # sipcapture's capture_node : our HEP capture id
    assert {int(r["proto"]) for r in rows} == {1}  # type: ignore[arg-type]  # Kamailio's PROTO_UDP (from our chunk 2: 17)


def test_hep_out_to_nobody_never_stops_the_accounting(tmp_path: Path) -> None:
    """A collector that is not there (UDP refused, TCP refused): the records are all written,
    the copies are counted as not sent, one alarm line says so, exit 0."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind((PROXY, 0))
        port = s.getsockname()[1]
    for scheme in ("udp", "tcp"):
        res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", str(CAPTURE), "--no-db", "--log", "none",
                              "-j", "0", "--jsonl", str(tmp_path / f"{scheme}.jsonl"), "--hep-out",
                              f"{scheme}://{PROXY}:{port}", "--stats", str(tmp_path / f"{scheme}.json")],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert len(jsonl(tmp_path / f"{scheme}.jsonl")) == 4  # 2 calls: INVITE answered + BYE, each
        stats = json.loads((tmp_path / f"{scheme}.json").read_text())["hep_out"]
        assert sum(stats["lost"].values()) > 0
        assert res.stderr.count("alarm: --hep-out") >= 1
