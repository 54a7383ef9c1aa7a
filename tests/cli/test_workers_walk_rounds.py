"""`process -j N` on one classic pcap file: the workers skip other shards' frames in C
(fileworker._Walk) and cut rounds by frames. Records (in order) and counters equal -j 0's on
every capture of the test suite and the conformance cases, with rounds of a few frames (every
round boundary crossed: a Tick, a message, a call's records on either side of one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sipsniff_acc import filerun
from sipsniff_acc.events import Counters
from sipsniff_acc.processrun import RunResult, run
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import load_rules
from sipsniff_acc.sources.pcapfile import CaptureReader, SourceError, open_captures
from tests.conftest import PCAPS

REPO = Path(__file__).resolve().parents[2]
CAPTURES = sorted(PCAPS.glob("*.pcap*")) + sorted((REPO / "tests" / "conformance" / "cases").glob("*/capture.pcap"))
RULES = ('acc: {log_flag: 1, log_missed_flag: 2, db_flag: 1, db_missed_flag: 2, failed_transaction_flag: 3,'
         ' report_ack: true, log_extra: "ua=$hdr(User-Agent);ts=$TS"}\nroute:\n'
         '  - if: {method: BYE}\n    setflag: [1, 3]\n  - if: {in_dialog: true}\n    stop: true\n'
         '  - setflag: [1, 2, 3]\n')


class _Kept:
    def __init__(self) -> None:
        self.records: list[AccRecord] = []

    def emit(self, records: list[AccRecord]) -> None:
        self.records.extend(records)

    def close(self) -> None:
        pass


def _run(path: Path, workers: int, tmp_path: Path) -> tuple[list[AccRecord], dict[str, object], list[str]]:
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(RULES)
    errors: list[SourceError] = []
    kept = _Kept()
    counters = Counters()
    run(open_captures([CaptureReader(path)], errors), load_rules(rules_path), [kept], counters,
        result=RunResult(), workers=workers)
    return kept.records, counters.as_dict(), [str(e) for e in errors]


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.parent.name if p.name == "capture.pcap" else p.name)
def test_small_rounds_give_the_records_of_one_process(path: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    one = _run(path, 0, tmp_path)
    monkeypatch.setattr(filerun, "ROUND_FRAMES", 3)
    assert _run(path, 2, tmp_path) == one
    monkeypatch.setattr(filerun, "ROUND_FRAMES", 1)
    assert _run(path, 3, tmp_path) == one
