"""Emitters against real endpoints: syslog over UDP/TCP on loopback, SQLite files."""

from __future__ import annotations

import io
import socket
import sqlite3
import threading
from pathlib import Path

import orjson

from sipsniff_acc.emitters.jsonl import JsonlEmitter
from sipsniff_acc.emitters.spool import DurableSpool, SpooledEmitter
from sipsniff_acc.emitters.sql import SqlEmitter, julian, missing_columns
from sipsniff_acc.emitters.syslog import LogEmitter
from sipsniff_acc.processrun import records_of
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import parse_rules
from sipsniff_acc.sysloglines import payload, rfc3164
from tests.flows import answered_call, rejected_call

RULES = """
acc: {log_flag: 1, log_missed_flag: 2, db_flag: 1, db_missed_flag: 2, log_facility: LOG_LOCAL0,
      db_extra: "ua=$hdr(User-Agent);fu=$fU", multi_leg_info: "leg_src=$avp(src)"}
route:
  - if: {method: INVITE, in_dialog: false}
    setflag: [1, 2]
  - if: {method: INVITE, in_dialog: false}
    set_avp: {src: A}
  - if: {method: INVITE, in_dialog: false}
    set_avp: {src: B}
  - if: {method: BYE}
    setflag: [1]
"""


def records() -> tuple[list[AccRecord], object]:
    rules = parse_rules(RULES)
    from tests.flows import Call
    return records_of([*answered_call(), *rejected_call(call=Call(call_id="call-2"))], rules), rules


def test_payload_time_modes() -> None:
    r = AccRecord("answered", 1700000000.25, "INVITE", "f", None, "c", "200", "OK", ("log",),
                  extras={"log": [("ua", None), ("x", "1")]}, legs=[[("l", "B")], [("l", None)]])
    assert payload(r) == ("ACC: transaction answered: timestamp=1700000000;method=INVITE;from_tag=f;to_tag=;"
                          "call_id=c;code=200;reason=OK;ua=;x=1;l=B;l=")
    assert payload(r, time_mode=1).startswith("ACC: transaction answered: timestamp=1700000000;time_exten=250000;")
    assert ";time_attr=1700000000.250;" in payload(r, time_mode=2)
    assert ";t=2023-11-14 22:13:20;" in payload(r, time_mode=4, time_attr="t")


def test_rfc3164_framing() -> None:
    data = rfc3164("ACC: x", 1700000000.0, "LOG_LOCAL0", 1, "kamailio", 42)
    assert data.startswith(b"<133>") and data.endswith(b" kamailio[42]: ACC: x\n")  # local0*8 + notice(5)


def test_syslog_over_udp_and_tcp_on_loopback() -> None:
    rs, rules = records()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(5)
    em = LogEmitter(rules, None, f"udp://127.0.0.1:{udp.getsockname()[1]}")  # type: ignore[arg-type]
    em.emit(rs)
    em.close()
    got = [udp.recv(65536) for _ in range(3)]
    udp.close()
    assert all(g.startswith(b"<133>") for g in got)
    assert b"ACC: transaction answered: timestamp=1002;method=INVITE" in got[0]
    assert b"ACC: call missed: " in got[2]

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(5)
    chunks: list[bytes] = []

    def serve() -> None:
        conn, _ = srv.accept()
        conn.settimeout(5)
        while data := conn.recv(65536):
            chunks.append(data)
        conn.close()

    th = threading.Thread(target=serve)
    th.start()
    em = LogEmitter(rules, None, f"tcp://127.0.0.1:{srv.getsockname()[1]}")  # type: ignore[arg-type]
    em.emit(rs)
    em.close()
    th.join(10)
    srv.close()
    lines = b"".join(chunks).splitlines()
    assert len(lines) == 3 and all(b" kamailio[" in ln for ln in lines)


def test_sqlite_rows_are_kamailio_compatible_and_idempotent(tmp_path: Path) -> None:
    rs, rules = records()
    url = f"sqlite:///{tmp_path / 'acc.db'}"
    for _ in range(2):
        em = SqlEmitter(url, rules)  # type: ignore[arg-type]
        assert em.where == url
        em.emit(rs)
        em.close()
    con = sqlite3.connect(tmp_path / "acc.db")
    acc = con.execute("SELECT method, to_tag, time, ua, fu, leg_src FROM acc ORDER BY id").fetchall()
    missed = con.execute("SELECT method, sip_code, leg_src FROM missed_calls").fetchall()
    versions = dict(con.execute("SELECT table_name, table_version FROM version").fetchall())
    con.close()
    # INVITE: one row per leg set, LIFO (B then A); BYE: no AVPs, one row with NULL legs
    assert [(m, leg) for m, _t, _time, _ua, _fu, leg in acc] == [("INVITE", "B"), ("INVITE", "A"), ("BYE", None)]
    assert acc[0][2] == julian(1002.001) and acc[0][3] is None and acc[0][4] == "alice"  # null extra -> NULL
    assert missed == [("INVITE", "486", "B"), ("INVITE", "486", "A")]
    assert versions == {"acc": 5, "missed_calls": 4}


def test_init_db_check_reports_missing_columns(tmp_path: Path) -> None:
    _rs, rules = records()
    db = tmp_path / "k.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE acc (id INTEGER PRIMARY KEY, method TEXT, from_tag TEXT, to_tag TEXT, callid TEXT,"
                " sip_code TEXT, sip_reason TEXT, time REAL)")
    con.close()
    problems = missing_columns(f"sqlite:///{db}", rules)  # type: ignore[arg-type]
    assert any("acc lacks column(s) ua, fu, leg_src" in p for p in problems)
    assert any("sipsniff_id" in p for p in problems)


def test_spool_keeps_records_while_the_database_is_unreachable(tmp_path: Path) -> None:
    """A database path whose directory does not exist yet: every delivery fails, the records
    wait in the spool, in order; once the directory exists the next retry delivers them all."""
    rs, rules = records()
    target = tmp_path / "later" / "acc.db"
    now = [0.0]
    alarms = io.StringIO()
    backend = SqlEmitter(f"sqlite:///{target}", rules, connect=False)  # type: ignore[arg-type]
    sp = SpooledEmitter(backend, DurableSpool(tmp_path / "spool"), batch=2, retry_interval=5.0,
                        clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s), alarms=alarms,
                        drain_timeout=3.0)
    sp.emit(rs)
    assert sp.pending == 3 and sp.delivered == 0 and sp.outages == 1
    assert "alarm: db backend down" in alarms.getvalue() and "OperationalError" in sp.last_error
    sp.close()  # drains for 3 s of (fake) time, then gives up: the records stay in the spool file
    assert DurableSpool(tmp_path / "spool").count(backend.name) == 3 and backend.name == f"sql:sqlite:///{target}"
    target.parent.mkdir()
    again = SpooledEmitter(SqlEmitter(f"sqlite:///{target}", rules, connect=False), DurableSpool(tmp_path / "spool"),  # type: ignore[arg-type]
                           alarms=alarms)
    assert again.recovered == 3
    again.close()
    assert again.delivered == 3 and again.pending == 0
    con = sqlite3.connect(target)
    assert con.execute("SELECT count(*) FROM acc").fetchone()[0] == 3  # INVITE (two legs) + BYE
    assert con.execute("SELECT count(*) FROM missed_calls").fetchone()[0] == 2
    con.close()


def test_spool_round_trips_records(tmp_path: Path) -> None:
    rs, _rules = records()
    spool = DurableSpool(tmp_path / "s")
    spool.append("x", rs)
    back = [r for _seq, r in spool.peek("x", 10)]
    assert [r.as_dict() for r in back] == [r.as_dict() for r in rs]
    spool.ack("x", spool.peek("x", 1)[0][0])
    assert spool.count("x") == 2


def test_jsonl(tmp_path: Path) -> None:
    rs, _rules = records()
    with open(tmp_path / "r.jsonl", "wb") as f:
        JsonlEmitter(f).emit(rs)
    docs = [orjson.loads(x) for x in (tmp_path / "r.jsonl").read_bytes().splitlines()]
    assert [d["kind"] for d in docs] == ["answered", "answered", "missed"]
    assert docs[0]["legs"] == [{"leg_src": "B"}, {"leg_src": "A"}] and docs[0]["id"] == rs[0].record_id


class _Down:
    name, where = "down", "nowhere"

    def wants(self, r: AccRecord) -> bool:
        return True

    def deliver(self, records: list[AccRecord]) -> None:
        from sipsniff_acc.emitters.spool import BackendDown
        raise BackendDown("refused")

    def close(self) -> None:
        pass


def test_a_full_spool_blocks_then_gives_up_keeping_everything(tmp_path: Path) -> None:
    from sipsniff_acc.emitters.spool import SpoolFull
    rs, _rules = records()
    now = [0.0]
    alarms = io.StringIO()
    sp = SpooledEmitter(_Down(), DurableSpool(tmp_path / "s"), batch=1, max_records=2, full_timeout=10.0,  # type: ignore[arg-type]
                        clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s), alarms=alarms)
    sp.emit(rs[:2])
    try:
        sp.emit(rs[2:])
        raise AssertionError("the spool should be full")
    except SpoolFull as e:
        assert "spool full" in str(e)
    assert "alarm: spool full for down (2 records, limit 2)" in alarms.getvalue()
    assert now[0] >= 10.0 and DurableSpool(tmp_path / "s").count("down") == 2 and sp.buffer == rs[2:]


def test_a_syslog_tcp_server_that_goes_away_is_reconnected_then_counted(tmp_path: Path) -> None:
    rs, rules = records()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    em = LogEmitter(rules, None, f"tcp://127.0.0.1:{port}")  # type: ignore[arg-type]
    conn, _ = srv.accept()
    em.emit(rs[:1])
    assert conn.recv(65536).startswith(b"<")
    conn.close()  # the server drops the connection: the next sends fail, a reconnection succeeds
    import time as _t
    _t.sleep(0.1)
    em.emit(rs[1:2])
    em.emit(rs[1:2])
    conn2, _ = srv.accept()
    conn2.settimeout(2)
    assert b"ACC: " in conn2.recv(65536)
    conn2.close()
    srv.close()  # now nobody listens: lines are counted, not lost silently
    _t.sleep(0.1)
    for _ in range(3):
        em.emit(rs[2:3])
    em.close()
    assert em.send_failures >= 1 and em.written == 6


def test_openser_profile_creates_the_openser_schema(tmp_path: Path) -> None:
    from sipsniff_acc.rules import parse_rules as pr
    rules = pr("profile: openser-1.2\nacc: {db_flag: 1}\n")
    SqlEmitter(f"sqlite:///{tmp_path / 'o.db'}", rules).close()
    con = sqlite3.connect(tmp_path / "o.db")
    ddl = con.execute("SELECT sql FROM sqlite_master WHERE name = 'acc'").fetchone()[0]
    versions = dict(con.execute("SELECT table_name, table_version FROM version").fetchall())
    con.close()
    assert "from_tag VARCHAR(64)" in ddl and "callid VARCHAR(128)" in ddl and "sip_reason VARCHAR(32)" in ddl
    assert versions == {"acc": 4, "missed_calls": 3}
