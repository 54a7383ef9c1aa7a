"""Readers for the recorded Kamailio cases (shared by the conformance tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def kamailio_records(folder: Path) -> list[tuple[str, dict[str, object]]]:
    """(table, row) for every acc and missed_calls row, in the order Kamailio wrote them."""
    rows = [("acc", r) for r in json.loads((folder / "acc.json").read_text())]
    rows += [("missed_calls", r) for r in json.loads((folder / "missed_calls.json").read_text())]
    return sorted(rows, key=lambda tr: float(tr[1]["time"]))  # type: ignore[arg-type]


def shape(rows: list[tuple[str, dict[str, object]]]) -> list[tuple[object, ...]]:
    """What must not change between recordings: table, method, code, reason (tags and ids do)."""
    return sorted((t, r["method"], r["sip_code"], r["sip_reason"]) for t, r in rows)


def our_messages_of(pcap: Path) -> list[dict[str, object]]:
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "messages", "-q", str(pcap)],
                         capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in res.stdout.splitlines()]


def rules_for(case: str, proxy_addresses: bool = True) -> str:
    """The rules.yaml equivalent of kamailio.cfg.in filled in for one case."""
    from tests.conformance.record_kamailio import CASES, CDR_EXTRA, PROXY

    c = CASES[case]
    params = {"log_flag": 1, "log_missed_flag": 2, "db_flag": 1, "db_missed_flag": 2, "failed_transaction_flag": 3,
              "log_level": 1}
    params.update(dict(c.modparams))
    for key, value in (("log_extra", c.extras), ("db_extra", c.extras), ("multi_leg_info", c.legs)):
        if value:
            params[key] = value
    dialog = dlg = ""
    if c.cdr:  # the dialog module, dlg_manage() on initial INVITEs, $dlg_var(v) = "dv1", acc cdr_* modparams
        params.update({"cdr_enable": 1, "cdr_on_failed": 1, "cdrs_table": "acc_cdrs", "cdr_extra": CDR_EXTRA})
        params.update(dict(c.cdr_params))
        dialog = f"dialog:\n  default_timeout: {c.dlg_timeout}\n" if c.dlg_timeout else ""
        dlg = "  - if: {method: INVITE, in_dialog: false}\n    dlg_manage: true\n    set_dlg_var: {v: dv1}\n"
    acc = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in params.items())
    methods = json.dumps(c.flag_methods.split("|"))
    addresses = f'["{PROXY}:5060"]' if proxy_addresses else "[]"
    return (
        f"profile: kamailio-5.6\nproxy:\n  addresses: {addresses}\ntm:\n  fr_inv_timer: {c.fr_inv_timer / 1000}\n"
        f"acc:\n{acc}{dialog}"
        "route:\n"
        "  - if: {in_dialog: true, method: BYE}\n    setflag: [1, 3]\n"
        + (f"  - if: {{in_dialog: true, method: INVITE}}\n    setflag: {json.dumps(list(c.reinvite_flags))}\n"
           if c.reinvite_flags else "")
        + "  - if: {in_dialog: true}\n    stop: true\n"
        + dlg
        + f"  - if: {{method: {methods}}}\n    setflag: {json.dumps(list(c.invite_flags))}\n"
        + "".join(f"  - if: {{method: {methods}}}\n    set_avp: {{{k}: {json.dumps(v)}}}\n" for k, v in c.avps)
    )


CORE = ("method", "from_tag", "to_tag", "callid", "sip_code", "sip_reason")


def run_process(pcap: Path, rules_text: str, work: Path) -> tuple[list[str], dict[str, list[dict[str, object]]]]:
    """`sipsniff-acc process` on a capture with the given rules: (ACC log lines, rows per table)."""
    import sqlite3

    work.mkdir(parents=True, exist_ok=True)
    rules = work / "rules.yaml"
    rules.write_text(rules_text)
    db, log = work / "acc.db", work / "acc.log"
    for p in (db, log):
        p.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", str(pcap), "--rules", str(rules),
                    "--db-url", f"sqlite:///{db}", "--log", str(log), "-q", "--spool", str(work / "acc.spool")],
                   capture_output=True, text=True, timeout=300, check=True)
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    rows = {t: [dict(r) for r in con.execute(f"SELECT * FROM {t} ORDER BY id")]  # noqa: S608 - fixed names
            for t in ("acc", "missed_calls")}
    con.close()
    return log.read_text().splitlines(), rows


def comparable(row: dict[str, object]) -> tuple[object, ...]:
    """A row without its ids; the time as whole seconds (Julian REAL → Unix, as Kamailio reads it back)."""
    t = round(86400 * (float(row["time"]) - 2440587.5) + 0.5)  # type: ignore[arg-type]
    rest = tuple(sorted((k, "<NULL>" if v is None else v) for k, v in row.items() if k not in ("id", "time", "sipsniff_id")))
    return (t, *rest)


def assert_same_records(folder: Path, work: Path, rules_text: str) -> tuple[int, int]:
    """Our log lines and rows against Kamailio's for a recorded case; returns (lines, rows) compared.

    Log lines are compared from "ACC: " on, timestamp included, so the time must agree to
    the second; rows column by column (extras and legs too), time to the second."""
    lines, rows = run_process(folder / "capture.pcap", rules_text, work)
    ours = sorted(line.split("ACC: ", 1)[1] for line in lines)
    theirs = sorted(line.split("ACC: ", 1)[1] for line in (folder / "acc.log").read_text().splitlines())
    assert ours == theirs
    n = 0
    for table in ("acc", "missed_calls"):
        kam = json.loads((folder / f"{table}.json").read_text())
        assert sorted(map(comparable, rows[table])) == sorted(map(comparable, kam)), table
        n += len(kam)
    return len(theirs), n


def require_live() -> None:
    """Skip (or fail under SIPSNIFF_REQUIRE_SERVERS=1) unless Kamailio can be recorded here."""
    import os
    import shutil

    import pytest

    missing = [p for p in ("kamailio", "sipp", "tcpdump") if shutil.which(p) is None]
    if missing or os.geteuid() != 0 or not Path("/usr/lib/x86_64-linux-gnu/kamailio/modules/db_sqlite.so").exists():
        reason = f"needs root, kamailio (+ sqlite modules), sipp and tcpdump; missing: {missing or 'privileges/modules'}"
        if os.environ.get("SIPSNIFF_REQUIRE_SERVERS") == "1":
            pytest.fail(f"{reason}, and SIPSNIFF_REQUIRE_SERVERS=1 forbids skipping")
        pytest.skip(reason)
