"""Bounds on the state the acc stages keep, so a flood can't grow memory without end.

Every table the tracker and engine keep is bounded here, by count (and where a message's
size matters, by bytes), and what is evicted when a bound is reached is counted. rules.yaml's
``limits:`` section sets any of these fields; the defaults keep peak RSS under 300 MB under
each flood of benchmarks/bench_floods.py.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class Limits:
    max_transactions: int = 100_000  #: transactions held (open + completed), oldest evicted first
    max_transaction_bytes: int = 64 << 20  #: bytes of SIP messages held by those transactions
    max_dialogs: int = 50_000  #: dialogs held
    record_id_window: float = 300.0  #: packet-time seconds an id is remembered (to number exact twins)
    max_hdr_scan: int = 512  #: header lines $hdr() looks through in one message

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
