"""Bounds on the state the acc stages keep, so a flood can't grow memory without end.

Every table the tracker and engine keep is bounded here, by count (and where a message's
size matters, by bytes), and what is evicted when a bound is reached is counted. rules.yaml's
``limits:`` section sets any of these fields; the defaults keep peak RSS under 300 MB under
each flood of benchmarks/bench_floods.py (measured: see docs/architecture.md, "Bounds").

Sizing, measured on CPython 3.11 (tracemalloc): an open INVITE transaction costs ~1.3 KB
besides its header block and Call-ID (message object and fields, transaction, indexes,
deadline), its final reply ~0.7 KB besides its header block; max_transaction_bytes counts
all of that (tracker.REQUEST_OVERHEAD, REPLY_OVERHEAD), so 80 MB is ~25,000 answered calls
with ordinary headers (~3.3 KB each) or ~40,000 ringing ones. A call never hung up also
keeps a dialog (~250 bytes plus its Call-ID once its transaction is gone), an ACK entry
(~150) and a record id (~95). A busy proxy (500 calls/s) keeps ~35,000 transactions (32 s
of completed ones absorbing retransmissions, plus the ringing ones); completed ones are
evicted first (at 500 calls/s with BYEs the 80 MB hold ~25 s of them, not 32).

The bounds are for the whole run: with ``-j N`` each worker gets 1/N of them (``shard``),
as it sees 1/N of the calls.

``max_sip_message`` bounds the capture stage instead (one SIP message framed out of TCP, an
SCTP user message, a WebSocket message). RFC 3261 sets no size over TCP (§18.3: only UDP is
bound, by the datagram). Kamailio's and PJSIP's 64 KB buffers are build-time defaults that
deployments raise: a presence server's RLS NOTIFY (RFC 4662) for a large contact list runs to
hundreds of KB (SIPp had to grow its buffers for exactly that). 1 MiB holds those with room
(a ~5,000-entry list) and costs nothing until such a message comes: the TCP stage keeps at
most 2 x max_sip_message per direction (a message in progress plus the start of the next)
and 256 MiB over all directions, so the worst case is unchanged and the bytes are the ones
that arrived. The tracker keeps only a message's header block, counted in
``max_transaction_bytes``. Settable from 1 KiB to 64 MiB.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Final

DEFAULT_MAX_SIP_MESSAGE: Final = 1 << 20  #: bytes; see the module docstring for the reasoning
MIN_SIP_MESSAGE: Final = 1 << 10  #: below this even an ordinary INVITE with SDP would be cut
MAX_SIP_MESSAGE: Final = 1 << 26  #: a setting above 64 MiB is a typo: the TCP total budget is 256 MiB


@dataclass(frozen=True, slots=True)
class Limits:
    max_transactions: int = 50_000  #: transactions held (open + completed), and ACKs remembered; oldest evicted first
    #: bytes those transactions hold: header blocks, Call-IDs and the objects around them
    max_transaction_bytes: int = 80 << 20
    max_dialogs: int = 50_000  #: dialogs held
    #: packet-time seconds a record id is remembered, to number exact twins; must exceed the
    #: spread of record times among records made close together (the engine raises it to
    #: 2 x fr_inv_timer + 32 s if smaller: see AccEngine)
    record_id_window: float = 300.0
    max_record_ids: int = 1_000_000  #: ids remembered at most (~95 bytes each); past it the window shrinks, counted
    max_hdr_scan: int = 512  #: header lines $hdr() looks through in one message
    #: bytes of one SIP message over TCP, SCTP or WebSocket (UDP is bound by the datagram); a
    #: longer one is counted (tcp_message_too_long, ...) and its stream resyncs
    max_sip_message: int = DEFAULT_MAX_SIP_MESSAGE
    #: branches one server transaction holds: its first and the current failure round's (a
    #: serial fork's earlier rounds are let go once accounted). Kamailio's tm refuses a branch
    #: past its max_branches (12 by default), counted over all rounds, and that setting is
    #: capped below MAX_BRANCHES_LIMIT (32, core/config.h): 32 holds whatever any tm sends,
    #: whatever max_branches it was given; a branch past it is counted (branches_cut)
    max_branches: int = 32

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"limits.{f.name} must be a positive number, not {value!r}")
        if not MIN_SIP_MESSAGE <= self.max_sip_message <= MAX_SIP_MESSAGE:
            raise ValueError(f"limits.max_sip_message must be between {MIN_SIP_MESSAGE} and {MAX_SIP_MESSAGE} "
                             f"bytes (1 KiB - 64 MiB), not {self.max_sip_message!r}")

    def shard(self, n: int) -> Limits:
        """The bounds of one of n workers (calls are spread evenly by Call-ID): counts and
        bytes divided by n, the time window and the per-message and per-transaction bounds unchanged."""
        if n <= 1:
            return self
        return replace(self, max_transactions=max(1, self.max_transactions // n),
                       max_transaction_bytes=max(1, self.max_transaction_bytes // n),
                       max_dialogs=max(1, self.max_dialogs // n), max_record_ids=max(2, self.max_record_ids // n))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
