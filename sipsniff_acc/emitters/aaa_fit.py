"""Text values fitted to what an AAA protocol can carry (RADIUS, Diameter), one policy for both.

A value that no encoder can take, or that a server would refuse, must never stop the records
after it (issue 10), and a change made to fit must never be silent. So, for every string
attribute or UTF8String AVP:

* a lone surrogate (text that is not valid Unicode; it has no UTF-8 form) becomes U+FFFD;
* NUL becomes U+FFFD: both protocols carry lengths, but every C consumer (radcli, Kamailio,
  FreeRADIUS's SQL modules, PostgreSQL) cuts the value there or refuses it;
* a value over the protocol's limit is cut on a UTF-8 character boundary (the caller decides
  whether to send the cut value or to refuse the record).

Each change is counted under "<attribute>: <what>" in the caller's Counter. The common case
(clean, short) costs one ``str.encode`` and one byte search.
"""

from __future__ import annotations

import re
from collections import Counter

REPLACEMENT = "\ufffd".encode()
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean(value: str, limit: int) -> bytes | None:
    """The fast path (nearly every value): its UTF-8 octets when nothing needs fitting, else None."""
    try:
        data = value.encode()
    except UnicodeEncodeError:
        return None
    return data if len(data) <= limit and b"\0" not in data else None


def fit_text(value: str, limit: int | None, counts: Counter[str], name: str) -> tuple[bytes, bool]:
    """The octets to send for ``value`` and whether they were cut to ``limit`` (not counted
    here: the caller counts a cut or refuses the record)."""
    try:
        data = value.encode()
    except UnicodeEncodeError:
        data = _SURROGATE.sub("\ufffd", value).encode()
        counts[f"{name}: invalid text replaced"] += 1
    if b"\0" in data:
        data = data.replace(b"\0", REPLACEMENT)
        counts[f"{name}: NUL replaced"] += 1
    if limit is not None and len(data) > limit:
        return data[:limit].decode("utf-8", "ignore").encode(), True
    return data, False
