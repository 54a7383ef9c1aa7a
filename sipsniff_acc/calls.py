"""One record per call (issue 12, VoIPmonitor's ``cdr`` table as the anchor). Pure.

``CallBuilder`` is fed ``SipMessage``s in capture order (``feed``), the packet clock
(``advance(now)``), capture gaps (``gap(ts)``) and the end of input (``finish``); each returns
the calls that ended. No sockets, files or clocks: the packet timestamp is the only clock.

A call is one INVITE dialog as the caller sees it, keyed by (Call-ID, From-tag):

- **Forks aggregated.** An INVITE whose second Via carries a branch of the call's INVITE is a
  *forward* (a proxy leg, or a fork): its replies go to ``legs``, never start a call.
- **Call-ID reuse split.** A new upstream INVITE (no To-tag, not a forward, not a retransmission)
  on an *ended* call starts a new call; after a 401/407 challenge it continues the same call
  (the authenticated retry). A new From-tag is a new key, so a new call.
- **The caller's leg decides.** The upstream INVITE transaction (its top-Via branches) gives
  the times (INVITE, first provisional, ringing 180/183, answer, final) and the final code;
  downstream legs give ``legs`` (and who sent an error: relayed from a leg = callee, else proxy).
- **Ends.** BYE (end = the BYE's time; emitted at its first final reply or ``BYE_WAIT`` later),
  CANCEL (with its 487), an error final, no final at all (``INVITE_WAIT``: timeout), or RFC 4028
  session-timer expiry when no BYE is seen: last refresh + Session-Expires, emitted after
  ``SESSION_GRACE`` more; an answered call with neither is ended at ``MAX_CALL`` (timeout).
- **finish():** calls still open are emitted as they stand: ``end`` is null and ``ended_how``
  ``"open"``; ``outcome`` is ``"answered"`` if answered, else ``"open"``.

Everything inferred (an end from a timer, an ender guessed without a downstream leg) is listed
in ``provenance.inferred``; what was on the wire in ``provenance.seen``. ``capture_gaps`` is
true when a ``gap(ts)`` fell between the INVITE and the end. Open calls are bounded by
``max_calls``; when full the oldest is emitted early (``ended_how: "evicted"``) and counted.
"""

from __future__ import annotations

import heapq
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from sipsniff_acc.sip import SipMessage
from sipsniff_acc.tracker import tm_tag_prefix

INVITE_WAIT: Final = 300.0  #: no final reply this long after the INVITE: a timeout (fr_inv_timer 120 s + margin)
BYE_WAIT: Final = 32.0  #: a BYE with no final reply: the call is emitted this long after it (64*T1)
LINGER: Final = 32.0  #: an ended call absorbs late retransmissions this long (no new call from them)
CHALLENGE_WAIT: Final = 32.0  #: a 401/407 with no authenticated retry: the call ends as rejected after this
SESSION_GRACE: Final = 32.0  #: RFC 4028: past last refresh + Session-Expires, this long before the call is ended
MAX_CALL: Final = 14400.0  #: an answered call with no BYE and no session timer: ended (VoIPmonitor's absolute_timeout)
MAX_CALLS: Final = 200_000  #: open calls held; the oldest goes out early when full (counted)
MAX_LIST: Final = 8  #: entries kept in a call's lists (legs, media, user agents, branches)

#: RTP/AVP static payload types (RFC 3551) that SDP may list without an rtpmap.
STATIC_PT: Final[dict[str, str]] = {"0": "PCMU/8000", "3": "GSM/8000", "4": "G723/8000", "8": "PCMA/8000",
                                    "9": "G722/8000", "18": "G729/8000"}
_Q850 = re.compile(r"Q\.850\s*;\s*cause\s*=\s*(\d+)(?:.*?text\s*=\s*\"([^\"]*)\")?", re.IGNORECASE)
_SE = re.compile(r"^\s*(\d+)")
_HDR = {name: re.compile(rb"\n(?:" + alts + rb")[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE) for name, alts in (
    ("from", rb"from|f"), ("to", rb"to|t"), ("user-agent", rb"user-agent"), ("server", rb"server"),
    ("reason", rb"reason"), ("session-expires", rb"session-expires|x"))}
_SDP_M = re.compile(rb"^m=audio (\d+)(?:/\d+)? \S+ ?([^\r\n]*)", re.MULTILINE)
_SDP_C = re.compile(rb"^c=IN IP[46] ([^\s/]+)", re.MULTILINE)
_SDP_MAP = re.compile(rb"^a=rtpmap:(\d+) ([^\r\n]+)", re.MULTILINE)
_NAME_ADDR = re.compile(r'^\s*(?:"((?:[^"\\]|\\.)*)"|([^<"]*?))\s*<([^>]*)>|^\s*([^;]+)')


def _addr(ip: str, port: object) -> str:
    """ip:port, an IPv6 address in brackets."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


_BRANCH_END: Final = frozenset((b";", b",", b" ", b"\t", b"\r", b"\n", b""))
_VIA_LINE = re.compile(rb"\n(?:via|v)[ \t]*:([^\r\n]*)", re.IGNORECASE)


def _carries_branch(msg: SipMessage, c: Call) -> bool:
    """Whether a lower Via of this INVITE holds a branch of the call's INVITE or of one of its legs
    (the top Via's own branch is new: checked before). A byte search, not the Via parse."""
    start, end, raw = msg._hdr_start, msg._hdr_end, msg.raw
    if start <= 0:
        lower = " ".join(msg.vias()[1:])
        return any(b and b in lower for b in (*c.branches, *c.leg_index))
    for b in (*c.branches, *c.leg_index):
        if not b:
            continue
        key = b.encode()
        at = raw.find(key, start, end)
        while at >= 0:  # the whole parameter value, not a prefix of a longer branch
            if raw[at + len(key) : at + len(key) + 1] in _BRANCH_END:
                return True
            at = raw.find(key, at + 1, end)
    return False


def _one_via(msg: SipMessage) -> bool:
    """The message has exactly one Via entry (its sender made it)."""
    start = msg._hdr_start
    if start <= 0:
        return len(msg.vias()) == 1
    lines = _VIA_LINE.findall(msg.raw, start - 1, msg._hdr_end)
    return len(lines) == 1 and b"," not in lines[0]


def hdr(msg: SipMessage, name: str) -> str | None:
    """First value of a header by one regex over the header block: the full lazy header parse
    (``msg.header``) cost ~15 us a message here, this ~1 us. Folded blocks (rare) take the parse."""
    start = msg._hdr_start
    if start <= 0 or msg._headers is not None:
        return msg.header(name)
    raw = msg.raw
    end = msg._hdr_end
    if b"\n " in raw[start:end] or b"\n\t" in raw[start:end]:
        return msg.header(name)
    m = _HDR[name].search(raw, start - 1, end)
    return m.group(1).strip().decode("utf-8", "replace") if m else None


def outcome_of(code: int, cancelled: bool) -> str:
    """The counting class of a final code (aligned with gen_workload.py's ground truth:
    answered, busy, notfound → rejected, cancel → cancelled, noanswer → no_answer)."""
    if 200 <= code < 300:
        return "answered"
    if cancelled or code == 487:
        return "cancelled"
    if code in (486, 600):
        return "busy"
    if code in (480, 408):
        return "no_answer"
    if 300 <= code < 400:
        return "redirected"
    if 500 <= code < 600:
        return "failed"
    return "rejected"


def party(value: str | None) -> tuple[str | None, str | None, str | None]:
    """(display name, URI, user part) of a From/To header value."""
    if not value:
        return None, None, None
    m = _NAME_ADDR.match(value)
    if m is None:
        return None, None, None
    name = m.group(1) if m.group(1) is not None else (m.group(2) or "").strip() or None
    uri = (m.group(3) if m.group(3) is not None else (m.group(4) or "")).strip()
    rest = uri.split(":", 1)[1] if ":" in uri else uri
    user = rest.split("@", 1)[0].split(";", 1)[0] if "@" in rest else None
    return name, uri or None, user


def sdp_media(body: bytes) -> tuple[str | None, list[str]]:
    """("ip:port" of the first audio m= line, its codecs by rtpmap or static type) of an SDP body.
    The connection address is the media-level c= (after the m= line), else the session-level one."""
    m = _SDP_M.search(body)
    if m is None:
        return None, []
    port = m.group(1).decode()
    nxt = body.find(b"\nm=", m.end())
    c = _SDP_C.search(body, m.end(), nxt if nxt >= 0 else len(body)) or _SDP_C.search(body, 0, m.start())
    conn = c.group(1).decode("ascii", "replace") if c else ""
    pts = m.group(2).decode("ascii", "replace").split()[:MAX_LIST]
    maps = {k.decode(): v.strip().decode("ascii", "replace") for k, v in _SDP_MAP.findall(body)} if b"a=rtpmap:" in body else {}
    return _addr(conn, port), [maps.get(p) or STATIC_PT.get(p) or p for p in pts]


@dataclass(slots=True)
class Call:
    """One call as the caller saw it; ``as_dict`` is its JSON line / table row."""

    call_id: str
    from_tag: str
    invite_time: float
    seq: int = 0  #: the n-th call on this Call-ID (Call-ID reuse)
    to_tag: str | None = None
    first_provisional: float | None = None
    ringing: float | None = None
    answer: float | None = None
    end: float | None = None
    final_code: int | None = None
    final_reason: str | None = None
    ended_by: str | None = None  #: caller, callee, proxy, timer
    ended_how: str | None = None  #: bye, cancel, error_reply, timeout, session_timer, open, evicted
    reason_header: str | None = None
    q850_cause: int | None = None
    q850_text: str | None = None
    caller_uri: str | None = None
    caller_number: str | None = None
    caller_name: str | None = None
    callee_uri: str | None = None
    callee_number: str | None = None
    callee_name: str | None = None
    request_uri: str | None = None
    caller_ua: str | None = None
    callee_ua: str | None = None
    caller_addr: str | None = None  #: signalling address of the caller (src of the upstream INVITE)
    callee_addr: str | None = None  #: where the upstream INVITE went
    transport: str | None = None
    legs: list[dict[str, Any]] = field(default_factory=list)  #: downstream INVITEs: to, transport, final code
    offer_media: str | None = None
    offer_codecs: list[str] = field(default_factory=list)
    answer_media: str | None = None
    answer_codecs: list[str] = field(default_factory=list)
    session_expires: int | None = None
    capture_gaps: bool = False
    seen: set[str] = field(default_factory=set)
    inferred: set[str] = field(default_factory=set)
    # working state (not written)
    branches: set[str] = field(default_factory=set)  #: top-Via branches of the upstream INVITEs
    leg_index: dict[str, dict[str, Any]] = field(default_factory=dict)
    challenged: bool = False
    cancelled: bool = False
    bye_time: float | None = None
    bye_by: str | None = None
    refreshed: float = 0.0
    last: float = 0.0
    done: float | None = None  #: when the call ended (it lingers LINGER more)
    deadline: float = 0.0

    @property
    def outcome(self) -> str:
        if self.answer is not None:
            return "answered"
        if self.final_code is not None:
            return outcome_of(self.final_code, self.cancelled)
        if self.cancelled:
            return "cancelled"
        if self.ended_how == "timeout":
            return "no_answer" if self.first_provisional is not None else "failed"
        return "open"

    def as_dict(self) -> dict[str, Any]:
        """The record: times in epoch seconds, durations in seconds (billable = answer → end)."""
        pdd = None
        if self.ringing is not None or self.first_provisional is not None:
            pdd = round((self.ringing if self.ringing is not None else self.first_provisional) - self.invite_time, 6)  # type: ignore[operator]
        end = self.end
        billable = round(end - self.answer, 6) if end is not None and self.answer is not None else 0.0
        return {
            "call_id": self.call_id, "seq": self.seq, "from_tag": self.from_tag, "to_tag": self.to_tag,
            "outcome": self.outcome, "invite_time": self.invite_time, "first_provisional": self.first_provisional,
            "ringing": self.ringing, "answer": self.answer, "end": end, "post_dial_delay": pdd,
            "duration": round(end - self.invite_time, 6) if end is not None else None, "billable": billable,
            "final_code": self.final_code, "final_reason": self.final_reason, "ended_by": self.ended_by,
            "ended_how": self.ended_how, "reason_header": self.reason_header, "q850_cause": self.q850_cause,
            "q850_text": self.q850_text, "caller_uri": self.caller_uri, "caller_number": self.caller_number,
            "caller_name": self.caller_name, "callee_uri": self.callee_uri, "callee_number": self.callee_number,
            "callee_name": self.callee_name, "request_uri": self.request_uri, "caller_ua": self.caller_ua,
            "callee_ua": self.callee_ua, "caller_addr": self.caller_addr, "callee_addr": self.callee_addr,
            "transport": self.transport, "legs": [{k: v for k, v in leg.items()} for leg in self.legs],
            "offer_media": self.offer_media, "offer_codecs": self.offer_codecs, "answer_media": self.answer_media,
            "answer_codecs": self.answer_codecs, "session_expires": self.session_expires,
            "capture_gaps": self.capture_gaps,
            "provenance": {"seen": sorted(self.seen), "inferred": sorted(self.inferred)},
        }


@dataclass
class CallStats:
    calls: int = 0  #: calls emitted
    evicted: int = 0  #: open calls emitted early because ``max_calls`` was reached
    orphans: int = 0  #: in-dialog messages or replies of no known call (call began before the capture)


class CallBuilder:
    """SIP messages in capture order → one ``Call`` per call. Pure; see the module docstring."""

    def __init__(self, max_calls: int = MAX_CALLS, invite_wait: float = INVITE_WAIT,
                 proxies: frozenset[str] = frozenset()) -> None:
        """``proxies``: the proxy's IP addresses (rules.yaml ``proxy.addresses``): an error final
        it sent and no leg relayed is the proxy's own."""
        self.proxies = proxies
        self.max_calls = max_calls
        self.invite_wait = invite_wait
        self.by_id: dict[str, list[Call]] = {}
        self.open = 0
        self.opened: dict[int, Call] = {}  #: open calls by id(), oldest first (eviction in O(1))
        self.heap: list[tuple[float, int, Call]] = []  #: (deadline, n, call); stale entries skipped
        self.n = 0
        self.seqs: dict[str, int] = {}
        self.gaps: deque[float] = deque(maxlen=64)
        self.stats = CallStats()
        self.now = float("-inf")

    # -- the clock ---------------------------------------------------------------------------
    def _arm(self, c: Call, when: float) -> None:
        c.deadline = when
        self.n += 1
        heapq.heappush(self.heap, (when, self.n, c))

    def advance(self, now: float) -> list[Call]:
        """Packet time is ``now``: calls whose timers ran out end (and ended ones stop lingering)."""
        self.now = now
        out: list[Call] = []
        heap = self.heap
        while heap and heap[0][0] <= now:
            when, _, c = heapq.heappop(heap)
            if c.deadline != when:
                continue
            if c.done is not None:  # lingered enough: forgotten
                self._drop(c)
                continue
            self._expire(c, when)
            out.append(c)
        return out

    def _expire(self, c: Call, when: float) -> None:
        """A timer ended the call (no final, BYE unanswered, session timer, challenge not retried)."""
        if c.bye_time is not None:
            self._end(c, c.bye_time, c.bye_by or "caller", "bye")
        elif c.challenged and c.final_code is not None:
            self._end(c, c.last, "proxy", "error_reply")  # 407 from a proxy; a 401 may be a UAS's
            c.inferred.add("ended_by")
        elif c.answer is not None:
            if c.session_expires:
                self._end(c, c.refreshed + c.session_expires, "timer", "session_timer")
            else:
                self._end(c, c.last, "timer", "timeout")
            c.inferred.add("end")
        else:
            self._end(c, when, "timer", "timeout")
            c.inferred.add("end")

    def _end(self, c: Call, end: float, by: str, how: str) -> None:
        c.end, c.ended_by, c.ended_how = end, by, how
        if any(c.invite_time < g <= end for g in self.gaps):
            c.capture_gaps = True
        c.done = end
        self.open -= 1
        self.opened.pop(id(c), None)
        self.stats.calls += 1
        self._arm(c, max(end, c.last, self.now) + LINGER)

    def _drop(self, c: Call) -> None:
        lst = self.by_id.get(c.call_id)
        if lst is not None:
            if c in lst:
                lst.remove(c)
            if not lst:
                del self.by_id[c.call_id]
                self.seqs.pop(c.call_id, None)

    def gap(self, ts: float) -> None:
        """Packets were dropped at ``ts``: calls spanning it are marked ``capture_gaps``."""
        self.gaps.append(ts)

    def finish(self) -> list[Call]:
        """End of input: open calls go out as they stand (``ended_how: "open"``)."""
        out = []
        for lst in self.by_id.values():
            for c in lst:
                if c.done is None:
                    c.ended_how = "open"
                    if any(c.invite_time < g for g in self.gaps):
                        c.capture_gaps = True
                    self.stats.calls += 1
                    out.append(c)
        self.by_id.clear()
        self.heap.clear()
        self.open = 0
        self.opened.clear()
        out.sort(key=lambda c: c.invite_time)
        return out

    # -- messages ----------------------------------------------------------------------------
    def feed(self, msg: SipMessage) -> list[Call]:
        """One message; the calls that ended with it (or with the clock it brought)."""
        out = self.advance(msg.ts) if self.heap and self.heap[0][0] <= msg.ts else []
        cid = msg.call_id
        if cid is None:
            return out
        if msg.is_request:
            m = msg.method
            if m == "INVITE":
                if msg.to_tag is None:
                    self._invite(msg, out)
                else:
                    self._reinvite(msg)
            elif m == "BYE":
                self._bye(msg)
            elif m == "CANCEL":
                c = self._find(cid, msg.from_tag, None)
                if c is not None and c.done is None and c.answer is None:
                    c.cancelled = True
                    c.seen.add("cancel")
                    self._reason(c, msg)
            elif m == "UPDATE":
                c = self._find(cid, msg.from_tag, msg.to_tag)
                if c is not None:
                    c.last = msg.ts
            return out
        cm = msg.cseq_method
        if cm == "INVITE":
            self._invite_reply(msg, out)
        elif cm == "BYE":
            c = self._find(cid, msg.from_tag, msg.to_tag)
            if c is not None and c.done is None and c.bye_time is not None and msg.code >= 200:
                c.last = msg.ts
                self._end(c, c.bye_time, c.bye_by or "caller", "bye")
                out.append(c)
        elif cm == "UPDATE" and 200 <= msg.code < 300:
            c = self._find(cid, msg.from_tag, msg.to_tag)
            if c is not None and c.answer is not None and c.done is None:
                self._refresh(c, msg)
        return out

    def _find(self, cid: str, ftag: str | None, ttag: str | None) -> Call | None:
        lst = self.by_id.get(cid)
        if not lst:
            return None
        for c in reversed(lst):
            if c.from_tag == (ftag or "") or (ttag is not None and c.from_tag == ttag):
                return c
        return None

    def _invite(self, msg: SipMessage, out: list[Call]) -> None:
        cid = msg.call_id
        assert cid is not None
        ftag = msg.from_tag or ""
        c = self._find(cid, ftag, None)
        branch = msg.branch or ""
        if c is not None:
            if branch in c.branches or branch in c.leg_index:
                return  # a retransmission
            if _carries_branch(msg, c):  # a forward of the caller's INVITE (or of a leg): a leg, a fork
                self._leg(c, msg, branch)
                return
            if c.done is None and (c.challenged or c.final_code is None):
                if len(c.branches) < MAX_LIST * 4:  # bounded: a flood of new INVITEs on one call
                    c.branches.add(branch)  # the authenticated retry (or a new transaction of the same call)
                c.challenged = False
                c.final_code = c.final_reason = None
                c.last = msg.ts
                self._offer(c, msg)
                self._arm(c, msg.ts + self.invite_wait)
                return
            if c.done is None:  # a new INVITE on a call that had its final: that call is over
                return
        # a new call
        if self.open >= self.max_calls:
            self._evict(out)
        seq = self.seqs.get(cid, 0)
        self.seqs[cid] = seq + 1
        c = Call(call_id=cid, from_tag=ftag, invite_time=msg.ts, seq=seq, last=msg.ts, refreshed=msg.ts)
        c.branches.add(branch)
        c.caller_name, c.caller_uri, c.caller_number = party(hdr(msg, "from"))
        c.callee_name, c.callee_uri, c.callee_number = party(hdr(msg, "to"))
        c.request_uri = msg.ruri
        c.caller_ua = hdr(msg, "user-agent")
        c.caller_addr = _addr(msg.src, msg.sport)
        c.callee_addr = _addr(msg.dst, msg.dport)
        c.transport = msg.transport
        c.seen.update(("invite", "caller", "callee"))
        if c.caller_ua:
            c.seen.add("caller_ua")
        self._offer(c, msg)
        self.by_id.setdefault(cid, []).append(c)
        self.open += 1
        self.opened[id(c)] = c
        self._arm(c, msg.ts + self.invite_wait)

    def _offer(self, c: Call, msg: SipMessage) -> None:
        if msg.content_length:
            media, codecs = sdp_media(msg.body)
            if media is not None:
                c.offer_media, c.offer_codecs = media, codecs
                c.seen.add("offer_sdp")

    def _leg(self, c: Call, msg: SipMessage, branch: str) -> None:
        if len(c.leg_index) >= MAX_LIST:
            return
        leg: dict[str, Any] = {"to": _addr(msg.dst, msg.dport), "from": _addr(msg.src, msg.sport),
                               "transport": msg.transport, "ruri": msg.ruri, "invite_time": msg.ts, "final_code": None}
        c.leg_index[branch] = leg
        c.legs.append(leg)
        c.seen.add("legs")

    def _evict(self, out: list[Call]) -> None:
        """The table is full: the oldest open call goes out now, as it stands (counted)."""
        oldest = next(iter(self.opened.values()), None)
        if oldest is not None:
            self.stats.evicted += 1
            self._end(oldest, oldest.last, "timer", "evicted")
            oldest.end = None
            oldest.inferred.add("end")
            out.append(oldest)

    def _invite_reply(self, msg: SipMessage, out: list[Call]) -> None:
        cid = msg.call_id
        assert cid is not None
        c = self._find(cid, msg.from_tag, msg.to_tag)  # the To-tag: a re-INVITE from the callee
        if c is None:
            self.stats.orphans += 1
            return
        code = msg.code
        branch = msg.branch or ""
        if msg.branch is None:  # no Via (SIPp's 487 scenario, relayed as it came): by addresses
            if _addr(msg.dst, msg.dport) == c.caller_addr:
                branch = next(iter(c.branches))
            else:
                branch = next((b for b, leg in c.leg_index.items() if leg["to"] == _addr(msg.src, msg.sport)), "")
        if branch not in c.branches:
            leg = c.leg_index.get(branch)
            if leg is not None and code >= 200 and leg["final_code"] is None:
                leg["final_code"] = code
                if code < 300 and c.callee_ua is None:
                    c.callee_ua = hdr(msg, "server") or hdr(msg, "user-agent")
            elif leg is None and c.answer is not None and 200 <= code < 300 and c.done is None:
                self._refresh(c, msg)  # a re-INVITE's 200 (its own branch): a session refresh
            return
        if c.done is not None:
            return
        ts = msg.ts
        c.last = ts
        if code < 200:
            if code > 100 and c.first_provisional is None:
                c.first_provisional = ts
                c.seen.add("provisional")
            if code in (180, 183) and c.ringing is None:
                c.ringing = ts
                c.seen.add("ringing")
            return
        if c.final_code is not None and not c.challenged:
            return  # a retransmitted final
        c.final_code, c.final_reason = code, msg.reason
        c.to_tag = msg.to_tag
        c.seen.add("final")
        if code < 300:
            if c.answer is None:
                c.answer = ts
                c.seen.add("answer")
                ua = hdr(msg, "server") or hdr(msg, "user-agent")
                if ua:
                    c.callee_ua = ua
                    c.seen.add("callee_ua")
                if msg.content_length:
                    media, codecs = sdp_media(msg.body)
                    if media is not None:
                        c.answer_media, c.answer_codecs = media, codecs
                        c.seen.add("answer_sdp")
                self._refresh(c, msg)
            return
        if code in (401, 407):  # a challenge: the authenticated retry continues the call
            c.challenged = True
            self._arm(c, ts + CHALLENGE_WAIT)
            return
        self._reason(c, msg)
        if c.cancelled:
            self._end(c, ts, "caller", "cancel")
        else:
            self._who_failed(c, msg)
            self._end(c, ts, c.ended_by or "callee", "error_reply")
        out.append(c)

    def _who_failed(self, c: Call, msg: SipMessage) -> None:
        """Who sent the error final: relayed from a leg (callee), or the proxy's own reply
        (no leg had it; or, no leg seen, a Kamailio local To-tag or a ``proxies`` address)."""
        code = msg.code
        if c.legs:
            c.ended_by = "callee" if any(leg["final_code"] == code for leg in c.legs) else "proxy"
            return
        tag = msg.to_tag or ""
        if (msg.src in self.proxies or tag.startswith(tm_tag_prefix(msg.src, msg.sport))
                or tag.startswith(tm_tag_prefix(msg.src, msg.sport, stateless=True))):
            c.ended_by = "proxy"
        else:
            c.ended_by = "callee"
            c.inferred.add("ended_by")

    def _refresh(self, c: Call, msg: SipMessage) -> None:
        """A 2xx to INVITE/UPDATE: RFC 4028 Session-Expires restarts the session timer."""
        c.refreshed = msg.ts
        c.last = msg.ts
        se = hdr(msg, "session-expires")
        if se:
            m = _SE.match(se)
            if m:
                c.session_expires = min(int(m.group(1)), 86400)
                c.seen.add("session_expires")
        if c.bye_time is None:
            self._arm(c, msg.ts + (c.session_expires + SESSION_GRACE if c.session_expires else MAX_CALL))

    def _reinvite(self, msg: SipMessage) -> None:
        c = self._find(msg.call_id or "", msg.from_tag, msg.to_tag)
        if c is not None:
            c.last = msg.ts

    def _bye(self, msg: SipMessage) -> None:
        c = self._find(msg.call_id or "", msg.from_tag, msg.to_tag)
        if c is None:
            self.stats.orphans += 1
            return
        if c.done is not None or c.bye_time is not None:
            return
        c.bye_time = msg.ts
        c.last = msg.ts
        addr = _addr(msg.src, msg.sport)
        own = _one_via(msg)  # one Via: the sender made this BYE (a forward has two or more)
        if addr == c.caller_addr:
            c.bye_by = "caller"
        elif msg.from_tag == c.from_tag:
            c.bye_by = "caller" if not own else "proxy"
        else:
            far = {leg["to"] for leg in c.legs} | {c.callee_addr}
            c.bye_by = "proxy" if own and c.legs and addr not in far else "callee"
        c.seen.add("bye")
        self._reason(c, msg)
        if c.answer is None:  # a BYE for an early dialog, or after a lost 200
            c.inferred.add("answer")
        self._arm(c, msg.ts + BYE_WAIT)

    def _reason(self, c: Call, msg: SipMessage) -> None:
        r = hdr(msg, "reason")
        if r and c.reason_header is None:
            c.reason_header = r
            m = _Q850.search(r)
            if m:
                c.q850_cause = int(m.group(1))
                c.q850_text = m.group(2)
            c.seen.add("reason")
