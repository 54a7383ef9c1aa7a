"""Real Kamailio 5.6 on loopback for the HEP tests (tests/hep), every process ours, stopped by PID.

``relay_with_siptrace``: Kamailio (kamailio_hep.cfg.in: the conformance proxy plus siptrace,
HEPv3 with an auth key and a capture id) relays SIPp calls and mirrors every message to our
``sipsniff-acc process --hep-listen``; returns Kamailio's acc rows and ACC lines beside ours.
``sipcapture``: a Kamailio with the sipcapture module (hep_capture_on) writing what it receives
to an SQLite sip_capture table, for --hep-out.

Addresses: H2's 127.0.12.0/24, ports 19060-19099.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CONFORMANCE = HERE.parent / "conformance"
SQL = Path("/usr/share/kamailio/db_sqlite")
MODULES = Path("/usr/lib/x86_64-linux-gnu/kamailio/modules")
PROXY, UAC, UAS = "127.0.12.1", "127.0.12.2", "127.0.12.3"
PROXY_PORT, UAC_PORT, UAS_PORT, HEP_PORT, CAPTURE_PORT = 19060, 19070, 19080, 19090, 19091
AGENT_ID = 2001
SECRET = "s3cret-hep"
STOP_TIMEOUT = 20.0


def require_kamailio(*modules: str) -> None:
    """Skip (or fail under SIPSNIFF_REQUIRE_SERVERS=1) unless kamailio, sipp and the modules are here."""
    missing = [p for p in ("kamailio", "sipp") if shutil.which(p) is None]
    missing += [m for m in ("db_sqlite", *modules) if not (MODULES / f"{m}.so").exists()]
    if missing:
        reason = f"needs kamailio (+ sqlite modules, {', '.join(modules)}) and sipp; missing: {', '.join(missing)}"
        if os.environ.get("SIPSNIFF_REQUIRE_SERVERS") == "1":
            pytest.fail(f"{reason}, and SIPSNIFF_REQUIRE_SERVERS=1 forbids skipping")
        pytest.skip(reason)


def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def _scenario(name: str) -> list[str]:
    return ["-sn", name] if name in ("uac", "uas") else ["-sf", str(CONFORMANCE / "scenarios" / name)]


def start_ours(args: list[str], work: Path, name: str = "ours") -> subprocess.Popen[bytes]:
    """``sipsniff-acc process ARGS``, returned once it says it is listening (bounded wait)."""
    err = open(work / f"{name}.err", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "sipsniff_acc", "process", *args], stdout=subprocess.DEVNULL,
                            stderr=err, cwd=work)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = (work / f"{name}.err").read_text(errors="replace")
        if "listening on" in text:
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"sipsniff-acc exited {proc.returncode}: {text[-2000:]}")
        time.sleep(0.05)
    stop(proc)
    raise AssertionError("sipsniff-acc did not listen within 60 s")


@dataclass
class Relayed:
    kam_rows: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    kam_lines: list[str] = field(default_factory=list)
    work: Path = Path()


def relay_with_siptrace(case: str, work: Path, fr_inv_timer: int = 120000) -> Relayed:
    """Kamailio relays the conformance case's SIPp calls and mirrors them over HEP to
    udp://PROXY:HEP_PORT (whoever listens there: the caller starts us first)."""
    from tests.conformance.record_kamailio import ALL_CASES

    c = ALL_CASES[case]
    db = work / "kam.db"
    con = sqlite3.connect(db)
    con.executescript((SQL / "standard-create.sql").read_text() + (SQL / "acc-create.sql").read_text())
    for name in [p.split("=")[0] for p in c.extras.split(";") if p]:  # db_extra's columns, as the recorder adds them
        for table in ("acc", "missed_calls"):
            con.execute(f"ALTER TABLE {table} ADD COLUMN {name} VARCHAR(128) DEFAULT NULL")
    con.commit()
    con.close()
    cfg = work / "kamailio.cfg"
    params = "\n".join(f'modparam("acc", "{k}", {v})' for k, v in c.modparams)
    if c.extras:
        params += f'\nmodparam("acc", "log_extra", "{c.extras}")\nmodparam("acc", "db_extra", "{c.extras}")'
    cfg.write_text((HERE / "kamailio_hep.cfg.in").read_text().format(
        proxy=PROXY, port=PROXY_PORT,
        tcp=f"listen=tcp:{PROXY}:{PROXY_PORT}" if c.transport == "tcp" else "disable_tcp=yes", db=db, fr_inv_timer=fr_inv_timer, modparams=params,
        collector=f"{PROXY}:{HEP_PORT}", agent_id=AGENT_ID, auth_key=SECRET, flag_methods=c.flag_methods,
        invite_flags="\n".join(f"\t\tsetflag({f});" for f in c.invite_flags)))
    log = open(work / "kamailio.log", "wb")  # noqa: SIM115
    kam = subprocess.Popen(["kamailio", "-f", str(cfg), "-DD", "-E", "-Y", str(work), "-P", str(work / "k.pid"),
                            "-m", "32", "-M", "8"], stderr=log, stdout=log)
    uas = subprocess.Popen(["sipp", *_scenario(c.uas), "-i", UAS, "-p", str(UAS_PORT), "-m", str(c.calls),
                            "-nostdin", "-timeout", "30"], cwd=work, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        _wait_log(work / "kamailio.log", kam)
        subprocess.run(["sipp", *_scenario(c.uac), *(["-t", "t1"] if c.transport == "tcp" else []), f"{UAS}:{UAS_PORT}", "-rsa", f"{PROXY}:{PROXY_PORT}",
                        "-i", UAC, "-p", str(UAC_PORT), "-m", str(c.calls), "-r", str(c.rate), "-d", str(c.pause_ms),
                        "-nostdin", "-timeout", "40"], cwd=work, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=90, check=False)
        try:
            uas.wait(15)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(1.0)  # the last HEP copies reach us, and our reorder window lets them go
    finally:
        stop(uas)
        stop(kam)
        log.close()
    out = Relayed(work=work)
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    for table in ("acc", "missed_calls"):
        out.kam_rows[table] = [dict(r) for r in con.execute(f"SELECT * FROM {table} ORDER BY id")]  # noqa: S608
    con.close()
    out.kam_lines = [ln for ln in (work / "kamailio.log").read_text(errors="replace").splitlines() if "ACC:" in ln]
    return out


def _wait_log(log: Path, proc: subprocess.Popen[bytes]) -> None:
    """Kamailio had 1.5 s to start its children (as the conformance recorder gives it) and is still up."""
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    if proc.poll() is not None:
        raise AssertionError(f"kamailio exited: {log.read_text(errors='replace')[-2000:]}")


#: sip_capture's columns as Kamailio 5.6's sipcapture module writes them (its *_column
#: modparams' defaults); every one plain, so the module's insert always fits
CAPTURE_COLUMNS = ("date", "micro_ts", "method", "correlation_id", "reply_reason", "ruri", "ruri_user", "ruri_domain",
                   "from_user", "from_domain", "from_tag", "to_user", "to_domain", "to_tag", "pid_user", "contact_user",
                   "auth_user", "callid", "callid_aleg", "via_1", "via_1_branch", "cseq", "diversion", "reason",
                   "content_type", "auth", "user_agent", "source_ip", "source_port", "destination_ip",
                   "destination_port", "contact_ip", "contact_port", "originator_ip", "originator_port", "proto",
                   "family", "rtp_stat", "type", "node", "msg", "custom_field1", "custom_field2", "custom_field3")

CAPTURE_CFG = """#!KAMAILIO
# A Homer-style collector: sipcapture stores every HEP packet it accepts in SQLite.
debug=2
log_stderror=yes
children=1
auto_aliases=no
dns=no
rev_dns=no
disable_tcp=yes
listen=udp:{addr}:{port}
mpath="{modules}/"
loadmodule "pv.so"
loadmodule "db_sqlite.so"
loadmodule "sipcapture.so"
modparam("sipcapture", "db_url", "sqlite://{db}")
modparam("sipcapture", "capture_on", 1)
modparam("sipcapture", "hep_capture_on", 1)
modparam("sipcapture", "capture_node", "homer01")
modparam("sipcapture", "table_name", "sip_capture")
request_route {{
	sip_capture();
	drop;
}}
onreply_route {{
	sip_capture();
	drop;
}}
"""


class SipCapture:
    """kamailio + sipcapture on udp://addr:port, rows in work/capture.db's sip_capture."""

    def __init__(self, work: Path, addr: str = PROXY, port: int = CAPTURE_PORT) -> None:
        self.db = work / "capture.db"
        con = sqlite3.connect(self.db)
        con.executescript((SQL / "standard-create.sql").read_text())
        con.execute("CREATE TABLE sip_capture (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                    + ", ".join(f"{c} TEXT" for c in CAPTURE_COLUMNS) + ")")
        con.commit()
        con.close()
        cfg = work / "capture.cfg"
        cfg.write_text(CAPTURE_CFG.format(addr=addr, port=port, modules=MODULES, db=self.db))
        self.log_path = work / "capture.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(["kamailio", "-f", str(cfg), "-DD", "-E", "-Y", str(work), "-P",
                                      str(work / "c.pid"), "-m", "32", "-M", "8"], stderr=self.log, stdout=self.log)
        _wait_log(self.log_path, self.proc)
        self.url = f"udp://{addr}:{port}"

    def rows(self) -> list[dict[str, object]]:
        con = sqlite3.connect(self.db)
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute("SELECT * FROM sip_capture ORDER BY id")]
        finally:
            con.close()

    def close(self) -> None:
        stop(self.proc)
        self.log.close()


def jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
