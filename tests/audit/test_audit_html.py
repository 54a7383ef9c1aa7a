"""Issue 12, audit acceptance: the HTML report opened in headless Chromium (the Debian
package) renders with no console error and no request outside the file, and its layout is
the expected one: five plots (KPIs per hour, final codes, discrepancy timeline, billed vs
measured durations, worst callers/destinations) each decoded and shown at its size, in a
two-column grid without overlap, the totals and discrepancy tables filled in, and a
full-page screenshot of the size that layout gives. Not a pixel comparison."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.audit.books import VOLUME, kamailio_rows, load
from tests.audit.chromium import chromium, inspect_page
from tests.audit.test_audit_databases import plant
from tests.conformance.goldens import rules_for

PLOTS = ["kpi", "codes", "timeline", "durations", "parties"]


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    chromium()  # skips (or fails under SIPSNIFF_REQUIRE_SERVERS=1) when Chromium is missing
    rows, expect = plant(kamailio_rows())
    load(f"sqlite:///{tmp_path / 'audit_faults.db'}", rows)
    (tmp_path / "rules.yaml").write_text(rules_for("volume_mixed"))
    page = tmp_path / "report.html"
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "audit", str(VOLUME / "capture.pcap"), "--rules",
                          "rules.yaml", "--against", f"sqlite:///{tmp_path / 'audit_faults.db'}", "--html", str(page),
                          "-q"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 1, res.stderr
    text = page.read_text()
    assert "<script" not in text and not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # self-contained
    assert page.stat().st_mode & 0o077 == 0

    report = inspect_page(page, ["img.plot", "#totals tbody tr", "#discrepancies tbody tr", "h2"])
    assert report.errors == [], report.errors
    assert report.failed == []
    outside = [u for u in report.requests if not u.startswith(("data:", page.resolve().as_uri()))]
    assert outside == []

    plots = report.boxes["img.plot"]
    assert len(plots) == len(PLOTS)
    for box in plots:
        assert box["complete"] and box["natural"] and box["natural"] > 300  # the SVG decoded
        assert 400 <= box["width"] <= 700 and 200 <= box["height"] <= 500, box
    for i, a in enumerate(plots):  # no two plots overlap
        for b in plots[i + 1:]:
            assert (a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"]
                    or a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"]), (a, b)
    columns = sorted({round(b["x"]) for b in plots})
    rows_y = sorted({round(b["y"]) for b in plots})
    assert len(columns) == 2 and len(rows_y) == 3  # a two-column grid: 2 + 2 + 1
    assert len(report.boxes["#totals tbody tr"]) == 2  # acc, missed_calls
    assert len(report.boxes["#discrepancies tbody tr"]) == len(expect)
    assert len(report.boxes["h2"]) == 4

    width, height = report.screenshot_size
    assert 1000 <= width <= 1400  # the 1280 px window, the page's 1100 px column
    lowest = max(b["y"] + b["height"] for b in plots)
    assert lowest + 300 <= height <= 8000  # everything below the plots (tables) is in the shot too
