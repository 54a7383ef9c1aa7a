"""Kamailio's ACC syslog text (acc-spec §3) and RFC 3164 framing. Pure formatting."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Final

from sipsniff_acc.records import KIND_TEXT, AccRecord

FACILITIES: Final[dict[str, int]] = {
    "LOG_KERN": 0, "LOG_USER": 1, "LOG_MAIL": 2, "LOG_DAEMON": 3, "LOG_AUTH": 4, "LOG_SYSLOG": 5, "LOG_LPR": 6,
    "LOG_NEWS": 7, "LOG_UUCP": 8, "LOG_CRON": 9, "LOG_AUTHPRIV": 10, "LOG_FTP": 11,
    **{f"LOG_LOCAL{i}": 16 + i for i in range(8)},
}
#: Kamailio log level -> (syslog severity, the level name Kamailio prints)
LEVELS: Final[dict[int, tuple[int, str]]] = {
    -5: (1, "ALERT"), -4: (2, "BUG"), -3: (2, "CRITICAL"), -2: (2, "CRITICAL"), -1: (3, "ERROR"),
    0: (4, "WARNING"), 1: (5, "NOTICE"), 2: (6, "INFO"), 3: (7, "DEBUG"),
}


#: What a reader could take for a line break or a terminal command: C0 controls (CR, LF, TAB,
#: ESC...), DEL, C1 controls (NEL, CSI...) and the Unicode line/paragraph separators that
#: ``str.splitlines`` honours; and the bidirectional controls (U+061C, U+200E/F, U+202A-E,
#: U+2066-9: marks, embeddings, overrides, isolates), with which a terminal or an editor shows a
#: value in another order than it has (a U+202E right-to-left override in a Call-ID spoofs the
#: rest of the line). Nothing else is touched: ``;``, ``=`` and a backslash stay raw, as
#: Kamailio writes them, so a clean value is byte-identical to Kamailio's line.
UNSAFE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2028\u2029\u2066-\u2069]")
_NAMED: Final = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape(text: str) -> str:
    """``text`` with every control character written as ``\\r``, ``\\n``, ``\\t``, ``\\xHH``
    (other C0, DEL, C1) or ``\\u2028``/``\\u2029``, so one value can never end a line or
    drive a terminal; the bidi controls as ``\\u202e`` etc., so none can reorder what is shown.
    A clean text (the usual case) is returned as is after ``str.isprintable`` (C, ~2x faster
    than the regex search; false for every character above, the bidi controls included: they
    are category Cf; so it only lets the regex look when one of them, or a harmless
    non-printable such as U+00A0, is present). Before that, the C ``clean_ascii`` (when built):
    ASCII without a control character, the usual line, in ~1 instruction a character where
    ``isprintable`` looks each one up in the Unicode tables."""
    if (_clean_ascii is not None and _clean_ascii(text)) or text.isprintable():
        return text
    return UNSAFE.sub(_escape_char, text)


_clean_ascii: Callable[[str], bool] | None = None
try:
    from sipsniff_acc import _speedups

    _clean_ascii = _speedups.clean_ascii
except ImportError:  # not built: isprintable() alone
    pass


#: The same characters as JSON output leaves them (orjson escapes C0 but not DEL, C1,
#: U+2028/9 or the bidi controls, which are valid JSON): inside a JSON text they can only be
#: within a string. In UTF-8: U+061C d8 9c, U+200E/F e2 80 8e/8f, U+202A-E e2 80 aa-ae,
#: U+2028/9 e2 80 a8/a9, U+2066-9 e2 81 a6-a9.
_DEL: Final = b"\x7f"
_JSON_UNSAFE: Final = re.compile(
    b"\x7f|\xc2[\x80-\x9f]|\xd8\x9c|\xe2\x80[\x8e\x8f\xa8-\xae]|\xe2\x81[\xa6-\xa9]")


def _json_char(m: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % ord(m.group().decode())


def json_safe(line: bytes) -> bytes:
    """A UTF-8 JSON text with DEL, C1 controls, U+2028/9 and the bidi controls written as ``\\uXXXX`` escapes: the
    same JSON value, but nothing a terminal or ``splitlines()`` would act on."""
    if line.isascii() and _DEL not in line:  # the usual case: two C scans, no regex
        return line
    return _JSON_UNSAFE.sub(_json_char, line)


def payload(r: AccRecord, time_mode: int = 0, time_attr: str = "time_attr", time_exten: str = "time_exten",
            time_format: str = "%Y-%m-%d %H:%M:%S") -> str:
    """'ACC: <kind>: timestamp=..;method=..;...' with log_extra and legs, no newline (acc.c acc_log_request).

    Control characters in any value are escaped (``escape``): a CR or LF from a packet must not
    let a peer forge a second ACC line in the log, the syslog datagram or a terminal.
    """
    sec = int(r.ts)
    stamp = ""
    if time_mode == 1:
        stamp = f";{time_exten}={int(round((r.ts - sec) * 1e6)) % 1000000}"
    elif time_mode == 2:
        stamp = f";{time_attr}={r.ts:.3f}"
    elif time_mode in (3, 4):
        tm = time.localtime(sec) if time_mode == 3 else time.gmtime(sec)
        stamp = f";{time_attr}={time.strftime(time_format, tm)}"
    # one f-string for the fixed fields (a list of parts joined cost ~2x for the usual record)
    text = (f"ACC: {KIND_TEXT[r.kind]}: timestamp={sec}{stamp};method={r.method};from_tag={r.from_tag or ''};"
            f"to_tag={r.to_tag or ''};call_id={r.call_id or ''};code={r.code};reason={r.reason}")
    extras = r.extras.get("log")
    if extras or r.legs:
        parts = [text]
        for name, value in extras or ():
            parts.append(f";{name}={value or ''}")
        for leg in r.legs:
            for name, value in leg:
                parts.append(f";{name}={value or ''}")
        text = "".join(parts)
    return escape(text)


def level_of(level: int) -> tuple[int, str]:
    return LEVELS.get(max(-5, min(3, level)), (5, "NOTICE"))


def rfc3164(message: str, ts: float, facility: str = "LOG_DAEMON", level: int = 1, ident: str = "kamailio",
            pid: int = 0, hostname: str | None = None) -> bytes:
    """One syslog datagram as Kamailio's syslog(3) call produces it: <PRI>Mmm dd hh:mm:ss ident[pid]: msg."""
    severity, _name = level_of(level)
    pri = FACILITIES[facility] * 8 + severity
    stamp = time.strftime("%b %d %H:%M:%S", time.localtime(ts))
    if stamp[4] == "0":
        stamp = stamp[:4] + " " + stamp[5:]
    host = f"{hostname} " if hostname else ""
    return f"<{pri}>{stamp} {host}{ident}[{pid}]: {message}\n".encode()
