"""`sipsniff-acc audit` on the command line: trouble is one line and exit 2, found before the
work (bad URL, unreachable server, missing table, missing capture, bad output path, options
that do not go together); a damaged capture is exit 2 too; a CSV export with a column
mapping; only the capture's time span is read; --db-timezone local."""

from __future__ import annotations

import csv
import json
import datetime as dt
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sipsniff_acc.audit.billing import from_julian, to_julian
from tests.audit.books import VOLUME, kamailio_rows, load
from tests.conformance.goldens import rules_for
from tests.servers import free_port

PCAP = VOLUME / "capture.pcap"


def audit(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sipsniff_acc", "audit", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120, env=env)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "rules.yaml").write_text(rules_for("volume_mixed"))
    load(f"sqlite:///{tmp_path / 'audit_books.db'}", kamailio_rows())
    return tmp_path


def one_error_line(res: subprocess.CompletedProcess[str], *words: str) -> None:
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    for w in words:
        assert w in lines[0], lines[0]


def test_the_books_agree_exit_0(work: Path) -> None:
    before = (work / "audit_books.db").read_bytes()
    res = audit(str(PCAP), "-m", "rules.yaml", "--against", "sqlite:///audit_books.db", cwd=work)
    assert res.returncode == 0, res.stderr
    assert "the books agree: 0 discrepancies" in res.stdout
    assert (work / "audit_books.db").read_bytes() == before  # an audit never writes to the books
    assert not (work / "sipsniff-acc.spool").exists() and not (work / "acc.db").exists()


def test_a_report_that_cannot_be_written_is_trouble(work: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    res = audit(str(PCAP), "-m", "rules.yaml", "--against", "sqlite:///audit_books.db", "--html", "/dev/full",
                cwd=work)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "error: writing the report" in res.stderr


def test_trouble_before_the_work(work: Path) -> None:
    db = "sqlite:///audit_books.db"
    one_error_line(audit(str(PCAP), "-m", "rules.yaml", cwd=work), "--against")
    one_error_line(audit(str(PCAP), "-m", "rules.yaml", "--against", "nosuch+x://a/b", cwd=work), "nosuch")
    one_error_line(audit(str(PCAP), "-m", "rules.yaml", "--against", "sqlite:///no/such.db", cwd=work), "no such")
    one_error_line(audit("missing.pcap", "-m", "rules.yaml", "--against", db, cwd=work), "missing.pcap")
    one_error_line(audit(str(PCAP), "-m", "rules.yaml", "--against", db, "--jsonl", "no/dir/x.jsonl", cwd=work),
                   "--jsonl")
    one_error_line(audit(str(PCAP), "-m", "rules.yaml", "--against", db, "--map", "callid=c", cwd=work), "--map")
    one_error_line(audit(str(PCAP), "-m", "rules.yaml", "--against", db, "--time-tolerance", "-1", cwd=work),
                   "--time-tolerance")
    one_error_line(audit(str(PCAP), "-m", "rules.yaml", "--against", db, "--db-timezone", "mars", cwd=work),
                   "--db-timezone")
    (work / "nodb.yaml").write_text("acc: {log_flag: 1}\nroute: [{if: {method: INVITE}, setflag: [1]}]\n")
    one_error_line(audit(str(PCAP), "-m", "nodb.yaml", "--against", db, cwd=work), "nothing to audit")


def test_missing_table_names_it(work: Path) -> None:
    con = sqlite3.connect(work / "audit_books.db")
    con.execute("DROP TABLE missed_calls")
    con.commit()
    con.close()
    one_error_line(audit(str(PCAP), "-m", "rules.yaml", "--against", "sqlite:///audit_books.db", cwd=work),
                   "no table missed_calls")


def test_unreachable_server_is_one_line(work: Path) -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    res = audit(str(PCAP), "-m", "rules.yaml", "--against", f"postgresql+psycopg://audit:secret@127.0.0.1:{port}/audit_x",
                cwd=work)
    one_error_line(res, str(port))
    assert "secret" not in res.stderr
    assert time.monotonic() - started < 60


def test_damaged_capture_is_trouble(work: Path) -> None:
    cut = work / "cut.pcap"
    data = PCAP.read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 7])  # a record cut in the middle
    res = audit(str(cut), "-m", "rules.yaml", "--against", "sqlite:///audit_books.db", cwd=work)
    one_error_line(res, "cut.pcap", "truncated")


def _csv(path: Path, rows: dict[str, list[dict[str, Any]]], skip: int = 0) -> None:
    """An export as a billing system might write it: its own column names, ISO times."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tbl", "call_id", "method", "from_tag", "to_tag", "status", "phrase", "ts"])
        n = 0
        for table, rs in rows.items():
            for r in rs:
                n += 1
                if n == skip:
                    continue
                t = from_julian(r["time"])
                when = dt.datetime.fromtimestamp(t, dt.timezone.utc).replace(tzinfo=None)
                w.writerow([table, r["callid"], r["method"], r["from_tag"], r["to_tag"], r["sip_code"], r["sip_reason"],
                            when.isoformat(sep=" ")])


MAP = "table=tbl,callid=call_id,code=status,reason=phrase,time=ts"


def test_csv_export_with_a_mapping(work: Path) -> None:
    _csv(work / "export.csv", kamailio_rows())
    res = audit(str(PCAP), "-m", "rules.yaml", "--against", "export.csv", "--map", MAP, cwd=work)
    assert res.returncode == 0, res.stdout + res.stderr
    _csv(work / "short.csv", kamailio_rows(), skip=10)
    res = audit(str(PCAP), "-m", "rules.yaml", "--against", "short.csv", "--map", MAP, "--jsonl", "d.jsonl", cwd=work)
    assert res.returncode == 1, res.stdout + res.stderr
    assert '"kind":"missing","table":"acc"' in (work / "d.jsonl").read_text()
    assert len((work / "d.jsonl").read_text().splitlines()) == 1
    # rows of another table, a row without a readable time: counted and said, not silently dropped
    with (work / "export.csv").open("a") as f:
        f.write("acc_other,x1,INVITE,a,b,200,OK,2026-11-22 21:48:50\nacc,x2,INVITE,a,b,200,OK,yesterday\n")
    res = audit(str(PCAP), "-m", "rules.yaml", "--against", "export.csv", "--map", MAP, cwd=work)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 row(s) of table 'acc_other'" in res.stderr and "1 row(s) without a readable time (line 603)" in res.stderr
    # unmapped: the export's names are not the database's
    one_error_line(audit(str(PCAP), "-m", "rules.yaml", "--against", "export.csv", cwd=work), "callid", "--map")
    one_error_line(audit(str(PCAP), "-m", "rules.yaml", "--against", "export.csv", "--map", "colour=x", cwd=work),
                   "colour")


def test_db_timezone_local(work: Path) -> None:
    env = dict(os.environ, TZ="Asia/Kolkata")  # UTC+5:30: local DATETIMEs read as UTC miss the span entirely
    code = subprocess.run([sys.executable, "-c", "import time; print(time.timezone)"], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert code == "-19800"
    # rows written in Kolkata local time
    rows = kamailio_rows()
    for rs in rows.values():
        for r in rs:
            r["time"] = to_julian(from_julian(r["time"]) + 19800)  # so that the "UTC" text is the local clock
    _csv(work / "local.csv", rows)
    res = audit(str(PCAP), "-m", "rules.yaml", "--against", "local.csv", "--map", MAP, "--db-timezone", "local",
                cwd=work, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    res = audit(str(PCAP), "-m", "rules.yaml", "--against", "local.csv", "--map", MAP, cwd=work, env=env)
    assert res.returncode == 1 and "600 missing" in res.stdout


def test_only_the_capture_span_is_read(work: Path) -> None:
    con = sqlite3.connect(work / "audit_books.db")
    row = con.execute("SELECT method, from_tag, to_tag, callid, sip_code, sip_reason, time FROM acc LIMIT 1").fetchone()
    for shift in (-86400.0, 3600.0):  # a day before, an hour after: other captures' business
        con.execute("INSERT INTO acc (method, from_tag, to_tag, callid, sip_code, sip_reason, time) VALUES (?,?,?,?,?,?,?)",
                    (*row[:3], f"elsewhere-{shift}", *row[4:6], row[6] + shift / 86400))
    # a row for a call never seen, timed in the capture's last second: the event may lie just
    # after the last packet (whole seconds): not judged; the same row mid-capture is a phantom
    import struct
    last = struct.unpack_from("<I", _frames(PCAP)[1][-1])[0]
    for callid, second in (("edge@192.0.2.9", last), ("middle@192.0.2.9", last - 5)):
        con.execute("INSERT INTO acc (method, from_tag, to_tag, callid, sip_code, sip_reason, time) "
                    "VALUES (?,?,?,?,?,?,?)", (*row[:3], callid, *row[4:6], to_julian(second)))
    con.commit()
    con.close()
    res = audit(str(PCAP), "-m", "rules.yaml", "--against", "sqlite:///audit_books.db", "--jsonl", "d.jsonl",
                cwd=work)
    assert res.returncode == 1, res.stdout + res.stderr
    found = [json.loads(line) for line in (work / "d.jsonl").read_text().splitlines()]
    assert sorted((d["kind"], d["field"], d["callid"]) for d in found) == [
        ("phantom", None, "middle@192.0.2.9"), ("unverified", "capture_edge", "edge@192.0.2.9")]


SAMPLE = Path(__file__).resolve().parents[1] / "pcaps" / "sample.pcap"


def _frames(pcap: Path) -> tuple[bytes, list[bytes]]:
    """A little-endian µs pcap's global header and its records (header + data each)."""
    import struct
    data = pcap.read_bytes()
    out, off = [], 24
    while off < len(data):
        incl = struct.unpack_from("<I", data, off + 8)[0]
        out.append(data[off:off + 16 + incl])
        off += 16 + incl
    return data[:24], out


def test_worked_example_on_the_sample(tmp_path: Path) -> None:
    """The README's example: the sample's own rows agree; a deleted row, a changed code and a
    row inserted twice are found; a capture that starts after a call's INVITE does not turn
    that call's row into a phantom (it is listed as unverified, exit 0)."""
    run = subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", str(SAMPLE), "--log", "none", "-q"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    res = audit(str(SAMPLE), "--against", "sqlite:///acc.db", cwd=tmp_path)
    assert res.returncode == 0 and "the books agree" in res.stdout, res.stdout + res.stderr

    header, frames = _frames(SAMPLE)
    first_invite = next(i for i, f in enumerate(frames) if f[16:].find(b"INVITE sip:") == 42)
    (tmp_path / "late.pcap").write_bytes(header + b"".join(frames[first_invite + 1:]))
    res = audit("late.pcap", "--against", "sqlite:///acc.db", "--jsonl", "late.jsonl", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    late = [json.loads(line) for line in (tmp_path / "late.jsonl").read_text().splitlines()]
    assert [(d["kind"], d["field"], d["method"], d["billing"]) for d in late] == [
        ("unverified", "began_before_capture", "INVITE", "200")]

    con = sqlite3.connect(tmp_path / "acc.db")
    con.execute("DELETE FROM acc WHERE id = 2")
    con.execute("UPDATE acc SET sip_code = '487' WHERE id = 5")
    con.execute("INSERT INTO acc (method, from_tag, to_tag, callid, sip_code, sip_reason, time) "
                "SELECT method, from_tag, to_tag, callid, sip_code, sip_reason, time FROM acc WHERE id = 7")
    con.commit()
    con.close()
    res = audit(str(SAMPLE), "--against", "sqlite:///acc.db", "--jsonl", "diff.jsonl", cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    found = sorted((d["kind"], d["field"]) for d in map(json.loads, (tmp_path / "diff.jsonl").read_text().splitlines()))
    assert found == [("duplicate", None), ("mismatch", "sip_code"), ("missing", None)]
    assert "3 discrepancies: 1 missing, 1 mismatch, 1 duplicate" in res.stdout


def test_csv_export_of_cdrs_alone(tmp_path: Path) -> None:
    """An export of acc_cdrs with Kamailio's column names (no --map but the table): only that
    table is audited; a CDR's duration changed by 5 s is the one discrepancy."""
    from tests.audit.books import CASES
    case = CASES / "cdr_answered"
    (tmp_path / "rules.yaml").write_text(rules_for("cdr_answered"))
    cdrs = json.loads((case / "acc_cdrs.json").read_text())
    for name, stretch in (("clean.csv", 0.0), ("stretched.csv", 5.0)):
        with (tmp_path / name).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["start_time", "end_time", "duration", "c_callid", "c_ft", "c_tt"])
            for i, r in enumerate(cdrs):
                start = dt.datetime.fromtimestamp(from_julian(r["start_time"]), dt.timezone.utc).isoformat()
                w.writerow([start, from_julian(r["end_time"]), r["duration"] + (stretch if i == 0 else 0), r["c_callid"],
                            r["c_ft"], r["c_tt"]])
    args = (str(case / "capture.pcap"), "-m", "rules.yaml", "--map", "table==acc_cdrs")
    res = audit(*args, "--against", "clean.csv", cwd=tmp_path)
    assert res.returncode == 0 and "acc_cdrs  wire 2  billing 2  paired 2" in res.stdout, res.stdout + res.stderr
    res = audit(*args, "--against", "stretched.csv", "--jsonl", "d.jsonl", cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    found = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert [(d["kind"], d["table"], d["field"], d["callid"]) for d in found] == [
        ("mismatch", "acc_cdrs", "duration", cdrs[0]["c_callid"])]
