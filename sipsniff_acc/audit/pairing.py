"""Pairing the wire's rows with the billing rows (pure: lists in, discrepancies out).

First by (table, Call-ID, method, From-tag, To-tag), then what is left by (table, Call-ID,
method, From-tag) and nearest time. Within a key the pairs are chosen by nearest time (the
closest pair first), so a re-INVITE's row pairs with its own billing row, not the call's
first one. Paired rows are compared field by field: code, reason, time (beyond the time
tolerance), the To-tag when only the loose key matched, a CDR's end and duration (beyond
the duration tolerance). A billing row left over whose key was already paired is a
``duplicate`` (billed twice); any other billing row left over is a ``phantom``; a wire row
left over is ``missing``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace

from sipsniff_acc.audit.model import DUPLICATE, MISMATCH, MISSING, PHANTOM, Discrepancy, Row

MAX_PAIRWISE = 4096  #: rows of one key matched pair by pair (closest first); beyond, in time order


@dataclass
class Result:
    pairs: list[tuple[Row, Row]] = field(default_factory=list)
    discrepancies: list[Discrepancy] = field(default_factory=list)

    def counts(self) -> Counter[tuple[str, str]]:
        """(kind, table) -> discrepancies."""
        return Counter((d.kind, d.table) for d in self.discrepancies)


def _match(ws: list[Row], bs: list[Row]) -> tuple[list[tuple[Row, Row]], list[Row], list[Row]]:
    """Pairs closest in time first; (pairs, wire left, billing left)."""
    if len(ws) == 1 and len(bs) == 1:
        return [(ws[0], bs[0])], [], []
    if len(ws) * len(bs) <= MAX_PAIRWISE:
        cand = sorted((abs(w.time - b.time), i, j) for i, w in enumerate(ws) for j, b in enumerate(bs))
        used_w: set[int] = set()
        used_b: set[int] = set()
        pairs = []
        for _d, i, j in cand:
            if i in used_w or j in used_b:
                continue
            used_w.add(i)
            used_b.add(j)
            pairs.append((ws[i], bs[j]))
        return (pairs, [w for i, w in enumerate(ws) if i not in used_w],
                [b for j, b in enumerate(bs) if j not in used_b])
    ws2, bs2 = sorted(ws, key=lambda r: r.time), sorted(bs, key=lambda r: r.time)
    n = min(len(ws2), len(bs2))
    return list(zip(ws2[:n], bs2[:n], strict=True)), ws2[n:], bs2[n:]


def _group(rows: list[Row], key: Callable[[Row], Hashable]) -> dict[Hashable, list[Row]]:
    out: dict[Hashable, list[Row]] = defaultdict(list)
    for r in rows:
        out[key(r)].append(r)
    return out


def _stage(wire: list[Row], billing: list[Row], key: Callable[[Row], Hashable]
           ) -> tuple[list[tuple[Row, Row]], list[Row], list[Row]]:
    bw, bb = _group(wire, key), _group(billing, key)
    pairs: list[tuple[Row, Row]] = []
    w_left: list[Row] = []
    b_left: list[Row] = []
    for k, ws in bw.items():
        bs = bb.get(k)
        if not bs:
            w_left.extend(ws)
            continue
        p, wl, bl = _match(ws, bs)
        pairs += p
        w_left += wl
        b_left += bl
    for k, bs in bb.items():
        if k not in bw:
            b_left.extend(bs)
    return pairs, w_left, b_left


def _disc(kind: str, r: Row, field_: str = "", wire: object = None, billing: object = None,
          ref: str = "") -> Discrepancy:
    return Discrepancy(kind, r.table, r.callid, r.method, r.from_tag, r.to_tag, field_, wire, billing, r.time,
                       ref or r.ref)


def compare(w: Row, b: Row, time_tolerance: float, duration_tolerance: float) -> list[Discrepancy]:
    """One mismatch per field that differs (both values named); the wire's keys and time."""
    out = []
    base = Discrepancy(MISMATCH, w.table, w.callid, w.method, w.from_tag, w.to_tag, time=w.time, ref=b.ref)

    def diff(field_: str, wv: object, bv: object) -> None:
        out.append(replace(base, field=field_, wire=wv, billing=bv))

    if w.to_tag != b.to_tag:
        diff("to_tag", w.to_tag, b.to_tag)
    if w.code != b.code and not (w.end is not None or b.end is not None):
        diff("code", w.code, b.code)
    if w.reason != b.reason and not (w.end is not None or b.end is not None):
        diff("reason", w.reason, b.reason)
    if abs(w.time - b.time) > time_tolerance:
        diff("time", w.time, b.time)
    if w.end is not None and b.end is not None and abs(w.end - b.end) > duration_tolerance:
        diff("end", w.end, b.end)
    if w.duration is not None and b.duration is not None and abs(w.duration - b.duration) > duration_tolerance:
        diff("duration", w.duration, b.duration)
    return out


def pair(wire: list[Row], billing: list[Row], time_tolerance: float = 1.0,
         duration_tolerance: float = 1.0) -> Result:
    """Every row of both sides either paired or named in a discrepancy."""
    res = Result()
    p1, w_left, b_left = _stage(wire, billing, lambda r: r.key)
    p2, w_left, b_left = _stage(w_left, b_left, lambda r: r.loose_key)
    res.pairs = p1 + p2
    for w, b in res.pairs:
        res.discrepancies += compare(w, b, time_tolerance, duration_tolerance)
    billed = {b.key for _w, b in res.pairs}
    for w in w_left:
        res.discrepancies.append(_disc(MISSING, w, wire=w.code or None))
    for b in b_left:
        if b.key in billed:
            res.discrepancies.append(_disc(DUPLICATE, b, billing=b.code or None))
        else:
            res.discrepancies.append(_disc(PHANTOM, b, billing=b.code or None))
    res.discrepancies.sort(key=lambda d: (d.time, d.table, d.callid, d.kind, d.field))
    return res
