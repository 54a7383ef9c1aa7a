"""Red team on `audit`: a billing database written by someone else (NULLs, huge and
non-UTF-8 text, a time in the wrong encoding, hostile Call-IDs and User-Agents) is audited
without a traceback, its rows reported with their text escaped: the HTML report runs no
script in headless Chromium; and a password in --against is never printed, however
malformed the URL."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from sipsniff_acc.audit.billing import to_julian
from tests.audit.books import VOLUME, kamailio_rows, load
from tests.conformance.goldens import rules_for

PCAP = VOLUME / "capture.pcap"
XSS = "<script>console.error('xss-script')</script>"
IMG = "\"'><img src=x onerror=\"console.error('xss-img')\">"


def audit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sipsniff_acc", "audit", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=240)


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://bob:p@ssS3cretX@127.0.10.1:1/db",  # an unescaped @ in the password
    "bob:S3cretXY@127.0.10.1/db",  # the scheme forgotten: taken for a CSV file name
    "mysql+pymysql://bob:x@127.0.10.1:1/db?password=S3cretQQ",
    "postgresql+psycopg://bob:S3cret%40XY@127.0.10.1:1/db",
])
def test_a_password_in_against_is_never_printed(tmp_path: Path, url: str) -> None:
    (tmp_path / "rules.yaml").write_text(rules_for("volume_mixed"))
    res = audit(str(PCAP), "-m", "rules.yaml", "--against", url, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "S3cret" not in res.stdout + res.stderr, res.stderr
    assert "***" in res.stderr and "Traceback" not in res.stderr


def test_hostile_billing_rows_are_audited_and_escaped(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(rules_for("volume_mixed"))
    db = tmp_path / "books.db"
    load(f"sqlite:///{db}", kamailio_rows())
    con = sqlite3.connect(db)
    row = con.execute("SELECT method, from_tag, to_tag, callid, sip_code, sip_reason, time, src_user, ua, acct "
                      "FROM acc ORDER BY id LIMIT 1 OFFSET 20").fetchone()
    t = row[6]
    ins = ("INSERT INTO acc (method, from_tag, to_tag, callid, sip_code, sip_reason, time, src_user, ua, acct) "
           "VALUES (?,?,?,?,?,?,?,?,?,?)")
    con.execute(ins, ("INVITE", IMG, XSS, XSS, "200", IMG, t, XSS, IMG, "a"))  # a phantom with hostile text
    con.execute(ins, (None, None, None, "nulls@x", None, None, t, None, None, None))  # NULLs
    con.execute(ins, ("INVITE", "f", "t", "huge@x", "200", "OK" * 500_000, t, "u" * 100_000, "ua", "a"))
    con.execute(ins, ("INVITE", "f", "t", "text-time@x", "200", "OK", "2026-12-02 04:00:00", "u", "ua", "a"))
    con.execute("INSERT INTO acc (method, from_tag, to_tag, callid, sip_code, sip_reason, time) "
                "VALUES ('INVITE', 'f', 't', CAST(x'ff3cfe3e' AS TEXT), '200', CAST(x'c328' AS TEXT), ?)", (t,))
    # a million rows of other days: outside the capture's span, never read
    far = to_julian(0) + 1000
    con.executemany("INSERT INTO acc (method, from_tag, to_tag, callid, sip_code, sip_reason, time) "
                    "VALUES ('INVITE','f','t',?,'200','OK',?)", ((f"old{i}", far + i / 1e6) for i in range(1_000_000)))
    con.execute("CREATE INDEX acc_time ON acc(time)")
    con.commit()
    con.close()
    res = audit(str(PCAP), "-m", "rules.yaml", "--against", f"sqlite:///{db}", "--jsonl", "d.jsonl",
                "--html", "r.html", cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    found = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    callids = {d["callid"] for d in found}
    assert XSS in callids and "nulls@x" in callids and "huge@x" in callids
    assert not any(str(c).startswith("old") for c in callids)
    html = (tmp_path / "r.html").read_text()
    assert "<script" not in html.lower() and "<img src=x" not in html
    assert len(html) < 2_000_000  # the 1 MB reason is not copied whole into the page

    from tests.audit.chromium import chromium, inspect_page
    chromium()
    report = inspect_page(tmp_path / "r.html", ["img"])
    assert report.errors == [], report.errors
    assert len(report.boxes["img"]) >= 5  # the plots only: no injected image


def test_csv_export_with_bom_crlf_quotes_and_a_latin1_byte(tmp_path: Path) -> None:
    """A BOM, CRLF line ends, a quoted reason with "" and a line break, and one cp1252 byte:
    the byte was an exit-2 'cannot be read as CSV' for the whole export; now it is shown as
    \\xNN, counted in a note, and only its row differs."""
    from tests.audit.test_audit_cli import MAP, _csv
    (tmp_path / "rules.yaml").write_text(rules_for("volume_mixed"))
    _csv(tmp_path / "e.csv", kamailio_rows())
    lines = (tmp_path / "e.csv").read_bytes().split(b"\r\n")
    j = next(i for i in range(6, len(lines)) if lines[i].count(b",OK,") == 1)
    assert lines[5].count(b",OK,") == 1
    lines[5] = lines[5].replace(b",OK,", b',"O""K\nsecond line",')
    lines[j] = lines[j].replace(b",OK,", b",OK\xe9,")
    (tmp_path / "h.csv").write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines))
    res = audit(str(PCAP), "-m", "rules.yaml", "--against", "h.csv", "--map", MAP, "--jsonl", "d.jsonl", cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "1 byte sequence(s) not UTF-8" in res.stderr
    found = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert sorted((d["kind"], d["field"], d["billing"]) for d in found) == [
        ("mismatch", "sip_reason", 'O"K\nsecond line'), ("mismatch", "sip_reason", "OK\\xe9")]
