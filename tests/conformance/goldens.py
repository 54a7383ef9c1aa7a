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
