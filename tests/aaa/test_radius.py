"""RADIUS accounting against a real FreeRADIUS on loopback (issue 6).

Conformance: tests/aaa/kamailio_acc_radius.pcap is a capture of a real Kamailio 5.6.3 with
acc_radius + radcli beside its SIP traffic (call + BYE, 486, local t_reply 486, MESSAGE,
OPTIONS, REGISTER, INFO; recorded for the team in ../shared/aaa, kamailio.cfg there). We
process its SIP with the equivalent rules.yaml and send our records to FreeRADIUS, then
replay Kamailio's own Accounting-Requests from the capture to the same server: FreeRADIUS's
decoding of both must be identical, attribute by attribute and in order.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from sipsniff_acc.decode import decode
from sipsniff_acc.events import Datagram
from sipsniff_acc.sources import CaptureReader
from tests.aaa_servers import SECRET, FreeRadius, freeradius  # noqa: F401 - fixture

HERE = Path(__file__).resolve().parent
CAPTURE = HERE / "kamailio_acc_radius.pcap"

RULES = """\
profile: kamailio-5.6
proxy: {{addresses: ["127.0.3.2:13860"]}}
acc:
  log_flag: 1
  failed_transaction_flag: 3
  radius_flag: 1
  radius_missed_flag: 2
  service_type: 15
  radius_config: {config}
route:
  - if: {{in_dialog: true, method: [BYE, INVITE, UPDATE]}}
    setflag: [1, 3]
  - if: {{in_dialog: true}}
    stop: true
  - if: {{method: CANCEL}}
    stop: true
  - setflag: [1, 2, 3]
"""


def write_rules(tmp: Path, server: FreeRadius, extra: str = "", timeout: float = 1.0) -> Path:
    cfg = tmp / "radius.yaml"
    cfg.write_text(f"servers: ['{server.ip}:{server.port}']\nsecret: {SECRET}\ntimeout: {timeout}\nretries: 1\n"
                   f"bind: 127.0.3.2\nnas_ip: 127.0.3.2\n{extra}")
    rules = tmp / "rules.yaml"
    rules.write_text(RULES.format(config=cfg))
    return rules


def kamailio_requests() -> list[bytes]:
    """The Accounting-Requests Kamailio sent (UDP to port 13813), in order."""
    out = []
    for frame in CaptureReader(str(CAPTURE)):
        d = decode(frame)
        if isinstance(d, Datagram) and d.dport == 13813:
            out.append(d.payload)
    return out


def replay(server: FreeRadius, packets: list[bytes]) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.3.2", 0))
    s.settimeout(5)
    for p in packets:
        s.sendto(p, (server.ip, server.port))
        s.recv(4096)  # the Accounting-Response
    s.close()


#: lines FreeRADIUS adds to a detail entry about the packet, not from it
_DETAIL_OWN = ("Packet-Src-Port", "Packet-Dst-Port", "Packet-Src-IP-Address", "Packet-Dst-IP-Address",
               "Timestamp", "Acct-Unique-Session-Id")


def detail_blocks(server: FreeRadius) -> list[list[str]]:
    """The detail file's entries as their attribute lines, minus what FreeRADIUS adds itself."""
    text = (server.dir / "var" / "radacct" / "detail").read_text()
    blocks = []
    for entry in text.strip().split("\n\n"):
        lines = [ln.strip() for ln in entry.splitlines()[1:]]  # the first line is the time header
        blocks.append([ln for ln in lines if ln and not ln.startswith(_DETAIL_OWN)])
    return blocks


def test_we_send_what_kamailio_sends(tmp_path: Path, freeradius: FreeRadius) -> None:
    theirs = kamailio_requests()
    assert len(theirs) == 10
    rules = write_rules(tmp_path, freeradius)
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", str(CAPTURE), "--rules", str(rules),
                          "--no-db", "--log", "none", "--spool", str(tmp_path / "spool")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert re.search(r"radius(:\S+)?: 10 records delivered", res.stderr)
    ours = freeradius.records()
    replay(freeradius, theirs)
    time.sleep(0.2)
    kam = freeradius.records()[len(ours):]
    assert len(ours) == len(kam) == 10
    for o, k in zip(ours, kam, strict=True):
        assert list(o) == list(k)  # the same attributes in the same order
        assert o == k
    detail = detail_blocks(freeradius)  # and in the detail file, as FreeRADIUS writes it
    assert len(detail) == 20 and detail[:10] == detail[10:]
    assert [(o["Acct-Status-Type"], o["Sip-Method"]) for o in ours] == [
        ("Start", "INVITE"), ("Stop", "BYE"), ("Failed", "INVITE"), ("Failed", "INVITE"), ("Failed", "INVITE"),
        ("Failed", "INVITE"), ("Failed", "MESSAGE"), ("Failed", "OPTIONS"), ("Failed", "REGISTER"), ("Failed", "INFO")]


def volume_rules(tmp: Path, server: FreeRadius) -> Path:
    """The volume conformance case's rules, with RADIUS on the same flags as the log."""
    from tests.conformance.goldens import rules_for
    cfg = tmp / "radius.yaml"
    cfg.write_text(f"servers: ['{server.ip}:{server.port}']\nsecret: {SECRET}\ntimeout: 0.5\nretries: 1\n"
                   "bind: 127.0.3.5\nnas_ip: 127.0.3.5\n")
    text = rules_for("volume_mixed").replace(
        "acc:\n", f"acc:\n  radius_flag: 1\n  radius_missed_flag: 2\n  radius_config: {cfg}\n  radius_extra: \"User-Name=$fU\"\n", 1)
    p = tmp / "rules.yaml"
    p.write_text(text)
    return p


def expected(tmp: Path, rules: Path) -> list[tuple[object, ...]]:
    import json
    out = tmp / "expected.jsonl"
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", str(VOLUME), "--rules", str(rules),
                          "--no-db", "--log", "none", "--jsonl", str(out), "-q", "--spool", str(tmp / "x.spool")],
                         capture_output=True, text=True, timeout=120, cwd=tmp)
    # (this run also delivered to the server: the caller clears its records first)
    assert res.returncode == 0, res.stderr
    return sorted((d["call_id"], d["method"], int(d["code"]), int(d["ts"])) for d in map(json.loads, out.read_text().splitlines())
                  if "radius" in d["backends"])


VOLUME = Path(__file__).resolve().parents[1] / "conformance" / "cases" / "volume_mixed" / "capture.pcap"


def test_radius_outage_mid_run_every_record_once(tmp_path: Path, freeradius: FreeRadius) -> None:
    from tests.streaming import run_through_outage
    rules = volume_rules(tmp_path, freeradius)
    want = expected(tmp_path, rules)
    assert len(want) == 600
    freeradius.jsonl.unlink()
    err = run_through_outage(tmp_path, VOLUME, rules, freeradius, lambda: len(freeradius.records()))
    assert "alarm: radius backend down" in err
    got = sorted((r["Acct-Session-Id"], r["Sip-Method"], r["Sip-Response-Code"],
                  int(__import__("calendar").timegm(time.strptime(r["Event-Timestamp"], "%b %d %Y %H:%M:%S UTC"))))
                 for r in freeradius.records())
    assert got == want  # every record once: the busy calls' two identical Failed packets (missed + failed) included
    assert all(r["User-Name"].startswith("caller") for r in freeradius.records())


def test_failover_to_the_second_server_and_radiusclient_conf(tmp_path: Path, freeradius: FreeRadius) -> None:
    """radiusclient.conf with two acctservers: the first answers nothing, the second is FreeRADIUS."""
    from sipsniff_acc.emitters.radius import RadiusEmitter, load_config
    from sipsniff_acc.processrun import records_of
    from sipsniff_acc.rules import parse_rules
    from tests.flows import answered_call
    from tests.servers import free_port

    dead = free_port()
    conf = tmp_path / "radiusclient.conf"
    (tmp_path / "servers").write_text(f"{freeradius.ip} {SECRET}\n127.0.3.9 other-secret\n")
    conf.write_text(f"# radcli style\nacctserver 127.0.3.9:{dead},{freeradius.ip}:{freeradius.port}\nservers servers\n"
                    "radius_timeout 0.3\nradius_retries 1\nbindaddr 127.0.3.5\nnas-ip 127.0.3.5\n")
    cfg = load_config(str(conf))
    assert cfg.servers == [("127.0.3.9", dead, "other-secret"), (freeradius.ip, freeradius.port, SECRET)]
    rules = parse_rules(f"acc: {{radius_flag: 1, radius_config: {conf}}}\nroute:\n  - setflag: [1]\n")
    em = RadiusEmitter(rules)
    em.deliver(records_of(answered_call(), rules))
    em.close()
    assert em.sent == 2 and em.retransmissions == 1  # the first record tried the dead server twice
    assert [r["Acct-Status-Type"] for r in freeradius.records()] == ["Start", "Stop"]
