"""/metrics during a `process -` run: SIP messages by kind (request method / status class)
and, for -j 0, the tracker's tables held now. The counts equal the run's own summary
(--stats ``sip_by_kind``) and what was sent: two whole calls and one INVITE left open."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.ops.calls import call, filler, finish, header, invite, send, start, wait_reading_stdin
from tests.ops.test_metrics import HOST, free_port, scrape


def kind(sample: dict[tuple[str, tuple[tuple[str, str], ...]], float], k: str) -> float | None:
    return sample.get(("sipsniff_sip_messages_by_kind_total", (("kind", k),)))


@pytest.mark.parametrize("workers", [0, 2])
def test_messages_by_kind_and_tables_held_are_scraped(tmp_path: Path, workers: int) -> None:
    port = free_port()
    proc = start(tmp_path, "--log", "none", "--metrics", f"{HOST}:{port}", "--stats", "stats.json", workers=workers)
    try:
        send(proc, header() + call("A", 1000) + call("B", 1003) + invite("C", 1006) + filler(1007))
        deadline = time.monotonic() + 20
        t = 1008.0
        while True:  # -j N: a round's counts come back when it closes (packet time goes on)
            wait_reading_stdin(proc)
            during = scrape(port)
            if kind(during, "INVITE") == 3 or time.monotonic() > deadline:
                break
            send(proc, filler(t))
            t += 0.5
    finally:
        status = finish(proc)
    assert status == 0, (tmp_path / "stderr").read_text()
    stats = json.loads((tmp_path / "stats.json").read_text())
    # INVITE x3, ACK x2, BYE x2; 200 to each INVITE answered and to each BYE
    assert stats["sip_by_kind"] == {"INVITE": 3, "ACK": 2, "BYE": 2, "2xx": 4}
    assert kind(during, "INVITE") == stats["sip_by_kind"]["INVITE"]
    assert kind(during, "2xx") == stats["sip_by_kind"]["2xx"]
    assert kind(during, "BYE") == 2
    if workers == 0:  # the tracker's tables now: C's INVITE has no final reply
        assert during[("sipsniff_open_transactions", ())] == 1
        assert during[("sipsniff_tracked_transactions", ())] >= 1
        assert ("sipsniff_tracked_dialogs", ()) in during
