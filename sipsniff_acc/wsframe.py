"""WebSocket framing (RFC 6455 §5) for SIP over WebSocket (RFC 7118).

Frames are unmasked and fragmented messages (continuation frames) joined; each complete
text or binary message is one SIP message (RFC 7118 §5). Control frames (ping, pong,
close) are skipped. Pure: bytes in, messages out.
"""

from __future__ import annotations

from typing import Final

from sipsniff_acc.limits import DEFAULT_MAX_SIP_MESSAGE
from sipsniff_acc.sip import looks_like_sip

MAX_WS_MESSAGE: Final = DEFAULT_MAX_SIP_MESSAGE  #: default bound on one message (limits.max_sip_message)


def _header(buf: bytes | bytearray) -> tuple[int, int, int, int, bytes] | None:
    """(fin+opcode byte, header length, payload length, opcode, mask) or None if incomplete."""
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    n = b1 & 0x7F
    at = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = int.from_bytes(buf[2:4], "big")
        at = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n = int.from_bytes(buf[2:10], "big")
        at = 10
    mask = b""
    if b1 & 0x80:
        if len(buf) < at + 4:
            return None
        mask = bytes(buf[at : at + 4])
        at += 4
    return b0, at, n, b0 & 0x0F, mask


def _unmask(data: bytes, mask: bytes) -> bytes:
    if not mask:
        return data
    # XOR with the repeated 4-byte key, as one big-integer operation (fast in CPython)
    key = (mask * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(len(data), "big")


def looks_like_ws_sip(buf: bytes | bytearray) -> bool:
    """A text/binary WebSocket frame carrying SIP (a capture that starts after the upgrade)."""
    h = _header(buf)
    if h is None or h[0] & 0x70 or h[3] not in (1, 2):
        return False
    _, at, n, _, mask = h
    head = bytes(buf[at : at + min(n, 64)])
    return looks_like_sip(_unmask(head, mask[: len(head)] if len(head) < 4 else mask)) if head else False


class WsDecoder:
    """One direction of a WebSocket connection."""

    def __init__(self, max_message: int = MAX_WS_MESSAGE) -> None:
        self.max_message = max_message  #: bytes of one message (frames joined): longer is ws_bad_frame
        self._parts: list[bytes] = []
        self._size = 0

    def reset(self) -> None:
        self._parts.clear()
        self._size = 0

    def feed(self, buf: bytearray) -> tuple[list[bytes], list[str]]:
        """Consume whole frames from ``buf``; return complete messages and anomaly names."""
        messages: list[bytes] = []
        problems: list[str] = []
        while True:
            h = _header(buf)
            if h is None:
                break
            b0, at, n, opcode, mask = h
            if n > self.max_message or b0 & 0x70:  # oversized, or reserved bits we never negotiated
                problems.append("ws_bad_frame")
                buf.clear()
                self.reset()
                break
            if len(buf) < at + n:
                break
            payload = _unmask(bytes(buf[at : at + n]), mask)
            del buf[: at + n]
            if opcode >= 8:  # control frames may interleave with a fragmented message
                continue
            if opcode in (1, 2):
                if self._parts:
                    problems.append("ws_unfinished_message")
                self.reset()
            elif not self._parts and opcode == 0:
                problems.append("ws_orphan_continuation")
                continue
            self._parts.append(payload)
            self._size += n
            if self._size > self.max_message:
                problems.append("ws_bad_frame")
                self.reset()
                continue
            if b0 & 0x80:  # FIN
                messages.append(b"".join(self._parts))
                self.reset()
        return messages, problems
