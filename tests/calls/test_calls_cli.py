"""process --calls / --calls-table end to end (the real command in a subprocess).

The acceptance check of issue 12: on a generated workload, call counts by outcome equal the
generator's ground truth (.meta.json). A few thousand calls here; the 50k-call figure is a
one-off run (see the report / README).
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GEN = REPO / "benchmarks" / "gen_workload.py"
#: gen_workload.py's ground-truth names → the calls' outcome classes
GROUND_TRUTH = {"call_answered": "answered", "call_busy": "busy", "call_notfound": "rejected",
                "call_cancel": "cancelled", "call_noanswer": "no_answer"}


def sipsniff(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sipsniff_acc", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("calls") / "w.pcap"
    subprocess.run([sys.executable, str(GEN), str(out), "--calls", "3000", "--window", "300", "--seed", "9",
                    "--tcp-share", "0.1"], check=True, capture_output=True, timeout=300)
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    return out, meta


def _expected(meta: dict[str, int]) -> dict[str, int]:
    want: Counter[str] = Counter()
    for k, outcome in GROUND_TRUTH.items():
        want[outcome] += meta.get(k, 0)
    return {k: v for k, v in want.items() if v}


def test_calls_by_outcome_equal_the_generator_s_ground_truth(workload: tuple[Path, dict[str, int]],
                                                            tmp_path: Path) -> None:
    pcap, meta = workload
    calls = tmp_path / "calls.jsonl"
    res = sipsniff("process", str(pcap), "--no-db", "--log", "none", "-q", "--calls", str(calls))
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(os.stat(calls).st_mode) == 0o600
    rows = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(rows) == meta["calls"]
    assert dict(Counter(r["outcome"] for r in rows)) == _expected(meta)
    assert all(r["end"] is not None and r["ended_how"] in ("bye", "cancel", "error_reply") for r in rows)
    answered = [r for r in rows if r["outcome"] == "answered"]
    assert all(r["billable"] >= 5.0 and r["answer_codecs"][:1] == ["PCMU/8000"] for r in answered)  # talk >= 5 s
    assert {r["ended_by"] for r in answered} == {"caller"}
    assert len({(r["call_id"], r["seq"]) for r in rows}) == len(rows)


def test_calls_table_in_sqlite_beside_the_acc_rows(workload: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    pcap, meta = workload
    db = tmp_path / "acc.db"
    res = sipsniff("process", str(pcap), "--db-url", f"sqlite:///{db}", "--spool", str(tmp_path / "spool.db"),
                   "--log", "none", "-q", "--calls-table", "calls")
    assert res.returncode == 0, res.stderr
    con = sqlite3.connect(db)
    got = dict(con.execute("SELECT outcome, count(*) FROM calls GROUP BY outcome").fetchall())
    assert got == _expected(meta)
    legs, prov = con.execute("SELECT legs, provenance FROM calls WHERE outcome = 'answered' LIMIT 1").fetchone()
    assert json.loads(legs)[0]["final_code"] == 200 and "answer" in json.loads(prov)["seen"]
    assert con.execute("SELECT count(*) FROM acc").fetchone()[0] > 0
    con.close()


def test_a_calls_table_that_fails_is_one_line_and_accounting_goes_on(tmp_path: Path) -> None:
    """A table named calls that is something else: one line, the acc rows and the JSON lines all there."""
    pcap = REPO / "tests" / "conformance" / "cases" / "volume_mixed" / "capture.pcap"
    db = tmp_path / "acc.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE calls (x INTEGER NOT NULL)")
    con.commit()
    con.close()
    calls = tmp_path / "calls.jsonl"
    res = sipsniff("process", str(pcap), "--db-url", f"sqlite:///{db}", "--spool", str(tmp_path / "spool.db"),
                   "--log", "none", "-q", "--calls-table", "calls", "--calls", str(calls))
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: calls table:") and "Traceback" not in res.stderr
    assert len(calls.read_text().splitlines()) == 300
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*) FROM acc").fetchone()[0] == 483 - 117  # INVITE 200 + BYE + failed (missed apart)
    con.close()


@pytest.mark.parametrize("args,says", [
    (["-j", "2", "--calls", "c.jsonl"], "use -j 0"),
    (["--calls-table", "x y"], "--calls-table 'x y'"),
    (["--no-db", "--calls-table", "calls"], "drop --no-db"),
    (["--calls", "nodir/c.jsonl"], "--calls nodir/c.jsonl: directory nodir does not exist"),
])
def test_calls_mistakes_are_one_line_before_the_work(tmp_path: Path, args: list[str], says: str) -> None:
    pcap = REPO / "tests" / "conformance" / "cases" / "busy_486" / "capture.pcap"
    res = sipsniff("process", str(pcap), "--log", "none", *args, cwd=tmp_path)
    assert res.returncode == 2
    assert says in res.stderr and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "acc.db").exists()


def test_calls_to_stdout(tmp_path: Path) -> None:
    pcap = REPO / "tests" / "conformance" / "cases" / "cancel_after_180" / "capture.pcap"
    res = sipsniff("process", str(pcap), "--no-db", "--log", "none", "-q", "--calls", "-", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    [row] = [json.loads(line) for line in res.stdout.splitlines()]
    assert (row["outcome"], row["ended_by"], row["ended_how"], row["final_code"]) == ("cancelled", "caller", "cancel", 487)
