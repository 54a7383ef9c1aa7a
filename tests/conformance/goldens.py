"""Readers for the recorded Kamailio cases (shared by the conformance tests)."""

from __future__ import annotations

import json
import re
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
    from tests.conformance.record_kamailio import ALL_CASES, CDR_EXTRA, PROXY

    c = ALL_CASES[case]
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
        + (f"failure_route:\n  - setflag: {json.dumps(list(c.failure_flags))}\n" if c.failure_flags else "")
        + ("    t_on_failure: true\n" if c.failure_rearm else "")
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
    (work / "acc.jsonl").unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", str(pcap), "--rules", str(rules),
                    "--db-url", f"sqlite:///{db}", "--log", str(log), "-q", "--spool", str(work / "acc.spool"),
                    "--jsonl", str(work / "acc.jsonl")],
                   capture_output=True, text=True, timeout=300, check=True)
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    rows = {t: [dict(r) for r in con.execute(f"SELECT * FROM {t} ORDER BY id")]  # noqa: S608 - fixed names
            for t in ("acc", "missed_calls", "acc_cdrs") if t in tables}
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
    ours = sorted(line.split("ACC: ", 1)[1] for line in lines if "ACC: " in line)
    theirs = sorted(line.split("ACC: ", 1)[1] for line in (folder / "acc.log").read_text().splitlines())
    assert ours == theirs
    n = 0
    for table in ("acc", "missed_calls"):
        kam = json.loads((folder / f"{table}.json").read_text())
        assert sorted(map(comparable, rows[table])) == sorted(map(comparable, kam)), table
        n += len(kam)
    return len(theirs), n


def records_just_begun(work: Path, slack_s: float) -> set[tuple[str, str, str, str, str, int]]:
    """Our acc records whose packet came less than ``slack_s`` after a second's tick, by identity:
    (method, From-tag, To-tag, Call-ID, code, second). Dialog CDRs are left out (a CDR has its
    call's INVITE method and final code: it would lift the INVITE's row)."""
    out: set[tuple[str, str, str, str, str, int]] = set()
    for line in (work / "acc.jsonl").read_text().splitlines():
        r = json.loads(line)
        ts = float(r["ts"])
        if ts - int(ts) < slack_s and r["kind"] != "cdr":  # a dialog CDR is not an acc record
            out.add((r["method"], r["from_tag"] or "", r["to_tag"] or "", r["call_id"] or "", str(r["code"]), int(ts)))
    return out


_LINE_ID = re.compile(r"timestamp=(\d+);method=([^;]*);from_tag=([^;]*);to_tag=([^;]*);call_id=([^;]*);code=([^;]*);")


def _pair(ours: list[tuple[int, object, bool]], theirs: list[tuple[int, object]]) -> list[tuple[int, object]]:
    """Kamailio's (second, rest) items as compared with ours (second, rest, within the slack):
    items with the same rest are paired in time order; Kamailio's second is lifted to ours
    only where it is one below and ours came within the slack after the tick."""
    mine: dict[object, list[tuple[int, bool]]] = {}
    for sec, rest, ok in ours:
        mine.setdefault(rest, []).append((sec, ok))
    groups: dict[object, list[int]] = {}
    for sec, rest in theirs:
        groups.setdefault(rest, []).append(sec)
    out: list[tuple[int, object]] = []
    for rest, secs in groups.items():
        paired = sorted(mine.get(rest, []))
        for i, sec in enumerate(sorted(secs)):
            if i < len(paired) and paired[i][1] and paired[i][0] == sec + 1:
                sec += 1
            out.append((sec, rest))
    return out


_TIMESTAMP = re.compile(r"timestamp=(\d+);")


def assert_same_records_paired(folder: Path, work: Path, rules_text: str, slack_s: float) -> tuple[int, int]:
    """assert_same_records for a recording made during the run, with the second-boundary slack
    applied record by record: Kamailio's and our records with the same fields but the time are
    paired in time order, and Kamailio's may be one second below its partner only if ours came
    less than ``slack_s`` after the tick. (Lifting every Kamailio record of
    the second before such a tick, so a record of the same call written a moment before it — a
    serial fork's first missed row, a call's INVITE row before its BYE's — is lifted wrongly.)"""
    lines, rows = run_process(folder / "capture.pcap", rules_text, work)
    begun = records_just_begun(work, slack_s)

    def split(text: str) -> tuple[int, str]:
        m = _TIMESTAMP.search(text)
        return (int(m.group(1)), text[: m.start()] + text[m.end() :]) if m else (0, text)

    def ok(text: str) -> bool:
        m = _LINE_ID.search(text)
        return m is not None and (*m.groups()[1:], int(m.group(1))) in begun

    ours = [line.split("ACC: ", 1)[1] for line in lines if "ACC: " in line]
    theirs = [line.split("ACC: ", 1)[1] for line in (folder / "acc.log").read_text().splitlines()]
    assert sorted(map(split, ours)) == sorted(_pair([(*split(t), ok(t)) for t in ours], list(map(split, theirs))))
    n = 0
    for table in ("acc", "missed_calls"):
        kam = json.loads((folder / f"{table}.json").read_text())

        def item(r: dict[str, object]) -> tuple[int, object]:
            c = comparable(r)
            return c[0], c[1:]  # type: ignore[return-value]

        def row_ok(r: dict[str, object]) -> bool:
            return (r["method"], r["from_tag"] or "", r["to_tag"] or "", r["callid"] or "", str(r["sip_code"]),
                    item(r)[0]) in begun

        mine = sorted(map(item, rows[table]))
        assert mine == sorted(_pair([(*item(r), row_ok(r)) for r in rows[table]], list(map(item, kam)))), table
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


CDR_MARK = "log_write_cdr(): "
#: how far a CDR time may be from Kamailio's, in ms. Kamailio reads its clock while it processes
#: the INVITE/BYE/ACK, 0.1-4 ms after the packet's arrival (measured on the recordings); we take
#: the proxy's first reaction on the wire (its 100 Trying, its forward), which is after the read:
#: the millisecond is Kamailio's in most cases and 1 ms later in the others.
CDR_TOLERANCE_MS = 2


def _cdr_pairs(line: str) -> list[tuple[str, str]]:
    return [tuple(p.split("=", 1)) for p in line.split(CDR_MARK, 1)[1].split("; ")]  # type: ignore[misc]


def _ms(value: str) -> int:
    sec, _, frac = value.partition(".")
    return int(sec) * 1000 + int((frac + "000")[:3])


def _julian_second(v: object) -> int:
    return round(86400 * (float(v) - 2440587.5) + 0.5)  # type: ignore[arg-type]


def assert_same_cdrs(folder: Path, work: Path, rules_text: str, tolerance_ms: int = CDR_TOLERANCE_MS) -> dict[str, int]:
    """Our dialog CDRs against Kamailio's: the log lines (keys in order and extras exact, times
    within CDR_TOLERANCE_MS) and the acc_cdrs rows (columns and extras exact, start/end seconds
    as Kamailio's, or off by one only where the tolerance crosses a second; duration within the
    tolerance), and each CDR's place among the ACC lines of its call (acc-spec §1.13).
    Returns counts and the largest difference seen (ms)."""
    lines, rows = run_process(folder / "capture.pcap", rules_text, work)
    theirs = [line for line in (folder / "cdr.log").read_text().splitlines() if CDR_MARK in line]
    ours = [line for line in lines if CDR_MARK in line]
    assert len(ours) == len(theirs), (ours, theirs)
    worst = exact = 0
    by_extras = lambda pairs: [p for p in pairs[3:]]  # noqa: E731
    ours_p = sorted((_cdr_pairs(line) for line in ours), key=by_extras)
    theirs_p = sorted((_cdr_pairs(line) for line in theirs), key=by_extras)
    for o, t in zip(ours_p, theirs_p, strict=True):
        assert [k for k, _v in o] == [k for k, _v in t]  # keys exact, in order
        assert o[3:] == t[3:]  # cdr_extra values exact
        for (_k, ov), (_k2, tv) in zip(o[:3], t[:3], strict=True):
            if tv == "0":  # a failed dialog's duration is the string "0"
                assert ov == "0"
                continue
            diff = abs(_ms(ov) - _ms(tv))
            worst = max(worst, diff)
            exact += diff == 0
            assert diff <= tolerance_ms, (o, t)
    kam_rows = json.loads((folder / "acc_cdrs.json").read_text())
    our_rows = rows.get("acc_cdrs", [])
    assert len(our_rows) == len(kam_rows)
    key = lambda r: sorted((k, str(v)) for k, v in r.items() if k.startswith("c_"))  # noqa: E731
    for o, t in zip(sorted(our_rows, key=key), sorted(kam_rows, key=key), strict=True):
        assert set(o) - {"sipsniff_id"} == set(t)
        assert {k: v for k, v in o.items() if k.startswith("c_")} == {k: v for k, v in t.items() if k.startswith("c_")}
        for col in ("start_time", "end_time"):
            assert isinstance(o[col], float)
            assert abs(_julian_second(o[col]) - _julian_second(t[col])) <= 1
        assert abs(float(o["duration"]) - float(t["duration"])) <= tolerance_ms / 1000 + 1e-9
    # seconds off by one only where the millisecond tolerance crosses a second boundary
    for o, t in zip(ours_p, theirs_p, strict=True):
        for (_k, ov), (_k2, tv) in list(zip(o[:2], t[:2], strict=True)):
            if _ms(ov) // 1000 != _ms(tv) // 1000:
                assert abs(_ms(ov) - _ms(tv)) <= tolerance_ms
    # where each CDR goes among the ACC lines of the same call
    order = (folder / "order.log").read_text().splitlines()
    assert _call_orders(order) == _call_orders(lines)
    return {"lines": len(theirs), "rows": len(kam_rows), "times": 3 * len(theirs), "exact_ms": exact, "worst_ms": worst}


def _call_orders(lines: list[str]) -> dict[str, list[str]]:
    """Call-ID -> the kinds of its ACC and CDR lines in output order."""
    import re

    out: dict[str, list[str]] = {}
    for line in lines:
        if CDR_MARK in line:
            m = re.search(r"c_callid=([^;]*)", line)
            kind = "cdr"
        elif "ACC: " in line:
            m = re.search(r";call_id=([^;]*)", line)
            kind = line.split("ACC: ", 1)[1].split(":", 1)[0] + " " + line.split(";method=", 1)[1].split(";", 1)[0]
        else:
            continue
        if m:
            out.setdefault(m.group(1), []).append(kind)
    return out
