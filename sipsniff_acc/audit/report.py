"""What the audit tells: the terminal summary, the JSON lines, and the call statistics the
HTML report plots (ASR/ACD/NER per hour, final codes, billed vs measured durations, callers
and destinations with the most discrepancies)."""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import IO

import orjson

from sipsniff_acc.audit.model import KINDS, Discrepancy, Row
from sipsniff_acc.audit.pairing import Result
from sipsniff_acc.sysloglines import escape, json_safe

#: final codes that count as the network having done its job (ITU-T E.425 NER): answered,
#: busy, no answer, declined, cancelled by the caller
NER_CODES = frozenset({486, 600, 603, 480, 487, 408})


def iso(t: float | None) -> str:
    if t is None or t != t or t in (float("inf"), float("-inf")):
        return "-"
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def write_jsonl(out: IO[bytes], discrepancies: list[Discrepancy]) -> None:
    """One discrepancy a line; control characters escaped as in every JSON output of ours."""
    for d in discrepancies:
        out.write(json_safe(orjson.dumps(d.as_dict())) + b"\n")


def summary(res: Result, wire: list[Row], billing: list[Row], tables: list[str], first: float | None,
            last: float | None, out: IO[str], unverified: int = 0) -> None:
    """Counts by table and kind, then one line: agree, or how many discrepancies of which kind."""
    w, b = Counter(r.table for r in wire), Counter(r.table for r in billing)
    paired = Counter(wr.table for wr, _b in res.pairs)
    counts = res.counts()
    print(f"audit: {len(wire)} row(s) from the wire, {len(billing)} in billing, {iso(first)} .. {iso(last)}",
          file=out)
    width = max([len(t) for t in tables] + [5])
    for t in tables:
        kinds = "  ".join(f"{counts[(k, t)]} {k}" for k in KINDS)
        print(escape(f"  {t:<{width}}  wire {w[t]}  billing {b[t]}  paired {paired[t]}  {kinds}"), file=out)
    if unverified:
        print(f"  {unverified} billing row(s) not judged: calls already in progress when the capture began, or "
              "rows of its first or last second (kind 'unverified' in --jsonl)", file=out)
    total = len(res.discrepancies)
    if not total:
        print("the books agree: 0 discrepancies", file=out)
        return
    by_kind = Counter(d.kind for d in res.discrepancies)
    fields = Counter(d.field for d in res.discrepancies if d.field)
    more = f" (fields: {', '.join(f'{f} {n}' for f, n in fields.most_common())})" if fields else ""
    print(f"{total} discrepanc{'y' if total == 1 else 'ies'}: "
          + ", ".join(f"{by_kind[k]} {k}" for k in KINDS if by_kind[k]) + more, file=out)


# --- call statistics (HTML report) ---------------------------------------------------------

@dataclass
class Hour:
    attempts: int = 0
    answered: int = 0
    ner_ok: int = 0
    seconds: float = 0.0  #: talk time of answered calls that ended in the capture
    ended: int = 0


@dataclass
class CallStats:
    """Per-call outcomes from the rows of one side (first INVITE row of each Call-ID)."""

    hours: dict[int, Hour] = field(default_factory=dict)
    codes: Counter[str] = field(default_factory=Counter)
    durations: dict[str, float] = field(default_factory=dict)  #: Call-ID -> seconds (answered and ended)
    outcomes: dict[str, str] = field(default_factory=dict)  #: Call-ID -> final code of its INVITE
    calls: int = 0


def call_stats(rows: list[Row]) -> CallStats:
    """ASR/ACD/NER per hour and final codes. A call is a Call-ID's initial INVITE row (any
    table, the first in time); its duration runs from that row's time to its BYE row's, or
    is a CDR's duration when the CDR table has the call."""
    invites: dict[str, Row] = {}
    byes: dict[str, float] = {}
    cdr: dict[str, float] = {}
    for r in sorted(rows, key=lambda r: r.time):
        if r.duration is not None:
            cdr.setdefault(r.callid, r.duration)
        elif r.method == "INVITE" and not r.in_dialog and r.code:
            prev = invites.get(r.callid)  # the first row, or the first 2xx one when the call was answered
            if prev is None or (prev.code[:1] != "2" and r.code[:1] == "2"):
                invites[r.callid] = r
        elif r.method == "BYE":
            byes.setdefault(r.callid, r.time)
    st = CallStats()
    for cid, r in invites.items():
        hour = int(r.time // 3600) * 3600
        h = st.hours.setdefault(hour, Hour())
        h.attempts += 1
        st.calls += 1
        st.codes[r.code] += 1
        st.outcomes[cid] = r.code
        code = int(r.code) if r.code.isdigit() else 0
        if 200 <= code < 300:
            h.answered += 1
            h.ner_ok += 1
            seconds = cdr.get(cid)
            if seconds is None and cid in byes:
                seconds = max(0.0, byes[cid] - r.time)
            if seconds is not None:
                h.seconds += seconds
                h.ended += 1
                st.durations[cid] = seconds
        elif code in NER_CODES:
            h.ner_ok += 1
    for cid, seconds in cdr.items():  # CDRs of calls whose INVITE rows are not in the tables
        st.durations.setdefault(cid, seconds)
    return st


@dataclass
class Party:
    """A caller or a destination: its discrepancies and its calls on the wire."""

    name: str
    discrepancies: int = 0
    calls: int = 0
    answered: int = 0

    @property
    def asr(self) -> float | None:
        return 100.0 * self.answered / self.calls if self.calls else None


def worst_parties(discrepancies: list[Discrepancy], parties: dict[str, tuple[str, str]],
                  outcomes: dict[str, str] | None = None, top: int = 10) -> tuple[list[Party], list[Party]]:
    """Callers and destinations with the most discrepancies (who is under- or over-billed),
    then the lowest answer-seizure ratio on the wire: the worst first."""
    sides: tuple[dict[str, Party], dict[str, Party]] = ({}, {})

    def get(i: int, name: str) -> Party:
        name = name or "(unknown)"
        p = sides[i].get(name)
        if p is None:
            p = sides[i][name] = Party(name)
        return p

    for cid, code in (outcomes or {}).items():
        for i, name in enumerate(parties.get(cid, ("", ""))):
            p = get(i, name)
            p.calls += 1
            p.answered += code[:1] == "2"
    for d in discrepancies:
        for i, name in enumerate(parties.get(d.callid, ("", ""))):
            get(i, name).discrepancies += 1

    def rank(p: Party) -> tuple[int, float, int]:
        return (-p.discrepancies, p.asr if p.asr is not None else 101.0, -p.calls)

    callers, callees = (sorted(side.values(), key=rank)[:top] for side in sides)
    return callers, callees


def by_kind_over_time(discrepancies: list[Discrepancy]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for d in discrepancies:
        out[d.kind].append(d.time)
    return out
