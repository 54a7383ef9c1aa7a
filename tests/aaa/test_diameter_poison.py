"""Diameter: a permanent refusal is set aside, never retried for ever (issue 10), against
Erlang/OTP's diameter (tests/fixtures/diameter/acct_peer.escript answers 5004 to a Call-ID
with "poison", 3009 with the E bit to "badbits", 3004 TOO_BUSY once to "busyonce").

Measured before: any answer but 2001 was a BackendDown, so one 5004 kept every later record
of every later run in the spool.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.aaa.poison import NORMAL, poison_capture
from tests.aaa_servers import OtpDiameterPeer, diameter_peer  # noqa: F401 - fixture

RULES = """\
acc:
  log_flag: 1
  diameter_flag: 1
  diameter_client_host: {ip}
  diameter_client_port: {port}
  diameter_bind: 127.0.3.11
  diameter_origin_host: sniffer.test.example
  diameter_origin_realm: test.example
  diameter_timeout: 2
  diameter_extra: "7846=$hdr(X-Extra)"
route:
  - setflag: [1]
"""


def run(tmp: Path, peer: OtpDiameterPeer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sipsniff_acc", *args, "--spool", str(tmp / "spool")],
                          capture_output=True, text=True, timeout=120, cwd=tmp)


def test_poison_answered_5004_is_dead_lettered_and_twenty_calls_delivered(
        tmp_path: Path, diameter_peer: OtpDiameterPeer) -> None:
    """Acceptance (issue 10): the 20 normal calls' 40 ACRs answered 2001, the poison (5004)
    and badbits (3009, E bit) records dead-lettered with the peer's reason, the busy record
    (3004 once) retried and delivered; the run ends promptly."""
    cap = poison_capture(tmp_path / "poison.pcap", markers=("badbits", "busyonce"))
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(ip=diameter_peer.ip, port=diameter_peer.port))
    res = run(tmp_path, diameter_peer, "process", str(cap), "--rules", str(rules), "--no-db", "--log", "none",
              "--drain-timeout", "20")
    assert res.returncode in (0, 3), res.stderr  # the lead decides whether dead letters make it 3
    acrs = diameter_peer.acrs()
    sid = [a["avps"]["Acct-Session-Id"][0] for a in acrs]
    answered = Counter(s for s, a in zip(sid, acrs, strict=True) if a["result"] == 2001)
    assert all(answered[f"normal-{i}@example.com"] == 2 for i in range(NORMAL))  # INVITE and BYE
    assert sum(n for s, n in answered.items() if s.startswith("normal-")) == 2 * NORMAL
    assert answered["busyonce@example.com"] == 2  # 3004 is transient: retried and delivered
    refused = Counter((s, a["result"]) for s, a in zip(sid, acrs, strict=True) if a["result"] != 2001)
    assert refused[("busyonce@example.com", 3004)] == 1
    poison = {s for s in sid if "poison" in s}
    assert len(poison) == 3 and all(refused[(s, 5004)] == 2 for s in poison)  # each record tried once
    assert refused[("badbits@example.com", 3009)] == 2

    export = run(tmp_path, diameter_peer, "spool", "export", "--dead")
    assert export.returncode == 0, export.stderr
    dead = [json.loads(line) for line in export.stdout.splitlines()]
    assert len(dead) == 8
    assert all(d["destination"] == f"diameter:{diameter_peer.ip}:{diameter_peer.port}" for d in dead)
    by_call = Counter((d["entry"]["record"]["call_id"], d["reason"]) for d in dead)
    reason_5004 = "Diameter: refused for good: Result-Code 5004 (INVALID_AVP_VALUE), Error-Message " \
                  "'poison Call-ID refused'"
    assert {c for c, _r in by_call} == poison | {"badbits@example.com"}
    assert all(r == reason_5004 for c, r in by_call if "poison" in c)
    assert by_call[("badbits@example.com", "Diameter: refused for good: Result-Code 3009 (INVALID_AVP_BITS), "
                    "E bit")] == 2
    status = run(tmp_path, diameter_peer, "spool", "status")
    assert "0 pending, 8 dead-lettered" in status.stdout


def test_a_later_run_is_not_blocked_by_the_poison(tmp_path: Path, diameter_peer: OtpDiameterPeer) -> None:
    """The measured case: before, a second run (or `deliver`) retried the 5004 record first,
    for ever, and delivered nothing."""
    cap = poison_capture(tmp_path / "poison.pcap")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(ip=diameter_peer.ip, port=diameter_peer.port))
    for _ in range(2):
        res = run(tmp_path, diameter_peer, "process", str(cap), "--rules", str(rules), "--no-db", "--log", "none",
                  "--drain-timeout", "10")
        assert res.returncode in (0, 3), res.stderr
    normal = [a for a in diameter_peer.acrs() if a["avps"]["Acct-Session-Id"][0].startswith("normal-")]
    assert len(normal) == 4 * NORMAL and all(a["result"] == 2001 for a in normal)  # both runs, every record
    assert "0 pending" in run(tmp_path, diameter_peer, "spool", "status").stdout
