"""process --state FILE from the command line: mistakes are one line, exit 2, before any
packet; a capture cut in two and run as two invocations sharing a state file gives the
records of one run over the whole capture."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sipsniff_acc.sources.pcapfile import CaptureReader
from tests.builders import pcap_bytes
from tests.conftest import PCAPS
from tests.restart.test_state import RULES

EXE = str(Path(sys.executable).with_name("sipsniff-acc"))


def sniff(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, "process", *args, "--no-db", "--log", "none", "-m", str(work / "rules.yaml")],
                          cwd=work, capture_output=True, text=True, timeout=120)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "rules.yaml").write_text(RULES)
    return tmp_path


def test_usage_errors_are_one_line(work: Path) -> None:
    sample = str(PCAPS / "sample.pcap")
    for state, why in ((work / "rules.yaml", "is not a sipsniff-acc state file"), (work, "is a directory"),
                       (work / "missing" / "st", "does not exist")):
        r = sniff(work, sample, "-j", "0", "--state", str(state))
        assert r.returncode == 2, r.stderr
        assert why in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_other_shard_count_refused(work: Path) -> None:
    """A state saved by -j 0 is not split across -j 2's workers differently: refused, one line."""
    from sipsniff_acc.processrun import AccPipeline
    from sipsniff_acc.rules import parse_rules
    from sipsniff_acc.state import save_state
    save_state(work / "st", AccPipeline(parse_rules(RULES)))
    r = sniff(work, str(PCAPS / "sample.pcap"), "-j", "2", "--state", str(work / "st"))
    assert r.returncode == 2 and "saved by a run with -j 0, this run has -j 2" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_two_runs_one_capture(work: Path) -> None:
    """sample.pcap (10 SIPp calls) cut in the middle of the calls: the first run saves its open
    calls at its end, the second restores them; together: the records of one run."""
    frames = list(CaptureReader(PCAPS / "sample.pcap"))
    half = len(frames) // 2
    for name, part in (("a.pcap", frames[:half]), ("b.pcap", frames[half:])):
        (work / name).write_bytes(pcap_bytes([(f.ts, f.data) for f in part], linktype=frames[0].linktype))
    whole = sniff(work, str(PCAPS / "sample.pcap"), "-j", "0", "--jsonl", str(work / "whole.jsonl"))
    assert whole.returncode == 0, whole.stderr
    first = sniff(work, str(work / "a.pcap"), "-j", "0", "--jsonl", str(work / "a.jsonl"), "--state", str(work / "st"))
    assert first.returncode == 0, first.stderr
    assert re.search(r"state .*: saved \d+ transactions, \d+ dialogs", first.stderr), first.stderr
    second = sniff(work, str(work / "b.pcap"), "-j", "0", "--jsonl", str(work / "b.jsonl"), "--state", str(work / "st"))
    assert second.returncode == 0, second.stderr
    assert "restored" in second.stderr and "0 expired dropped" in second.stderr, second.stderr

    def recs(*names: str) -> list[dict[str, object]]:
        return [json.loads(line) for n in names for line in (work / n).read_text().splitlines()]

    want = recs("whole.jsonl")
    assert sorted({(r["kind"], r["method"]) for r in want}) == [("acked", "ACK"), ("answered", "BYE"), ("answered", "INVITE")]
    assert recs("a.jsonl", "b.jsonl") == want
