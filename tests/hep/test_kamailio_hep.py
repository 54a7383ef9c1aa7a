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
#: before it sends, and for a reply it received (a missed call's 486, relayed) after siptrace
#: stamped it (seen: ours 1796221901.999865, Kamailio's 1796221902). A record whose time (ours)
#: is this close to a second's tick, on either side, may carry Kamailio's second on the other
#: side; nowhere else may the seconds differ.
BOUNDARY_SLACK_S = 0.010

#: answered, busy, cancelled; SIP over TCP between caller and proxy (replies that reach us before
#: their request); 300 mixed calls at 30 calls/s (HEP datagrams out of the wire's order)
CASES = ("answered_bye_from_caller", "busy_486_failed_and_missed", "cancel_after_180", "tcp_caller", "volume_mixed")


def _our_args(work: Path, password: str = SECRET, workers: str = "0") -> list[str]:
    return ["-j", workers, "--hep-listen", f"udp://{PROXY}:{HEP_PORT}", "--hep-password", password, "-m", str(work / "rules.yaml"),
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


def _same_second(ours: float, kam: int, slack_s: float) -> bool:
    """Kamailio's second is ours, or the one before when ours began less than ``slack_s`` ago,
    or the one after when ours ends in less than ``slack_s``."""
    return (int(ours) == kam or (int(ours) == kam + 1 and ours % 1 < slack_s)
            or (int(ours) + 1 == kam and ours % 1 > 1 - slack_s))


def _pair_times(ours: dict[object, list[float]], theirs: dict[object, list[int]], slack_s: float) -> int:
    """Records keyed by everything but their time: the same keys, the same count each, and
    each time paired (in order) within the boundary rule."""
    assert sorted(map(str, ours)) == sorted(map(str, theirs))
    n = 0
    for key, times in ours.items():
        kam = sorted(theirs[key])
        assert len(times) == len(kam), key
        for o, k in zip(sorted(times), kam, strict=True):
            assert _same_second(o, k, slack_s), (key, o, k)
            n += 1
    return n


def assert_equal_to_kamailio(work: Path, kam_rows: dict[str, list[dict[str, object]]], kam_lines: list[str],
                             slack_s: float = BOUNDARY_SLACK_S) -> int:
    """Our ACC lines and rows against Kamailio's: every field equal, the time to the second,
    where a record of ours less than ``slack_s`` after a second's tick may carry Kamailio's
    previous second (and no other); returns how many rows were compared."""
    records = jsonl(work / "ours.jsonl")

    def split(text: str) -> tuple[str, int]:
        head, _sep, rest = text.partition("timestamp=")
        num, semi, tail = rest.partition(";")
        return head + semi + tail, int(num)

    ours: dict[object, list[float]] = {}
    for r in records:
        if "log" in r["backends"]:  # type: ignore[operator]
            key = (r["call_id"], r["to_tag"], r["code"], r["method"], r["kind"], r["cseq"])
            ours.setdefault(key, []).append(float(r["ts"]))  # type: ignore[arg-type]
    # the log lines themselves, time taken out: equal as multisets
    our_lines = sorted(split(ln.split("ACC: ", 1)[1])[0] for ln in (work / "ours.log").read_text().splitlines()
                       if "ACC: " in ln)
    assert our_lines == sorted(split(ln.split("ACC: ", 1)[1])[0] for ln in kam_lines)
    # and the seconds of each line: ours from the JSON lines (to the µs), Kamailio's from its line
    theirs: dict[object, list[int]] = {}
    kinds = {"transaction answered": "answered", "call missed": "missed", "request acknowledged": "acked"}
    for ln in kam_lines:
        text = ln.split("ACC: ", 1)[1]
        kind = kinds[text.split(":", 1)[0]]
        f = dict(p.split("=", 1) for p in text.split(": ", 1)[1].split(";") if "=" in p)
        cseq = next(r["cseq"] for r in records if r["call_id"] == f["call_id"] and r["method"] == f["method"])
        key = (f["call_id"], f["to_tag"] or None, f["code"], f["method"], kind, cseq)
        theirs.setdefault(key, []).append(int(f["timestamp"]))
    _pair_times(ours, theirs, slack_s)
    rows = _our_rows(work / "ours.db")
    n = 0
    for table in ("acc", "missed_calls"):
        mine: dict[object, list[float]] = {}
        for row in rows[table]:  # the row's time to the µs: its record's in the JSON lines
            t = next(float(r["ts"]) for r in records  # type: ignore[arg-type]
                     if (r["call_id"], r["to_tag"], r["code"], r["method"], r["table"])
                     == (row["callid"], row["to_tag"] or None, row["sip_code"], row["method"], table))
            mine.setdefault(comparable(row)[1:], []).append(t)
        kams: dict[object, list[int]] = {}
        for row in kam_rows[table]:  # Kamailio's second, read back from db_sqlite's Julian day (of t - 0.5 s)
            kams.setdefault(comparable(row)[1:], []).append(comparable(row)[0])  # type: ignore[arg-type]
        n += _pair_times(mine, kams, slack_s)
    assert len(records) == len(kam_lines)
    return n


@pytest.mark.parametrize("case, workers", [*((c, "0") for c in CASES), ("volume_mixed", "2")])
def test_siptrace_mirror_gives_kamailios_records(case: str, workers: str, tmp_path: Path) -> None:
    """-j 0, and -j 2 (calls sharded over two worker processes) on the 300 calls."""
    require_kamailio("siptrace", "acc", "tm")
    (tmp_path / "rules.yaml").write_text(_rules(case))
    ours = start_ours(_our_args(tmp_path, workers=workers), tmp_path)
    try:
        relayed = relay_with_siptrace(case, tmp_path)
        # on a busy machine we may still be reading the mirror: wait (bounded) for as many
        # records as Kamailio wrote ACC lines before the stop, rather than guess a time
        deadline = time.monotonic() + 60
        out = tmp_path / "ours.jsonl"  # whole lines only: a line may be half written while we look
        while (out.read_bytes().count(b"\n") if out.exists() else 0) < len(relayed.kam_lines) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)  # anything beyond Kamailio's records would show up too
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
    # replies Kamailio stamped before their request (tcp_caller: 3 before RequestFirst) were put after it
    assert stats["tracker"]["replies_without_request"] == 0


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
        if scheme == "tcp":  # nothing could be sent: every copy is counted lost, none as sent
            assert stats["sent"] == 0 and sum(stats["lost"].values()) == 26, stats  # the 26 messages
        assert res.stderr.count("alarm: --hep-out") >= 1
