"""Our Diameter codec and peer logic, against a scripted peer on a loopback socket.
(Interop with an independent implementation is tests/aaa/test_diameter.py, Erlang/OTP.)"""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from sipsniff_acc.emitters import diameter as d
from sipsniff_acc.emitters.spool import BackendDown, RecordRejected
from sipsniff_acc.processrun import records_of
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import parse_rules
from tests.flows import Call, answered_call, rejected_call


def test_codec_round_trip_and_padding() -> None:
    raw = d.message(d.ACR, d.FLAG_R | d.FLAG_P, 3, 7, 9, [
        d.utf8(d.SESSION_ID, "h;1;2;x"), d.u32(d.RECORD_TYPE, d.START),
        d.utf8(1, "abcde", mandatory=False, vendor=d.VENDOR)])
    assert len(raw) % 4 == 0 and int.from_bytes(raw[1:4], "big") == len(raw)
    m = d.parse(raw)
    assert (m.command, m.flags, m.app, m.hbh, m.e2e) == (d.ACR, 0xC0, 3, 7, 9)
    assert m.avps == [(d.SESSION_ID, 0, b"h;1;2;x"), (d.RECORD_TYPE, 0, struct.pack(">I", 2)), (1, d.VENDOR, b"abcde")]
    assert m.u32(d.RECORD_TYPE) == 2


RULES = parse_rules("acc: {diameter_flag: 1, diameter_missed_flag: 2, failed_transaction_flag: 3, "
                    "diameter_client_host: 127.0.0.1, diameter_client_port: 1, diameter_timeout: 2}\n"
                    "route:\n  - if: {method: INVITE}\n    setflag: [1, 2, 3]\n  - if: {method: BYE}\n    setflag: [1]\n")


def test_record_types() -> None:
    recs = records_of([*answered_call(), *rejected_call(call=Call(call_id="b"))], RULES)
    assert [(r.method, d.record_type(r)) for r in recs] == [
        ("INVITE", d.START), ("BYE", d.STOP), ("INVITE", d.EVENT), ("INVITE", d.EVENT)]
    assert d.record_number(recs[0], d.START) == 0 and d.record_number(recs[1], d.STOP) > 0
    assert d.session_id("h", "call-1") == d.session_id("h", "call-1") != d.session_id("h", "b")


def _peer(script: list[str]) -> tuple[socket.socket, threading.Thread, list[d.Message]]:
    """A peer that answers CER, then for each ACR follows the script: 'ok', 'dwr-then-ok', 'refuse'."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    seen: list[d.Message] = []

    def read(conn: socket.socket) -> d.Message:
        head = b""
        while len(head) < 4:
            head += conn.recv(4 - len(head))
        length = int.from_bytes(head[1:4], "big")
        body = head
        while len(body) < length:
            body += conn.recv(length - len(body))
        m = d.parse(body)
        seen.append(m)
        return m

    def answer(conn: socket.socket, m: d.Message, code: int, how: str = "") -> None:
        """how: '' a Result-Code; 'ebit' with the E flag (a protocol error); 'exp' an Experimental-Result."""
        if how == "exp":  # Experimental-Result (297) { Vendor-Id, Experimental-Result-Code (298) }
            avps = [d.avp(297, d.u32(d.VENDOR_ID, 10415) + d.u32(298, code))]
        else:
            avps = [d.u32(d.RESULT_CODE, code)]
        avps.append(d.utf8(d.ORIGIN_HOST, "peer"))
        if code // 1000 == 5 and how != "exp":  # Failed-AVP (279) { Acct-Session-Id }, Error-Message (281)
            avps += [d.avp(279, d.utf8(d.ACCT_SESSION_ID, "x")), d.utf8(281, "bad\nvalue")]
        conn.sendall(d.message(m.command, d.FLAG_E if how == "ebit" else 0, m.app, m.hbh, m.e2e, avps))

    def run() -> None:
        conn, _ = srv.accept()
        conn.settimeout(5)
        answer(conn, read(conn), 2001)  # CEA
        for step in script:
            m = read(conn)
            if step == "dwr-then-ok":
                conn.sendall(d.message(d.DWR, d.FLAG_R, 0, 77, 78, [d.utf8(d.ORIGIN_HOST, "peer")]))
                dwa = read(conn)
                assert dwa.command == d.DWR and not dwa.flags & d.FLAG_R and dwa.u32(d.RESULT_CODE) == 2001
            if ":" in step:  # "code:5004", "ebit:3009", "exp:5012"
                how, _, code = step.partition(":")
                answer(conn, m, int(code), how)
            else:
                answer(conn, m, 3002 if step == "refuse" else 2001)
        try:
            m = read(conn)  # DPR
            answer(conn, m, 2001)
        except (OSError, AssertionError):
            pass
        conn.close()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return srv, th, seen


def test_peer_dialogue_cer_acr_dwr_dpr() -> None:
    recs = records_of(answered_call(), RULES)
    srv, th, seen = _peer(["ok", "dwr-then-ok"])
    em = d.DiameterEmitter(RULES)
    em.peer = ("127.0.0.1", srv.getsockname()[1])
    em.deliver(recs)
    em.close()
    th.join(5)
    srv.close()
    assert [m.command for m in seen] == [d.CER, d.ACR, d.ACR, d.DWR, d.DPR]
    assert em.sent == 2 and seen[1].u32(d.ACCT_APP_ID) == 3 and seen[1].flags & d.FLAG_P


def test_an_error_answer_keeps_the_record() -> None:
    recs = records_of(answered_call(), RULES)
    srv, th, _seen = _peer(["ok", "refuse"])
    em = d.DiameterEmitter(RULES)
    em.peer = ("127.0.0.1", srv.getsockname()[1])
    with pytest.raises(BackendDown) as e:
        em.deliver(recs)
    assert e.value.delivered == 1 and "Result-Code 3002" in str(e.value)
    em.close()
    th.join(5)
    srv.close()


def test_result_codes_transient_or_permanent() -> None:
    """RFC 6733 §7.1: 5xxx and 3008/3009 are about this request (dead-letter it); 4xxx, the
    other 3xxx (busy, undeliverable, peer configuration) and a missing code are retried."""
    assert [d.classify(c) for c in (2001, 2002)] == [d.OK, d.OK]
    assert [d.classify(c) for c in (5004, 5012, 5005, 5999, 3008, 3009)] == [d.PERMANENT] * 6
    assert [d.classify(c) for c in (3002, 3004, 3005, 3001, 3010, 3999, 4001, 4002, 1001, None)] == [d.TRANSIENT] * 10


def _deliver_against(script: list[str], recs: list[AccRecord]
                     ) -> tuple[d.DiameterEmitter, pytest.ExceptionInfo[Exception]]:
    srv, th, _seen = _peer(script)
    em = d.DiameterEmitter(RULES)
    em.peer = ("127.0.0.1", srv.getsockname()[1])
    with pytest.raises((RecordRejected, BackendDown)) as e:
        em.deliver(recs)
    em.close()
    th.join(5)
    srv.close()
    return em, e


@pytest.mark.parametrize(("step", "says"), [
    ("code:5004", "Result-Code 5004 (INVALID_AVP_VALUE), Failed-AVP 44, Error-Message 'bad?value'"),
    ("code:5012", "Result-Code 5012 (UNABLE_TO_COMPLY)"),
    ("ebit:3009", "Result-Code 3009 (INVALID_AVP_BITS), E bit"),
    ("ebit:3008", "Result-Code 3008 (INVALID_HDR_BITS), E bit"),
    ("exp:5030", "Result-Code 5030"),
])
def test_a_permanent_refusal_rejects_that_record_only(step: str, says: str) -> None:
    """Before: any answer but 2001 was BackendDown, so a 5004 was retried for ever."""
    recs = records_of(answered_call(), RULES)
    em, e = _deliver_against(["ok", step], recs)
    assert isinstance(e.value, RecordRejected) and e.value.index == 1
    assert says in e.value.reason
    assert em.sent == 1 and em.rejected == 1


@pytest.mark.parametrize("step", ["ebit:3004", "ebit:3002", "code:4002", "exp:4001"])
def test_a_transient_failure_keeps_the_record(step: str) -> None:
    recs = records_of(answered_call(), RULES)
    _em, e = _deliver_against(["ok", step], recs)
    assert isinstance(e.value, BackendDown) and e.value.delivered == 1 and "transient" in str(e.value)


def test_values_are_fitted_nul_and_invalid_text() -> None:
    em = d.DiameterEmitter(RULES)
    r = records_of(answered_call(), RULES)[0]
    r.call_id, r.reason = "a\0b", "x\udcffy"
    m = d.parse(em.acr(r))
    assert m.first(d.ACCT_SESSION_ID) == "a\ufffdb".encode()
    assert next(v for c, vendor, v in m.avps if (c, vendor) == (d.V_REASON, d.VENDOR)) == "x\ufffdy".encode()
    assert em.fitted == {"Acct-Session-Id: NUL replaced": 1, "Reason: invalid text replaced": 1}


def test_an_unencodable_record_is_rejected_before_any_io() -> None:
    em = d.DiameterEmitter(RULES)  # the peer (port 1) is never contacted: no BackendDown
    r = records_of(answered_call(), RULES)[0]
    r.extras = {"diameter": [("not-a-code", "v")]}  # a spooled record from other rules
    with pytest.raises(RecordRejected) as e:
        em.deliver([r])
    assert e.value.index == 0 and "cannot be encoded" in e.value.reason
