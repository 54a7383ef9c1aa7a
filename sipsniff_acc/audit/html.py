"""The audit as one self-contained HTML file: totals, ASR/ACD/NER per hour, the final-code
histogram, the timeline of discrepancies, billed vs measured durations, the callers and
destinations with the most discrepancies, and the discrepancies themselves.

Plots are drawn by matplotlib (Agg, SVG output with text as paths: no font or network
needed at view time) and embedded as ``data:`` images, so each figure keeps its own SVG ids
and the page needs nothing but itself. matplotlib is imported only when a report is asked for.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from collections import Counter
from typing import Any

from sipsniff_acc.audit.model import KINDS, Discrepancy, Row
from sipsniff_acc.audit.pairing import Result
from sipsniff_acc.audit.report import CallStats, Party, call_stats, iso, worst_parties
from sipsniff_acc.audit.wire import WireSide

MAX_TABLE_ROWS = 1000  #: discrepancies listed in the page (all of them are in --jsonl); the rest counted
MAX_POINTS = 20_000  #: points per scatter plot; beyond, an even sample (the count is said in the caption)
COLORS = {"missing": "#d62728", "phantom": "#9467bd", "mismatch": "#ff7f0e", "duplicate": "#1f77b4",
          "wire": "#2ca02c", "billing": "#1f77b4"}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1100px;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0} td,th{border:1px solid #ccc;padding:.2em .5em;overflow-wrap:break-word}
th{background:#f3f3f3;text-align:left} #discrepancies td:first-child{white-space:nowrap} td.n{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start} .wide{overflow-x:auto} figure{margin:0;width:522px} figcaption{font-size:.85em;color:#555}
img.plot{width:520px;height:auto;border:1px solid #eee} .agree{color:#2ca02c;font-weight:bold}
.disagree{color:#d62728;font-weight:bold} code{font-size:.9em} .muted{color:#777}
"""


def _esc(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _figure() -> tuple[Any, Any]:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    plt.rcParams.update({"svg.fonttype": "path", "svg.hashsalt": "sipsniff-audit", "font.size": 9})
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    return fig, ax


def _embed(fig: Any, name: str, caption: str) -> str:
    """The figure as an <img> holding its SVG (a data: URI), closed afterwards."""
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return (f'<figure id="fig-{name}"><img class="plot" data-plot="{name}" alt="{_esc(caption)}" '
            f'src="data:image/svg+xml;base64,{data}"><figcaption>{_esc(caption)}</figcaption></figure>')


def _hour_label(h: int) -> str:
    return dt.datetime.fromtimestamp(h, dt.timezone.utc).strftime("%m-%d %H:00")


def _kpi_plot(wire: CallStats, billing: CallStats) -> str:
    fig, ax = _figure()
    hours = sorted(set(wire.hours) | set(billing.hours))
    x = list(range(len(hours)))
    w = 0.2
    for i, (label, st) in enumerate((("wire", wire), ("billing", billing))):
        asr = [100 * st.hours[h].answered / st.hours[h].attempts if h in st.hours and st.hours[h].attempts else 0
               for h in hours]
        ner = [100 * st.hours[h].ner_ok / st.hours[h].attempts if h in st.hours and st.hours[h].attempts else 0
               for h in hours]
        off = -1.5 * w + 2 * i * w
        ax.bar([v + off for v in x], asr, w, label=f"ASR % ({label})", color=COLORS[label])
        ax.bar([v + off + w for v in x], ner, w, label=f"NER % ({label})", color=COLORS[label], alpha=0.45)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.set_xticks(x, [_hour_label(h) for h in hours])
    ax2 = ax.twinx()
    for label, st, mark in (("wire", wire, "o-"), ("billing", billing, "s--")):
        acd = [st.hours[h].seconds / st.hours[h].ended if h in st.hours and st.hours[h].ended else 0 for h in hours]
        ax2.plot(x, acd, mark, color="#444" if label == "wire" else "#999", label=f"ACD s ({label})")
    ax2.set_ylabel("ACD (s)")
    ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left", ncol=2)
    ax.set_title("ASR, NER and ACD per hour (UTC)")
    return _embed(fig, "kpi", "Answer-seizure ratio, network-effectiveness ratio (bars) and average call "
                  "duration (lines) per hour, from the wire and from the billing rows")


def _codes_plot(wire: CallStats, billing: CallStats) -> str:
    fig, ax = _figure()
    codes = sorted(set(wire.codes) | set(billing.codes), key=lambda c: (len(c), c))
    x = list(range(len(codes)))
    ax.bar([v - 0.2 for v in x], [wire.codes[c] for c in codes], 0.4, label="wire", color=COLORS["wire"])
    ax.bar([v + 0.2 for v in x], [billing.codes[c] for c in codes], 0.4, label="billing", color=COLORS["billing"])
    ax.set_xticks(x, codes)
    ax.set_xlabel("final code of the call's INVITE")
    ax.set_ylabel("calls")
    ax.legend(fontsize=8)
    ax.set_title("Final codes")
    return _embed(fig, "codes", "Final-code histogram: calls by the final reply to their INVITE")


def _timeline_plot(discrepancies: list[Discrepancy], first: float | None, last: float | None) -> str:
    fig, ax = _figure()
    import matplotlib.dates as mdates
    shown = discrepancies[:: max(1, len(discrepancies) // MAX_POINTS)]
    for i, kind in enumerate(KINDS):
        ts = [dt.datetime.fromtimestamp(d.time, dt.timezone.utc) for d in shown
              if d.kind == kind and d.time not in (float("inf"), float("-inf"))]
        ax.scatter(ts, [i] * len(ts), s=14, color=COLORS[kind], label=f"{kind} ({sum(d.kind == kind for d in discrepancies)})")
    if first is not None and last is not None:
        ax.set_xlim(dt.datetime.fromtimestamp(first - 1, dt.timezone.utc),
                    dt.datetime.fromtimestamp(last + 1, dt.timezone.utc))
    ax.set_yticks(range(len(KINDS)), KINDS)
    ax.set_ylim(-0.7, len(KINDS) - 0.3)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))  # type: ignore[no-untyped-call]
    ax.set_xlabel("time (UTC)")
    ax.set_title("Discrepancies over the capture")
    sample = "" if len(shown) == len(discrepancies) else f" (an even sample of {len(shown)})"
    return _embed(fig, "timeline", f"Timeline of discrepancies by kind{sample}")


def _durations_plot(wire: CallStats, billing: CallStats) -> str:
    fig, ax = _figure()
    both = [(wire.durations[c], billing.durations[c]) for c in wire.durations if c in billing.durations]
    shown = both[:: max(1, len(both) // MAX_POINTS)]
    ax.scatter([m for m, _b in shown], [b for _m, b in shown], s=10, color=COLORS["billing"], alpha=0.7)
    top = max([1.0] + [max(m, b) for m, b in shown])
    ax.plot([0, top], [0, top], color="#888", linewidth=0.8, linestyle="--", label="billed = measured")
    ax.set_xlabel("measured on the wire (s)")
    ax.set_ylabel("billed (s)")
    ax.legend(fontsize=8)
    ax.set_title(f"Billed vs measured durations ({len(both)} calls)")
    return _embed(fig, "durations", "Billed vs measured call durations (INVITE 2xx to BYE, or the CDR's duration)")


def _parties_plot(callers: list[Party], callees: list[Party]) -> str:
    import matplotlib.pyplot as plt
    _figure()
    plt.close("all")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(6.4, 3.6), dpi=100)
    for ax, data, title in ((a1, callers, "callers"), (a2, callees, "destinations")):
        rows = list(reversed(data))
        names = [p.name[:24] for p in rows]
        ax.barh(range(len(rows)), [p.discrepancies for p in rows], color=COLORS["missing"], label="discrepancies")
        ax.barh(range(len(rows)), [-(100 - p.asr) / 10 if p.asr is not None else 0 for p in rows],
                color="#bbbbbb", label="failed calls % / 10")
        ax.set_yticks(range(len(rows)), names, fontsize=7)
        ax.axvline(0, color="#444", linewidth=0.6)
        ax.set_title(f"worst {title}")
        ax.set_xlabel("discrepancies (right), failed % / 10 (left)", fontsize=7)
    return _embed(fig, "parties", "Callers and destinations with the most discrepancies, then the lowest ASR")


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{_esc(v)}</td>'
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(res: Result, wire: WireSide, wire_rows: list[Row], billing_rows: list[Row], tables: list[str],
           against: str, unverified: int = 0) -> str:
    """The whole page as text."""
    ws, bs = call_stats(wire_rows), call_stats(billing_rows)
    callers, callees = worst_parties(res.discrepancies, wire.parties, ws.outcomes)
    counts = res.counts()
    wn, bn = Counter(r.table for r in wire_rows), Counter(r.table for r in billing_rows)
    paired = Counter(w.table for w, _b in res.pairs)
    total = len(res.discrepancies)
    verdict = ('<p class="agree">The books agree: 0 discrepancies.</p>' if not total else
               f'<p class="disagree">{total} discrepanc{"y" if total == 1 else "ies"}: '
               + ", ".join(f"{sum(counts[(k, t)] for t in tables)} {k}" for k in KINDS) + ".</p>")
    if unverified:
        verdict += (f'<p class="muted">{unverified} billing row(s) not judged: calls already in progress when the '
                    "capture began, or rows of its first or last second (kind <code>unverified</code> in --jsonl).</p>")
    totals = _table(["table", "wire", "billing", "paired", *KINDS],
                    [[t, wn[t], bn[t], paired[t], *(counts[(k, t)] for k in KINDS)] for t in tables],
                    set(range(1, 4 + len(KINDS))))

    def kpi(st: CallStats) -> list[Any]:
        att = sum(h.attempts for h in st.hours.values())
        ans = sum(h.answered for h in st.hours.values())
        ner = sum(h.ner_ok for h in st.hours.values())
        ended = sum(h.ended for h in st.hours.values())
        secs = sum(h.seconds for h in st.hours.values())
        return [att, ans, f"{100 * ans / att:.1f}" if att else "-", f"{100 * ner / att:.1f}" if att else "-",
                f"{secs / ended:.1f}" if ended else "-"]

    calls = _table(["side", "calls", "answered", "ASR %", "NER %", "ACD s"],
                   [["wire", *kpi(ws)], ["billing", *kpi(bs)]], {1, 2, 3, 4, 5})
    plots = [_kpi_plot(ws, bs), _codes_plot(ws, bs), _timeline_plot(res.discrepancies, wire.first, wire.last),
             _durations_plot(ws, bs), _parties_plot(callers, callees)]
    listed = res.discrepancies[:MAX_TABLE_ROWS]
    more = (f'<p class="muted">{total - len(listed)} more discrepancies are not listed here '
            "(every one is in --jsonl).</p>" if total > len(listed) else "")
    timed = ("time", "start_time", "end_time", "end")
    rows = [[iso(d.time), d.kind, d.table, d.callid, d.method, d.from_tag, d.to_tag, d.field,
             iso(d.wire) if d.field in timed and isinstance(d.wire, float) else d.wire,
             iso(d.billing) if d.field in timed and isinstance(d.billing, float) else d.billing, d.ref]
            for d in listed]
    def party_rows(ps: list[Party]) -> list[list[Any]]:
        return [[p.name, p.discrepancies, p.calls, "-" if p.asr is None else f"{p.asr:.1f}"] for p in ps]

    worst = _table(["caller", "discrepancies", "calls", "ASR %"], party_rows(callers), {1, 2, 3}) + \
        _table(["destination", "discrepancies", "calls", "ASR %"], party_rows(callees), {1, 2, 3})
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>sipsniff-acc audit</title><style>{CSS}</style></head>
<body>
<h1>Billing audit</h1>
<p>Capture {_esc(iso(wire.first))} .. {_esc(iso(wire.last))} against <code>{_esc(against)}</code>.</p>
{verdict}
<h2>Totals</h2>
<div id="totals">{totals}</div>
{calls}
<h2>Plots</h2>
<div class="plots">
{chr(10).join(plots)}
</div>
<h2>Worst callers and destinations</h2>
<div class="plots">{worst}</div>
<h2>Discrepancies</h2>
<div class="wide" id="discrepancies">
{_table(["time", "kind", "table", "Call-ID", "method", "From-tag", "To-tag", "field", "wire", "billing", "where"], rows)}
</div>
{more}
</body></html>
"""
