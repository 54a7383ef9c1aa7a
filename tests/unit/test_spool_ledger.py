"""The spool as a ledger (issue 10), against real SQLite files: destinations, dead letters,
bisection, corrupt rows, a full disk, rules changes, the format version, file modes."""

from __future__ import annotations

import io
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from sipsniff_acc.emitters.spool import (
    DurableSpool, RecordRejected, SpooledEmitter, SpoolDiskFull, SpoolError,
)
from sipsniff_acc.emitters.sql import SqlEmitter
from sipsniff_acc.emitters.sqlurl import SqlError, destination
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import RulesFile, parse_rules

RULES_A = 'acc: {db_flag: 1, db_extra: "xx=$hdr(X-Extra)"}\n'
RULES_B = "acc: {db_flag: 1, db_table_acc: cdr}\n"  # another table, no extra: rules changed since spooling


def recs(n: int, start: int = 0, callid: str = "") -> list[AccRecord]:
    out = []
    for i in range(start, start + n):
        r = AccRecord("answered", 1_700_000_000.0 + i, "INVITE", f"f{i}", f"t{i}", callid or f"c{i}", "200", "OK",
                      ("db",), table="acc", extras={"db": [("xx", f"x{i}")]})
        r.record_id = f"{i:032x}"
        out.append(r)
    return out


def fake_clock() -> tuple[list[float], dict[str, object]]:
    now = [0.0]
    return now, {"clock": lambda: now[0], "sleep": lambda s: now.__setitem__(0, now[0] + s)}


def rows(db: Path, table: str = "acc", col: str = "callid") -> list[str]:
    con = sqlite3.connect(db)
    try:
        return [r[0] for r in con.execute(f"SELECT {col} FROM {table} ORDER BY id")]  # noqa: S608 - fixed names
    finally:
        con.close()


def rules(text: str) -> RulesFile:
    return parse_rules(text)


def test_destination_is_the_url_without_password_and_with_an_absolute_sqlite_path(tmp_path: Path) -> None:
    assert destination("postgresql+psycopg://acc:s3cret@db:5432/acc") == "sql:postgresql+psycopg://acc@db:5432/acc"
    os.chdir(tmp_path)
    assert destination("sqlite:///acc.db") == f"sql:sqlite:///{tmp_path / 'acc.db'}"
    assert destination("mysql+pymysql://a@h/x") != destination("mysql+pymysql://a@h/y")


def test_records_for_another_destination_are_left_alone_and_said_so(tmp_path: Path) -> None:
    """Issue 10: the spool was keyed by backend type; a run to database B inserted A's records."""
    a_db, b_db = tmp_path / "a" / "acc.db", tmp_path / "b.db"
    spool = DurableSpool(tmp_path / "spool")
    now, fake = fake_clock()
    a = SpooledEmitter(SqlEmitter(f"sqlite:///{a_db}", rules(RULES_A), connect=False), spool, batch=2,
                       drain_timeout=0, alarms=io.StringIO(), **fake)  # type: ignore[arg-type]
    a.emit(recs(3))  # a/ does not exist yet: the records wait
    a.close()
    assert spool.count(a.backend.name) == 3
    alarms = io.StringIO()
    b = SpooledEmitter(SqlEmitter(f"sqlite:///{b_db}", rules(RULES_A)), DurableSpool(tmp_path / "spool"),
                       alarms=alarms, **fake)  # type: ignore[arg-type]
    b.emit(recs(2, start=10))
    b.close()
    assert rows(b_db) == ["c10", "c11"]  # none of A's
    assert f"note: 3 record(s) in the spool {tmp_path / 'spool'} are for sql:sqlite:///{a_db}" in alarms.getvalue()
    assert f"--db-url 'sqlite:///{a_db}'" in alarms.getvalue()
    a_db.parent.mkdir()
    again = SpooledEmitter(SqlEmitter(f"sqlite:///{a_db}", rules(RULES_A)), DurableSpool(tmp_path / "spool"),
                           alarms=io.StringIO(), **fake)  # type: ignore[arg-type]
    again.close()
    assert again.delivered == 3 and rows(a_db) == ["c0", "c1", "c2"]


def test_rows_spooled_under_other_rules_are_delivered_as_they_were_rendered(tmp_path: Path) -> None:
    """Issue 10: records spooled under one rules file crashed the run after the rules changed (KeyError)."""
    db = tmp_path / "later" / "acc.db"
    url = f"sqlite:///{db}"
    now, fake = fake_clock()
    sp = SpooledEmitter(SqlEmitter(url, rules(RULES_A), connect=False), DurableSpool(tmp_path / "spool"),
                        drain_timeout=0, alarms=io.StringIO(), **fake)  # type: ignore[arg-type]
    sp.emit(recs(3))
    sp.close()
    db.parent.mkdir()
    SqlEmitter(url, rules(RULES_A)).close()  # the schema the records were meant for
    later = SpooledEmitter(SqlEmitter(url, rules(RULES_B), connect=False), DurableSpool(tmp_path / "spool"),
                           alarms=io.StringIO(), **fake)  # type: ignore[arg-type]
    later.close()
    assert later.delivered == 3 and later.dead_lettered == 0
    assert rows(db, col="xx") == ["x0", "x1", "x2"] and rows(db, "cdr") == []


def test_a_refused_record_is_found_by_bisection_and_set_aside_the_rest_in_order(tmp_path: Path) -> None:
    """The user's own table refuses one row (a CHECK constraint): IntegrityError on the whole
    batch; the spool bisects, delivers the 15 others in order, dead-letters that one."""
    db = tmp_path / "acc.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE acc (id INTEGER PRIMARY KEY, method VARCHAR(16), from_tag VARCHAR(128), "
                "to_tag VARCHAR(128), callid VARCHAR(255) CHECK (callid <> 'c9'), sip_code VARCHAR(3), "
                "sip_reason VARCHAR(128), time REAL, xx VARCHAR(128), sipsniff_id VARCHAR(32) UNIQUE)")
    con.close()
    backend = SqlEmitter(f"sqlite:///{db}", rules(RULES_A))
    calls = []
    deliver = backend.deliver_entries
    backend.deliver_entries = lambda entries: (calls.append(len(entries)), deliver(entries))[1]  # type: ignore[method-assign]
    alarms = io.StringIO()
    now, fake = fake_clock()
    sp = SpooledEmitter(backend, DurableSpool(tmp_path / "spool"), batch=16, alarms=alarms,
                        **fake)  # type: ignore[arg-type]
    sp.emit(recs(16))
    sp.close()
    assert rows(db) == [f"c{i}" for i in range(16) if i != 9]
    assert sp.delivered == 15 and sp.dead_lettered == 1 and sp.pending == 0
    assert len(calls) <= 2 * 4 + 2  # about 2 log2(16) attempts, never a retry loop
    assert "record 00000000000000000000000000000009 refused (IntegrityError: CHECK constraint failed" \
        in alarms.getvalue()
    spool = DurableSpool(tmp_path / "spool")
    (reason, n), = spool.dead_reasons()[sp.backend.name].items()
    assert n == 1 and reason.startswith("IntegrityError: CHECK constraint failed")


def test_overlong_values_are_truncated_and_counted_or_dead_lettered(tmp_path: Path) -> None:
    long = recs(1, callid="c" * 300)
    for policy, stored in (("truncate", 1), ("dead-letter", 0)):
        db = tmp_path / f"{policy}.db"
        backend = SqlEmitter(f"sqlite:///{db}", rules(RULES_A), on_overlong=policy)
        now, fake = fake_clock()
        sp = SpooledEmitter(backend, DurableSpool(tmp_path / f"{policy}.spool"), alarms=io.StringIO(),
                            **fake)  # type: ignore[arg-type]
        sp.emit(long + recs(2, start=1))
        sp.close()
        got = rows(db)
        assert len(got) == 2 + stored and sp.pending == 0
        if stored:
            assert got[0] == "c" * 255 and backend.fitted == {"acc.callid truncated": 1}
        else:
            assert sp.dead_reasons == {"acc.callid: 300 characters, the column holds 255": 1}
    with pytest.raises(SqlError, match="on_overlong"):
        SqlEmitter(f"sqlite:///{tmp_path / 'x.db'}", rules(RULES_A), on_overlong="drop")


def test_nul_and_invalid_characters_become_the_replacement_character(tmp_path: Path) -> None:
    r = recs(1)[0]
    r.extras = {"db": [("xx", "a\x00b\udcffc")]}
    backend = SqlEmitter(f"sqlite:///{tmp_path / 'acc.db'}", rules(RULES_A))
    backend.deliver([r])
    assert rows(tmp_path / "acc.db", col="xx") == ["a\ufffdb\ufffdc"]
    assert backend.fitted == {"acc.xx replaced": 1}


def test_a_corrupt_spool_row_is_dead_lettered_not_fatal(tmp_path: Path) -> None:
    """Issue 10: a corrupt spool row made every later run crash."""
    url = f"sqlite:///{tmp_path / 'later' / 'acc.db'}"
    now, fake = fake_clock()
    sp = SpooledEmitter(SqlEmitter(url, rules(RULES_A), connect=False), DurableSpool(tmp_path / "spool"),
                        drain_timeout=0, alarms=io.StringIO(), **fake)  # type: ignore[arg-type]
    sp.emit(recs(4))
    sp.close()
    con = sqlite3.connect(tmp_path / "spool")
    seqs = [s for (s,) in con.execute("SELECT seq FROM queue ORDER BY seq")]
    con.execute("UPDATE queue SET record = x'00ff7b' WHERE seq = ?", (seqs[1],))
    con.execute("UPDATE queue SET record = '{\"table\": 5}' WHERE seq = ?", (seqs[2],))
    con.commit()
    con.close()
    (tmp_path / "later").mkdir()
    alarms = io.StringIO()
    again = SpooledEmitter(SqlEmitter(url, rules(RULES_A)), DurableSpool(tmp_path / "spool"), alarms=alarms,
                           **fake)  # type: ignore[arg-type]
    again.close()
    assert rows(tmp_path / "later" / "acc.db") == ["c0", "c3"]
    assert again.dead_lettered == 2 and again.pending == 0
    assert "unreadable spool entry" in alarms.getvalue()


def test_a_full_disk_stops_intake_and_loses_nothing_accepted(tmp_path: Path) -> None:
    """Issue 10: on a full filesystem, a traceback and records lost. SQLite's max_page_count
    gives the same SQLITE_FULL as a full disk."""
    db = tmp_path / "later" / "acc.db"
    spool = DurableSpool(tmp_path / "spool")
    spool.db.execute(f"PRAGMA max_page_count = {spool.db.execute('PRAGMA page_count').fetchone()[0] + 6}")
    now, fake = fake_clock()
    alarms = io.StringIO()
    sp = SpooledEmitter(SqlEmitter(f"sqlite:///{db}", rules(RULES_A), connect=False), spool, batch=10,
                        drain_timeout=0, alarms=alarms, **fake)  # type: ignore[arg-type]
    sent = 0
    with pytest.raises(SpoolDiskFull, match="the disk is full; intake stopped"):
        for i in range(0, 5000, 10):
            sp.emit(recs(10, start=i))
            sent += 10
    accepted = DurableSpool(tmp_path / "spool").count(sp.backend.name)
    assert 0 < accepted == sp.spooled and len(sp.buffer) == 10
    sp.close()  # never raises; the unspooled buffer is counted as lost (the database is unreachable)
    assert sp.lost == 10 and "could be neither spooled (disk full) nor delivered: lost" in alarms.getvalue()
    db.parent.mkdir()
    again = SpooledEmitter(SqlEmitter(f"sqlite:///{db}", rules(RULES_A)), DurableSpool(tmp_path / "spool"),
                           alarms=io.StringIO(), **fake)  # type: ignore[arg-type]
    again.close()
    assert again.delivered == accepted and len(rows(db)) == accepted == sent


def test_when_the_disk_is_full_the_buffer_goes_straight_to_a_live_database(tmp_path: Path) -> None:
    db = tmp_path / "acc.db"
    spool = DurableSpool(tmp_path / "spool")
    spool.db.execute(f"PRAGMA max_page_count = {spool.db.execute('PRAGMA page_count').fetchone()[0]}")
    now, fake = fake_clock()
    sp = SpooledEmitter(SqlEmitter(f"sqlite:///{db}", rules(RULES_A)), spool, batch=40, alarms=io.StringIO(),
                        **fake)  # type: ignore[arg-type]
    with pytest.raises(SpoolDiskFull):
        sp.emit(recs(40))
    sp.close()
    assert sp.lost == 0 and sp.delivered == 40 and len(rows(db)) == 40


def test_spool_format_is_versioned_and_foreign_files_are_refused_in_one_line(tmp_path: Path) -> None:
    old = tmp_path / "v1.spool"
    con = sqlite3.connect(old)
    con.execute("CREATE TABLE queue (seq INTEGER PRIMARY KEY AUTOINCREMENT, backend TEXT NOT NULL, "
                "record BLOB NOT NULL, queued REAL NOT NULL DEFAULT 0)")
    con.close()
    with pytest.raises(SpoolError, match="spool format 1"):
        DurableSpool(old)
    newer = tmp_path / "v9.spool"
    DurableSpool(newer).close()
    con = sqlite3.connect(newer)
    con.execute("UPDATE meta SET value = '9' WHERE key = 'schema'")
    con.commit()
    con.close()
    with pytest.raises(SpoolError, match="use a newer sipsniff-acc"):
        DurableSpool(newer)
    junk = tmp_path / "junk.spool"
    junk.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(SpoolError, match="not a usable spool") as e:
        DurableSpool(junk)
    assert "\n" not in str(e.value)
    with pytest.raises(SpoolError, match="no spool file here"):
        DurableSpool(tmp_path / "missing", create=False)


def test_spool_and_sqlite_files_are_created_0600(tmp_path: Path) -> None:
    """Issue 10: spool and SQLite files were created world-readable."""
    old = os.umask(0o022)
    try:
        DurableSpool(tmp_path / "spool").close()
        SqlEmitter(f"sqlite:///{tmp_path / 'acc.db'}", rules(RULES_A)).close()
        existing = tmp_path / "mine.db"
        existing.touch(0o644)
        SqlEmitter(f"sqlite:///{existing}", rules(RULES_A)).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "spool").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "acc.db").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(existing).st_mode) == 0o644  # an existing file keeps its mode


def test_an_impossible_sqlite_path_fails_at_once_naming_it(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(SqlError, match="the directory /nonexistent/dir does not exist"):
        SqlEmitter("sqlite:////nonexistent/dir/acc.db", rules(RULES_A), connect="try")
    (tmp_path / "d.db").mkdir()
    with pytest.raises(SqlError, match="is a directory"):
        SqlEmitter(f"sqlite:///{tmp_path / 'd.db'}", rules(RULES_A), connect="try")
    assert time.monotonic() - start < 5


def test_retry_moves_dead_letters_back_in_front_of_nothing_else(tmp_path: Path) -> None:
    spool = DurableSpool(tmp_path / "spool")
    spool.append("x", recs(3))
    first = spool.peek("x", 1)[0][0]
    spool.bury("x", [first], "refused")
    assert spool.pending() == {"x": 2} and dict(spool.dead_reasons()["x"]) == {"refused": 1}
    assert spool.retry("x") == {"x": 1}
    assert [r.call_id for _s, r in spool.peek("x", 10)] == ["c1", "c2", "c0"]
    assert spool.dead_reasons() == {}


def test_record_rejected_with_an_index_acks_what_came_before(tmp_path: Path) -> None:
    """RADIUS/Diameter's side of the contract: RecordRejected(index) after index records got through."""

    class Picky:
        name, where = "radius:127.0.0.1:1813", "127.0.0.1:1813"
        got: list[str] = []

        def wants(self, r: AccRecord) -> bool:
            return True

        def deliver(self, records: list[AccRecord]) -> None:
            for i, r in enumerate(records):
                if r.call_id == "c2":
                    raise RecordRejected("attribute too long", index=i)
                self.got.append(r.call_id or "")

        def close(self) -> None:
            pass

    now, fake = fake_clock()
    sp = SpooledEmitter(Picky(), DurableSpool(tmp_path / "spool"), batch=10, alarms=io.StringIO(),
                        **fake)  # type: ignore[arg-type]
    sp.emit(recs(5))
    sp.close()
    assert Picky.got == ["c0", "c1", "c3", "c4"] and sp.dead_lettered == 1 and sp.delivered == 4


#: a formatted UTC time column (gmtime)
RULES_T4 = 'acc: {db_flag: 1, time_mode: 4, db_extra: "xx=$hdr(X-Extra)"}\n'
IMPOSSIBLE = float(2 ** 62)  #: seconds: past year 9999 (a pcapng with if_tsresol=0 can carry it)


def test_a_record_that_cannot_be_rendered_is_dead_lettered_alone_when_spooled(tmp_path: Path) -> None:
    """Red team: one record's time broke the whole batch (traceback, nothing spooled, nothing delivered)."""
    db = tmp_path / "acc.db"
    batch = recs(5)
    batch[2].ts = IMPOSSIBLE
    alarms = io.StringIO()
    now, fake = fake_clock()
    sp = SpooledEmitter(SqlEmitter(f"sqlite:///{db}", rules(RULES_T4)), DurableSpool(tmp_path / "spool"), batch=3,
                        drain_timeout=0, alarms=alarms, **fake)  # type: ignore[arg-type]
    sp.emit(batch)
    sp.close()
    assert rows(db) == ["c0", "c1", "c3", "c4"]
    assert (sp.delivered, sp.dead_lettered, sp.pending, sp.lost) == (4, 1, 0, 0)
    [(reason, n)] = sp.dead_reasons.items()
    assert n == 1 and reason.startswith(f"time {int(IMPOSSIBLE)} is outside what a DATETIME column holds")
    assert f"record {batch[2].record_id} refused (time " in alarms.getvalue()
    spool = DurableSpool(tmp_path / "spool")
    [(_seq, _dest, doc, _q, stored_reason, _at)] = list(spool.rows("dead"))
    assert stored_reason == reason and b'"unrendered"' in doc  # the record itself is kept, to retry


@pytest.mark.parametrize("reachable", [True, False])
def test_close_never_says_kept_in_the_spool_what_the_spool_refused(tmp_path: Path, reachable: bool) -> None:
    """Red team: "21 record(s) kept in the spool" while the spool was empty. When the spool cannot
    take the buffer at close (here: a read-only spool), the records go straight to the database, or
    are counted lost with an alarm; one that cannot be rendered is lost with its own reason."""
    db = tmp_path / ("acc.db" if reachable else "missing/acc.db")
    spool = DurableSpool(tmp_path / "spool")
    alarms = io.StringIO()
    now, fake = fake_clock()
    sp = SpooledEmitter(SqlEmitter(f"sqlite:///{db}", rules(RULES_T4), connect=reachable), spool, batch=100,
                        drain_timeout=0, alarms=alarms, **fake)  # type: ignore[arg-type]
    batch = recs(6)
    batch[4].ts = IMPOSSIBLE
    sp.emit(batch)  # buffered (below the batch size)
    spool.db.execute("PRAGMA query_only = 1")  # the spool now refuses every write
    sp.close()
    assert sp.pending == 0 and not sp.buffer
    text = alarms.getvalue()
    assert "could not be rendered (time " in text and "nor spooled" in text
    if reachable:
        assert (sp.delivered, sp.lost) == (5, 1) and rows(db) == ["c0", "c1", "c2", "c3", "c5"]
    else:
        assert (sp.delivered, sp.lost) == (0, 6)
        assert "5 record(s) could be neither spooled (spool " in text and "nor delivered: lost" in text
