"""Kamailio's ACC syslog text (acc-spec §3) and RFC 3164 framing. Pure formatting."""

from __future__ import annotations

import time
from typing import Final

from sipsniff_acc.records import AccRecord

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


def payload(r: AccRecord, time_mode: int = 0, time_attr: str = "time_attr", time_exten: str = "time_exten",
            time_format: str = "%Y-%m-%d %H:%M:%S") -> str:
    """'ACC: <kind>: timestamp=..;method=..;...' with log_extra and legs, no newline (acc.c acc_log_request)."""
    sec = int(r.ts)
    parts = [f"ACC: {r.text}: timestamp={sec}"]
    if time_mode == 1:
        parts.append(f";{time_exten}={int(round((r.ts - sec) * 1e6)) % 1000000}")
    elif time_mode == 2:
        parts.append(f";{time_attr}={r.ts:.3f}")
    elif time_mode in (3, 4):
        tm = time.localtime(sec) if time_mode == 3 else time.gmtime(sec)
        parts.append(f";{time_attr}={time.strftime(time_format, tm)}")
    parts.append(f";method={r.method};from_tag={r.from_tag or ''};to_tag={r.to_tag or ''};"
                 f"call_id={r.call_id or ''};code={r.code};reason={r.reason}")
    for name, value in r.extras.get("log", ()):
        parts.append(f";{name}={value or ''}")
    for leg in r.legs:
        for name, value in leg:
            parts.append(f";{name}={value or ''}")
    return "".join(parts)


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
