"""Dialog CDRs as Kamailio 5.6's acc module writes them with the dialog module (acc_cdr.c, acc-spec §7).

Fed the tracker's events (after the acc engine has seen each one), returns ``AccRecord``s of
kind ``cdr``: one per dialog the rules manage (``dlg_manage: true`` or ``dialog.dlg_flag``),
written

* when the BYE's transaction sends its final reply upstream (DLGCB_TERMINATED_CONFIRMED):
  start = the INVITE's arrival (or the first ACK of the 2xx with ``cdr_start_on_confirmed``),
  end = the BYE's arrival, extras evaluated on the BYE;
* when the INVITE fails (DLGCB_FAILED, with ``cdr_on_failed``): start = end = creation,
  duration ``0``, extras on the reply if it is real (relayed), on the INVITE if the proxy made
  it (FAKED: timer 408, script t_reply);
* when a confirmed dialog's lifetime (``dialog.default_timeout``) runs out with no in-dialog
  request (DLGCB_EXPIRED, only with ``cdr_expired_dlg_enable``): end = expiry, extras from
  ``$dlg_var`` only. Fired from packet time (``advance(now)``: a live source's Idle ticks too).

Times are Kamailio's ``time2string``: seconds + ``.`` + milliseconds truncated; the duration
is end - start on those millisecond values (``timersub``), ``0`` until the dialog ends.
The CDR's place among the acc records of the same event is Kamailio's (acc-spec §1.13):
before the INVITE's negative reply's records, after the BYE's.

Pure: no I/O, the packet timestamp is the clock. Bounded: dialogs by ``Limits.max_dialogs``
(the oldest forgotten first, counted in ``CdrStats.evicted``); dialogs never
answered are forgotten fr_inv_timer + 32 s after their INVITE.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from sipsniff_acc import pv
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import CompiledRule, RulesFile, compile_rule
from sipsniff_acc.sip import SipMessage
from sipsniff_acc.tracker import RETAIN, AckIn, Event, ReplyOut, RequestIn, Transaction

if TYPE_CHECKING:
    from sipsniff_acc.acc import AccEngine

CDR: Final = "cdr"  #: the record kind
#: what Kamailio 5.6.3 puts before a CDR line (LOC_INFO + function; the level name follows log_level)
LOG_PREFIX: Final = "NOTICE: acc [acc_cdr.c:395]: log_write_cdr(): "

EARLY, CONFIRMED_NA, CONFIRMED, ENDING = "early", "confirmed_na", "confirmed", "ending"


def msec(ts: float) -> int:
    """A packet time as whole milliseconds (truncated, as time2string prints tv_usec / 1000)."""
    return int(round(ts * 1_000_000)) // 1000


def time2string(ms: int) -> str:
    """Kamailio's ``"%ld.%03d"`` of a time (or a timersub'ed duration) in milliseconds."""
    sec, rest = divmod(ms, 1000)
    return f"{sec}.{rest:03d}"


@dataclass(slots=True)
class Dialog:
    """One dialog the dialog module would track: its CDR variables and what matches it."""

    call_id: str
    caller_tag: str
    invite: Transaction  #: the initial INVITE's server transaction
    start: float  #: arrival of the INVITE (or of the 2xx's ACK with cdr_start_on_confirmed)
    end: float = 0.0  #: arrival of the BYE (or the expiry); 0 while the dialog goes on
    #: the proxy's own first reaction to the request that set ``start`` (its 100 Trying, its copy
    #: of the ACK): Kamailio reads its clock just before sending it, so this time truncated to
    #: the millisecond is Kamailio's more often than the arrival is (measured on the recordings)
    start_ref: float = 0.0
    state: str = EARLY
    callee_tag: str | None = None
    code: int = 0  #: the INVITE's final code
    reason: str = ""
    vars: dict[str, str] = field(default_factory=dict)  #: $dlg_var
    expires: float = 0.0  #: confirmed: when the lifetime runs out unless an in-dialog request comes
    bye: Transaction | None = None  #: the BYE that ends it
    ack: SipMessage | None = None  #: cdr_start_on_confirmed: the ACK that set ``start``


@dataclass
class CdrStats:
    written: int = 0
    failed: int = 0  #: of which for failed dialogs
    expired: int = 0  #: dialogs whose lifetime ran out (a CDR only with cdr_expired_dlg_enable)
    skipped: int = 0  #: not written: cdr_skip's dialog variable was set
    open_at_end: int = 0  #: dialogs still going when the input ended (no CDR: Kamailio writes none yet)
    evicted: int = 0  #: dialogs forgotten early to stay within Limits.max_dialogs: no CDR for them

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class CdrEngine:
    """Dialog CDRs from tracker events; ``feed(ev, acc_records)`` returns them merged in Kamailio's order."""

    def __init__(self, rules: RulesFile, engine: AccEngine) -> None:
        """``engine``: the acc engine of the same pipeline (record ids, $TS, counters, limits are shared)."""
        self.engine = engine
        self.max_dialogs = engine.limits.max_dialogs
        self.dialogs: OrderedDict[tuple[str, str], Dialog] = OrderedDict()  #: (Call-ID, caller's From-tag)
        self.by_txn: dict[tuple[str, str, str, int], Dialog] = {}  #: INVITE / BYE transaction key -> dialog
        self._timers: list[tuple[float, str, str]] = []  #: (when, Call-ID, tag): expiry or unanswered give-up
        self.stats = CdrStats()
        self.replace_rules(rules)

    def replace_rules(self, rules: RulesFile) -> None:
        """Take rules.yaml's CDR settings (at start, and on a reload): dialogs already tracked go
        on with their variables and times; new ones follow the new route rules."""
        self.rules = rules
        a = rules.acc
        self.acc = a
        self.backends = a.cdr_backends
        self.table = a.cdrs_table
        self.names = (a.cdr_start_id, a.cdr_end_id, a.cdr_duration_id)
        self.extras = a.cdr_extras
        self.on_failed = a.cdr_on_failed
        self.on_confirmed = a.cdr_start_on_confirmed
        self.expired_enable = a.cdr_expired_dlg_enable
        self.skip = a.cdr_skip
        self.timeout = rules.dialog.default_timeout
        self.dlg_flag = rules.dialog.dlg_flag
        self.unanswered_life = rules.tm.fr_inv_timer + RETAIN
        self.route: list[CompiledRule] = [compile_rule(r) for r in rules.route]

    @property
    def enabled(self) -> bool:
        return bool(self.backends)

    # --- events --------------------------------------------------------------------------

    def feed(self, ev: Event, recs: list[AccRecord]) -> list[AccRecord]:
        """The acc records of one event with this event's CDR (if any) put in Kamailio's place."""
        if isinstance(ev, RequestIn):
            self._request(ev.txn, ev.msg)
        elif isinstance(ev, ReplyOut):
            d = self.by_txn.get(ev.txn.key)
            if d is not None:
                if d.invite is ev.txn:
                    cdr = self._invite_reply(d, ev)
                    if cdr is not None:
                        return [cdr, *recs]
                elif ev.code >= 200:
                    cdr = self._bye_reply(d, ev)
                    if cdr is not None:
                        return [*recs, cdr]
        elif isinstance(ev, AckIn):
            self._ack(ev)
        return recs

    def seen(self, msg: SipMessage) -> list[AccRecord]:
        """Every message, before the tracker: fires the timers due (``advance``) and notes the
        proxy's first reaction to a dialog's start (its 100 Trying; its copy of the ACK)."""
        out = self.advance(msg.ts) if self._timers and self._timers[0][0] <= msg.ts else []
        if msg.code == 100 and msg.cseq_method == "INVITE" or self.on_confirmed and msg.method == "ACK":
            self._reaction(msg)
        return out

    def _reaction(self, msg: SipMessage) -> None:
        d = self.dialogs.get((msg.call_id or "", msg.from_tag or ""))
        if d is None or d.start_ref:
            return
        if msg.code == 100:  # the proxy's 100 to the caller answers the caller's INVITE (same top Via)
            if d.state == EARLY and d.ack is None and msg.branch == d.invite.request.branch and msg.ts >= d.start:
                d.start_ref = msg.ts
        elif d.ack is not None and msg is not d.ack and msg.cseq_num == d.ack.cseq_num \
                and msg.branch != d.ack.branch and 0 <= msg.ts - d.start < 0.5:
            d.start_ref = msg.ts  # the proxy relaying the ACK that confirmed the dialog

    def _start_time(self, d: Dialog) -> float:
        """When Kamailio set the start: the proxy's reaction if seen, else its first forward of
        the INVITE (not for an ACK start), else the arrival."""
        if d.start_ref:
            return d.start_ref
        if d.ack is None:
            for b in d.invite.branches:
                return b.request.ts if b.request.ts >= d.start else d.start
        return d.start

    def _end_time(self, d: Dialog) -> float:
        """The BYE's arrival, or the proxy's forward of it (Kamailio's clock is read between)."""
        if d.bye is not None and d.end == d.bye.request.ts:
            for b in d.bye.branches:
                if 0 <= b.request.ts - d.end < 0.5:
                    return b.request.ts
        return d.end

    def advance(self, now: float) -> list[AccRecord]:
        """Fire the dialog timers due by ``now`` (packet time, or a live source's Idle time)."""
        out: list[AccRecord] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, call_id, tag = heapq.heappop(timers)
            d = self.dialogs.get((call_id, tag))
            if d is None:
                continue
            if d.state == EARLY and when >= d.invite.created + self.unanswered_life:
                self._forget(d)  # never answered in sight: tm gave up long ago
            elif d.state in (CONFIRMED_NA, CONFIRMED) and d.expires <= when:
                self._forget(d)
                self.stats.expired += 1
                if d.state == CONFIRMED:  # cdr_on_expired: an acknowledged dialog gets its end now
                    d.end = when
                if self.expired_enable:
                    cdr = self._cdr(d, None, when)
                    if cdr is not None:
                        out.append(cdr)
        return out

    def finish(self) -> list[AccRecord]:
        """End of input: dialogs still going are counted; Kamailio would not have written them yet."""
        self.stats.open_at_end += len(self.dialogs)
        return []

    # --- the dialog's life ---------------------------------------------------------------

    def _walk(self, msg: SipMessage) -> tuple[bool, dict[str, str]]:
        """request_route as far as the dialog module is concerned: (managed?, set_dlg_var values)."""
        flags = 0
        managed = False
        sets: list[tuple[str, str]] = []
        for rule in self.route:
            if not rule.matches(msg, flags, 0):
                continue
            flags = (flags | rule.set_mask) & ~rule.reset_mask
            if rule.drop:
                return False, {}
            managed = managed or rule.dlg_manage
            sets.extend(rule.dlg_vars)
            if rule.stop:
                break
        if self.dlg_flag is not None and flags & (1 << self.dlg_flag):
            managed = True
        return managed, dict(sets) if sets else {}

    def _request(self, txn: Transaction, msg: SipMessage) -> None:
        call_id = msg.call_id or ""
        if txn.role != "server":
            return
        if not msg.to_tag:
            if txn.method != "INVITE" or not msg.from_tag:
                return
            managed, sets = self._walk(msg)
            if not managed:
                return
            old = self.dialogs.pop((call_id, msg.from_tag), None)
            if old is not None:
                self._forget(old)
            d = Dialog(call_id, msg.from_tag, txn, msg.ts)
            self._set_vars(d, sets, txn, msg)
            self.dialogs[(call_id, msg.from_tag)] = d
            self.by_txn[txn.key] = d
            heapq.heappush(self._timers, (txn.created + self.unanswered_life, call_id, msg.from_tag))
            if len(self.dialogs) > self.max_dialogs:
                self._forget(self.dialogs[next(iter(self.dialogs))])
                self.stats.evicted += 1
            return
        found = self._match(call_id, msg.from_tag, msg.to_tag)
        if found is None or found.state not in (CONFIRMED_NA, CONFIRMED):
            return
        _managed, sets = self._walk(msg)
        self._set_vars(found, sets, txn, msg)
        if txn.method == "BYE":  # DLGCB_TERMINATED: the end is the BYE's arrival
            found.end = msg.ts
            found.state = ENDING
            found.bye = txn
            self.by_txn[txn.key] = found
        else:  # an in-dialog request refreshes the dialog's lifetime
            self._refresh(found, msg.ts)

    def _ack(self, ev: AckIn) -> None:
        msg = ev.msg
        d = self._match(msg.call_id or "", msg.from_tag, msg.to_tag)
        if d is None or d.state not in (CONFIRMED_NA, CONFIRMED):
            return
        if d.state == CONFIRMED_NA:  # DLGCB_CONFIRMED
            d.state = CONFIRMED
            if self.on_confirmed:
                d.start, d.start_ref, d.ack = msg.ts, 0.0, msg
        self._refresh(d, msg.ts)

    def _invite_reply(self, d: Dialog, ev: ReplyOut) -> AccRecord | None:
        if ev.late or ev.code < 200 or d.state != EARLY:
            return None
        reply = ev.reply
        d.code = ev.code
        d.reason = reply.reason if reply is not None else ""
        if ev.code < 300:
            d.state = CONFIRMED_NA
            d.callee_tag = reply.to_tag if reply is not None else None
            del self.by_txn[ev.txn.key]
            self._refresh(d, ev.ts)
            return None
        self._forget(d)  # DLGCB_FAILED
        if not self.on_failed:
            return None
        if ev.local or reply is None:
            msg: SipMessage = d.invite.request  # FAKED: the request's values
        else:  # the reply as the proxy received it (its source is the callee)
            got = ev.branch.final if ev.branch is not None else None
            msg = got if got is not None else reply
            d.callee_tag = msg.to_tag
        self.stats.failed += 1
        return self._cdr(d, msg, ev.ts)

    def _bye_reply(self, d: Dialog, ev: ReplyOut) -> AccRecord | None:
        if d.bye is not ev.txn:
            return None
        self._forget(d)
        return self._cdr(d, ev.txn.request, ev.ts)

    def _refresh(self, d: Dialog, ts: float) -> None:
        d.expires = ts + self.timeout
        heapq.heappush(self._timers, (d.expires, d.call_id, d.caller_tag))

    def _match(self, call_id: str, from_tag: str | None, to_tag: str | None) -> Dialog | None:
        """The dialog of an in-dialog request, sent by the caller or by the callee."""
        d = self.dialogs.get((call_id, from_tag or ""))
        if d is not None and (d.callee_tag is None or d.callee_tag == to_tag):
            return d
        d = self.dialogs.get((call_id, to_tag or ""))
        if d is not None and (d.callee_tag is None or d.callee_tag == from_tag):
            return d
        return None

    def _forget(self, d: Dialog) -> None:
        key = (d.call_id, d.caller_tag)
        if self.dialogs.get(key) is d:
            del self.dialogs[key]
        for t in (d.invite, d.bye):
            if t is not None and self.by_txn.get(t.key) is d:
                del self.by_txn[t.key]
        if len(self._timers) > 4 * len(self.dialogs) + 4096:  # refreshed and forgotten entries: drop them
            live = self.dialogs
            self._timers = [t for t in self._timers if (t[1], t[2]) in live]
            heapq.heapify(self._timers)

    def _set_vars(self, d: Dialog, sets: dict[str, str], txn: Transaction, msg: SipMessage) -> None:
        if not sets:
            return
        ctx = self._ctx(msg, txn, d, msg.ts)
        for name, value in sets.items():
            d.vars[name] = pv.interpolate(str(value), ctx)

    # --- the record ----------------------------------------------------------------------

    def _ctx(self, msg: SipMessage, txn: Transaction | None, d: Dialog, ts: float) -> pv.PvContext:
        st = txn.acc if txn is not None else None
        avps = st.avps if st is not None else {}
        e = self.engine
        return pv.PvContext(msg, None, avps, ts, e.start, e.limits.max_hdr_scan, dlg_vars=d.vars)

    def _cdr(self, d: Dialog, msg: SipMessage | None, ts: float) -> AccRecord | None:
        """write_cdr(): the log line and/or row; ``msg`` None for an expired dialog ($dlg_var only)."""
        if not self.backends:  # CDRs switched off by a reload
            return None
        if self.skip and self.skip in d.vars:
            self.stats.skipped += 1
            return None
        start, end, duration = self.names
        t0 = msec(self._start_time(d))
        if d.end:
            t1 = msec(self._end_time(d))
            times = (time2string(t0), time2string(t1), time2string(t1 - t0))
        else:  # never ended (failed, or expired before its ACK): start = end, duration "0"
            times = (time2string(t0), time2string(t0), "0")
        pairs: list[tuple[str, str | None]] = [(start, times[0]), (end, times[1]), (duration, times[2])]
        if msg is None:
            pairs += [(n, d.vars.get(s.arg) if s.name == "dlg_var" else None) for n, s in self.extras]
        else:
            txn = d.bye if msg is not None and d.bye is not None and msg is d.bye.request else d.invite
            ctx = self._ctx(msg, txn, d, ts)
            pairs += pv.evaluate_extras(self.extras, ctx)
            if ctx.hdr_cut:
                self.engine.stats.hdr_scans_cut += ctx.hdr_cut
        self.stats.written += 1
        r = AccRecord(CDR, ts, "INVITE", d.caller_tag, d.callee_tag, d.call_id, str(d.code) if d.code else "",
                      d.reason, self.backends, self.table, {CDR: pairs}, [], d.invite.request.cseq_num,
                      in_dialog=True)  # a dialog's record: capture-gap marking looks back to the dialog's start
        self.engine.ids.assign(r)
        return r


def cdr_pairs(r: AccRecord) -> list[tuple[str, str | None]]:
    """start, end, duration and the cdr_extra values of a CDR record, in Kamailio's order."""
    return r.extras.get(CDR, [])


def cdr_line(r: AccRecord) -> str:
    """log_write_cdr()'s message: ``name=value`` pairs joined by "; " (null as empty), no prefix."""
    from sipsniff_acc.sysloglines import escape
    return escape("; ".join(f"{name}={value or ''}" for name, value in cdr_pairs(r)))
