"""rules.yaml `limits:` through the command line: a bound that is reached is said in the
summary and in --stats, in one process and with -j 2 (each worker holds 1/N of the limits)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PCAPS

RULES = """\
route:
  - if: {method: INVITE, in_dialog: false}
    setflag: [1, 2]
  - if: {method: BYE, in_dialog: true}
    setflag: [1]
acc: {log_flag: 1, log_missed_flag: 2}
limits: {max_transactions: 4, max_dialogs: 4}
"""


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_reached_limit_is_counted_in_the_summary_and_stats(tmp_path: Path, workers: str) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    stats = tmp_path / "stats.json"
    p = subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", "-r", str(PCAPS / "sample.pcap"),
                        "-m", str(rules), "--no-db", "--log", "none", "-j", workers, "--stats", str(stats)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "limits reached (rules.yaml limits:)" in p.stderr
    tracker = json.loads(stats.read_text())["tracker"]
    assert tracker["evicted_transactions"] > 0
    # sequential calls: only completed transactions had to go, every call is still accounted
    assert not tracker["evicted_open"]
    assert json.loads(stats.read_text())["records"] == {"answered": 20}
