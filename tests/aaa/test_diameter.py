"""Diameter base accounting against Erlang/OTP's diameter application on loopback (issue 6):
CER/CEA, ACRs answered 2001 with the expected record types, DPR at the end; an outage of
the peer mid-run loses and duplicates nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.aaa_servers import OtpDiameterPeer, diameter_peer  # noqa: F401 - fixture
from tests.conformance.goldens import rules_for
from tests.streaming import run_through_outage

CASES = Path(__file__).resolve().parents[1] / "conformance" / "cases"
VOLUME = CASES / "volume_mixed" / "capture.pcap"


def rules(tmp: Path, peer: OtpDiameterPeer, case: str) -> Path:
    text = rules_for(case).replace("acc:\n", (
        f"acc:\n  diameter_flag: 1\n  diameter_missed_flag: 2\n  diameter_client_host: {peer.ip}\n"
        f"  diameter_client_port: {peer.port}\n  diameter_bind: 127.0.3.11\n  diameter_origin_host: sniffer.test.example\n"
        f"  diameter_origin_realm: test.example\n  diameter_timeout: 2\n  diameter_extra: \"7846=$fU\"\n"), 1)
    p = tmp / "rules.yaml"
    p.write_text(text)
    return p


def ours(tmp: Path, pcap: Path, rules_file: Path) -> list[dict[str, object]]:
    out = tmp / "records.jsonl"
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", str(pcap), "--rules", str(rules_file),
                          "--no-db", "--log", "none", "--jsonl", str(out), "--spool", str(tmp / "spool")],
                         capture_output=True, text=True, timeout=120, cwd=tmp)
    assert res.returncode == 0, res.stderr
    return [d for d in map(json.loads, out.read_text().splitlines()) if "diameter" in d["backends"]]


def test_acrs_answered_2001_with_the_expected_types(tmp_path: Path, diameter_peer: OtpDiameterPeer) -> None:
    recs = ours(tmp_path, CASES / "answered_bye_from_caller" / "capture.pcap",
                rules(tmp_path, diameter_peer, "answered_bye_from_caller"))
    recs += ours(tmp_path, CASES / "busy_486_failed_and_missed" / "capture.pcap",
                 rules(tmp_path, diameter_peer, "busy_486_failed_and_missed"))
    events = diameter_peer.events()
    assert [e["event"] for e in events][:1] == ["peer_up"] and events[-1]["event"] == "peer_down"  # CER ... DPR
    acrs = diameter_peer.acrs()
    assert len(acrs) == len(recs) == 6  # 2 x (INVITE, BYE) + missed + failed
    types = [(a["avps"]["Acct-Session-Id"][0], a["avps"]["Accounting-Record-Type"]) for a in acrs]
    calls = sorted({t[0] for t in types})
    by_call = {c: [t for cid, t in types if cid == c] for c in calls}
    assert sorted(by_call.values()) == [[1, 1], [2, 4], [2, 4]]  # EVENT x2 (busy); START then STOP per call
    for a in acrs:
        avps = a["avps"]
        assert avps["Origin-Host"] == "sniffer.test.example" and avps["Acct-Application-Id"] == [3]
        assert avps["Session-Id"].startswith("sniffer.test.example;")
        other = {(o["code"], o["vendor"]) for o in a["other"]}
        assert (393, "undefined") in other and (7846, 32473) in other  # SIP-Method, the diameter_extra
    sessions = {a["avps"]["Acct-Session-Id"][0]: a["avps"]["Session-Id"] for a in acrs}
    assert all(a["avps"]["Session-Id"] == sessions[a["avps"]["Acct-Session-Id"][0]] for a in acrs)


def test_peer_outage_mid_run_every_record_once(tmp_path: Path, diameter_peer: OtpDiameterPeer) -> None:
    r = rules(tmp_path, diameter_peer, "volume_mixed")
    first = tmp_path / "first"  # a complete run first: the records to expect
    first.mkdir()
    want = sorted(int(d["id"][8:16], 16) for d in ours(first, VOLUME, r))
    assert len(want) == 600
    diameter_peer.records_file.unlink()
    err = run_through_outage(tmp_path, VOLUME, r, diameter_peer, lambda: len(diameter_peer.acrs()))
    assert "alarm: diameter backend down" in err
    got = sorted(a["e2e"] for a in diameter_peer.acrs())  # End-to-End ids come from the record ids
    assert got == want
