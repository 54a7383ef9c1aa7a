"""Helpers for the calls tests: a capture file through the real capture stages into CallBuilder."""

from __future__ import annotations

from pathlib import Path

from sipsniff_acc.calls import Call, CallBuilder
from sipsniff_acc.pipeline import MessagePipeline
from sipsniff_acc.sip import SipMessage
from sipsniff_acc.sources.pcapfile import CaptureReader


def calls_of_pcap(path: Path, builder: CallBuilder | None = None) -> list[Call]:
    """Every call of a capture file, in the order they were emitted."""
    b = builder or CallBuilder()
    mp = MessagePipeline()
    out: list[Call] = []
    for frame in CaptureReader(str(path)):
        for m in mp.feed(frame):
            if isinstance(m, SipMessage):
                out.extend(b.feed(m))
    for m in mp.finish():
        if isinstance(m, SipMessage):
            out.extend(b.feed(m))
    out.extend(b.finish())
    return out
