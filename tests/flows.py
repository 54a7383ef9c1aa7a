"""Call flows through a proxy, as parsed SipMessages with addresses and times (for tracker/engine tests).

UAC 10.0.0.1 → proxy 10.0.0.10 → UAS 10.0.0.2 (and UAS2 10.0.0.3 for forking), all port 5060.
Every helper returns what a SPAN port beside the proxy sees: both legs.
"""

from __future__ import annotations

import hashlib

from sipsniff_acc import sip
from sipsniff_acc.sip import SipMessage

UAC, PROXY, UAS, UAS2 = "10.0.0.1", "10.0.0.10", "10.0.0.2", "10.0.0.3"
TM_TAG = hashlib.md5(f"SER-TM/tags{PROXY}5060".encode()).hexdigest()  # noqa: S324 - Kamailio's tag format
SL_TAG = hashlib.md5(f"KAMAILIO-stateless{PROXY}5060".encode()).hexdigest()  # noqa: S324


def message(text: str, ts: float, src: str, dst: str, transport: str = "UDP") -> SipMessage:
    m = sip.parse(text.replace("\n", "\r\n").encode())
    m.ts, m.src, m.sport, m.dst, m.dport, m.transport = ts, src, 5060, dst, 5060, transport
    return m


class Call:
    """One dialog's messages; ``vias`` are (host, branch) top first."""

    def __init__(self, call_id: str = "call-1", ftag: str = "alice-tag", ruri: str = "sip:bob@example.com",
                 headers: str = "") -> None:
        self.call_id, self.ftag, self.ruri, self.headers = call_id, ftag, ruri, headers

    def request(self, method: str, ts: float, src: str, dst: str, vias: list[tuple[str, str]], cseq: int = 1,
                to_tag: str | None = None, ruri: str | None = None, body: str = "", extra: str = "",
                from_tag: str | None = None, cseq_method: str | None = None, route: str = "") -> SipMessage:
        via = "".join(f"Via: SIP/2.0/UDP {h}:5060;branch={b}\n" for h, b in vias)
        to = "<sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else "")
        text = (f"{method} {ruri or self.ruri} SIP/2.0\n{via}{route}Max-Forwards: 70\n"
                f"From: \"Alice\" <sip:alice@example.com>;tag={from_tag or self.ftag}\nTo: {to}\n"
                f"Call-ID: {self.call_id}\nCSeq: {cseq} {cseq_method or method}\n{self.headers}{extra}"
                f"Content-Length: {len(body)}\n\n{body}")
        return message(text, ts, src, dst)

    def reply(self, code: int, reason: str, ts: float, src: str, dst: str, vias: list[tuple[str, str]],
              cseq: int = 1, method: str = "INVITE", to_tag: str | None = None, body: str = "",
              extra: str = "", from_tag: str | None = None) -> SipMessage:
        via = "".join(f"Via: SIP/2.0/UDP {h}:5060;branch={b}\n" for h, b in vias)
        to = "<sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else "")
        text = (f"SIP/2.0 {code} {reason}\n{via}From: \"Alice\" <sip:alice@example.com>;tag={from_tag or self.ftag}\n"
                f"To: {to}\nCall-ID: {self.call_id}\nCSeq: {cseq} {method}\n{extra}Content-Length: {len(body)}\n\n{body}")
        return message(text, ts, src, dst)


C = ("10.0.0.1", "z9hG4bK-uac1")  #: the caller's Via
P = ("10.0.0.10", "z9hG4bK-px1")  #: the proxy's Via on the branch to UAS
P2 = ("10.0.0.10", "z9hG4bK-px2")  #: on the branch to UAS2


def answered_call(call: Call | None = None, t: float = 1000.0, bye_from_callee: bool = False) -> list[SipMessage]:
    """INVITE, 100, 180, 200, ACK, then BYE/200 (both legs)."""
    c = call or Call()
    ttag = "bob-tag"
    msgs = [
        c.request("INVITE", t, UAC, PROXY, [C]),
        c.reply(100, "trying -- your call is important to us", t + 0.001, PROXY, UAC, [C]),
        c.request("INVITE", t + 0.002, PROXY, UAS, [P, C]),
        c.reply(180, "Ringing", t + 0.1, UAS, PROXY, [P, C], to_tag=ttag),
        c.reply(180, "Ringing", t + 0.101, PROXY, UAC, [C], to_tag=ttag),
        c.reply(200, "OK", t + 2.0, UAS, PROXY, [P, C], to_tag=ttag),
        c.reply(200, "OK", t + 2.001, PROXY, UAC, [C], to_tag=ttag),
        c.request("ACK", t + 2.01, UAC, PROXY, [("10.0.0.1", "z9hG4bK-ack1")], to_tag=ttag),
        c.request("ACK", t + 2.011, PROXY, UAS, [("10.0.0.10", "z9hG4bK-pack1"), ("10.0.0.1", "z9hG4bK-ack1")],
                  to_tag=ttag),
    ]
    if bye_from_callee:
        route = f"Route: <sip:{PROXY};lr;ftag={c.ftag}>\n"
        b, pb = ("10.0.0.2", "z9hG4bK-bye2"), ("10.0.0.10", "z9hG4bK-pbye2")
        msgs += [
            c.request("BYE", t + 60, UAS, PROXY, [b], cseq=1, from_tag=ttag, to_tag=c.ftag, route=route),
            c.request("BYE", t + 60.001, PROXY, UAC, [pb, b], cseq=1, from_tag=ttag, to_tag=c.ftag),
            c.reply(200, "OK", t + 60.01, UAC, PROXY, [pb, b], method="BYE", from_tag=ttag, to_tag=c.ftag),
            c.reply(200, "OK", t + 60.011, PROXY, UAS, [b], method="BYE", from_tag=ttag, to_tag=c.ftag),
        ]
    else:
        b, pb = ("10.0.0.1", "z9hG4bK-bye1"), ("10.0.0.10", "z9hG4bK-pbye1")
        msgs += [
            c.request("BYE", t + 60, UAC, PROXY, [b], cseq=2, to_tag=ttag),
            c.request("BYE", t + 60.001, PROXY, UAS, [pb, b], cseq=2, to_tag=ttag),
            c.reply(200, "OK", t + 60.01, UAS, PROXY, [pb, b], cseq=2, method="BYE", to_tag=ttag),
            c.reply(200, "OK", t + 60.011, PROXY, UAC, [b], cseq=2, method="BYE", to_tag=ttag),
        ]
    return msgs


def rejected_call(code: int = 486, reason: str = "Busy Here", call: Call | None = None, t: float = 1000.0,
                  extra: str = "") -> list[SipMessage]:
    c = call or Call()
    ttag = "bob-tag"
    return [
        c.request("INVITE", t, UAC, PROXY, [C]),
        c.request("INVITE", t + 0.002, PROXY, UAS, [P, C]),
        c.reply(180, "Ringing", t + 0.1, UAS, PROXY, [P, C], to_tag=ttag),
        c.reply(180, "Ringing", t + 0.101, PROXY, UAC, [C], to_tag=ttag),
        c.reply(code, reason, t + 3.0, UAS, PROXY, [P, C], to_tag=ttag, extra=extra),
        c.request("ACK", t + 3.001, PROXY, UAS, [P], to_tag=ttag),
        c.reply(code, reason, t + 3.002, PROXY, UAC, [C], to_tag=ttag, extra=extra),
        c.request("ACK", t + 3.01, UAC, PROXY, [C], to_tag=ttag),
    ]


def local_reject(code: int = 404, reason: str = "Not Here", call: Call | None = None, t: float = 1000.0,
                 stateless: bool = False) -> list[SipMessage]:
    """The proxy answers the INVITE itself (t_reply; or sl_send_reply when ``stateless``)."""
    c = call or Call()
    tag = f"{SL_TAG}.a1b2c3d4" if stateless else f"{TM_TAG}-a1b2c3d4"
    msgs = [c.request("INVITE", t, UAC, PROXY, [C])]
    if not stateless:
        msgs.append(c.reply(100, "trying -- your call is important to us", t + 0.001, PROXY, UAC, [C]))
    msgs += [c.reply(code, reason, t + 0.002, PROXY, UAC, [C], to_tag=tag),
             c.request("ACK", t + 0.01, UAC, PROXY, [C], to_tag=tag)]
    return msgs
