"""ACC lines to stdout, a file, the local syslog socket or a remote syslog server (UDP/TCP).

A line for a stream is the message Kamailio hands to syslog (with its level/module prefix
for the kamailio-5.6 profile, bare for openser-1.2); a datagram to a syslog socket is
framed RFC 3164 with the record's packet time and the configured facility and level.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import IO
from urllib.parse import urlsplit

from sipsniff_acc.cdr import CDR, LOG_PREFIX as CDR_PREFIX, cdr_line
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import RulesFile
from sipsniff_acc.sysloglines import level_of, payload, rfc3164


class SyslogTargetError(ValueError):
    pass


class LogEmitter:
    """Writes the "log" backend's records as Kamailio's ACC lines."""

    def __init__(self, rules: RulesFile, stream: IO[str] | None = None, target: str | None = None,
                 ident: str = "kamailio") -> None:
        self.acc = rules.acc
        level = self.acc.log_level_number
        prefix = rules.profile_info.log_prefix
        self.prefix = prefix.replace("NOTICE", level_of(level)[1], 1) if prefix else ""
        self.cdr_prefix = CDR_PREFIX.replace("NOTICE", level_of(level)[1], 1)  #: dialog CDR lines (cdr.py)
        self.stream = stream
        self.ident = ident
        self.level = level
        self.sock: socket.socket | None = None
        self.stream_sock = False
        self.written = 0
        self.target = target
        self.send_failures = 0  #: lines a syslog socket refused even after a reconnection (counted, alarmed)
        self._unflushed = False
        if target:
            self.sock, self.stream_sock = _open_target(target)

    def line(self, r: AccRecord) -> str:
        a = self.acc
        if r.kind == CDR:  # log_write_cdr(): start_time=...; end_time=...; duration=...; <cdr_extra>
            return self.cdr_prefix + cdr_line(r)
        return self.prefix + payload(r, a.time_mode, a.time_attr, a.time_exten, a.time_format)

    def emit(self, records: list[AccRecord]) -> None:
        stream = self.stream
        lines: list[str] = []  # one write for the records of a call (a write each cost ~3k instructions)
        for r in records:
            if "log" not in r.backends:
                continue
            text = self.line(r)
            if stream is not None:
                lines.append(text)
            if self.sock is not None:
                facility = self.acc.cdr_facility if r.kind == CDR else self.acc.log_facility
                self._send(rfc3164(text, r.ts, facility, self.level, self.ident, os.getpid()))
            self.written += 1
        if lines and stream is not None:
            lines.append("")
            stream.write("\n".join(lines))
            self._unflushed = True

    def tick(self) -> None:
        """The run's clock (records out within 1 s): the lines written since go to the file or
        pipe now, not when a block buffer fills."""
        if self._unflushed:
            self._unflushed = False
            assert self.stream is not None
            self.stream.flush()

    def _send(self, data: bytes) -> None:
        """Send one datagram/line; on an error reconnect once, then count the loss and say so."""
        for attempt in range(2):
            try:
                if self.sock is None:
                    assert self.target is not None
                    self.sock, self.stream_sock = _open_target(self.target)
                if self.stream_sock:
                    self.sock.sendall(data)
                else:
                    self.sock.send(data)
                return
            except (OSError, SyslogTargetError) as e:
                if self.sock is not None:
                    self.sock.close()
                    self.sock = None
                if attempt:
                    if not self.send_failures:
                        print(f"alarm: syslog {self.target}: {e}; lines that cannot be sent are counted "
                              "(the records still go to the other outputs)", file=sys.stderr)
                    self.send_failures += 1

    def close(self) -> None:
        if self.stream is not None:
            self.stream.flush()
        if self.sock is not None:
            self.sock.close()


def _open_target(target: str) -> tuple[socket.socket, bool]:
    """'local' (/dev/log), 'unix:///path', 'udp://host:port' or 'tcp://host:port'."""
    if target in ("local", "unix") or target.startswith("unix://"):
        path = target[len("unix://"):] if target.startswith("unix://") else "/dev/log"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.connect(path)
        except OSError as e:
            s.close()
            raise SyslogTargetError(f"syslog socket {path}: {e.strerror}") from None
        return s, False
    form = "use local, unix:///path, udp://host:port or tcp://host:port"
    try:  # urlsplit and .port raise ValueError for '[::1' (no ']') and a port not in 0..65535
        u = urlsplit(target)
        port = u.port or 514
    except ValueError as e:
        raise SyslogTargetError(f"--syslog {target!r}: {e} ({form}, port 1-65535)") from None
    if u.scheme not in ("udp", "tcp") or not u.hostname:
        raise SyslogTargetError(f"--syslog {target!r}: {form}")
    kind = socket.SOCK_DGRAM if u.scheme == "udp" else socket.SOCK_STREAM
    try:
        info = socket.getaddrinfo(u.hostname, port, type=kind)[0]
        s = socket.socket(info[0], kind)
        s.settimeout(5)
        s.connect(info[4])
    except OSError as e:
        raise SyslogTargetError(f"syslog {target}: {e.strerror or e}") from None
    return s, u.scheme == "tcp"
