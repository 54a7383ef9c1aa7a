"""Transactions and dialogs as the proxy sees them (RFC 3261 §17, acc-spec §9), on the packet clock.

Fed ``SipMessage``s in capture order, returns events for the acc engine, h11-style:

* ``RequestIn``: a request created a transaction at the proxy (its server side), first copy only.
* ``AckIn``: an ACK for a 2xx reached the proxy (a new transaction in RFC 3261 terms).
* ``BranchesFailed``: every branch of an INVITE ended negatively (Kamailio's TMCB_ON_FAILURE);
  with serial forking once per failed round, when the failure_route's next branch shows up.
* ``ReplyOut``: the proxy sent a reply upstream (TMCB_RESPONSE_OUT): relayed provisionals,
  the final reply, and 2xx from other forks after completion (``late``).

Which transactions are the proxy's: a request to a configured proxy address is a server
transaction, one from it a branch. Without addresses, a request whose second Via is the
top Via of a request already seen is a proxy's forward (a branch), and its sender is
recorded as an inferred proxy; every other request is a server transaction. A reply the
proxy generated itself (no branch got it) is ``local``; with no branch in sight, the To-tag
decides: Kamailio's tm tags are MD5("SER-TM/tags"+ip+port)-crc, sl's MD5("KAMAILIO-stateless"...).

Bounded (issue 10): transactions held (count and bytes), dialogs, the ACK table and the
deadline heap never exceed ``Limits``. When full, the oldest completed transactions go first
(they only absorb retransmissions), then the oldest open ones; every eviction is counted in
``TrackerStats``. An open server transaction that is evicted is forgotten as if never seen:
it makes no record (its later replies count as replies without a request); it is never
accounted as a 408, because the call may well be answered after we gave up on it.
Held messages keep their header block only (the body is never read after parsing).

Pure: no I/O, no clock but message timestamps.
"""

from __future__ import annotations

import hashlib
import heapq
import re
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sipsniff_acc.limits import Limits
from sipsniff_acc.sip import SipMessage
from sipsniff_acc.sipmethods import method_key

MAGIC = "z9hG4bK"
_BRANCH = re.compile(r";\s*branch\s*=\s*([^;,\s]+)", re.IGNORECASE)
_LOCAL_TAG = re.compile(r"[0-9a-f]{32}-[0-9a-f]{1,8}\Z")  #: tm's local To-tag shape (core/tags.h, separator '-')
_SL_TAG = re.compile(r"[0-9a-f]{32}\.[0-9a-f]{1,8}\Z")  #: sl's (separator '.')
RETAIN = 32.0  #: seconds a completed transaction is kept to absorb retransmissions (RFC 3261 Timer J/H scale)
SWEEP_EVERY = 1.0
#: how much earlier than fr_inv_timer after a branch was sent tm's timer may fire: its timers run
#: on 1/16 s ticks counted from the tick before the send (measured: 18 ms early); two ticks
FR_EARLY = 0.125
#: --open-as-408: seconds after the proxy's fr timer before its 408 is accounted without a reply on
#: the wire. The proxy sends its own 408 as the timer fires; the grace lets that real reply (a few
#: ms later on the mirror) win, and keeps the record well inside the "out within 1 s" promise.
TIMER_GRACE = 0.5
#: What a held message costs besides its header block and (a request) its Call-ID, so that
#: max_transaction_bytes bounds the real bytes (measured with tracemalloc, CPython 3.11; see
#: tests/unit/test_bounded_state.py): a request is the message object and its dict (~310),
#: its decoded fields (~300), the transaction, its acc state, key, heap and index entries
#: (~700); a final reply is its object and fields, its heap entry, To-tag tuples (~700)
REQUEST_OVERHEAD = 1300
REPLY_OVERHEAD = 700


Tags = tuple[str, ...] | frozenset[str]
#: A transaction's key: (branch, or the RFC 2543 Via id; the CSeq method upper-cased; Call-ID;
#: CSeq number), a plain tuple (the state file holds it as one). Typed as a tuple of any length
#: for mypyc: a fixed-length tuple type is kept unboxed (in a Transaction, a deadline entry, a
#: variable) and boxed again at each use as a dict key: a new tuple to allocate, hash and
#: compare item by item, ~8 times a transaction. Boxed, the one tuple object is looked up by
#: identity everywhere.
Key = tuple[Any, ...]


def _add_tag(tags: Tags, tag: str) -> Tags:
    """tags plus tag: a tuple while short, a frozenset past 8 (forks flooding new To-tags
    must not make each addition and lookup linear)."""
    if len(tags) < 8 and isinstance(tags, tuple):
        return (*tags, tag)
    return frozenset(tags) | {tag}


@dataclass(eq=False, slots=True)
class Transaction:
    key: Key  #: (branch, METHOD, Call-ID, CSeq number)
    request: SipMessage
    role: str  #: "server" (the proxy's, accounted), "branch" (the proxy's forward), "other"
    parent: Transaction | None = None  #: a branch's server transaction
    #: its branches; the shared empty tuple until the first (an empty list each was 56 bytes)
    branches: list[Transaction] | tuple[()] = ()
    final: SipMessage | None = None  #: the first final reply (sent upstream for a server transaction)
    final_ts: float = 0.0
    final_local: bool = False
    #: To-tags of the 2xx sent upstream; tuples (frozensets past a few tags), replaced on
    #: change: a one-tag frozenset is 216 bytes, a tuple 48, and there are one or two per call
    to_tags_2xx: Tags = ()
    acked: Tags = ()  #: To-tags whose first ACK has been seen
    cancelled: bool = False
    stateless: bool = False  #: the final came from sl (no transaction at the proxy: never accounted)
    retransmissions: int = 0
    acc: Any = None  #: the acc engine's per-transaction state (flags, AVPs)
    size: int = 0  #: bytes of SIP messages this transaction holds (request + final reply)
    timer_408: bool = False  #: --open-as-408 accounted the proxy's timer 408 (no final reply came in time)
    #: serial forking: index in ``branches`` of the current failure round's first branch (tm's
    #: first_branch); the branches before it failed and a failure_route relayed again. Once a
    #: round is accounted its branches leave the list but the transaction's very first (the
    #: start of the call, its R-URI), so in every later round this is 1 and the list stays
    #: within ``Limits.max_branches`` however many rounds an endless failure_route makes
    first_branch: int = 0

    @property
    def method(self) -> str:
        method: str = self.key[1]
        return method

    @property
    def created(self) -> float:
        return self.request.ts


#: The events below are dataclasses with their ``__init__`` written out (init=False): compiled by
#: mypyc it stores the fields directly, where the dataclass's generated one runs as interpreted
#: Python through the attribute descriptors. Not the state file's classes (Transaction, Dialog):
#: a compiled class with its own ``__init__`` cannot be built by the unpickler's ``__new__``.
@dataclass(slots=True, init=False)
class RequestIn:
    txn: Transaction
    msg: SipMessage

    def __init__(self, txn: Transaction, msg: SipMessage) -> None:
        self.txn = txn
        self.msg = msg


@dataclass(slots=True, init=False)
class AckIn:
    msg: SipMessage
    invite: Transaction | None  #: the INVITE transaction it acknowledges (None: not seen)
    first: bool  #: the first ACK for this To-tag inside the INVITE's wait window (report_ack)

    def __init__(self, msg: SipMessage, invite: Transaction | None, first: bool) -> None:
        self.msg = msg
        self.invite = invite
        self.first = first


@dataclass(slots=True, init=False)
class BranchesFailed:
    txn: Transaction
    reply: SipMessage | None  #: the picked branch's reply; None: FAKED (timer or local)
    code: int
    ts: float
    branch: Transaction | None  #: the picked branch
    #: tm runs the failure_route for this round: the first round, and every round a new branch
    #: followed (the route relayed again); not a later last round, since each run disarms
    #: t_on_failure and a script re-arming it is not seen on the wire
    failure_route: bool = True

    def __init__(self, txn: Transaction, reply: SipMessage | None, code: int, ts: float, branch: Transaction | None,
                 failure_route: bool = True) -> None:
        self.txn = txn
        self.reply = reply
        self.code = code
        self.ts = ts
        self.branch = branch
        self.failure_route = failure_route


@dataclass(slots=True, init=False)
class ReplyOut:
    txn: Transaction
    reply: SipMessage | None  #: None only for a 408 synthesised at the end of the input
    code: int
    ts: float
    local: bool
    late: bool = False  #: a 2xx with a new To-tag after the transaction had completed
    branch: Transaction | None = None  #: the branch whose reply this relays

    def __init__(self, txn: Transaction, reply: SipMessage | None, code: int, ts: float, local: bool,
                 late: bool = False, branch: Transaction | None = None) -> None:
        self.txn = txn
        self.reply = reply
        self.code = code
        self.ts = ts
        self.local = local
        self.late = late
        self.branch = branch


Event = RequestIn | AckIn | BranchesFailed | ReplyOut


@dataclass(slots=True)
class Dialog:
    """One call leg pair at the proxy, keyed by Call-ID and the caller's From-tag."""

    call_id: str
    caller_tag: str
    state: str = "init"  #: init -> early -> confirmed -> terminated; or failed (negative final)
    created: float = 0.0
    ended: float = 0.0  #: packet time it became terminated or failed (0.0: not yet)


def _sorted(counts: Counter[str]) -> dict[str, int]:
    return dict(sorted(counts.items()))


@dataclass
class TrackerStats:
    transactions: Counter[str] = field(default_factory=Counter)  #: created, by role
    retransmissions: int = 0
    replies_without_request: int = 0
    acks_without_invite: int = 0
    open_at_end: Counter[str] = field(default_factory=Counter)  #: server transactions with no final reply, by method
    timed_out: Counter[str] = field(default_factory=Counter)
    #: --open-as-408: server transactions accounted as the timer's 408 during the run, by method
    timer_408: Counter[str] = field(default_factory=Counter)
    replies_after_timer_408: int = 0  #: final replies that came after their transaction's timer 408 (absorbed)
    stateless_replies: int = 0
    dialogs: Counter[str] = field(default_factory=Counter)  #: by final state
    inferred_proxies: set[str] = field(default_factory=set)
    # bounds reached (Limits): what was let go to stay inside them
    evicted_transactions: int = 0  #: transactions forgotten early because the table was full (count or bytes)
    evicted_open: Counter[str] = field(default_factory=Counter)  #: of those, server transactions still without a final reply, by method: no record
    evicted_dialogs: int = 0  #: dialogs forgotten early (max_dialogs)
    evicted_acks: int = 0  #: ACKs forgotten before 32 s (max_transactions): a retransmitted one may count again
    hdr_scans_cut: int = 0  #: $hdr() lookups that stopped at max_hdr_scan header lines
    record_ids_cut: int = 0  #: times the record-id table was emptied early (max_record_ids)
    #: branches not held by their server transaction: one failure round past max_branches
    #: (tm itself never sends so many); tracked as transactions, left out of t_pick_branch
    branches_cut: int = 0

    def as_dict(self) -> dict[str, object]:
        # counts by name sorted: a -j N run merges each worker's in another order than -j 0's counting
        return {
            "transactions": _sorted(self.transactions), "retransmissions": self.retransmissions,
            "replies_without_request": self.replies_without_request, "acks_without_invite": self.acks_without_invite,
            "open_at_end": _sorted(self.open_at_end), "timed_out": _sorted(self.timed_out),
            "timer_408": _sorted(self.timer_408), "replies_after_timer_408": self.replies_after_timer_408,
            "stateless_replies": self.stateless_replies, "dialogs": _sorted(self.dialogs),
            "inferred_proxies": sorted(self.inferred_proxies),
            "evicted_transactions": self.evicted_transactions, "evicted_open": _sorted(self.evicted_open),
            "evicted_dialogs": self.evicted_dialogs, "evicted_acks": self.evicted_acks,
            "hdr_scans_cut": self.hdr_scans_cut, "record_ids_cut": self.record_ids_cut,
            "branches_cut": self.branches_cut,
        }

    def merge(self, other: TrackerStats) -> None:
        """Add another shard's counts (``-j N``: one tracker per worker)."""
        self.transactions.update(other.transactions)
        self.retransmissions += other.retransmissions
        self.replies_without_request += other.replies_without_request
        self.acks_without_invite += other.acks_without_invite
        self.open_at_end.update(other.open_at_end)
        self.timed_out.update(other.timed_out)
        self.timer_408.update(other.timer_408)
        self.replies_after_timer_408 += other.replies_after_timer_408
        self.stateless_replies += other.stateless_replies
        self.dialogs.update(other.dialogs)
        self.inferred_proxies |= other.inferred_proxies
        self.evicted_transactions += other.evicted_transactions
        self.evicted_open.update(other.evicted_open)
        self.evicted_dialogs += other.evicted_dialogs
        self.evicted_acks += other.evicted_acks
        self.hdr_scans_cut += other.hdr_scans_cut
        self.record_ids_cut += other.record_ids_cut
        self.branches_cut += other.branches_cut

    def evictions(self) -> str:
        """One summary line of what the bounds let go ('' when nothing was): for the CLI."""
        parts = []
        if self.evicted_transactions:
            lost = ", ".join(f"{n} {m}" for m, n in sorted(self.evicted_open.items()))
            parts.append(f"{self.evicted_transactions} transactions"
                         + (f" (open, not accounted: {lost})" if lost else ""))
        if self.evicted_dialogs:
            parts.append(f"{self.evicted_dialogs} dialogs")
        if self.evicted_acks:
            parts.append(f"{self.evicted_acks} ACKs")
        if self.hdr_scans_cut:
            parts.append(f"{self.hdr_scans_cut} $hdr() lookups cut at max_hdr_scan")
        if self.record_ids_cut:
            parts.append(f"record-id table emptied early {self.record_ids_cut} times")
        if self.branches_cut:
            parts.append(f"{self.branches_cut} branches past max_branches")
        return ("limits reached (rules.yaml limits:): " + "; ".join(parts)) if parts else ""


_PREFIXES: dict[tuple[str, int, bool], str] = {}


def tm_tag_prefix(ip: str, port: int, stateless: bool = False) -> str:
    """Kamailio's local To-tag prefix (core/tags.h init_tags) for a listen address. Remembered
    for up to 4096 addresses: the tracker asks for every final reply (an MD5 each was 1.5 % of
    the tracker and engine); past that, computed each time (a spoofed-address flood)."""
    got = _PREFIXES.get((ip, port, stateless))
    if got is None:
        sig = "KAMAILIO-stateless" if stateless else "SER-TM/tags"
        got = hashlib.md5(f"{sig}{ip}{port}".encode()).hexdigest()  # noqa: S324 - Kamailio's tag format, not security
        if len(_PREFIXES) < 4096:
            _PREFIXES[(ip, port, stateless)] = got
    return got


def _ccitt_table() -> tuple[int, ...]:
    """CRC-CCITT, bit-reflected (polynomial 0x8408), one entry per byte value."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CCITT = _ccitt_table()
_HEX = "0123456789abcdef"


def _ccitt_hex(*parts: str) -> str:
    """The 4 hex digits tm writes for a CRC-CCITT over ``parts`` (core crc.c): register
    0xFFFF, complemented at the end, nibbles written least significant first."""
    crc = 0xFFFF
    for part in parts:
        for byte in part.encode("utf-8", "surrogateescape"):
            crc = _CCITT[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFF
    return "".join(_HEX[(crc >> shift) & 0xF] for shift in (0, 4, 8, 12))


_VIA_SENT_BY = re.compile(r"^\s*[^/\s]+\s*/\s*[^/\s]+\s*/\s*\S+\s+(\[[^\]]*\]|[^\s:;,]+)(?:\s*:\s*(\d+))?")


def tm_tag_suffix(request: SipMessage) -> str:
    """The per-request half of tm's local To-tag (core/tags.h calc_crc_suffix): a CRC over the
    top Via's host, port (as written, '' if none) and branch, then one over port, host and
    Call-ID. A timed-out branch's missed record carries this tag though no 408 went out."""
    vias = request.vias()
    if not vias:
        return ""
    m = _VIA_SENT_BY.match(vias[0])
    host, port = (m.group(1), m.group(2) or "") if m else ("", "")
    b = _BRANCH.search(vias[0])
    return _ccitt_hex(host, port, b.group(1) if b else "") + _ccitt_hex(port, host, request.call_id or "")


def tm_local_tag(request: SipMessage) -> str:
    """The To-tag tm gives its local replies to ``request`` (received at request.dst:dport)."""
    return f"{tm_tag_prefix(request.dst, request.dport)}-{tm_tag_suffix(request)}"


def _prio(code: int) -> int:
    """t_pick_branch's preference (tm/t_reply.c get_prio): lower wins; 6xx first, then 3xx, 4xx, 5xx."""
    cls, xx = divmod(code, 100)
    base = {0: 32000, 1: 11000, 2: 0, 3: 3000, 4: 4000, 5: 5000, 6: 1000}.get(cls, 32000)
    if cls == 4:
        xx = xx if xx in (1, 7, 15, 20, 84) else 100 + xx
    return base + xx


_UPPER: dict[str, str] = {}


def _upper(method: str) -> str:
    """The method upper-cased, one shared string per spelling (each key holds one per transaction)."""
    up = _UPPER.get(method)
    if up is None:
        up = method.upper()
        if len(_UPPER) < 256:
            _UPPER[method] = up
    return up


#: One shared copy of a short, often repeated string (addresses, methods, reasons) for the
#: messages transactions hold (_hold): each held message had its own ~55-byte copies. Bounded:
#: past 4096 distinct strings new ones are kept as they are.
_SHARED: Final[dict[str, str]] = {}


def _shared(value: str) -> str:
    """The shared copy of ``value`` (itself if new and kept, or past the bound)."""
    got = _SHARED.get(value)
    if got is None:
        if len(_SHARED) < 4096 and len(value) <= 64:
            _SHARED[value] = value
        return value
    return got


#: the usual Via's branch without the regex (a search, group and startswith: ~1.7k instructions),
#: or None where the regex must look; as sip.py's C scans, when built
_magic_branch: Callable[[str], str | None] | None = None
try:
    from sipsniff_acc import _speedups

    _magic_branch = _speedups.magic_branch
except ImportError:  # not built: the regex alone
    pass


def _via_id(via: str) -> str:
    """The transaction id a Via gives: its branch if RFC 3261, else the whole Via (RFC 2543)."""
    if _magic_branch is not None:
        branch = _magic_branch(via)
        if branch is not None:
            return branch
    m = _BRANCH.search(via)
    if m and m.group(1).startswith(MAGIC):
        return m.group(1)
    return via.split(";branch", 1)[0].strip().lower() + "|" + (m.group(1) if m else "")


# Transaction and Dialog are built field by field on the hot path: compiled by mypyc, their
# dataclass __init__ runs as interpreted Python through the attribute descriptors (~1.5 us a
# Transaction). They keep that __init__ (the state file's unpickler builds them by __new__, which
# a compiled class with its own __init__ refuses). tests/unit/test_fast_constructors.py holds
# these to the constructors.


def new_transaction(key: Key, request: SipMessage, role: str, parent: Transaction | None, size: int) -> Transaction:
    """``Transaction(key, request, role, parent, size=size)``."""
    t = Transaction.__new__(Transaction)
    t.key = key
    t.request = request
    t.role = role
    t.parent = parent
    t.branches = ()
    t.final = None
    t.final_ts = 0.0
    t.final_local = False
    t.to_tags_2xx = ()
    t.acked = ()
    t.cancelled = False
    t.stateless = False
    t.retransmissions = 0
    t.acc = None
    t.size = size
    t.timer_408 = False
    t.first_branch = 0
    return t


def new_dialog(call_id: str, caller_tag: str, created: float) -> Dialog:
    """``Dialog(call_id, caller_tag, created=created)``."""
    d = Dialog.__new__(Dialog)
    d.call_id = call_id
    d.caller_tag = caller_tag
    d.state = "init"
    d.created = created
    d.ended = 0.0
    return d
#: a deadline: (time, transaction key); boxed for mypyc like Key (a fixed type re-boxed each
#: entry, its float too, as it went from a run to the due list)
Entry = tuple[Any, ...]
#: runs of deadlines a tracker keeps (one per timer length: fr_timer, fr_inv_timer, wait_timer;
#: a rules reload may add some); past it, deadlines of a new length go to the heap
MAX_RUNS = 8


def _push(runs: dict[float, deque[Entry]], heap: list[Entry], at: float, key: Key, delay: float) -> None:
    """Add the deadline ``at`` (message time + ``delay``) for ``key``. Deadlines of one delay
    come in packet-time order, so each delay has a FIFO run (append/popleft: no comparisons;
    heappush/heappop of ~2 entries per transaction cost 13 % of the tracker and engine on the
    10k-call workload); an entry older than its run's last (packet time went back) goes to
    the heap, as does one of a delay past MAX_RUNS."""
    run = runs.get(delay)
    if run is None:
        if len(runs) >= MAX_RUNS:
            heapq.heappush(heap, (at, key))
            return
        run = runs[delay] = deque()
    if run and run[-1][0] > at:
        heapq.heappush(heap, (at, key))
    else:
        run.append((at, key))


def _pop_due(runs: dict[float, deque[Entry]], heap: list[Entry], now: float) -> list[Entry]:
    """The deadlines at or before ``now``, taken out, in the order one heap of them all would
    pop them: by time, then key (the records of timers come out in that order)."""
    due: list[Entry] = []
    for run in runs.values():
        if run and run[0][0] <= now:
            take = run.popleft
            while run and run[0][0] <= now:
                due.append(take())
    while heap and heap[0][0] <= now:
        due.append(heapq.heappop(heap))
    if len(due) > 1:
        due.sort()
    return due


class TransactionTracker:
    def __init__(self, proxies: list[tuple[str, int | None]] | None = None, wait_timer: float = 5.0,
                 fr_timer: float = 30.0, fr_inv_timer: float = 120.0, limits: Limits | None = None,
                 open_as_408: bool = False, ticked: bool = False) -> None:
        """``open_as_408``: a server transaction still without a final reply TIMER_GRACE after
        its fr timer is accounted as the proxy's 408, during the run (``advance``/``feed``).
        ``ticked``: the owner calls ``advance`` at the Ticks of packet time (the runs), so the
        sweep happens there only: a -j N worker feeds only its shard's messages, and a sweep at
        their times made its records differ from -j 0's when packet time went back. Without
        it (tests, tools that only feed), ``feed`` sweeps at the messages' times."""
        self.proxies = proxies or []
        self.ticked = ticked
        self.open_as_408 = open_as_408
        self.wait_timer = wait_timer
        self.fr_timer = fr_timer
        self.fr_inv_timer = fr_inv_timer
        self.limits = limits = limits or Limits()
        self._max_txns = limits.max_transactions
        self._max_bytes = limits.max_transaction_bytes
        self._max_branches = limits.max_branches
        self.txns: dict[Key, Transaction] = {}
        #: the same transactions in eviction order (OrderedDict: O(1) pop of the oldest; a plain
        #: dict's next(iter()) rescans the deleted slots at its front, quadratic under churn)
        self._open: OrderedDict[Key, Transaction] = OrderedDict()  #: no final reply yet, by creation
        self._done: OrderedDict[Key, Transaction] = OrderedDict()  #: final reply seen, by its time
        self.held_bytes = 0  #: bytes of SIP messages the transactions hold
        self.invites: dict[tuple[str, int, str], Transaction] = {}  #: (call-id, cseq, from-tag) -> server INVITE
        #: e2e ACKs seen (retransmission / forward detection), by the hash of their key: the key
        #: tuple held the ACK's own Call-ID (~350 bytes with a 200-byte one) for 32 s; a false
        #: match needs a 64-bit hash collision (~n / 2**64 per ACK)
        self.acks: OrderedDict[int, float] = OrderedDict()
        self.dialogs: OrderedDict[tuple[str, str], Dialog] = OrderedDict()
        #: for replies without a Via: the transaction, or a list when several share the key
        self.by_cseq: dict[tuple[str, int, str], Transaction | list[Transaction]] = {}
        #: when the sweep looks at a transaction: (time, key) in FIFO runs by delay (_push), and
        #: a heap of the rest (a loaded state's, state.py); ties compare the keys (str/int tuples)
        self._deadline_runs: dict[float, deque[Entry]] = {}
        self._deadlines: list[Entry] = []
        self._deadline_count = 0  #: entries pushed and not popped (a loaded heap's left out: the next compaction counts)
        self._heap_cap = 4096
        #: --open-as-408: (fr timer + TIMER_GRACE, key) of open server transactions, read by advance()
        self._timer_runs: dict[float, deque[Entry]] = {}
        self._timers: list[Entry] = []
        self._timers_cap = 4096
        self._dialog_limit = 4096
        self.stats = TrackerStats()
        self._next_sweep = 0.0

    # --- addresses -----------------------------------------------------------------------

    def _is_proxy(self, ip: str, port: int) -> bool:
        return any(ip == p and (pp is None or pp == port) for p, pp in self.proxies)

    # --- feeding -------------------------------------------------------------------------

    def feed(self, msg: SipMessage) -> list[Event]:
        out: list[Event] = []
        if msg.ts >= self._next_sweep and not self.ticked:  # (ticked: the bounds still hold, _evict below)
            self._sweep(msg.ts, out)
            self._next_sweep = msg.ts + SWEEP_EVERY
        if msg.call_id is None or msg.cseq_num is None:
            return out
        if msg.is_request:
            self._request(msg, out)
        else:
            self._reply(msg, out)
        if len(self.txns) > self._max_txns or self.held_bytes > self._max_bytes:
            self._evict()
        return out

    def _key(self, msg: SipMessage, via: str, method: str) -> Key:
        """The transaction key a given Via of this message names."""
        return (_via_id(via), method, msg.call_id or "", msg.cseq_num or 0)

    def _top_key(self, msg: SipMessage, method: str) -> Key:
        if msg.branch and msg.branch.startswith(MAGIC):
            return (msg.branch, method, msg.call_id or "", msg.cseq_num or 0)
        vias = msg.vias()
        return self._key(msg, vias[0] if vias else "", method)

    def _request(self, msg: SipMessage, out: list[Event]) -> None:
        method = _upper(msg.cseq_method or msg.method)
        if msg.method.upper() == "ACK":
            self._ack(msg, out)
            return
        key = self._top_key(msg, method)
        txn = self.txns.get(key)
        if txn is not None:
            txn.retransmissions += 1
            self.stats.retransmissions += 1
            return
        role, parent = self._role(msg, method)
        txn = new_transaction(key, msg, role, parent, self._hold(msg))
        self.txns[key] = txn
        self._open[key] = txn
        ckey = (key[2], key[3], method)
        same = self.by_cseq.get(ckey)
        if same is None:
            self.by_cseq[ckey] = txn
        elif isinstance(same, list):
            same.append(txn)
        else:
            self.by_cseq[ckey] = [same, txn]
        timeout = self._timeout(txn)
        self._deadline(msg.ts + timeout + RETAIN, key, timeout)
        if self.open_as_408 and role == "server" and method not in ("ACK", "CANCEL"):
            self._timer(msg.ts + timeout + TIMER_GRACE, key, timeout)
        self.stats.transactions[role] += 1
        if parent is not None:
            new_round = (role == "branch" and method == "INVITE" and parent.role == "server" and bool(parent.branches)
                         and self._next_round(parent, msg, out))
            if not isinstance(parent.branches, list):
                parent.branches = [txn]
            elif len(parent.branches) < self._max_branches:
                parent.branches.append(txn)
            else:  # a hostile capture's (tm refuses past max_branches): tracked, not held
                self.stats.branches_cut += 1
            if new_round:  # its own fr timer, from its first branch (pushed once it is in the list)
                timeout = self._timeout(parent)
                self._deadline(msg.ts + timeout + RETAIN, parent.key, timeout)
                if self.open_as_408:
                    self._timer(msg.ts + timeout + TIMER_GRACE, parent.key, timeout)
        if method == "CANCEL":
            invite = self.txns.get((key[0], "INVITE", key[2], key[3]))
            if invite is not None:
                invite.cancelled = True
                if invite.role == "branch" and role == "server":  # a proxy's own CANCEL of its branch
                    txn.role = role = "branch"
        if role != "server":
            return
        if method == "INVITE":
            if msg.from_tag:
                self.invites[(key[2], key[3], msg.from_tag)] = txn
            if not msg.to_tag and msg.from_tag:
                dialogs = self.dialogs
                if (key[2], msg.from_tag) not in dialogs:
                    dialogs[(key[2], msg.from_tag)] = new_dialog(key[2], msg.from_tag, msg.ts)
                    if len(dialogs) > self.limits.max_dialogs:  # the oldest goes; its state so far is counted
                        self.stats.dialogs[dialogs.popitem(last=False)[1].state] += 1
                        self.stats.evicted_dialogs += 1
        out.append(RequestIn(txn, msg))

    def _role(self, msg: SipMessage, method: str) -> tuple[str, Transaction | None]:
        """server/branch/other, and for a branch the server transaction it forwards."""
        via2 = msg.second_via()  # the C parse found it (a regex over the block cost 8 % of a run)
        parent = None
        if via2 is not None:
            parent = self.txns.get(self._key(msg, via2, method))
        if self.proxies:
            if self._is_proxy(msg.dst, msg.dport):
                return "server", None
            if self._is_proxy(msg.src, msg.sport):
                return "branch", parent
            return "other", None
        if parent is not None:
            self.stats.inferred_proxies.add(f"[{msg.src}]:{msg.sport}" if ":" in msg.src else f"{msg.src}:{msg.sport}")
            return "branch", parent
        return "server", None

    def _ack(self, msg: SipMessage, out: list[Event]) -> None:
        key = self._top_key(msg, "INVITE")
        invite = self.txns.get(key)
        if invite is not None:  # hop-by-hop ACK of a negative reply: part of the INVITE transaction
            return
        akey = hash((key[0], "ACK", key[2], key[3]))
        acks = self.acks
        if akey in acks:
            self.stats.retransmissions += 1
            return
        acks[akey] = msg.ts
        if len(acks) > self._max_txns:
            acks.popitem(last=False)
            self.stats.evicted_acks += 1
        via2 = msg.second_via()
        if via2 is not None and hash((self._key(msg, via2, "ACK")[0], "ACK", key[2], key[3])) in acks:
            return  # the proxy forwarding the ACK downstream
        if self.proxies and not self._is_proxy(msg.dst, msg.dport):
            return
        invite = self.invites.get((key[2], key[3], msg.from_tag or ""))
        if invite is None:
            self.stats.acks_without_invite += 1
            out.append(AckIn(msg, None, False))
            return
        tag = msg.to_tag or ""
        first = (
            invite.final is not None and invite.final.code < 300 and tag in invite.to_tags_2xx
            and tag not in invite.acked and msg.ts - invite.final_ts <= self.wait_timer
        )
        if first:
            invite.acked = _add_tag(invite.acked, tag)
        out.append(AckIn(msg, invite, first))

    def _reply(self, msg: SipMessage, out: list[Event]) -> None:
        method = _upper(msg.cseq_method)
        txn = self.txns.get(self._top_key(msg, method))
        if txn is None and msg.branch is None:
            txn = self._without_via(msg, method)
        if txn is None:
            self.stats.replies_without_request += 1
            return
        code = msg.code
        if txn.role == "branch":
            if code >= 200 and txn.final is None:
                self._final(txn, msg)
            return
        if txn.role != "server" or code == 100:
            return  # 100 Trying is hop-by-hop, never relayed (tm relay_100=0)
        if txn.timer_408:  # accounted as the timer's 408 already: one final per transaction
            if code >= 200:
                self.stats.replies_after_timer_408 += 1
            return
        if code < 200:
            if txn.final is None:
                self._dialog(txn, msg)
                out.append(ReplyOut(txn, msg, code, msg.ts, False, branch=self._branch_of(txn, msg)))
            return
        if txn.final is not None:
            if 200 <= code < 300 and txn.method == "INVITE" and msg.to_tag and msg.to_tag not in txn.to_tags_2xx:
                txn.to_tags_2xx = _add_tag(txn.to_tags_2xx, msg.to_tag)
                out.append(ReplyOut(txn, msg, code, msg.ts, False, late=True, branch=self._branch_of(txn, msg)))
            return
        self._final(txn, msg)
        if 200 <= code < 300 and msg.to_tag:
            txn.to_tags_2xx = _add_tag(txn.to_tags_2xx, msg.to_tag)
        branch = self._branch_of(txn, msg)
        local = branch is None and self._looks_local(txn, msg)
        txn.final_local = local
        if branch is None and not txn.branches and self._is_stateless(msg):
            txn.stateless = True
            self.stats.stateless_replies += 1
            return
        self._dialog(txn, msg)
        if txn.method == "INVITE" and code >= 300 and (txn.branches or not local):
            out.append(self._failed(txn, msg, branch))
        out.append(ReplyOut(txn, msg, code, msg.ts, local, branch=branch))

    def _final(self, txn: Transaction, msg: SipMessage) -> None:
        """The first final reply: held with the transaction, which moves to the completed ones."""
        txn.final, txn.final_ts = msg, msg.ts
        req = txn.request
        # the reply repeats the request's Call-ID, From-tag, CSeq method, branch: hold one copy
        # (written out: a loop over (name, value) pairs with getattr/setattr cost twice as much)
        call_id, from_tag, cseq_method, branch = txn.key[2], req.from_tag, req.cseq_method, req.branch
        if msg.call_id is not call_id and msg.call_id == call_id:
            msg.call_id = call_id
        if from_tag is not None and msg.from_tag is not from_tag and msg.from_tag == from_tag:
            msg.from_tag = from_tag
        if msg.cseq_method is not cseq_method and msg.cseq_method == cseq_method:
            msg.cseq_method = cseq_method
        if branch is not None and msg.branch is not branch and msg.branch == branch:
            msg.branch = branch
        n = self._hold(msg)
        txn.size += n
        key = txn.key
        if self._open.pop(key, None) is not None:
            self._done[key] = txn
        self._deadline(msg.ts + max(RETAIN, self.wait_timer), key, -1.0)  # (its own run: no timeout is < 0)

    def _hold(self, msg: SipMessage) -> int:
        """Keep only the header block of a message a transaction holds (nothing reads a held
        message's body; an SDP is most of an INVITE), share its short strings, drop its Via
        cache (only a new message's Vias are read), and add its bytes to the total held:
        the header block plus what the message object, its fields and the transaction around
        it cost (REQUEST_OVERHEAD, REPLY_OVERHEAD)."""
        raw = msg.raw
        if len(raw) > msg.body_start > 0:
            msg.raw = raw = raw[: msg.body_start]
        # the fields one by one (getattr/setattr by name are slow compiled); set only what
        # changes (the defaults stay on the class when interpreted)
        if msg.method and (v := _shared(msg.method)) is not msg.method:
            msg.method = v
        if msg.cseq_method and (v := _shared(msg.cseq_method)) is not msg.cseq_method:
            msg.cseq_method = v
        if msg.reason and (v := _shared(msg.reason)) is not msg.reason:
            msg.reason = v
        if msg.src and (v := _shared(msg.src)) is not msg.src:
            msg.src = v
        if msg.dst and (v := _shared(msg.dst)) is not msg.dst:
            msg.dst = v
        if msg.transport and (v := _shared(msg.transport)) is not msg.transport:
            msg.transport = v
        if msg._vias is not None:
            msg._vias = None
        n = len(raw) + (len(msg.call_id or "") + REQUEST_OVERHEAD if msg.is_request else REPLY_OVERHEAD)
        self.held_bytes += n
        return n

    def _without_via(self, msg: SipMessage, method: str) -> Transaction | None:
        """A reply with no Via (a UA that forgot to copy them; the proxy relays it anyway):
        the transaction of the same Call-ID/CSeq whose request came from where the reply goes,
        or went to where it comes from."""
        found = self.by_cseq.get((msg.call_id or "", msg.cseq_num or 0, method))
        cands = [] if found is None else found if isinstance(found, list) else [found]
        for t in cands:
            r = t.request
            if r.src == msg.dst and r.sport == msg.dport:
                return t
        for t in cands:
            r = t.request
            if r.dst == msg.src and r.dport == msg.sport:
                return t
        return None

    def _branch_of(self, txn: Transaction, reply: SipMessage) -> Transaction | None:
        """The branch of the current failure round whose reply this upstream reply relays (same
        code and To-tag); for a provisional, the round's first branch."""
        branches = txn.branches
        first = txn.first_branch
        for b in branches if not first else branches[first:]:
            f = b.final
            if f is not None and f.code == reply.code and f.to_tag == reply.to_tag:
                return b
        if reply.code < 200:
            return branches[first] if len(branches) > first else None
        return None

    def _looks_local(self, txn: Transaction, reply: SipMessage) -> bool:
        if txn.branches:
            return True  # branches are in sight and none got this reply
        tag = reply.to_tag or ""
        if tag.startswith(tm_tag_prefix(reply.src, reply.sport)):
            return True
        return bool(_LOCAL_TAG.match(tag)) and txn.request.to_tag is None

    def _is_stateless(self, reply: SipMessage) -> bool:
        tag = reply.to_tag or ""
        return tag.startswith(tm_tag_prefix(reply.src, reply.sport, stateless=True)) or bool(_SL_TAG.match(tag))

    def _failed(self, txn: Transaction, upstream: SipMessage, relayed: Transaction | None) -> BranchesFailed:
        """ON_FAILURE as the final reply goes upstream: the branch t_pick_branch picks among the
        last failure round's branches, or FAKED if it timed out."""
        got = self._pick(txn, txn.branches[txn.first_branch :], upstream.ts)
        if got is None:  # no branch in sight: the upstream reply is all we know
            return BranchesFailed(txn, upstream if relayed is not None or not txn.branches else None,
                                  upstream.code, upstream.ts, relayed)
        # after earlier rounds tm runs the failure_route again only if re-armed; a reply of its
        # own (no branch's, another code) shows it ran
        own_reply = relayed is None and got[2] != upstream.code
        return BranchesFailed(*got, failure_route=txn.first_branch == 0 or own_reply)

    def _pick(self, txn: Transaction, branches: Sequence[Transaction], fallback_ts: float
              ) -> tuple[Transaction, SipMessage | None, int, float, Transaction] | None:
        """t_pick_branch over one round's INVITE branches: (txn, reply or None for FAKED, code,
        time, branch). The time is the last branch reply's receipt when all replied (Kamailio
        reads its clock handling it), else ``fallback_ts`` (a timer fired: what followed it)."""
        best: tuple[int, int, Transaction, SipMessage | None] | None = None
        last = 0.0
        all_final = True
        for i, b in enumerate(branches):
            if b.request.method.upper() != "INVITE":
                continue
            f = b.final
            if f is None:
                all_final = False
            else:
                last = max(last, f.ts)
            code = f.code if f is not None else 408  # a branch without a final reply: tm's timer fakes a 408
            cand = (_prio(code), i, b, f)
            if best is None or cand[:2] < best[:2]:
                best = cand
        if best is None:
            return None
        _p, _i, branch, reply = best
        return (txn, reply, reply.code if reply is not None else 408, last if all_final and last else fallback_ts,
                branch)

    def _next_round(self, txn: Transaction, msg: SipMessage, out: list[Event]) -> bool:
        """A new INVITE branch of a server transaction that has branches already. If every branch
        of the current round has failed (a final reply >= 300, or none for as long as tm's fr
        timer runs), a failure_route relayed again (serial forking): the round's ON_FAILURE,
        picked among that round's branches only, and the new branch opens the next round.
        Otherwise it is one more parallel branch of the same relay. True: a new round."""
        if txn.final is not None or txn.timer_408:
            return False
        branches = txn.branches[txn.first_branch :]
        if not branches:
            return False
        patience = min(self.fr_timer, self.fr_inv_timer) - FR_EARLY
        for b in branches:
            f = b.final
            if f is None:
                if msg.ts - b.created < patience:
                    return False  # still pending: a parallel branch
            elif f.code < 300:
                return False
        got = self._pick(txn, branches, msg.ts)
        if got is not None:
            out.append(BranchesFailed(*got))
        # the round is accounted: its branches go (they keep no memory once evicted), but the
        # first of all, which the call's start time and R-URI come from; the new branch, next
        # in the list, starts the next round
        if isinstance(txn.branches, list):  # (a list whenever a branch was seen)
            del txn.branches[1:]
        txn.first_branch = 1
        return True

    def _dialog(self, txn: Transaction, reply: SipMessage) -> None:
        req = txn.request
        if txn.method == "BYE" and 200 <= reply.code < 300:  # either side may hang up
            for tag in (req.from_tag, req.to_tag):
                d = self.dialogs.get((txn.key[2], tag or ""))
                if d is not None:
                    if d.state != "terminated":
                        d.ended = reply.ts
                    d.state = "terminated"
            return
        if txn.method != "INVITE" or req.to_tag:
            return
        d = self.dialogs.get((txn.key[2], txn.request.from_tag or ""))
        if d is None or d.state in ("confirmed", "terminated"):
            return
        if reply.code < 200:
            if reply.to_tag:
                d.state = "early"
        elif reply.code < 300:
            d.state = "confirmed"
        else:
            d.state = "failed"
            d.ended = reply.ts

    # --- time ----------------------------------------------------------------------------

    def _timeout(self, txn: Transaction) -> float:
        return self.fr_inv_timer if txn.method == "INVITE" else self.fr_timer

    @staticmethod
    def _started(txn: Transaction) -> float:
        """When the fr timer now running for ``txn`` started: its request, or after a failed
        serial round the current round's first branch (each branch has its own timer)."""
        branches, i = txn.branches, txn.first_branch
        return branches[i].created if 0 < i < len(branches) else txn.created

    def advance(self, now: float) -> list[Event]:
        """The clock moved to ``now`` without a message (a live source's Idle, or the packet
        time of frames that carried no SIP): with ``open_as_408`` the proxy's timer 408s that
        are due are accounted, and transactions whose time is up are forgotten, as a message
        of that time would. Pure, like ``feed``: ``now`` is packet time (live: the wall clock).

        The 408s come from here (and at the end, ``finish``), not from ``feed``: the run calls
        ``advance`` at the same points of packet time with -j 0 and -j N, so the records come
        out in the same order. (Only a transaction nobody advanced past its timer for RETAIN
        seconds gets its 408 from ``feed``'s sweep, just before it is forgotten.)"""
        out: list[Event] = []
        for _at, key in _pop_due(self._timer_runs, self._timers, now):
            t = self.txns.get(key)
            if t is not None and t.final is None and not t.timer_408:
                if t.first_branch and _at < self._started(t) + self._timeout(t) + TIMER_GRACE:
                    continue  # a serial fork's earlier round: its next round pushed its own timer
                self._timer_408(t, out)
        if now >= self._next_sweep:
            self._sweep(now, out)
            self._next_sweep = now + SWEEP_EVERY
        return out

    def _timer(self, at: float, key: Key, delay: float) -> None:
        runs = self._timer_runs
        _push(runs, self._timers, at, key, delay)
        n = len(self._timers) + sum(map(len, runs.values()))
        if n > self._timers_cap:  # entries of evicted transactions: dropped as in _deadline
            # (and a serial fork's earlier rounds', skipped when popped: one per round)
            t_of, grace = self.txns.get, TIMER_GRACE - 1e-6

            def keep(e: Entry) -> bool:
                t = t_of(e[1])
                return t is not None and (not t.first_branch or (
                    t.final is None and not t.timer_408 and e[0] >= self._started(t) + self._timeout(t) + grace))

            self._timers = timers = [e for e in self._timers if keep(e)]
            heapq.heapify(timers)
            for d, run in runs.items():
                runs[d] = deque(e for e in run if keep(e))
            n = len(timers) + sum(map(len, runs.values()))
            self._timers_cap = n + n // 2 + 4096

    def _sweep(self, now: float, out: list[Event]) -> None:
        """Forget transactions whose time is up (deadlines in FIFO runs, _push: O(1) per transaction);
        count the server transactions that never got a final reply."""
        due = _pop_due(self._deadline_runs, self._deadlines, now)
        self._deadline_count -= len(due)
        for _deadline, key in due:
            t = self.txns.get(key)
            if t is None:
                continue
            if t.final is not None:
                if now - t.final_ts < max(RETAIN, self.wait_timer):
                    continue  # the entry pushed at its final reply comes later
            elif now - self._started(t) < self._timeout(t) + RETAIN:
                continue  # (a serial fork's next round pushed a later deadline)
            elif t.role == "server" and not t.timer_408:
                if self.open_as_408 and t.method not in ("ACK", "CANCEL"):
                    self._timer_408(t, out)  # nobody called advance() in time: accounted before forgotten
                else:
                    self.stats.timed_out[method_key(t.method)] += 1
            self._forget(key, t)
            if t.branches:  # a branch keeps its parent, never the reverse: no cycle left for the collector
                t.branches = ()
        acks = self.acks
        while acks:
            first = next(iter(acks))
            if now - acks[first] <= RETAIN:
                break
            del acks[first]
        if len(self.dialogs) > self._dialog_limit:  # ended dialogs leave the table; their final state is counted
            # Only those ended RETAIN ago: a call refused with a 407 comes again at once with the
            # same From-tag (one dialog entry). Pruning by packet time alone, not by the moment the
            # table passed a size (which a -j N shard reaches later), keeps --stats' dialog counts
            # those of -j 0.
            for k in [k for k, d in self.dialogs.items()
                      if (d.state in ("terminated", "failed") and now - d.ended > RETAIN) or now - d.created > 43200]:
                self.stats.dialogs[self.dialogs.pop(k).state] += 1
            self._dialog_limit = max(4096, 2 * len(self.dialogs))

    def _due(self, t: Transaction) -> float:
        """When the sweep forgets ``t`` as it is now (the time its deadline entry was pushed for)."""
        if t.final is not None:
            return t.final_ts + max(RETAIN, self.wait_timer)
        return self._started(t) + self._timeout(t) + RETAIN

    def _timer_408(self, t: Transaction, out: list[Event]) -> None:
        """The 408 the proxy's fr timer sends for a server transaction with no final reply, dated
        when the timer fired (what ``finish(open_as_408=True)`` gives at the end of the input)."""
        ts = self._started(t) + self._timeout(t)
        t.timer_408 = True
        t.final_ts = ts
        t.final_local = True
        self.stats.timer_408[method_key(t.method)] += 1
        if t.method == "INVITE":
            out.append(BranchesFailed(t, None, 408, ts, None, failure_route=not t.first_branch))
        out.append(ReplyOut(t, None, 408, ts, True))

    def _deadline(self, at: float, key: Key, delay: float) -> None:
        """When the sweep looks at ``key`` next: ``at``, message time + ``delay`` (names its run)."""
        runs = self._deadline_runs
        _push(runs, self._deadlines, at, key, delay)
        self._deadline_count = n = self._deadline_count + 1
        if n > self._heap_cap:
            # evicted transactions leave their entries (and keys) behind: drop them, O(n) once
            # per n/2 pushes, so stale entries stay under half the live ones (+4096); and a
            # serial fork's entries before its own deadline (popped, they would be skipped, and
            # the entry at that deadline is pending): its earlier rounds', one per round
            t_of = self.txns.get

            def keep(e: Entry) -> bool:
                t = t_of(e[1])
                return t is not None and (not t.first_branch or e[0] >= self._due(t) - 1e-6)

            self._deadlines = heap = [e for e in self._deadlines if keep(e)]
            heapq.heapify(heap)
            for d, run in runs.items():
                runs[d] = deque(e for e in run if keep(e))
            self._deadline_count = n = len(heap) + sum(map(len, runs.values()))
            self._heap_cap = n + n // 2 + 4096

    def pending_deadlines(self) -> tuple[int, int]:
        """How many sweep deadlines and --open-as-408 timers are held (the bounds' tests)."""
        return (len(self._deadlines) + sum(map(len, self._deadline_runs.values())),
                len(self._timers) + sum(map(len, self._timer_runs.values())))

    def _evict(self) -> None:
        """Over a bound: forget the oldest completed transactions, then the oldest open ones,
        until inside again; each counted. An open one's branches go with it (useless alone)."""
        stats = self.stats
        while len(self.txns) > self._max_txns or self.held_bytes > self._max_bytes:
            if self._done:
                key, t = self._done.popitem(last=False)
            elif self._open:
                key, t = self._open.popitem(last=False)
                if t.role == "server":
                    stats.evicted_open[method_key(t.method)] += 1
            else:
                break
            self._forget(key, t)
            stats.evicted_transactions += 1
            for b in t.branches:
                if self.txns.get(b.key) is b:
                    self._forget(b.key, b)
                    stats.evicted_transactions += 1
            t.branches = ()  # as in _sweep: no parent <-> branch cycle

    def _forget(self, key: Key, t: Transaction) -> None:
        del self.txns[key]
        # a transaction is in _done once it has its final reply (_final), in _open before: one
        # OrderedDict.pop (~1.1k instructions) where it is, the other only if it was not there
        if t.final is None:
            if self._open.pop(key, None) is None:
                self._done.pop(key, None)
        elif self._done.pop(key, None) is None:
            self._open.pop(key, None)
        self.held_bytes -= t.size
        ckey = (key[2], key[3], key[1])
        same = self.by_cseq.get(ckey)
        if same is t:
            del self.by_cseq[ckey]
        elif isinstance(same, list):
            same.remove(t)
            if len(same) == 1:
                self.by_cseq[ckey] = same[0]
        if t.role == "server" and t.method == "INVITE" and t.request.from_tag:
            ikey = (key[2], key[3], t.request.from_tag)
            if self.invites.get(ikey) is t:
                del self.invites[ikey]

    def finish(self, open_as_408: bool = False) -> list[Event]:
        """End of input: server transactions still without a final reply are counted, or (the
        option) accounted as the 408 the proxy's timer would have sent."""
        out: list[Event] = []
        for t in list(self.txns.values()):
            if t.role != "server" or t.final is not None or t.timer_408 or t.method in ("ACK", "CANCEL"):
                continue
            self.stats.open_at_end[method_key(t.method)] += 1
            if open_as_408:
                ts = self._started(t) + self._timeout(t)
                t.final_ts = ts
                t.final_local = True
                if t.method == "INVITE":
                    out.append(BranchesFailed(t, None, 408, ts, None, failure_route=not t.first_branch))
                out.append(ReplyOut(t, None, 408, ts, True))
        for d in self.dialogs.values():
            self.stats.dialogs[d.state] += 1
        return out
