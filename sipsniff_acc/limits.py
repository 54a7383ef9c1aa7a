"""Bounds on the state the acc stages keep, so a flood can't grow memory without end.

Every table the tracker and engine keep is bounded here, by count (and where a message's
size matters, by bytes), and what is evicted when a bound is reached is counted. rules.yaml's
``limits:`` section sets any of these fields; the defaults keep peak RSS under 300 MB under
each flood of benchmarks/bench_floods.py (measured: see docs/architecture.md, "Bounds").

Sizing, measured on CPython 3.11: an open INVITE transaction costs ~2.3 KB besides its header
bytes (message object, transaction, dialog, indexes), so 50,000 of them are ~120 MB with
~500-byte header blocks; 64 MB of held header bytes is ~100,000 ordinary requests. A busy
proxy (500 calls/s) keeps ~35,000 transactions (32 s of completed ones absorbing
retransmissions, plus the ringing ones); completed ones are evicted before open ones.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class Limits:
    max_transactions: int = 50_000  #: transactions held (open + completed), and ACKs remembered; oldest evicted first
    max_transaction_bytes: int = 64 << 20  #: bytes of SIP header blocks held by those transactions
    max_dialogs: int = 50_000  #: dialogs held
    #: packet-time seconds a record id is remembered, to number exact twins; must exceed the
    #: spread of record times among records made close together (the engine raises it to
    #: 2 x fr_inv_timer + 32 s if smaller: see AccEngine)
    record_id_window: float = 300.0
    max_record_ids: int = 1_000_000  #: ids remembered at most (~95 bytes each); past it the window shrinks, counted
    max_hdr_scan: int = 512  #: header lines $hdr() looks through in one message

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"limits.{f.name} must be a positive number, not {value!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
