"""The acc module's logic (acc-spec §1-2): tracker events + rules → ``AccRecord``s.

Mirrors Kamailio 5.6 acc_logic.c: flags are read when the request creates its transaction
(acc_onreq); ON_FAILURE reports missed calls and resets the missed flags that fired, then
failure_route runs; RESPONSE_OUT reports a missed call first if the missed flag is still
set (a local reply: no branches), then the answered record if should_acc_reply. Pure.

Bounded (issue 10): $hdr() looks through at most ``Limits.max_hdr_scan`` header lines, and
the header list a held message parsed for a rule or a record is dropped once the event is
done (for a 10,000-line message it is ~30x the message's bytes, and held transactions are
bounded by their bytes). Record ids are remembered for a window of packet time (records.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sipsniff_acc import pv
from sipsniff_acc.limits import Limits
from sipsniff_acc.records import ACKED, ANSWERED, MISSED, REQUEST, AccRecord, RecordIds, error_text, parse_comment
from sipsniff_acc.rules import CompiledRule, RulesFile, compile_rule
from sipsniff_acc.sip import SipMessage
from sipsniff_acc.tracker import (RETAIN, AckIn, BranchesFailed, Event, ReplyOut, RequestIn, TrackerStats, Transaction,
                                  tm_local_tag)

BACKENDS = ("log", "db", "radius", "diameter")


@dataclass(slots=True)
class TxnAcc:
    """What the proxy script decided for one transaction."""

    flags: int = 0
    avps: dict[str, list[str]] = field(default_factory=dict)
    registered: bool = False  #: acc callbacks installed at creation (an acc, missed or prepare flag was set)
    dropped: bool = False
    upstream: bool = False  #: detect_direction: the request goes callee -> caller
    rearmed: bool = False  #: a failure_route rule ran t_on_failure: the next failure round runs failure_route


def new_txn_acc(avps: dict[str, list[str]]) -> TxnAcc:
    """``TxnAcc(0, avps)`` field by field: compiled, the dataclass __init__ runs as interpreted
    Python (the state file's unpickler needs it kept; tests/unit/test_fast_constructors.py)."""
    t = TxnAcc.__new__(TxnAcc)
    t.flags = 0
    t.avps = avps
    t.registered = False
    t.dropped = False
    t.upstream = False
    t.rearmed = False
    return t


#: the AVPs of a transaction that set none, shared (an empty dict each was 64 bytes); _run
#: gives a transaction its own dict before the first AVP is set
_NO_AVPS: dict[str, list[str]] = {}


#: a record's backends in BACKENDS order, by the backends a rule or flag set named (at most a
#: few dozen lists: subsets and orders of BACKENDS); a generator per record was 3 % of the engine
_ORDERED: dict[tuple[str, ...], tuple[str, ...]] = {}


def _ordered(backends: list[str]) -> tuple[str, ...]:
    """``backends`` in BACKENDS order, one shared tuple per list."""
    key = tuple(backends)
    got = _ORDERED.get(key)
    if got is None:
        got = _ORDERED[key] = tuple(b for b in BACKENDS if b in backends)
    return got


def _route_ftag(msg: SipMessage) -> str | None:
    """The ftag parameter of the first Route (the one loose_route consumes), rr's append_fromtag."""
    route = msg.header_values("route")
    if not route:
        return None
    first = route[0]
    i = first.lower().find("ftag=")
    if i < 0:
        return None
    value = first[i + 5 :]
    for stop in (";", ">", ",", " "):
        value = value.split(stop, 1)[0]
    return value


def _realm(msg: SipMessage) -> str:
    """acc_diameter's Destination-Realm: the host of the From URI (of the To URI for REGISTER)."""
    which = "to" if (msg.method or msg.cseq_method).upper() == "REGISTER" else "from"
    return pv.uri_parts(pv.name_addr(msg.header(which))[1])[1]


def _unparse(msg: SipMessage | None) -> None:
    """Drop the parsed header list of a message a transaction holds (it is rebuilt on demand)."""
    if msg is not None and msg._headers is not None:
        msg._headers = None


def _code3(code: int) -> str:
    """``f"{code:03d}"``: str() for the usual 3-digit code (no format() call)."""
    return str(code) if code >= 100 else f"{code:03d}"


class AccEngine:
    def __init__(self, rules: RulesFile, limits: Limits | None = None, stats: TrackerStats | None = None) -> None:
        self.limits = limits = limits or Limits()
        self.stats = stats if stats is not None else TrackerStats()  #: hdr_scans_cut, record_ids_cut
        self._hdr_limit = limits.max_hdr_scan
        # Twins carry the same time; a record's time trails the newest record time by at most a
        # transaction's life (fr_inv_timer + 32 s: a failure's time is its last branch reply),
        # and --open-as-408 records at the end are dated up to fr_inv_timer after the last packet.
        tm = rules.tm
        window = max(limits.record_id_window, 2 * tm.fr_inv_timer + max(RETAIN, tm.wait_timer))
        self.ids = RecordIds(window, limits.max_record_ids, self.stats)
        self.start = 0.0
        self._configure(rules)

    def replace_rules(self, rules: RulesFile) -> None:
        """A reloaded rules.yaml (SIGHUP): transactions created from now on follow it; open ones
        keep the flags and AVPs their request got (Kamailio decides them in request_route, once).
        Record ids, $TS and the counters go on."""
        self._configure(rules)

    def _configure(self, rules: RulesFile) -> None:
        """Everything the engine takes from rules.yaml."""
        self.rules = rules
        self.acc = rules.acc
        self.profile = rules.profile_info
        self.relay_mode = rules.reply_relay_mode
        self._acc_flags = self.acc.flags(missed=False)
        self._missed_flags = self.acc.flags(missed=True)
        self._watch = 0
        self.route = [compile_rule(r) for r in rules.route]
        #: the route's outcome (flags, dropped, rearmed) by (method, in-dialog), when every rule
        #: only sets flags on a method/in-dialog condition (the usual rules.yaml): walked once
        #: per kind of request instead of once per request (None: rules that read more)
        self._route_memo: dict[tuple[str, bool], tuple[int, bool, bool]] | None = (
            {} if all(r.simple and not r.avps and not r.calls for r in self.route) else None)
        self.failure_route = [compile_rule(r) for r in rules.failure_route]
        self.early_media = self.acc.early_media
        self.failed_flag = self.acc.failed_transaction_flag
        self.failed_filtered = self.acc.failed_filtered
        self.report_cancels = self.acc.report_cancels
        self.detect_direction = self.acc.detect_direction
        self._extras = {b: self.acc.extras(b) for b in BACKENDS if self.acc.extras(b)}
        self._legs = self.acc.legs
        self._pv = bool(self._extras or self._legs)  #: records read pseudo-variables (extras, legs)
        for f in (*self._acc_flags.values(), *self._missed_flags.values()):
            self._watch |= 1 << f

    # --- events --------------------------------------------------------------------------

    def feed(self, event: Event) -> list[AccRecord]:
        out: list[AccRecord] = []
        if not self.start:
            self.start = event.msg.ts if isinstance(event, (RequestIn, AckIn)) else event.ts
        # (the event classes have no subclasses: a type() test per kind, cheaper than isinstance)
        if type(event) is RequestIn:
            self._request_in(event.txn, event.msg, out)
            _unparse(event.msg)
        elif type(event) is ReplyOut:
            self._reply_out(event, out)
            _unparse(event.txn.request)
            _unparse(event.reply)
        elif type(event) is BranchesFailed:
            self._failed(event, out)
            _unparse(event.txn.request)
            _unparse(event.reply)
        elif type(event) is AckIn:
            self._ack_in(event, out)  # the ACK itself is not held
        if out:
            ids = self.ids  # (a method call on it: native when compiled; a bound method is a Python call)
            for r in out:
                ids.assign(r)
        return out

    def _ctx(self, msg: SipMessage, new_uri: str | None, avps: dict[str, list[str]], ts: float) -> pv.PvContext:
        return pv.PvContext(msg, new_uri, avps, ts, self.start, self._hdr_limit)

    def _record_ctx(self, msg: SipMessage, new_uri: str | None, avps: dict[str, list[str]], ts: float
                    ) -> pv.PvContext | None:
        """What a record's extras and legs read; None when rules.yaml asks for none (a
        PvContext per record, never read, was ~0.8 % of a run)."""
        return pv.PvContext(msg, new_uri, avps, ts, self.start, self._hdr_limit) if self._pv else None

    def _run(self, rules: list[CompiledRule], msg: SipMessage, state: TxnAcc, code: int, ts: float,
             out: list[AccRecord], new_uri: str | None = None) -> None:
        """Walk route / failure_route: conditions see the flags as set so far."""
        for rule in rules:
            if not rule.matches(msg, state.flags, code):
                continue
            state.flags = (state.flags | rule.set_mask) & ~rule.reset_mask
            if rule.avps:
                if state.avps is _NO_AVPS:
                    state.avps = {}
                ctx = self._ctx(msg, new_uri, state.avps, ts)
                for name, value in rule.avps:
                    state.avps.setdefault(name, []).insert(0, pv.interpolate(str(value), ctx))
                if ctx.hdr_cut:
                    self.stats.hdr_scans_cut += ctx.hdr_cut
            for backends, comment, table in rule.calls:
                self._script_record(msg, state, list(backends), comment, table, ts, new_uri, out)
            if rule.t_on_failure:
                state.rearmed = True
            if rule.drop:
                state.dropped = True
            if rule.stop or rule.drop:
                break

    def _route(self, msg: SipMessage, state: TxnAcc, out: list[AccRecord]) -> None:
        """request_route for a request (``state`` as new): from the memo when the rules allow."""
        memo = self._route_memo
        if memo is None:
            self._run(self.route, msg, state, 0, msg.ts, out)
            return
        key = (msg.method or msg.cseq_method, bool(msg.to_tag))  # what simple conditions read
        got = memo.get(key)
        if got is None:
            self._run(self.route, msg, state, 0, msg.ts, out)
            if len(memo) < 256:  # (methods are tokens from the wire: bounded)
                memo[key] = (state.flags, state.dropped, state.rearmed)
            return
        state.flags, state.dropped, state.rearmed = got

    def _request_in(self, txn: Transaction, msg: SipMessage, out: list[AccRecord]) -> None:
        state = new_txn_acc(_NO_AVPS)
        txn.acc = state
        self._route(msg, state, out)
        if state.dropped:
            return
        if txn.method == "CANCEL" and not self.report_cancels:
            return  # skip_cancel(): CANCEL transactions are not accounted
        state.registered = bool(state.flags & self._watch)
        if self.detect_direction and msg.to_tag:
            ftag = _route_ftag(msg)
            state.upstream = bool(ftag) and ftag != msg.from_tag

    def _ack_in(self, ev: AckIn, out: list[AccRecord]) -> None:
        msg = ev.msg
        ack_state = TxnAcc()
        self._route(msg, ack_state, out)
        inv = ev.invite
        if not ev.first or inv is None or inv.acc is None or ack_state.dropped:
            return
        st: TxnAcc = inv.acc
        if not (self.acc.report_ack and st.registered and not st.dropped):
            return
        backends: list[str] = [b for b in ("log", "db") if b in self._acc_flags and st.flags & (1 << self._acc_flags[b])]
        backends += [b for b in ("radius", "diameter") if b in self._acc_flags and ack_state.flags & (1 << self._acc_flags[b])]
        if not backends:
            return
        code = inv.final.code if inv.final is not None else 200
        ctx = self._record_ctx(msg, None, st.avps, msg.ts)
        out.append(self._record(ACKED, msg, ctx, backends, self.acc.db_table_acc, msg.ts, self._method(msg),
                                msg.from_tag, msg.to_tag, str(code), error_text(code), local=False))

    def _failed(self, ev: BranchesFailed, out: list[AccRecord]) -> None:
        txn = ev.txn
        st: TxnAcc | None = txn.acc
        if st is None or st.dropped:
            return
        if st.registered:
            self._missed(txn, st, ev.reply, ev.code, ev.ts, ev.branch, out)
        if not (ev.failure_route or st.rearmed):  # a last round after a serial fork: t_on_failure was used up
            return
        st.rearmed = False  # each run disarms it (tm); a rule with t_on_failure arms it again
        new_uri = ev.branch.request.ruri if ev.branch is not None else None
        self._run(self.failure_route, txn.request, st, ev.code, ev.ts, out, new_uri)

    def _missed(self, txn: Transaction, st: TxnAcc, reply: SipMessage | None, code: int, ts: float,
                branch: Transaction | None, out: list[AccRecord]) -> None:
        backends = [b for b, f in self._missed_flags.items() if st.flags & (1 << f)]
        if not backends:
            return
        req = txn.request
        if self.profile.missed_uses_last_branch and txn.branches:
            branch = txn.branches[-1]
        if reply is not None:
            to_tag, reason, local = reply.to_tag, self._reason(reply), False
        else:  # FAKED: the request's To, else tm's local tag (env_set_totag, 5.5+), made up for a
            # branch that timed out in an earlier serial round (no 408 of it ever went out)
            local_tag = txn.final.to_tag if txn.final is not None else tm_local_tag(req)
            to_tag = req.to_tag or (None if self.profile.faked_to_tag_empty else local_tag)
            reason, local = self._local_reason(code, txn.final), True
        ctx = self._record_ctx(req, branch.request.ruri if branch is not None else None, st.avps, ts)
        from_tag = req.from_tag
        if st.upstream:
            from_tag, to_tag = req.to_tag, req.from_tag
        out.append(self._record(MISSED, req, ctx, backends, self.acc.db_table_missed_calls, ts, self._method(req),
                                from_tag, to_tag, str(code), reason, local))
        for b in backends:
            st.flags &= ~(1 << self._missed_flags[b])

    def _reply_out(self, ev: ReplyOut, out: list[AccRecord]) -> None:
        txn = ev.txn
        st: TxnAcc | None = txn.acc
        if st is None or not st.registered or st.dropped or txn.stateless:
            return
        req = txn.request
        code = ev.code
        if txn.method == "INVITE" and code >= 300 and not ev.late:
            # still-set missed flags: a local reply with no branches (acc_onreply → on_missed)
            self._missed(txn, st, None if ev.local else ev.reply, code, ev.ts, ev.branch, out)
        if not self._should_acc(ev, st):
            return
        backends = [b for b, f in self._acc_flags.items() if st.flags & (1 << f)]
        if not backends:
            return
        reply = ev.reply
        if ev.local or reply is None:
            to_tag = req.to_tag or (None if self.profile.faked_to_tag_empty or reply is None else reply.to_tag)
            reason = self._local_reason(code, reply)
        else:
            to_tag, reason = reply.to_tag, self._reason(reply)
        from_tag = req.from_tag
        if st.upstream:
            from_tag, to_tag = (reply.to_tag if reply is not None and not ev.local else req.to_tag), req.from_tag
        # (str() of a 3-digit code is its :03d; a format spec costs a format() method call compiled)
        code_s = str(code) if reply is None or ev.local else _code3(reply.code)
        new_uri = ev.branch.request.ruri if ev.branch is not None else (
            txn.branches[0].request.ruri if txn.branches else None)
        ctx = self._record_ctx(req, new_uri, st.avps, ev.ts)
        out.append(self._record(ANSWERED, req, ctx, backends, self.acc.db_table_acc, ev.ts, self._method(req),
                                from_tag, to_tag, code_s, reason, ev.local or reply is None))

    def _should_acc(self, ev: ReplyOut, st: TxnAcc) -> bool:
        """acc_logic.c should_acc_reply (+ tm's reply_relay_mode for late 2xx)."""
        code = ev.code
        if ev.late and self.relay_mode != 0:
            return False
        if code >= 300:
            f = self.failed_flag
            return f is not None and bool(st.flags & (1 << f)) and code not in self.failed_filtered
        if code >= 200:
            return True
        if not self.early_media:
            return False
        if self.profile.early_media_183_only:
            return code == 183
        reply = ev.reply
        return reply is not None and (reply.content_length or 0) > 0

    # --- fields --------------------------------------------------------------------------

    def _method(self, req: SipMessage) -> str:
        if self.profile.method_from_request_line:
            return req.method
        return req.cseq_method or req.method

    def _reason(self, reply: SipMessage) -> str:
        if self.acc.reason_from_hf:
            r = reply.header("reason")
            if r:
                return r
        return reply.reason

    def _local_reason(self, code: int, reply: SipMessage | None) -> str:
        if self.acc.local_reason == "wire" and reply is not None:
            return reply.reason
        return error_text(code)

    def _script_record(self, msg: SipMessage, st: TxnAcc, backends: list[str], comment: str, table: str | None,
                       ts: float, new_uri: str | None, out: list[AccRecord]) -> None:
        code, reason = parse_comment(comment)
        ctx = self._record_ctx(msg, new_uri, st.avps, ts)
        out.append(self._record(REQUEST, msg, ctx, backends, table or self.acc.db_table_acc, ts, self._method(msg),
                                msg.from_tag, msg.to_tag, code, reason, False))

    def _record(self, kind: str, msg: SipMessage, ctx: pv.PvContext | None, backends: list[str], table: str,
                ts: float, method: str, from_tag: str | None, to_tag: str | None, code: str, reason: str,
                local: bool) -> AccRecord:
        extras: dict[str, list[tuple[str, str | None]]] = {}
        legs: list[list[tuple[str, str | None]]] = []
        if ctx is not None:
            wanted = self._extras
            extras = {b: pv.evaluate_extras(wanted[b], ctx) for b in backends if b in wanted}
            legs = pv.evaluate_legs(self._legs, ctx) if self._legs else []
            if ctx.hdr_cut:
                self.stats.hdr_scans_cut += ctx.hdr_cut
                ctx.hdr_cut = 0
        return AccRecord(kind, ts, method, from_tag, to_tag, msg.call_id, code, reason,
                         _ordered(backends), table, extras, legs, msg.cseq_num, local,
                         bool(msg.to_tag), _realm(msg) if "diameter" in backends else "")
