"""A capture of poison calls followed by normal calls, for the RADIUS/Diameter acceptance
tests (issue 10): one bad record must never keep the records after it from their server.

Single-leg UDP calls 192.0.2.1 → 192.0.2.2 (INVITE/200/ACK, BYE/200): with every request
flagged, each call gives two records (INVITE 200, BYE 200).
"""

from __future__ import annotations

from pathlib import Path

from tests.builders import ether, ip4_udp, pcap_bytes, sip_request, sip_response

A, B = "192.0.2.1", "192.0.2.2"
LONG_CALL_ID = "poison-" + "c" * 293  #: 300 bytes: over RADIUS's 253
LONG_TO_TAG = "T" * 300
NORMAL = 20


def call(t: float, call_id: str, to_tag: str = "totag1", extra: tuple[str, ...] = ()) -> list[tuple[float, bytes]]:
    """One answered call and its BYE, as Ethernet frames with times."""
    def req(dt: float, method: str, n: int, cseq: int = 1, to: str | None = None) -> tuple[float, bytes]:
        return (t + dt, ether(ip4_udp(sip_request(method, call_id=call_id, cseq=cseq, from_tag="fromtag1",
                                                  to_tag=to, branch=f"z9hG4bK-{int(t)}-{n}",
                                                  extra_headers=extra), A, B)))

    def rep(dt: float, method: str, n: int, cseq: int = 1) -> tuple[float, bytes]:
        return (t + dt, ether(ip4_udp(sip_response(200, "OK", call_id=call_id, cseq=cseq, cseq_method=method,
                                                   from_tag="fromtag1", to_tag=to_tag,
                                                   branch=f"z9hG4bK-{int(t)}-{n}"), B, A)))

    return [req(0, "INVITE", 1), rep(0.1, "INVITE", 1), req(0.2, "ACK", 2, to=to_tag),
            req(1.0, "BYE", 3, cseq=2, to=to_tag), rep(1.1, "BYE", 3, cseq=2)]


def poison_capture(path: Path, markers: tuple[str, ...] = ()) -> Path:
    """Poison first (a 300-byte Call-ID, a 300-byte To-tag, a NUL in the X-Extra header the
    extras use), then one call per marker (Call-ID <marker>@example.com: the test Diameter
    peer answers by it), then NORMAL calls whose Call-IDs are normal-<i>@example.com."""
    frames = call(1000, LONG_CALL_ID, extra=("X-Extra: long",))
    frames += call(1010, "poison-totag@example.com", to_tag=LONG_TO_TAG, extra=("X-Extra: totag",))
    frames += call(1020, "poison-nul@example.com", extra=("X-Extra: a\0b",))
    for k, marker in enumerate(markers):
        frames += call(1030 + 10 * k, f"{marker}@example.com", extra=(f"X-Extra: {marker}",))
    for i in range(NORMAL):
        frames += call(1100 + 10 * i, f"normal-{i}@example.com", extra=(f"X-Extra: user{i}",))
    path.write_bytes(pcap_bytes(frames))
    return path
