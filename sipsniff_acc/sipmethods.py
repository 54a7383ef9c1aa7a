"""The SIP methods of the IANA registry: the one list counters and metric labels key by.

A method is any RFC 3261 token, so a hostile or broken peer could mint a new key (a
counter's memory, a ``--stats`` line, a scraper's time series) with every request it
sends; anything not in the registry is counted as "other"."""

from __future__ import annotations

#: The SIP methods (IANA registry); any other is "other".
METHODS = frozenset({
    "ACK", "BYE", "CANCEL", "INFO", "INVITE", "MESSAGE", "NOTIFY", "OPTIONS", "PRACK",
    "PUBLISH", "REFER", "REGISTER", "SUBSCRIBE", "UPDATE",
})


def method_key(method: str) -> str:
    """``method`` if registered, else "other": a bounded key (a set lookup, ~30 ns)."""
    return method if method in METHODS else "other"
