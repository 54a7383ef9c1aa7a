"""No false alarm: every recorded Kamailio case (tests/conformance/cases: answered, busy,
cancelled, forked, re-INVITE, extras and multi-leg rows, dialog CDRs, ...) audited against
Kamailio's own acc / missed_calls / acc_cdrs rows in SQLite: 0 discrepancies, exit 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.audit.books import CASES, kamailio_rows, load
from tests.conformance.goldens import rules_for

ALL = sorted(p.name for p in CASES.iterdir() if p.is_dir() and any(kamailio_rows(p).values()))


@pytest.mark.parametrize("case", ALL)
def test_kamailios_own_books_agree(case: str, tmp_path: Path) -> None:
    load(f"sqlite:///{tmp_path / 'audit.db'}", kamailio_rows(CASES / case))
    (tmp_path / "rules.yaml").write_text(rules_for(case))
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "audit", str(CASES / case / "capture.pcap"), "-m",
                          "rules.yaml", "--against", "sqlite:///audit.db", "--jsonl", "d.jsonl"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "d.jsonl").read_text() == ""
    rows = sum(len(v) for v in kamailio_rows(CASES / case).values())
    assert f"{rows} in billing" in res.stdout and "the books agree" in res.stdout
