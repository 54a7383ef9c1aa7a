"""Poison calls and normal calls as a pcap, and the rules that account them (issue 10).

Each call is INVITE / 200 / ACK / BYE / 200 between two UAs (single-leg mode: every server
transaction is accounted), so a call gives two `acc` rows: the INVITE's and the BYE's.
The poison calls carry one bad value each, in this order: a NUL byte in User-Agent (db_extra
`ua`), a 300-character Call-ID, a 200-character To-tag, a 200-character reason phrase, a
200-character X-Extra header (db_extra `xx`; sent on the INVITE only).
"""

from __future__ import annotations

from pathlib import Path

from tests.builders import ether, ip4_udp, pcap_bytes, sip_request, sip_response

RULES = """\
acc:
  db_flag: 1
  log_flag: 1
  acc_extra_nullable: true
  db_extra: "ua=$hdr(User-Agent);xx=$hdr(X-Extra)"
route:
  - if: {method: INVITE, in_dialog: false}
    setflag: [1]
  - if: {method: BYE, in_dialog: true}
    setflag: [1]
"""

LONG = 200
POISONS = ("nul", "callid", "totag", "reason", "extra")
NORMAL_CALLS = 20


def call(n: int, t: float, *, call_id: str | None = None, to_tag: str | None = None, reason: str = "OK",
         ua: str = "sipp", extra: str | None = None) -> list[tuple[float, bytes]]:
    """One answered and hung-up call as (time, frame) pairs."""
    cid = call_id or f"call-{n}@192.0.2.1"
    tag = to_tag or f"tt{n}"
    ftag = f"ft{n}"
    hdrs = (f"User-Agent: {ua}",) + ((f"X-Extra: {extra}",) if extra else ())
    a, b = "192.0.2.1", "192.0.2.2"
    msgs = [
        (a, b, sip_request("INVITE", call_id=cid, branch=f"z9hG4bK-i{n}", from_tag=ftag, extra_headers=hdrs)),
        (b, a, sip_response(200, reason, call_id=cid, branch=f"z9hG4bK-i{n}", from_tag=ftag, to_tag=tag)),
        (a, b, sip_request("ACK", call_id=cid, branch=f"z9hG4bK-a{n}", from_tag=ftag, to_tag=tag,
                           extra_headers=(f"User-Agent: {ua}",))),
        (a, b, sip_request("BYE", call_id=cid, cseq=2, branch=f"z9hG4bK-b{n}", from_tag=ftag, to_tag=tag,
                           extra_headers=(f"User-Agent: {ua}",))),
        (b, a, sip_response(200, "OK", call_id=cid, cseq=2, cseq_method="BYE", branch=f"z9hG4bK-b{n}",
                            from_tag=ftag, to_tag=tag)),
    ]
    return [(t + i * 0.01, ether(ip4_udp(m, src=s, dst=d))) for i, (s, d, m) in enumerate(msgs)]


def poison_then_normal(poisons: tuple[str, ...] = POISONS, normal: int = NORMAL_CALLS) -> bytes:
    """The pcap: the poison calls first, then ``normal`` clean calls, one second apart."""
    frames: list[tuple[float, bytes]] = []
    t = 1_700_000_000.0
    for i, kind in enumerate(poisons):
        kw: dict[str, str] = {
            "nul": {"ua": "bad\x00agent"}, "callid": {"call_id": "c" * 290 + "@192.0.2.1"},
            "totag": {"to_tag": "t" * LONG}, "reason": {"reason": "R" * LONG}, "extra": {"extra": "x" * LONG},
        }[kind]
        frames += call(1000 + i, t, **kw)
        t += 1
    for n in range(normal):
        frames += call(n, t)
        t += 1
    return pcap_bytes(frames)


def write_case(tmp: Path, poisons: tuple[str, ...] = POISONS, normal: int = NORMAL_CALLS) -> tuple[Path, Path]:
    """(pcap, rules.yaml) in ``tmp``."""
    pcap, rules = tmp / "poison.pcap", tmp / "rules.yaml"
    pcap.write_bytes(poison_then_normal(poisons, normal))
    rules.write_text(RULES)
    return pcap, rules
