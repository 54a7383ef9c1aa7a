"""`process`, `check-rules` and `init-db` as a user runs them (real subprocesses, real files)."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.conftest import PCAPS

REPO = Path(__file__).resolve().parents[2]


def sipsniff(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sipsniff_acc", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=None)


def test_quick_start_defaults_sqlite_and_log_lines(tmp_path: Path) -> None:
    """No options: built-in rules, ACC lines on stdout, rows in ./acc.db; a re-run adds no rows."""
    for _ in range(2):
        res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", str(PCAPS / "sample.pcap")],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path,
                             env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 20 and all(": ACC: transaction answered: timestamp=" in ln for ln in lines)
    assert "acc: 20 records (20 answered)" in res.stderr and "single-leg mode" in res.stderr
    con = sqlite3.connect(tmp_path / "acc.db")
    assert con.execute("SELECT count(*), count(DISTINCT sipsniff_id) FROM acc").fetchone() == (20, 20)
    con.close()


def test_outputs_jsonl_log_file_stats_and_syslog(tmp_path: Path) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(5)
    res = sipsniff("process", str(PCAPS / "sample.pcap"), "--no-db", "--log", str(tmp_path / "acc.log"),
                   "--jsonl", str(tmp_path / "r.jsonl"), "--stats", str(tmp_path / "s.json"),
                   "--syslog", f"udp://127.0.0.1:{udp.getsockname()[1]}", "-q")
    assert res.returncode == 0, res.stderr
    first = udp.recv(65536)
    udp.close()
    assert first.startswith(b"<29>") and b"ACC: transaction answered: " in first  # LOG_DAEMON, notice
    assert len((tmp_path / "acc.log").read_text().splitlines()) == 20
    docs = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(docs) == 20 and {d["method"] for d in docs} == {"INVITE", "BYE"}
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["records"] == {"answered": 20} and stats["tracker"]["transactions"] == {"server": 20}


def test_bad_rules_say_where(tmp_path: Path) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text("acc:\n  log_flag: 1\n  early_media: maybe\n")
    for cmd in (["check-rules", str(bad)], ["process", "--rules", str(bad), str(PCAPS / "sample.pcap")]):
        res = sipsniff(*cmd)
        assert res.returncode == 2
        assert f"error: {bad}:3: acc.early_media: " in res.stderr
    ok = sipsniff("check-rules", str(REPO / "rules.yaml"))
    assert ok.returncode == 0 and "ok: profile kamailio-5.6" in ok.stdout


def test_init_db_then_check(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'acc.db'}"
    res = sipsniff("init-db", url)
    assert res.returncode == 0 and "tables ready: acc, missed_calls" in res.stdout
    assert sipsniff("init-db", url, "--check").returncode == 0
    rules = tmp_path / "r.yaml"
    rules.write_text('acc:\n  db_extra: "ua=$ua"\n')
    res = sipsniff("init-db", url, "--check", "--rules", str(rules))
    assert res.returncode == 3 and "acc lacks column(s) ua" in res.stderr


def test_unreachable_database_exit_3_then_deliver(tmp_path: Path) -> None:
    """A database that cannot take rows (another process holds SQLite's exclusive lock) is an
    outage: records wait in the spool, exit 3; once the lock is gone `deliver` sends them."""
    url = f"sqlite:///{tmp_path}/later/acc.db"
    (tmp_path / "later").mkdir()
    assert sipsniff("init-db", url).returncode == 0
    holder = sqlite3.connect(tmp_path / "later" / "acc.db", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        res = sipsniff("process", str(PCAPS / "sample.pcap"), "--db-url", url, "--log", "none", "--drain-timeout",
                       "1", cwd=tmp_path)
    finally:
        holder.close()
    assert res.returncode == 3
    assert "alarm: db backend down" in res.stderr and "20 record(s) kept in the spool" in res.stderr
    res = sipsniff("deliver", "--db-url", url, cwd=tmp_path)
    assert res.returncode == 0 and "20 record(s) delivered" in res.stdout
    res = sipsniff("process", str(PCAPS / "sample.pcap"), "--db-url", url, "--log", "none", cwd=tmp_path)
    assert res.returncode == 0
    con = sqlite3.connect(tmp_path / "later" / "acc.db")
    assert con.execute("SELECT count(*) FROM acc").fetchone()[0] == 20
    con.close()


def test_password_comes_from_a_file_and_is_never_printed(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cr3t-pw\n")
    res = sipsniff("process", str(PCAPS / "sample.pcap"), "--db-url", "postgresql+psycopg://acc@127.0.0.1:1/acc",
                   "--db-password-file", str(secret), "--log", "none", "--drain-timeout", "0.5", cwd=tmp_path)
    assert res.returncode == 3 and "127.0.0.1:1" in res.stderr
    assert "s3cr3t" not in res.stderr + res.stdout


def test_damaged_capture_still_accounts_what_came_before(tmp_path: Path) -> None:
    data = (PCAPS / "sample.pcap").read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[: len(data) * 2 // 3])
    res = sipsniff("process", str(cut), "--no-db", "-q")
    assert res.returncode == 1 and "error: " in res.stderr
    assert 0 < len(res.stdout.splitlines()) < 20


def test_workers_give_the_records_of_one_process(tmp_path: Path) -> None:
    """Calls sharded by Call-ID over 2 workers: the same lines, records and rows, in the same order."""
    cases = REPO / "tests" / "conformance" / "cases"
    captures = [str(cases / c / "capture.pcap") for c in ("volume_mixed", "parallel_fork_one_answers", "report_ack")]
    rules = tmp_path / "rules.yaml"
    rules.write_text('acc: {log_flag: 1, log_missed_flag: 2, db_flag: 1, db_missed_flag: 2, failed_transaction_flag: 3,'
                     ' report_ack: true, log_extra: "ua=$hdr(User-Agent);ts=$TS", db_extra: "ua=$hdr(User-Agent);ts=$TS"}\nroute:\n'
                     '  - if: {method: BYE}\n    setflag: [1, 3]\n  - if: {in_dialog: true}\n    stop: true\n'
                     '  - setflag: [1, 2, 3]\n')
    outs = {}
    for j in ("0", "2"):
        res = sipsniff("process", *captures, "--rules", str(rules), "-j", j, "--log", str(tmp_path / f"log{j}"),
                       "--jsonl", str(tmp_path / f"r{j}"), "--db-url", f"sqlite:///{tmp_path}/db{j}",
                       "--stats", str(tmp_path / f"s{j}"), "--spool", str(tmp_path / f"spool{j}"))
        assert res.returncode == 0, res.stderr
        con = sqlite3.connect(tmp_path / f"db{j}")
        rows = con.execute("SELECT method, from_tag, to_tag, callid, sip_code, sip_reason, time, ua, ts, sipsniff_id "
                           "FROM acc ORDER BY id").fetchall()
        con.close()
        stats = json.loads((tmp_path / f"s{j}").read_text())
        outs[j] = ((tmp_path / f"log{j}").read_text(), (tmp_path / f"r{j}").read_text(), rows,
                   stats["records"], stats["tracker"], stats["sip_messages"])
    assert len(outs["0"][0].splitlines()) > 600
    assert outs["0"] == outs["2"]


def test_check_rules_checks_the_radius_config(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"acc:\n  radius_flag: 1\n  radius_config: {tmp_path}/missing.yaml\n")
    res = sipsniff("check-rules", str(rules))
    assert res.returncode == 2 and "acc.radius_config:" in res.stderr and "cannot read" in res.stderr
    (tmp_path / "r.yaml").write_text("servers: ['127.0.3.1:1813']\nsecret: s\n")
    rules.write_text(f"acc:\n  radius_flag: 1\n  radius_config: {tmp_path}/r.yaml\n  radius_extra: \"Nope-Attr=$fU\"\n")
    res = sipsniff("check-rules", str(rules))
    assert res.returncode == 2 and "'Nope-Attr' is not in the RADIUS dictionary" in res.stderr


def test_sip_over_tls_is_accounted_with_a_key_log(tmp_path: Path) -> None:
    """tests/pcaps/tls.pcap: a real TLS call (INVITE/200/ACK, BYE/200); tshark decrypts with the key log."""
    from tests.conftest import require_program
    require_program("tshark")
    for j in ("0", "2"):
        res = sipsniff("process", str(PCAPS / "tls.pcap"), "--tls-keylog", str(PCAPS / "tls.keys"), "--no-db",
                       "-q", "-j", j, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert [ln.split("method=")[1].split(";")[0] for ln in lines] == ["INVITE", "BYE"]
        assert all("call_id=tls-call@" in ln for ln in lines)
    res = sipsniff("process", str(PCAPS / "tls.pcap"), "--no-db", "-q", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout == ""  # without keys nothing can be read
