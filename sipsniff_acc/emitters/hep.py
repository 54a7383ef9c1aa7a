"""``--hep-out udp://HOST:PORT`` (or tcp://): every SIP message the run sees, from any source
(pcap, -i, HEP), sent on as HEPv3 to a Homer/heplify-server or a Kamailio ``sipcapture``, with
the original packet's addresses, ports, transport and time (µs), our ``--hep-agent-id`` and
``--hep-password``; one sensor then feeds both the accounting and an existing Homer.

Why no thread and no blocking call: the copy to Homer must never slow or stop the accounting.
UDP goes out on a non-blocking connected socket (the kernel's socket buffer is the bounded
queue: a full one, or an ICMP refusal, is a counted loss). TCP goes through a bounded buffer
(``MAX_BUFFER``) written as far as the socket takes it, without waiting; a connection that
fails is retried at most once a second, and what does not fit meanwhile is counted, not
queued without end. Losses are summed per reason (``stats()``, the summary) and said in a
rate-limited alarm line (one per ``ALARM_EVERY`` seconds at most).
"""

from __future__ import annotations

import errno
import socket
import sys
import time
from collections import Counter
from typing import IO, Any, Final

from sipsniff_acc.records import AccRecord
from sipsniff_acc.sources.hep import HepUsageError, check_password, encode, parse_url
from sipsniff_acc.sysloglines import escape

MAX_BUFFER: Final = 4 << 20  #: bytes of HEP waiting for a TCP collector (~8,000 messages)
RECONNECT_EVERY: Final = 1.0  #: seconds between TCP connection attempts
ALARM_EVERY: Final = 10.0  #: seconds between two alarm lines about lost copies
CLOSE_WAIT: Final = 2.0  #: seconds the end of the run gives a TCP collector to take what waits
SNDBUF: Final = 4 << 20


class HepOut:
    """The HEP copy of every message; an ``Emitter`` too (``tick`` writes what waits for a TCP
    collector, ``close`` gives it ``CLOSE_WAIT`` seconds), so the run's clock drives it."""

    def __init__(self, url: str, agent_id: int = 0, password: str | bytes | None = None,
                 alarms: IO[str] | None = None, max_buffer: int = MAX_BUFFER) -> None:
        self.url = url
        self.scheme, host, port = parse_url(url, "--hep-out")
        if not 0 <= agent_id <= 0xFFFFFFFF:
            raise HepUsageError(f"--hep-agent-id {agent_id}: use 0 to 4294967295 (HEP's 32-bit capture id)")
        self.agent_id = agent_id
        self.password = check_password(password)
        self.alarms = alarms if alarms is not None else sys.stderr
        self.max_buffer = max_buffer
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM if self.scheme == "udp" else socket.SOCK_STREAM,
                                      flags=socket.AI_NUMERICSERV)
        except (OSError, UnicodeError) as e:
            raise HepUsageError(f"--hep-out {url}: cannot resolve {host!r} ({getattr(e, 'strerror', None) or e})") from None
        self.family: int = info[0][0]
        self.addr: tuple[Any, ...] = info[0][4]
        self.sent = 0  #: HEP packets handed to the kernel (TCP: queued for it, less what was lost since)
        self.lost: Counter[str] = Counter()  #: copies not sent, by reason
        self._buf = bytearray()
        self._sock: socket.socket | None = None
        self._connected = False
        self._next_connect = 0.0
        self._alarmed = float("-inf")
        self._told = 0  #: losses already in an alarm line
        self.last_error = ""  #: the last connection error (TCP), for the summary
        if self.scheme == "udp":
            s = socket.socket(self.family, socket.SOCK_DGRAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
            except OSError:
                pass
            s.setblocking(False)
            try:
                s.connect(self.addr)  # connected: the kernel reports a refusing collector (ICMP) to us
            except OSError as e:
                s.close()
                raise HepUsageError(f"--hep-out {url}: {e.strerror or e}") from None
            self._sock, self._connected = s, True
        else:
            self._connect()

    # -- the tap: one SIP message as the run saw it
    def send(self, ts: float, transport: str, src: bytes, sport: int, dst: bytes, dport: int, payload: bytes) -> None:
        """Send one message as HEPv3 (never blocks, never raises: a loss is counted)."""
        try:
            pkt = encode(ts, transport, src, sport, dst, dport, payload, self.agent_id, self.password)
        except ValueError:
            self._lose("too_big")
            return
        if self.scheme == "udp":
            try:
                self._sock.send(pkt)  # type: ignore[union-attr]
                self.sent += 1
            except (BlockingIOError, InterruptedError):
                self._lose("queue_full")
            except OSError as e:
                self._lose("refused" if e.errno == errno.ECONNREFUSED else errno.errorcode.get(e.errno or 0, "error").lower())
            return
        if len(self._buf) + len(pkt) > self.max_buffer:
            self._lose("queue_full" if self._connected else "not_connected")
            self._write()
            return
        self._buf += pkt
        self.sent += 1  # counted when queued; a connection lost with bytes in it counts them again below
        self._write()

    # -- Emitter
    def emit(self, records: list[AccRecord]) -> None:
        """Records are not ours to send: the messages come through ``send``."""

    def tick(self) -> None:
        if self.scheme == "tcp":
            self._write()
        self._alarm()

    def close(self) -> None:
        if self.scheme == "tcp":
            end = time.monotonic() + CLOSE_WAIT
            while self._buf and time.monotonic() < end:
                self._write()
                if self._buf:
                    time.sleep(0.01)
            if self._buf:
                self._lose_queued("unsent_at_end")
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._alarm(force=True)

    def stats_doc(self) -> dict[str, object]:
        """--stats' "hep_out" part."""
        return {"hep_out": {"url": self.url, "agent_id": self.agent_id, "sent": self.sent, "lost": dict(sorted(self.lost.items())),
                            "last_error": self.last_error}}

    def summary_line(self) -> str:
        lost = ", ".join(f"{k} {n}" for k, n in sorted(self.lost.items())) or "none"
        err = f" (last connection error {self.last_error})" if self.last_error else ""
        return (f"  hep-out {self.url}: {self.sent} messages sent as HEPv3 (agent id {self.agent_id}); "
                f"not sent: {lost}{err}")

    # -- internals
    def _lose(self, reason: str, n: int = 1) -> None:
        self.lost[reason] += n
        self._alarm()

    def _lose_queued(self, reason: str) -> None:
        """The TCP buffer's packets will not be sent: counted lost, no longer sent (whole packets,
        by their magic; the head may be a packet already partly written)."""
        n = min(self.sent, max(1, self._buf.count(b"HEP3")))
        self.sent -= n
        self._buf.clear()
        self._lose(reason, n)

    def _alarm(self, force: bool = False) -> None:
        """One line per ALARM_EVERY seconds at most, when copies were lost since the last one."""
        total = sum(self.lost.values())
        now = time.monotonic()
        if total == self._told or (not force and now - self._alarmed < ALARM_EVERY):
            return
        self._alarmed, new, self._told = now, total - self._told, total
        why = ", ".join(f"{k} {n}" for k, n in sorted(self.lost.items()))
        try:
            self.alarms.write(escape(f"alarm: --hep-out {self.url}: {new} message copies not sent "
                                     f"({total} in all: {why}); the accounting goes on") + "\n")
            self.alarms.flush()
        except (OSError, ValueError):
            pass

    def _connect(self) -> None:
        now = time.monotonic()
        if now < self._next_connect:
            return
        self._next_connect = now + RECONNECT_EVERY
        if self._sock is not None:
            self._sock.close()
        s = socket.socket(self.family, socket.SOCK_STREAM)
        s.setblocking(False)
        self._sock, self._connected = s, False
        err = s.connect_ex(self.addr)
        if err in (0, errno.EINPROGRESS, errno.EALREADY):
            self._connected = err == 0
        else:
            self._lose_connection(err)

    def _lose_connection(self, err: int) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._connected = False
        if err:
            self.last_error = errno.errorcode.get(err, str(err))

    def _write(self) -> None:
        """As much of the buffer as the socket takes now (TCP)."""
        if self._sock is None:
            self._connect()
            if self._sock is None:
                return
        s = self._sock
        if not self._connected:
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._lose_connection(err)
                return
            try:
                s.getpeername()
            except OSError:
                return  # still connecting
            self._connected = True
        while self._buf:
            try:
                n = s.send(self._buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._lose_queued("connection_lost")  # what was in the buffer is gone with the connection
                self._lose_connection(e.errno or 0)
                return
            del self._buf[:n]


__all__ = ["HepOut", "MAX_BUFFER"]
