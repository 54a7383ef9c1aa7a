"""Dialog CDRs (cdr.py) on crafted flows: when Kamailio's acc_cdr.c writes one, with what times and extras.

The flows are tests/flows.py's two-leg calls (what a SPAN port beside the proxy sees); the
Kamailio behaviour each test pins is in acc-spec §7 and the recordings of tests/conformance.
"""

from __future__ import annotations

import io
import socket
import sqlite3
from pathlib import Path

import pytest

from sipsniff_acc.acc import AccEngine
from sipsniff_acc.cdr import CDR, CdrEngine, cdr_line, msec, time2string
from sipsniff_acc.emitters.sql import SqlEmitter
from sipsniff_acc.emitters.syslog import LogEmitter
from sipsniff_acc.limits import Limits
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import RulesError, RulesFile, parse_address, parse_rules
from sipsniff_acc.sip import SipMessage
from sipsniff_acc.tracker import TransactionTracker
from tests.flows import PROXY, UAC, UAS, Call, answered_call, local_reject, rejected_call

BASE = """\
proxy: {{addresses: ["10.0.0.10:5060"]}}
acc:
  log_flag: 1
  log_missed_flag: 2
  db_flag: 1
  db_missed_flag: 2
  failed_transaction_flag: 3
  cdr_enable: true
  cdrs_table: acc_cdrs
  cdr_extra: "c_from=$fu;c_rs=$rs;c_si=$si;c_ru=$ru;c_v=$dlg_var(v);c_none=$dlg_var(none)"
{acc}
{top}
route:
  - if: {{in_dialog: true, method: BYE}}
    setflag: [1, 3]
  - if: {{in_dialog: false, method: INVITE}}
    setflag: [1, 2, 3]
    dlg_manage: true
    set_dlg_var: {{v: "u=$fU"}}
"""


def rules_of(acc: str = "", top: str = "", base: str = BASE) -> RulesFile:
    return parse_rules(base.format(acc=acc, top=top))


def run(msgs: list[SipMessage], rules: RulesFile, limits: Limits | None = None) -> tuple[list[AccRecord], CdrEngine]:
    """What AccPipeline does with CDRs on: every message seen, every event through acc then CDRs."""
    tracker = TransactionTracker([parse_address(a) for a in rules.proxy.addresses], rules.tm.wait_timer,
                                 rules.tm.fr_timer, rules.tm.fr_inv_timer, limits)
    engine = AccEngine(rules, limits, tracker.stats)
    cdr = CdrEngine(rules, engine)
    out: list[AccRecord] = []
    for m in msgs:
        out += cdr.seen(m)
        for ev in tracker.feed(m):
            out += cdr.feed(ev, engine.feed(ev))
    for ev in tracker.finish():
        out += cdr.feed(ev, engine.feed(ev))
    out += cdr.finish()
    return out, cdr


def cdrs(records: list[AccRecord]) -> list[dict[str, str | None]]:
    return [dict(r.extras[CDR]) for r in records if r.kind == CDR]


def kinds(records: list[AccRecord]) -> list[str]:
    return [f"{r.kind}:{r.method}" for r in records]


def test_time2string_truncates_to_milliseconds_like_kamailio() -> None:
    assert msec(1796182424.0619) == 1796182424061
    assert msec(1796182424.999999) == 1796182424999
    assert time2string(1796182424061) == "1796182424.061"
    assert time2string(1200) == "1.200"
    assert time2string(-1) == "-1.999"  # timersub's normalisation: (-1 s, 999 ms)


def test_answered_call_gives_one_cdr_after_the_bye_reply() -> None:
    t = 1000.0
    recs, cdr = run(answered_call(t=t), rules_of())
    assert kinds(recs) == ["answered:INVITE", "answered:BYE", "cdr:INVITE"]
    (c,) = cdrs(recs)
    # start: the proxy's 100 Trying (t + 1 ms), end: the proxy's forward of the BYE (t + 60.001)
    assert c["start_time"] == time2string(msec(t + 0.001)) == "1000.001"
    assert c["end_time"] == "1060.001"
    assert c["duration"] == "60.000"
    assert c["c_from"] == "sip:alice@example.com" and c["c_rs"] is None and c["c_si"] == UAC
    assert c["c_v"] == "u=alice" and c["c_none"] is None
    r = [r for r in recs if r.kind == CDR][0]
    assert (r.call_id, r.from_tag, r.to_tag, r.code, r.table, r.backends) == (
        "call-1", "alice-tag", "bob-tag", "200", "acc_cdrs", ("log", "db"))
    assert r.ts == pytest.approx(t + 60.011) and r.record_id
    assert cdr.stats.written == 1


def test_the_callees_bye_ends_the_dialog_too_and_extras_come_from_that_bye() -> None:
    recs, _ = run(answered_call(bye_from_callee=True), rules_of())
    (c,) = cdrs(recs)
    assert c["c_si"] == UAS and c["end_time"] == "1060.001"


def test_a_failed_dialog_writes_between_the_missed_and_the_answered_record() -> None:
    recs, _ = run(rejected_call(486, "Busy Here"), rules_of())
    assert kinds(recs) == ["missed:INVITE", "cdr:INVITE", "answered:INVITE"]
    (c,) = cdrs(recs)
    # start = end = creation (no 100 in this flow: the proxy's forward of the INVITE), duration "0";
    # extras on the reply as received from the callee: $rs set, $si the callee, $ru null on a reply
    assert c["start_time"] == c["end_time"] == "1000.002" and c["duration"] == "0"
    assert (c["c_rs"], c["c_si"], c["c_ru"]) == ("486", UAS, None)


def test_cdr_on_failed_0_writes_nothing_for_a_failed_dialog() -> None:
    recs, _ = run(rejected_call(486, "Busy Here"), rules_of("  cdr_on_failed: false"))
    assert kinds(recs) == ["missed:INVITE", "answered:INVITE"]


def test_the_proxys_own_reply_writes_first_with_extras_of_the_request() -> None:
    recs, _ = run(local_reject(404, "Not Here"), rules_of())
    assert kinds(recs) == ["cdr:INVITE", "missed:INVITE", "answered:INVITE"]
    (c,) = cdrs(recs)
    assert (c["c_rs"], c["c_si"], c["c_ru"]) == (None, UAC, "sip:bob@example.com")


def test_no_dlg_manage_no_cdr_and_check_rules_says_why() -> None:
    text = BASE.format(acc="", top="").replace("    dlg_manage: true\n", "")
    with pytest.raises(RulesError, match="no route rule has dlg_manage: true"):
        parse_rules(text)
    rules = parse_rules(text + "dialog: {dlg_flag: 5}\n")
    recs, _ = run(answered_call(), rules)  # flag 5 never set: no dialog tracked
    assert not cdrs(recs)
    rules = parse_rules(text.replace("setflag: [1, 2, 3]", "setflag: [1, 2, 3, 5]") + "dialog: {dlg_flag: 5}\n")
    assert len(cdrs(run(answered_call(), rules)[0])) == 1


def test_start_on_confirmed_starts_at_the_ack() -> None:
    recs, _ = run(answered_call(), rules_of("  cdr_start_on_confirmed: true"))
    (c,) = cdrs(recs)
    assert c["start_time"] == "1002.011"  # the proxy's relay of the ACK (the caller's came at 1002.010)
    assert c["duration"] == "57.990"


def _answered_no_bye(call: Call, t: float) -> list[SipMessage]:
    return answered_call(call, t)[:9]


def test_an_expired_dialog_is_written_only_with_cdr_expired_dlg_enable_and_only_dlg_vars() -> None:
    msgs = _answered_no_bye(Call(), 1000.0)
    later = answered_call(Call("call-2", "carol-tag"), 1030.0)  # packet time goes on
    bye = answered_call(Call(), 1000.0)[9:]
    for m in bye:
        m.ts += 40  # the BYE after the expiry: no dialog any more, no CDR
    flow = sorted([*msgs, *later, *bye], key=lambda m: m.ts)
    top = "dialog: {default_timeout: 10}"
    recs, cdr = run(flow, rules_of("  cdr_expired_dlg_enable: true", top))
    got = [r for r in recs if r.kind == CDR]
    assert [r.call_id for r in got] == ["call-1", "call-2"]
    c = dict(got[0].extras[CDR])
    # confirmed (ACKed) at 1002.011: expires 10 s later; end = expiry; only $dlg_var extras
    assert c["end_time"] == "1012.010" and c["start_time"] == "1000.001"
    assert (c["c_v"], c["c_from"], c["c_si"]) == ("u=alice", None, None)
    assert got[0].ts == pytest.approx(1012.01) and cdr.stats.expired == 2  # call-2 expires at 1042.01
    recs, cdr = run(flow, rules_of("", top))
    assert not [r for r in recs if r.kind == CDR] and cdr.stats.expired == 2


def test_in_dialog_requests_refresh_the_lifetime() -> None:
    c = Call()
    msgs = _answered_no_bye(c, 1000.0)
    msgs.append(c.request("INFO", 1009.0, UAC, PROXY, [("10.0.0.1", "z9hG4bK-info")], cseq=3, to_tag="bob-tag"))
    msgs.append(Call("other").request("OPTIONS", 1025.0, UAC, PROXY, [("10.0.0.1", "z9hG4bK-o")]))  # time goes on
    recs, _ = run(msgs, rules_of("  cdr_expired_dlg_enable: true", "dialog: {default_timeout: 10}"))
    (got,) = cdrs(recs)
    assert got["end_time"] == "1019.000"  # 10 s after the INFO, not after the ACK


def test_cdr_skip_suppresses_the_cdr() -> None:
    recs, cdr = run(answered_call(), rules_of("  cdr_skip: v"))
    assert not cdrs(recs) and cdr.stats.skipped == 1


def test_dialogs_are_bounded_and_the_evictions_counted() -> None:
    flows = [m for i in range(3) for m in _answered_no_bye(Call(f"c{i}", f"t{i}"), 1000.0 + i)]
    flows.sort(key=lambda m: m.ts)
    _recs, cdr = run(flows, rules_of(), Limits(max_dialogs=2))
    assert len(cdr.dialogs) == 2 and cdr.stats.evicted == 1


@pytest.mark.parametrize(("acc", "top", "route_extra", "why"), [
    ("  log_extra: \"v=$dlg_var(v)\"", "", "", "acc.log_extra: $dlg_var() is read in cdr_extra only"),
    ("  cdrs_table: \"acc cdrs\"", "", "", "acc.cdrs_table: 'acc cdrs' is not a valid table name"),
    ("  cdr_facility: LOG_NOPE", "", "", "acc.cdr_facility: 'LOG_NOPE': one of"),
    ("  cdr_start_id: \"1x\"", "", "", "acc.cdr_start_id: '1x' is not a valid dialog variable / column name"),
    ("", "dialog: {default_timeout: 0}", "", "dialog.default_timeout: Input should be greater than 0"),
    ("", "failure_route:\n  - set_dlg_var: {x: y}", "", "failure_route.0.set_dlg_var: set_dlg_var is a route"),
    ("", "", "    set_dlg_var: {v: \"$nope\"}", "set_dlg_var v: unknown pseudo-variable $nope"),
])
def test_rules_mistakes_are_one_line_each(acc: str, top: str, route_extra: str, why: str) -> None:
    text = BASE.format(acc=acc.replace("  cdrs_table: acc_cdrs\n", ""), top=top) + route_extra + "\n"
    if "cdrs_table" in acc:
        text = text.replace("  cdrs_table: acc_cdrs\n", "", 1)
    if route_extra:
        text = text.replace('    set_dlg_var: {v: "u=$fU"}\n', "")
    with pytest.raises(RulesError) as e:
        parse_rules(text, "rules.yaml")
    assert any(why in p for p in e.value.problems), e.value.problems
    assert all(p.startswith("rules.yaml:") and "\n" not in p for p in e.value.problems)


def test_openser_profile_has_no_cdrs() -> None:
    with pytest.raises(RulesError, match="OpenSER 1.2 has no dialog CDRs"):
        parse_rules("profile: openser-1.2\n" + BASE.format(acc="", top=""))


def test_log_line_and_facility(tmp_path: Path) -> None:
    rules = rules_of("  cdr_facility: LOG_LOCAL3")
    recs, _ = run(answered_call(), rules)
    r = [r for r in recs if r.kind == CDR][0]
    assert cdr_line(r) == ("start_time=1000.001; end_time=1060.001; duration=60.000; c_from=sip:alice@example.com; "
                           "c_rs=; c_si=10.0.0.1; c_ru=sip:bob@example.com; c_v=u=alice; c_none=")
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.9.200", 0))
    rx.settimeout(5)
    out = io.StringIO()
    em = LogEmitter(rules, out, f"udp://127.0.9.200:{rx.getsockname()[1]}")
    try:
        em.emit(recs)
        datagrams = [rx.recv(4096) for _ in range(3)]
    finally:
        em.close()
        rx.close()
    lines = out.getvalue().splitlines()
    assert lines[-1] == "NOTICE: acc [acc_cdr.c:395]: log_write_cdr(): " + cdr_line(r)
    assert datagrams[-1].startswith(b"<%d>" % (19 * 8 + 5))  # LOG_LOCAL3, NOTICE
    assert datagrams[0].startswith(b"<29>")  # the ACC lines keep log_facility (LOG_DAEMON)


def test_control_characters_in_a_cdr_value_are_escaped() -> None:
    r = AccRecord(CDR, 1.0, "INVITE", "a", "b", "c", "200", "OK", ("log",), "",
                  {CDR: [("start_time", "1.000"), ("x", "evil\nACC: forged")]})
    assert cdr_line(r) == "start_time=1.000; x=evil\\nACC: forged"


def test_rows_in_acc_cdrs_on_sqlite(tmp_path: Path) -> None:
    rules = rules_of()
    recs, _ = run([*answered_call(), *rejected_call(486, "Busy Here", Call("call-2", "b2"), t=2000.0)], rules)
    em = SqlEmitter(f"sqlite:///{tmp_path / 'acc.db'}", rules)
    em.emit(recs)
    em.emit(recs)  # a re-run inserts nothing twice
    em.close()
    con = sqlite3.connect(tmp_path / "acc.db")
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute("SELECT * FROM acc_cdrs ORDER BY id")]
    version = con.execute("SELECT table_version FROM version WHERE table_name='acc_cdrs'").fetchone()[0]
    con.close()
    assert version == 2 and len(rows) == 2
    first, failed = rows
    assert first["start_time"] == pytest.approx(((1000 - 0.5) / 86400) + 2440587.5)  # db_sqlite's Julian REAL
    assert first["end_time"] == pytest.approx(((1060 - 0.5) / 86400) + 2440587.5)
    assert first["duration"] == 60.0 and first["c_rs"] is None and first["c_v"] == "u=alice"
    assert failed["duration"] == 0.0 and failed["c_rs"] == "486" and failed["c_ru"] is None
    assert list(first)[:4] == ["id", "start_time", "end_time", "duration"]


def test_a_cdr_survives_the_spool_and_json_lines() -> None:
    """The spool stores a record as its as_dict() when it cannot render it yet: the CDR's pairs
    come back in order, so the row and the line are the same after a retry."""
    from sipsniff_acc.emitters.jsonl import record_line
    from sipsniff_acc.emitters.spool import record_from_dict

    recs, _ = run(answered_call(), rules_of())
    r = [r for r in recs if r.kind == CDR][0]
    back = record_from_dict(r.as_dict())
    assert back.extras[CDR] == r.extras[CDR] and cdr_line(back) == cdr_line(r) and back.record_id == r.record_id
    assert b'"kind":"cdr"' in record_line(r) and b'"start_time":"1000.001"' in record_line(r)
