#!/usr/bin/env python3
"""Record what a real Kamailio 5.6 writes with its acc module, for the conformance suite.

For each case: a fresh SQLite acc database, tcpdump on loopback, Kamailio (kamailio.cfg.in)
on 127.0.9.1:5060, a SIPp UAS on 127.0.9.3:5080, a SIPp UAC on 127.0.9.2:5070 whose
INVITE is sent to Kamailio with the UAS in its Request-URI. Afterwards the case folder
holds capture.pcap (what crossed the wire), acc.json and missed_calls.json (Kamailio's
rows) and acc.log (its ACC lines): the expected output for `sipsniff-acc process`.

Run as root: python tests/conformance/record_kamailio.py [CASE...]
Every process is ours, stopped by PID; every wait is bounded.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
CASES_DIR = HERE / "cases"
PROXY, UAC, UAS, UAS2 = "127.0.9.1", "127.0.9.2", "127.0.9.3", "127.0.9.4"
SQL = Path("/usr/share/kamailio/db_sqlite")

class Case(NamedTuple):
    uac: str  #: SIPp scenario of the caller ("uac" is SIPp's built-in one)
    uas: str  #: of the callee ("uas" built in)
    calls: int = 1
    invite_flags: tuple[int, ...] = (1, 2)  #: setflag() on an initial request (1 acc, 2 missed, 3 failed)
    flag_methods: str = "INVITE"  #: which initial requests get those flags (is_method() list)
    modparams: tuple[tuple[str, int], ...] = ()  #: extra acc modparams
    fr_inv_timer: int = 120000  #: tm's no-answer timer, ms (Kamailio's default)
    uas2: str = ""  #: a second callee's scenario: the call is forked to both (Request-URI user "fork")
    service: str = ""  #: Request-URI user: "nobody" (proxy's t_reply 404), "slnobody" (its sl_send_reply 404)
    reinvite_flags: tuple[int, ...] = ()  #: setflag() on an in-dialog INVITE
    extras: str = ""  #: log_extra and db_extra (the same list; the recorder adds the DB columns)
    legs: str = ""  #: multi_leg_info
    avps: tuple[tuple[str, str], ...] = ()  #: $avp(name) = "value" on the flagged initial requests, in order
    transport: str = "udp"  #: the caller's transport to the proxy ("tcp": Kamailio listens on TCP too)
    rate: int = 2  #: calls per second
    expect_rows: bool = True  #: False: Kamailio must write nothing (e.g. a stateless reply)
    #: dialog CDRs (issue 12): load `dialog`, dlg_manage() initial INVITEs and in-dialog requests, set
    #: $dlg_var(v), acc cdr_enable=1, cdr_on_failed=1, cdrs_table="acc_cdrs", cdr_extra=CDR_EXTRA
    cdr: bool = False
    cdr_params: tuple[tuple[str, int], ...] = ()  #: more acc cdr_* modparams (cdr_start_on_confirmed, ...)
    dlg_timeout: int = 0  #: dialog default_timeout, s (0: the module's 43200)
    pause_ms: int = 500  #: how long SIPp's built-in caller waits before its BYE
    #: serial forking (issue 12): Request-URI user "serial"; the first callee (uas) fails, a
    #: failure_route runs these setflag()s and relays again to the second callee (uas2)
    serial: bool = False
    failure_flags: tuple[int, ...] = ()
    #: the failure_route calls t_on_failure("SERIAL") again (an LCR script's re-arm): it runs at the
    #: second failure too, where it relays no more
    failure_rearm: bool = False


#: the cdr_extra of the CDR cases: PVs evaluated on the BYE, the failed reply or (FAKED) the INVITE
CDR_EXTRA = ("c_callid=$ci;c_from=$fu;c_to=$tu;c_ft=$ft;c_tt=$tt;c_rs=$rs;c_rr=$rr;c_rm=$rm;c_si=$si;"
             "c_ru=$ru;c_ua=$hdr(User-Agent);c_v=$dlg_var(v);c_nov=$dlg_var(none)")

CASES: dict[str, Case] = {
    "answered_bye_from_caller": Case("uac", "uas", calls=2),
    "busy_486": Case("uac_rejected.xml", "uas_busy.xml"),
    "callee_404": Case("uac_rejected.xml", "uas_not_found.xml"),
    "cancel_after_180": Case("uac_cancel.xml", "uas_ring_cancel.xml"),
    # failed_transaction_flag and the missed flag both set: two records, acc and missed_calls
    "busy_486_failed_and_missed": Case("uac_rejected.xml", "uas_busy.xml", invite_flags=(1, 2, 3)),
    # nobody answers: tm's timer fires, Kamailio CANCELs the callee and sends its own 408 upstream
    "no_answer_proxy_408": Case("uac_rejected.xml", "uas_ring_cancel.xml", invite_flags=(1, 2, 3),
                                fr_inv_timer=2000),
    # the callee hangs up; with detect_direction the BYE's tags are swapped back (acc-spec §2.4)
    "bye_from_callee": Case("uac_wait_bye.xml", "uas_bye.xml"),
    "bye_from_callee_detect_direction": Case("uac_wait_bye.xml", "uas_bye.xml", modparams=(("detect_direction", 1),)),
    "message_flagged": Case("uac_message.xml", "uas_message.xml", invite_flags=(1,), flag_methods="MESSAGE"),
    "report_ack": Case("uac", "uas", modparams=(("report_ack", 1),)),
    "report_cancels": Case("uac_cancel.xml", "uas_ring_cancel.xml", modparams=(("report_cancels", 1),)),
    "early_media_183": Case("uac_early_media.xml", "uas_early_media.xml", modparams=(("early_media", 1),)),
    # parallel forking: one callee answers, the other rings and is CANCELled by the proxy (487)
    "parallel_fork_one_answers": Case("uac", "uas", uas2="uas_ring_cancel.xml", invite_flags=(1, 2, 3)),
    # the proxy's routing rejects the call itself (t_reply 404): missed + answered, local To-tag, error_text reason
    "proxy_404": Case("uac_local_reject.xml", "uas", service="nobody", invite_flags=(1, 2, 3)),
    # ... or statelessly (sl_send_reply 404): no transaction, no record
    "proxy_404_stateless": Case("uac_local_reject.xml", "uas", service="slnobody", invite_flags=(1, 2, 3),
                                expect_rows=False),
    "reinvite": Case("uac_reinvite.xml", "uas_reinvite.xml", reinvite_flags=(1, 3)),
    "options_flagged": Case("uac_options.xml", "uas_options.xml", invite_flags=(1,), flag_methods="OPTIONS"),
    # log_extra/db_extra with many pseudo-variables (nulls too) and multi_leg_info (one DB row per leg)
    "extras_and_legs": Case(
        "uac_mixed.xml", "uas_mixed.xml", calls=6, invite_flags=(1, 2, 3),
        extras=("src_user=$fU;src_domain=$fd;src_name=$fn;src_ip=$si;src_port=$sp;dst_ouser=$tU;dst_user=$rU;"
                "dst_domain=$rd;ru=$ru;ou=$ou;ci=$ci;cs=$cs;rm=$rm;ua=$hdr(User-Agent);acct=$hdr(X-Account);"
                "nohdr=$hdr(X-Missing);tt=$tt;rs=$rs;pr=$pr;rcv_ip=$Ri;rcv_port=$Rp;av=$avp(foo);avall=$(avp(src)[*])"),
        legs="leg_src=$avp(src);leg_dst=$avp(dst)",
        avps=(("src", "A"), ("dst", "B"), ("src", "B"), ("dst", "C"), ("foo", "bar"))),
    "tcp_caller": Case("uac_mixed.xml", "uas_mixed.xml", calls=6, invite_flags=(1, 2, 3), transport="tcp"),
    # a few hundred mixed calls (answered + BYE, 486, 404), at 30 calls/s
    "volume_mixed": Case("uac_mixed.xml", "uas_mixed.xml", calls=300, rate=30, invite_flags=(1, 2, 3),
                         extras="src_user=$fU;ua=$hdr(User-Agent);acct=$hdr(X-Account)"),
    # dialog CDRs (acc cdr_enable with the dialog module), with the acc records beside them
    "cdr_answered": Case("uac", "uas", calls=2, invite_flags=(1, 2, 3), cdr=True),
    "cdr_callee_bye": Case("uac_wait_bye.xml", "uas_bye.xml", invite_flags=(1, 2, 3), cdr=True),
    "cdr_busy": Case("uac_rejected.xml", "uas_busy.xml", invite_flags=(1, 2, 3), cdr=True),
    "cdr_cancelled": Case("uac_cancel.xml", "uas_ring_cancel.xml", invite_flags=(1, 2, 3), cdr=True),
    "cdr_no_answer": Case("uac_rejected.xml", "uas_ring_cancel.xml", invite_flags=(1, 2, 3), fr_inv_timer=2000,
                          cdr=True),
    "cdr_parallel_fork": Case("uac", "uas", uas2="uas_ring_cancel.xml", invite_flags=(1, 2, 3), cdr=True),
    "cdr_reinvite": Case("uac_reinvite.xml", "uas_reinvite.xml", reinvite_flags=(1, 3), cdr=True),
    "cdr_proxy_404": Case("uac_local_reject.xml", "uas", service="nobody", invite_flags=(1, 2, 3), cdr=True),
    "cdr_start_on_confirmed": Case("uac", "uas", calls=2, cdr=True, cdr_params=(("cdr_start_on_confirmed", 1),),
                                   pause_ms=1200),
    # the dialog's lifetime (2 s) runs out before the BYE (4 s): the CDR is written at expiry, with
    # $dlg_var extras only; Kamailio's dialog timer ticks once a second (CDR_TIME_TOLERANCE_MS)
    "cdr_expired": Case("uac", "uas", cdr=True, dlg_timeout=2, pause_ms=4000,
                        cdr_params=(("cdr_expired_dlg_enable", 1),)),
    # serial forking: a failure_route relays again to a second callee. Kamailio writes a missed
    # row per failed round (the first branch's reply, before the failure_route runs), then
    # on_missed's reset leaves the missed flag off unless the failure_route sets it again
    "serial_486_then_200": Case("uac_serial.xml", "uas_busy.xml", uas2="uas", serial=True, invite_flags=(1, 2, 3)),
    "serial_486_then_480": Case("uac_serial.xml", "uas_busy.xml", uas2="uas_unavailable.xml", serial=True,
                                invite_flags=(1, 2, 3)),
    # the first callee rings past fr_inv_timer: tm fakes a 408 whose local To-tag never goes out
    "serial_timeout_then_200": Case("uac_serial.xml", "uas_ring_cancel.xml", uas2="uas", serial=True,
                                    invite_flags=(1, 2, 3), fr_inv_timer=2000),
    # the failure_route sets the missed flag again: the second failure is a missed call too
    "serial_failure_setflag": Case("uac_serial.xml", "uas_busy.xml", uas2="uas_unavailable.xml", serial=True,
                                   invite_flags=(1, 2, 3), failure_flags=(2,)),
    # ... and t_on_failure() again there: the failure_route runs at the last failure too (relays no
    # more); its setflag(missed) makes acc_onreply write one more missed row for the reply sent upstream
    "serial_failure_rearm": Case("uac_serial.xml", "uas_busy.xml", uas2="uas_unavailable.xml", serial=True,
                                 invite_flags=(1, 2, 3), failure_flags=(2,), failure_rearm=True),
    # ... with dialog CDRs: one CDR per call across the rounds
    "cdr_serial_486_then_200": Case("uac_serial.xml", "uas_busy.xml", uas2="uas", serial=True, invite_flags=(1, 2, 3),
                                    cdr=True),
    "cdr_serial_timeout_then_200": Case("uac_serial.xml", "uas_ring_cancel.xml", uas2="uas", serial=True,
                                        invite_flags=(1, 2, 3), fr_inv_timer=2000, cdr=True),
    "cdr_serial_486_then_480": Case("uac_serial.xml", "uas_busy.xml", uas2="uas_unavailable.xml", serial=True,
                                    invite_flags=(1, 2, 3), cdr=True),
}
#: cases whose CDR times Kamailio takes from a coarser clock than the packets' (ms)
CDR_TIME_TOLERANCE_MS: dict[str, int] = {"cdr_expired": 1100}


#: cases recorded under pending/ (`--pending`), not collected by the test suite: behaviour
#: recorded before we reproduce it (none now; serial forking moved to CASES)
PENDING: dict[str, Case] = {}
PENDING_DIR = HERE / "pending"
ALL_CASES = {**CASES, **PENDING}


def _scenario(name: str) -> list[str]:
    return ["-sn", name] if name in ("uac", "uas") else ["-sf", str(HERE / "scenarios" / name)]


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def record(case: str, cases_dir: Path = CASES_DIR) -> Path:
    """Run one case; its folder (capture, rows, log lines) is returned."""
    c = ALL_CASES[case]
    out = cases_dir / case
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        db = work / "acc.db"
        con = sqlite3.connect(db)
        con.executescript((SQL / "standard-create.sql").read_text() + (SQL / "acc-create.sql").read_text())
        for name in [p.split("=")[0] for p in (c.extras + ";" + c.legs).split(";") if p]:
            for table in ("acc", "missed_calls"):
                con.execute(f"ALTER TABLE {table} ADD COLUMN {name} VARCHAR(128) DEFAULT NULL")
        if c.cdr:
            for name in [p.split("=")[0] for p in CDR_EXTRA.split(";") if p]:
                con.execute(f"ALTER TABLE acc_cdrs ADD COLUMN {name} VARCHAR(128) DEFAULT NULL")
        con.commit()
        con.close()
        cfg = work / "kamailio.cfg"
        flags = "\n".join(f"\t\tsetflag({f});" for f in c.invite_flags)
        params = "\n".join(f'modparam("acc", "{k}", {v})' for k, v in c.modparams)
        for key, value in (("log_extra", c.extras), ("db_extra", c.extras), ("multi_leg_info", c.legs)):
            if value:
                params += f'\nmodparam("acc", "{key}", "{value}")'
        reinvite = ""
        if c.reinvite_flags:
            reinvite = ('\t\tif (is_method("INVITE")) {\n' + "".join(f"\t\t\tsetflag({f});\n" for f in c.reinvite_flags)
                        + "\t\t}\n")
        avps = "\n".join(f'\t\t$avp({k}) = "{v}";' for k, v in c.avps)
        tcp = f"listen=tcp:{PROXY}:5060" if c.transport == "tcp" else "disable_tcp=yes"
        dialog_load = dlg_initial = dlg_indialog = ""
        if c.cdr:
            dialog_load = 'loadmodule "dialog.so"\n' + (
                f'modparam("dialog", "default_timeout", {c.dlg_timeout})\n' if c.dlg_timeout else "")
            params += ('\nmodparam("acc", "cdr_enable", 1)\nmodparam("acc", "cdr_on_failed", 1)'
                       '\nmodparam("acc", "cdrs_table", "acc_cdrs")'
                       f'\nmodparam("acc", "cdr_extra", "{CDR_EXTRA}")')
            params += "".join(f'\nmodparam("acc", "{k}", {v})' for k, v in c.cdr_params)
            dlg_initial = '\t\tdlg_manage();\n\t\t$dlg_var(v) = "dv1";\n'
            dlg_indialog = "\t\tdlg_manage();\n"
        serial = failure_route = ""
        if c.serial:
            serial = '\tif ($rU == "serial") {\n\t\tt_on_failure("SERIAL");\n\t}\n'
            rearm = ('\tt_on_failure("SERIAL");\n\tif ($avp(relayed) != $null) {\n\t\texit;\n\t}\n'
                     '\t$avp(relayed) = "1";\n') if c.failure_rearm else ""
            failure_route = ("failure_route[SERIAL] {\n\tif (t_is_canceled()) {\n\t\texit;\n\t}\n"
                             + "".join(f"\tsetflag({f});\n" for f in c.failure_flags) + rearm
                             + f'\t$ru = "sip:serial2@{UAS2}:5080";\n\tt_relay();\n}}\n')
        cfg.write_text((HERE / "kamailio.cfg.in").read_text().format(serial=serial, failure_route=failure_route,
            proxy=PROXY, db=db, invite_flags=flags, fr_inv_timer=c.fr_inv_timer, modparams=params,
            flag_methods=c.flag_methods, uas2=UAS2, reinvite=reinvite, avps=avps, tcp=tcp,
            dialog_load=dialog_load, dlg_initial=dlg_initial, dlg_indialog=dlg_indialog))
        pcap = work / "capture.pcap"
        dump = subprocess.Popen(["tcpdump", "-i", "lo", "-s", "0", "-U", "-w", str(pcap), "net 127.0.9.0/24"],
                                stderr=subprocess.DEVNULL)
        log = open(work / "kamailio.log", "wb")  # noqa: SIM115
        kam = subprocess.Popen(["kamailio", "-f", str(cfg), "-DD", "-E", "-Y", str(work), "-P", str(work / "k.pid"),
                                "-m", "32", "-M", "8"], stderr=log, stdout=log)
        uas_proc = subprocess.Popen(["sipp", *_scenario(c.uas), "-i", UAS, "-p", "5080", "-m", str(c.calls),
                                     "-nostdin", "-timeout", "30"], cwd=work,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        uas2_proc = None
        if c.uas2:
            uas2_proc = subprocess.Popen(["sipp", *_scenario(c.uas2), "-i", UAS2, "-p", "5080", "-m", str(c.calls),
                                          "-nostdin", "-timeout", "30"], cwd=work,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.5)
            if kam.poll() is not None:
                raise SystemExit(f"kamailio exited: {(work / 'kamailio.log').read_text()[-2000:]}")
            service = ["-s", "serial" if c.serial else "fork"] if c.uas2 else ["-s", c.service] if c.service else []
            transport = ["-t", "t1"] if c.transport == "tcp" else []
            subprocess.run(["sipp", *_scenario(c.uac), *service, *transport, f"{UAS}:5080", "-rsa", f"{PROXY}:5060",
                            "-i", UAC, "-p", "5070", "-m", str(c.calls), "-r", str(c.rate), "-d", str(c.pause_ms), "-nostdin",
                            "-timeout", "40"],
                           cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=90, check=False)
            try:
                uas_proc.wait(2 if c.service else 15)
            except subprocess.TimeoutExpired:
                print(f"{case}: the UAS did not finish its calls", file=sys.stderr)
            time.sleep(1.0)
        finally:
            _stop(uas_proc)
            if uas2_proc is not None:
                _stop(uas2_proc)
            _stop(kam)
            log.close()
            time.sleep(0.5)
            _stop(dump)
        con = sqlite3.connect(db)
        con.row_factory = sqlite3.Row
        for table in ("acc", "missed_calls", *(("acc_cdrs",) if c.cdr else ())):
            rows = [dict(r) for r in con.execute(f"SELECT * FROM {table} ORDER BY id")]  # noqa: S608 - fixed names
            (out / f"{table}.json").write_text(json.dumps(rows, indent=1) + "\n")
        con.close()
        text = (work / "kamailio.log").read_text(errors="replace").splitlines()
        lines = [line for line in text if "ACC:" in line]
        (out / "acc.log").write_text("".join(line + "\n" for line in lines))
        if c.cdr:  # the CDR lines, and every acc/CDR line in the order Kamailio wrote them
            (out / "cdr.log").write_text("".join(line + "\n" for line in text if "log_write_cdr" in line))
            (out / "order.log").write_text("".join(line + "\n" for line in text
                                                   if "log_write_cdr" in line or "ACC:" in line))
        shutil.copy(pcap, out / "capture.pcap")
    print(f"{case}: {len(json.loads((out / 'acc.json').read_text()))} acc rows, "
          f"{len(json.loads((out / 'missed_calls.json').read_text()))} missed_calls rows, {len(lines)} ACC lines")
    return out


def main() -> None:
    """Record the named cases (all of CASES by default; `--pending` records PENDING under pending/)."""
    args = sys.argv[1:]
    if args[:1] == ["--pending"]:
        for case in args[1:] or list(PENDING):
            record(case, PENDING_DIR)
        return
    for case in args or list(CASES):
        record(case)


if __name__ == "__main__":
    main()
