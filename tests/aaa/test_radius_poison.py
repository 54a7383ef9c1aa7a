"""RADIUS: one record can never block the rest (issue 10), against a real FreeRADIUS.

Measured before: a Call-ID over 253 bytes raised inside pyrad on every run and every
`deliver`, so the spool was stuck for good; the shared secret was printed by two config
errors. Now values are fitted (RFC 2865's 253 octets, NUL, invalid text) or the record is
refused with ``RecordRejected`` (on_overlong: dead-letter, a packet over 4096 octets), and
a config mistake is one line without the secret.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sipsniff_acc.emitters.radius import RadiusConfigError, RadiusEmitter, load_config
from sipsniff_acc.emitters.spool import RecordRejected
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import parse_rules
from tests.aaa.poison import LONG_CALL_ID, LONG_TO_TAG, NORMAL, poison_capture
from tests.aaa_servers import SECRET, FreeRadius, freeradius  # noqa: F401 - fixture

MAX_STRING = 253  #: RFC 2865 §5
HIDDEN = "Hush-9f3c2a-secret"  #: a secret no message may ever show


@pytest.mark.parametrize(("name", "text"), [
    ("bad-port.yaml", f"servers: ['127.0.0.1:18x3:{HIDDEN}']\n"),
    ("no-host.yaml", f"servers: [':1813:{HIDDEN}']\n"),
    ("syntax.yaml", f"servers: ['127.0.0.1']\nsecret: {HIDDEN}: [oops\n"),
    ("syntax2.yaml", f"secret: \"{HIDDEN}\n  timeout: [\n"),
    ("timeout.yaml", f"servers: ['127.0.0.1']\nsecret: {HIDDEN}\ntimeout: soon\n"),
    ("nas.yaml", f"servers: ['127.0.0.1']\nsecret: {HIDDEN}\nnas_ip: '::1'\n"),
    ("policy.yaml", f"servers: ['127.0.0.1']\nsecret: {HIDDEN}\non_overlong: split\n"),
    ("port.conf", f"acctserver 127.0.0.1:abc:{HIDDEN}\n"),
    ("host.conf", f"acctserver :1813:{HIDDEN}\n"),
    ("range.conf", f"acctserver 127.0.0.1:99999:{HIDDEN}\n"),
    ("retries.conf", f"acctserver 127.0.0.1:1813:{HIDDEN}\nradius_retries many\n"),
])
def test_config_errors_are_one_line_without_the_secret(tmp_path: Path, name: str, text: str) -> None:
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(RadiusConfigError) as e:
        load_config(str(p))
    msg = str(e.value)
    assert HIDDEN not in msg and "\n" not in msg and msg.startswith(str(p))


def test_check_rules_names_the_mistake_in_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "radius.conf"
    cfg.write_text(f"acctserver 127.0.0.1:18l3:{HIDDEN}\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"acc: {{radius_flag: 1, radius_config: {cfg}}}\nroute:\n  - setflag: [1]\n")
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "check-rules", str(rules)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2
    assert HIDDEN not in res.stderr + res.stdout and "Traceback" not in res.stderr
    assert "bad port for server 127.0.0.1" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def emitter(tmp: Path, server: FreeRadius, extra: str = "", timeout: float = 1.0) -> RadiusEmitter:
    cfg = tmp / "radius.yaml"
    cfg.write_text(f"servers: ['{server.ip}:{server.port}']\nsecret: {SECRET}\ntimeout: {timeout}\nretries: 0\n"
                   f"bind: 127.0.3.2\nnas_ip: 127.0.3.2\n{extra}")
    rules = parse_rules(f"acc: {{radius_flag: 1, radius_config: {cfg}, radius_extra: 'User-Name=$fU'}}\n"
                        "route:\n  - setflag: [1]\n")
    return RadiusEmitter(rules)


def record(call_id: str, to_tag: str = "tt", user: str = "alice",
           legs: list[list[tuple[str, str | None]]] | None = None, rid: str = "") -> AccRecord:
    return AccRecord("answered", 1_700_000_000.0, "INVITE", "ft", to_tag, call_id, "200", "OK", ("radius",),
                     extras={"radius": [("User-Name", user)]}, legs=legs or [],
                     record_id=rid or f"{abs(hash(call_id)) % 16**16:016x}")


def test_overlong_values_are_truncated_and_nul_replaced(tmp_path: Path, freeradius: FreeRadius) -> None:
    em = emitter(tmp_path, freeradius)
    batch = [record(LONG_CALL_ID), record("poison-totag", to_tag=LONG_TO_TAG), record("poison-nul", user="a\0b"),
             record("poison-text", user="x\udcffy"), record("normal-1")]
    em.deliver(batch)
    em.close()
    got = freeradius.records()
    assert [r["Acct-Session-Id"] for r in got] == [LONG_CALL_ID[:MAX_STRING], "poison-totag", "poison-nul",
                                                       "poison-text", "normal-1"]
    assert got[1]["Sip-To-Tag"] == LONG_TO_TAG[:MAX_STRING]
    assert got[2]["User-Name"] == "a\ufffdb" and got[3]["User-Name"] == "x\ufffdy"
    assert em.fitted == {"Acct-Session-Id: truncated to 253 bytes": 1, "Sip-To-Tag: truncated to 253 bytes": 1,
                         "User-Name: NUL replaced": 1, "User-Name: invalid text replaced": 1}
    assert em.sent == 5


def test_multibyte_text_is_cut_on_a_character_boundary(tmp_path: Path, freeradius: FreeRadius) -> None:
    em = emitter(tmp_path, freeradius)
    em.deliver([record("é" * 200)])  # 400 bytes
    em.close()
    assert freeradius.records()[0]["Acct-Session-Id"] == "é" * 126  # 252 bytes: é is never split


def test_dead_letter_policy_refuses_the_record_with_its_index(tmp_path: Path, freeradius: FreeRadius) -> None:
    em = emitter(tmp_path, freeradius, "on_overlong: dead-letter\n")
    batch = [record("normal-1"), record(LONG_CALL_ID, rid="00000000000000aa"), record("normal-2")]
    with pytest.raises(RecordRejected) as e:
        em.deliver(batch)
    assert e.value.index == 1
    assert e.value.reason.startswith("RADIUS: Acct-Session-Id is 300 bytes, over RADIUS's 253")
    em.deliver(batch[2:])  # the spool goes on with the rest
    em.close()
    assert [r["Acct-Session-Id"] for r in freeradius.records()] == ["normal-1", "normal-2"]
    assert em.rejected == 1


def test_a_packet_over_4096_bytes_is_refused_not_retried(tmp_path: Path, freeradius: FreeRadius) -> None:
    """17 leg values of 253 bytes: FreeRADIUS would silently drop the packet, so before, the
    record timed out for ever (BackendDown, retried every second)."""
    em = emitter(tmp_path, freeradius, timeout=0.3)
    big = record("too-big", legs=[[("Sip-Uri-User", "u" * 253)]] * 17)
    with pytest.raises(RecordRejected) as e:
        em.deliver([record("normal-1"), big])
    assert e.value.index == 1 and "over RADIUS's 4096" in e.value.reason
    em.close()
    assert [r["Acct-Session-Id"] for r in freeradius.records()] == ["normal-1"]


RULES = """\
acc:
  log_flag: 1
  radius_flag: 1
  radius_config: {config}
  radius_extra: "User-Name=$hdr(X-Extra)"
route:
  - setflag: [1]
"""


def detail_sessions(server: FreeRadius) -> list[str]:
    """Acct-Session-Id of every entry of FreeRADIUS's detail file, in order."""
    text = (server.dir / "var" / "radacct" / "detail").read_text(errors="replace")
    return re.findall(r'^\s*Acct-Session-Id = "(.*)"$', text, flags=re.M)


def test_poison_then_twenty_calls_through_the_cli(tmp_path: Path, freeradius: FreeRadius) -> None:
    """Acceptance (issue 10): the poison is sent after fitting, every normal call's requests
    reach FreeRADIUS, the run ends promptly with 0 and says what was fitted."""
    cap = poison_capture(tmp_path / "poison.pcap")
    cfg = tmp_path / "radius.yaml"
    cfg.write_text(f"servers: ['{freeradius.ip}:{freeradius.port}']\nsecret: {SECRET}\ntimeout: 1\nretries: 1\n"
                   "bind: 127.0.3.2\nnas_ip: 127.0.3.2\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(config=cfg))
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", str(cap), "--rules", str(rules),
                          "--no-db", "--log", "none", "--spool", str(tmp_path / "spool"), "--drain-timeout", "10"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    sessions = detail_sessions(freeradius)
    normal = [f"normal-{i}@example.com" for i in range(NORMAL) for _ in (1, 2)]  # INVITE and BYE
    assert [s for s in sessions if s.startswith("normal-")] == normal
    assert sessions[:6] == [LONG_CALL_ID[:MAX_STRING]] * 2 + ["poison-totag@example.com"] * 2 + \
        ["poison-nul@example.com"] * 2
    got = freeradius.records()
    assert got[2]["Sip-To-Tag"] == LONG_TO_TAG[:MAX_STRING] and got[4]["User-Name"] == "a\ufffdb"
    assert "Acct-Session-Id: truncated to 253 bytes 2" in res.stderr  # the spool's note at close


def test_dead_letter_policy_through_the_cli(tmp_path: Path, freeradius: FreeRadius) -> None:
    """on_overlong: dead-letter (what Kamailio does to such a request, but kept): the two
    over-long calls' records are set aside with the reason, everything else is delivered,
    and a second run is not blocked by them."""
    cap = poison_capture(tmp_path / "poison.pcap")
    cfg = tmp_path / "radius.yaml"
    cfg.write_text(f"servers: ['{freeradius.ip}:{freeradius.port}']\nsecret: {SECRET}\ntimeout: 1\nretries: 1\n"
                   "bind: 127.0.3.2\nnas_ip: 127.0.3.2\non_overlong: dead-letter\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(config=cfg))
    spool = tmp_path / "spool"
    for _ in range(2):
        res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", str(cap), "--rules", str(rules),
                              "--no-db", "--log", "none", "--spool", str(spool), "--drain-timeout", "10"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert res.returncode in (0, 3), res.stderr
    sessions = detail_sessions(freeradius)
    normal = [f"normal-{i}@example.com" for i in range(NORMAL) for _ in (1, 2)]
    assert sessions == (["poison-nul@example.com"] * 2 + normal) * 2
    export = subprocess.run([sys.executable, "-m", "sipsniff_acc", "spool", "export", "--dead", "--spool", str(spool)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    dead = [json.loads(line) for line in export.stdout.splitlines()]
    assert len(dead) == 8  # 2 calls x 2 records x 2 runs
    assert {d["destination"] for d in dead} == {f"radius:{freeradius.ip}:{freeradius.port}"}
    reasons = sorted({d["reason"] for d in dead})
    why = "is 300 bytes, over RADIUS's 253 (on_overlong: dead-letter; Kamailio drops such a request)"
    assert reasons == [f"RADIUS: Acct-Session-Id {why}", f"RADIUS: Sip-To-Tag {why}"]


def test_a_record_from_other_rules_is_refused_before_any_io(tmp_path: Path) -> None:
    """A spooled record whose extras name an attribute this dictionary lacks, or a number no
    integer attribute holds: refused (or the value omitted and counted), never a traceback."""
    cfg = tmp_path / "radius.yaml"
    cfg.write_text(f"servers: ['127.0.0.1:1']\nsecret: {SECRET}\ntimeout: 0.2\nretries: 0\n")
    em = RadiusEmitter(parse_rules(f"acc: {{radius_flag: 1, radius_config: {cfg}}}\nroute:\n  - setflag: [1]\n"))
    stranger = record("c1")
    stranger.extras = {"radius": [("No-Such-Attribute", "x")]}
    with pytest.raises(RecordRejected) as e:
        em.deliver([stranger])
    assert e.value.index == 0 and "cannot be encoded" in e.value.reason
    huge = record("c2")
    huge.extras = {"radius": [("Acct-Session-Time", "9" * 5000)]}  # int() of it would raise
    out: list[tuple[str, int | str | bytes]] = []
    em._add(out, "Acct-Session-Time", "9" * 5000)
    assert out == [] and em.fitted == {"Acct-Session-Time: not a 32-bit number, omitted": 1}


def test_rules_on_overlong_applies_unless_the_radius_config_says(tmp_path: Path) -> None:
    """One policy for every backend: rules.yaml's acc.on_overlong (as for SQL), unless the
    RADIUS config sets its own."""
    cfg = tmp_path / "radius.yaml"
    cfg.write_text(f"servers: ['127.0.0.1:1']\nsecret: {SECRET}\n")
    rules = parse_rules(f"acc: {{radius_flag: 1, radius_config: {cfg}, on_overlong: dead-letter}}\n")
    em = RadiusEmitter(rules)
    assert em.on_overlong == "dead-letter"
    with pytest.raises(RecordRejected):
        em.deliver([record(LONG_CALL_ID)])
    cfg.write_text(f"servers: ['127.0.0.1:1']\nsecret: {SECRET}\non_overlong: truncate\n")
    assert RadiusEmitter(rules).on_overlong == "truncate"
    assert RadiusEmitter(rules, on_overlong="dead-letter").on_overlong == "dead-letter"  # --on-overlong


def test_a_bind_address_that_is_gone_is_backend_down(tmp_path: Path) -> None:
    """Only BackendDown or RecordRejected ever leave deliver (192.0.2.1 is no local address)."""
    from sipsniff_acc.emitters.spool import BackendDown
    cfg = tmp_path / "radius.yaml"
    cfg.write_text(f"servers: ['127.0.0.1:1']\nsecret: {SECRET}\nbind: 192.0.2.1\n")
    em = RadiusEmitter(parse_rules(f"acc: {{radius_flag: 1, radius_config: {cfg}}}\n"))
    with pytest.raises(BackendDown) as e:
        em.deliver([record("c1")])
    assert e.value.delivered == 0 and "cannot open a socket from 192.0.2.1" in str(e.value)
