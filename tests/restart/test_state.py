"""state.py: a pipeline saved mid-traffic and restored into a fresh one makes the records an
uninterrupted one makes; expired state is dropped with a count; bad files never crash."""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sipsniff_acc import sip, state
from sipsniff_acc.pipeline import MessagePipeline
from sipsniff_acc.processrun import AccPipeline
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import RulesFile, parse_rules
from sipsniff_acc.sip import SipMessage
from sipsniff_acc.sources.pcapfile import CaptureReader
from sipsniff_acc.state import (MAGIC, LoadResult, StateUsageError, check_state_path, load_state, save_state,
                                shard_path)
from tests.conftest import ROOT
from tests.flows import Call, answered_call

#: rules whose records depend on state a restart could lose: $TS (the proxy's start), the
#: ACK of a 2xx (report_ack needs the INVITE), AVPs set when the INVITE came in (multi-leg
#: columns of the BYE... no: of the INVITE's own records) and the failure route
RULES = """
profile: kamailio-5.6
tm: {fr_inv_timer: 120, wait_timer: 5}
acc:
  log_flag: 1
  log_missed_flag: 2
  db_flag: 1
  db_missed_flag: 2
  failed_transaction_flag: 3
  report_ack: true
  log_extra: "src_user=$fU;start=$TS;now=$Ts;ua=$hdr(User-Agent);leg=$avp(leg)"
  db_extra: "src_user=$fU;dst_user=$rU"
route:
  - if: {method: INVITE, in_dialog: false}
    setflag: [1, 2, 3]
    set_avp: {leg: "$rU"}
  - if: {method: BYE, in_dialog: true}
    setflag: [1, 3]
  - if: {method: ACK}
    setflag: [1]
failure_route:
  - if: {code: [404, 480]}
    acc_log_request: "404 callee unavailable"
"""


@pytest.fixture(scope="module")
def rules() -> RulesFile:
    return parse_rules(RULES)


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> list[SipMessage]:
    """400 generated calls (answered, busy, cancelled, unanswered, not found, OPTIONS, REGISTER)."""
    out = tmp_path_factory.mktemp("w") / "w.pcap"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gen_workload.py"), "--calls", "400", "--seed", "4",
                    str(out)], check=True, capture_output=True, timeout=120)
    return messages_of(out)


def messages_of(path: Path) -> list[SipMessage]:
    mp = MessagePipeline()
    msgs = [m for f in CaptureReader(path) for m in mp.feed(f) if isinstance(m, SipMessage)]
    msgs += [m for m in mp.finish() if isinstance(m, SipMessage)]
    return msgs


def fresh(msgs: list[SipMessage]) -> list[SipMessage]:
    """The same messages parsed anew (a pipeline trims the messages it holds)."""
    out = []
    for m in msgs:
        c = sip.parse(m.raw)
        for name in ("ts", "no", "src", "sport", "dst", "dport", "transport", "encap", "source"):
            setattr(c, name, getattr(m, name))
        out.append(c)
    return out


def rows(records: list[AccRecord]) -> list[dict[str, object]]:
    return [r.as_dict() for r in records]


def run_all(rules: RulesFile, msgs: list[SipMessage]) -> list[AccRecord]:
    acc = AccPipeline(rules)
    out = [r for m in fresh(msgs) for r in acc.feed(m)]
    return out + acc.finish()


def run_split(rules: RulesFile, msgs: list[SipMessage], at: int, path: Path, now: float | None = None
              ) -> tuple[list[AccRecord], LoadResult]:
    msgs = fresh(msgs)
    first = AccPipeline(rules)
    out = [r for m in msgs[:at] for r in first.feed(m)]
    save_state(path, first, now)
    del first
    second = AccPipeline(rules)
    res = load_state(path, second, now)
    out += [r for m in msgs[at:] for r in second.feed(m)]
    return out + second.finish(), res


def test_round_trip_equals_uninterrupted(rules: RulesFile, workload: list[SipMessage], tmp_path: Path) -> None:
    """Cut anywhere (several places, mid-call for hundreds of calls), save, restore into a fresh
    pipeline, feed the rest: the records equal one pipeline fed everything, ids included."""
    whole = rows(run_all(rules, workload))
    assert len(whole) > 500
    kinds = {r["kind"] for r in whole}
    assert {"answered", "missed", "request"} <= kinds  # (the generator's 2xx ACKs reuse the INVITE branch)
    for at in (1, 137, len(workload) // 3, len(workload) // 2, len(workload) - 5):
        got, res = run_split(rules, workload, at, tmp_path / f"s{at}")
        assert res.status == "restored"
        assert rows(got) == whole, f"cut at message {at}"
    mid, res = run_split(rules, workload, len(workload) // 2, tmp_path / "mid")
    assert res.transactions > 50 and res.dialogs > 50, res.summary()
    assert "restored" in res.summary()


def test_without_state_records_differ(rules: RulesFile, workload: list[SipMessage]) -> None:
    """The round trip test can fail: a restart without the state loses the ACK records and
    changes $TS (the check that the tests above look at state that matters)."""
    msgs = fresh(workload)
    at = len(msgs) // 2
    first, second = AccPipeline(rules), AccPipeline(rules)
    out = [r for m in msgs[:at] for r in first.feed(m)] + [r for m in msgs[at:] for r in second.feed(m)]
    assert rows(out + second.finish()) != rows(run_all(rules, workload))


def test_answered_call_bye_after_restart(rules: RulesFile, tmp_path: Path) -> None:
    """The issue's case on a hand-made flow: saved after the 200, restored, then ACK and BYE:
    the ACK record (needs the INVITE) and the BYE record come out as without a restart."""
    msgs = answered_call(Call(), t=1000.0)
    whole = rows(run_all(rules, msgs))
    at = next(i for i, m in enumerate(msgs) if m.code == 200) + 1
    got, res = run_split(rules, msgs, at, tmp_path / "st", now=None)
    assert rows(got) == whole
    assert [r["kind"] for r in whole].count("acked") == 1
    assert res.transactions >= 1 and res.dialogs == 1


def test_file_is_private_and_atomic(rules: RulesFile, workload: list[SipMessage], tmp_path: Path) -> None:
    acc = AccPipeline(rules)
    for m in fresh(workload[:300]):
        acc.feed(m)
    p = tmp_path / "state"
    p.write_bytes(b"old")  # replaced whole, not rewritten in place
    os.chmod(p, 0o644)
    n = save_state(p, acc, 0.0)
    assert n == p.stat().st_size
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert p.read_bytes().startswith(MAGIC)
    header = json.loads(p.read_bytes().split(b"\n", 1)[0][len(MAGIC):])
    assert header["version"] == state.VERSION and header["shards"] == 1
    assert [f.name for f in tmp_path.iterdir()] == ["state"]  # no temp file left


def test_expired_dropped_with_count(rules: RulesFile, tmp_path: Path) -> None:
    """A restart long after the save: transactions past their timers and dialogs past their
    expiry are dropped at load, counted; the ones still in time are kept."""
    t0 = 1000.0
    old = answered_call(Call("old-call", "old-tag"), t=t0)
    ringing = [m for m in answered_call(Call("ringing", "r-tag"), t=t0 + 100) if m.code != 200][:3]  # INVITE, 100, 180
    acc = AccPipeline(rules)
    for m in [*old[:-2], *ringing]:  # the old call: up to the ACK (confirmed, no BYE)
        acc.feed(m)
    p = tmp_path / "st"
    save_state(p, acc, now=t0 + 101)  # a live run's save: its clock is the wall clock
    later = tmp_path / "st-copy"  # a state is loaded once (then set aside): a copy for the second start
    later.write_bytes(p.read_bytes())
    # 60 s after the ringing INVITE: the old call's transactions (completed at ~t0) are past
    # 32 s, the ringing INVITE (fr_inv_timer 120 s) is not; both dialogs are within 12 h
    res = load_state(p, b := AccPipeline(rules), now=t0 + 160)
    assert res.status == "restored"
    assert res.expired_transactions >= 2 and res.transactions >= 1
    assert all(k[2] == "ringing" for k in b.tracker.txns), list(b.tracker.txns)
    assert res.dialogs == 2 and res.expired_dialogs == 0
    assert f"({res.expired} expired dropped)" in res.summary()
    # 13 h later: nothing left
    res = load_state(later, c := AccPipeline(rules), now=t0 + 13 * 3600)
    assert res.transactions == 0 and res.dialogs == 0 and not c.tracker.txns
    assert res.expired_dialogs == 2 and res.expired_transactions >= 3
    assert c.tracker.stats.timed_out["INVITE"] == 1  # the ringing INVITE timed out while we were down


def _saved(rules: RulesFile, tmp_path: Path) -> Path:
    acc = AccPipeline(rules)
    for m in answered_call(Call(), t=1000.0)[:6]:
        acc.feed(m)
    p = tmp_path / "st"
    save_state(p, acc)
    return p


@pytest.mark.parametrize("damage", ["truncated", "flipped", "header", "too_new", "evil", "wrong_type", "empty"])
def test_damaged_files_start_empty(rules: RulesFile, tmp_path: Path, damage: str) -> None:
    """A damaged, cut, newer or malicious file: one line, nothing restored, no exception, no
    code run; a damaged one is kept as FILE.bad."""
    p = _saved(rules, tmp_path)
    data = p.read_bytes()
    head, payload = data.split(b"\n", 1)
    header = json.loads(head[len(MAGIC):])
    marker = tmp_path / "pwned"
    if damage == "truncated":
        data = data[: len(data) - 40]
    elif damage == "flipped":
        data = data[:-30] + bytes([data[-30] ^ 0x55]) + data[-29:]
    elif damage == "header":
        data = MAGIC + b"{not json\n" + payload
    elif damage == "too_new":
        header["version"] = state.VERSION + 1
        data = MAGIC + json.dumps(header).encode() + b"\n" + payload
    elif damage in ("evil", "wrong_type"):
        class Evil:
            def __reduce__(self) -> tuple[object, ...]:
                return (os.system, (f"touch {marker}",))
        obj: object = {"tracker": Evil()} if damage == "evil" else {"tracker": {"txns": {("a", "b", "c", 1): 5}}}
        body = pickle.dumps(obj, protocol=5)
        import hashlib
        header.update(length=len(body), blake2b=hashlib.blake2b(body, digest_size=32).hexdigest())
        data = MAGIC + json.dumps(header).encode() + b"\n" + body
    elif damage == "empty":
        data = b""
    p.write_bytes(data)
    acc = AccPipeline(rules)
    res = load_state(p, acc, now=1010.0)
    assert res.status == "unusable", res
    assert not acc.tracker.txns and not acc.tracker.dialogs
    line = res.summary()
    assert "\n" not in line and "starting empty" in line
    assert not marker.exists()
    if damage == "too_new":
        assert "newer" in line and p.exists()
    elif damage != "empty":
        assert "damaged" in line and (tmp_path / "st.bad").exists()


def test_oversized_file_refused(rules: RulesFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _saved(rules, tmp_path)
    monkeypatch.setattr(state, "MAX_STATE_BYTES", p.stat().st_size - 1)
    res = load_state(p, AccPipeline(rules), now=1010.0)
    assert res.status == "unusable" and "bound" in res.problem
    with pytest.raises(state.StateFileError, match="bound"):  # and never written either
        acc = AccPipeline(rules)
        for m in answered_call(Call(), t=1000.0)[:6]:
            acc.feed(m)
        save_state(tmp_path / "other", acc)
    assert not (tmp_path / "other").exists()


def test_missing_file_is_a_first_start(rules: RulesFile, tmp_path: Path) -> None:
    res = load_state(tmp_path / "none", AccPipeline(rules), now=0.0)
    assert res.status == "missing" and "no saved state yet" in res.summary()


def test_usage_errors(rules: RulesFile, tmp_path: Path) -> None:
    """Paths that can never work are refused before the run, in one line."""
    (tmp_path / "rules.yaml").write_text(RULES)
    with pytest.raises(StateUsageError, match="not a sipsniff-acc state file"):
        check_state_path(tmp_path / "rules.yaml")
    with pytest.raises(StateUsageError, match="is a directory"):
        check_state_path(tmp_path)
    with pytest.raises(StateUsageError, match="does not exist"):
        check_state_path(tmp_path / "no" / "st")
    p = _saved(rules, tmp_path)
    check_state_path(p)  # ours, -j 0: fine
    with pytest.raises(StateUsageError, match="saved by a run with -j 0, this run has -j 2"):
        check_state_path(p, shards=2)
    acc = AccPipeline(rules, shards=2)
    save_state(shard_path(tmp_path / "sh", 0, 2), acc, shards=2)
    save_state(shard_path(tmp_path / "sh", 1, 2), acc, shards=2)
    check_state_path(tmp_path / "sh", shards=2)
    with pytest.raises(StateUsageError, match="saved by a run with -j 2, this run has -j 3"):
        check_state_path(tmp_path / "sh", shards=3)
    with pytest.raises(StateUsageError, match="-j 2, this run has -j 0"):
        check_state_path(tmp_path / "sh", shards=1)


def test_sharded_round_trip(rules: RulesFile, workload: list[SipMessage], tmp_path: Path) -> None:
    """-j 2: each worker's pipeline saved to FILE.i and restored: the merged records equal the
    uninterrupted sharded ones (ordered by message, as the front puts them back)."""
    from sipsniff_acc.processrun import shard_of
    msgs = fresh(workload)
    parts: list[list[tuple[int, SipMessage]]] = [[], []]
    for i, m in enumerate(msgs):
        parts[shard_of(m.raw, 2)].append((i, m))
    at = len(msgs) // 2

    def run(cut: bool) -> list[dict[str, object]]:
        out: list[tuple[int, int, AccRecord]] = []
        total = LoadResult()
        for s, part in enumerate(parts):
            acc = AccPipeline(rules, shards=2)
            acc.engine.start = msgs[0].ts  # as acc_worker sets it: the run's first packet
            for i, m in part:
                if cut and i == at:
                    path = shard_path(tmp_path / "st", s, 2)
                    save_state(path, acc, shards=2)
                    acc = AccPipeline(rules, shards=2)
                    total.merge(load_state(path, acc, shard=s, shards=2))
                out += [(i, n, r) for n, r in enumerate(acc.feed(m))]
            out += [(1 << 62, n, r) for n, r in enumerate(acc.finish())]
        if cut:
            assert total.status == "restored" and total.transactions > 20
        return rows([r for _i, _n, r in sorted(out, key=lambda x: (x[0], x[1]))])

    assert run(True) == run(False)


CDR_RULES = RULES.replace("  report_ack: true\n", "  report_ack: true\n  cdr_enable: true\n  cdr_extra: \"src=$fU;dst=$rU\"\n"
                          ).replace("    set_avp: {leg: \"$rU\"}\n", "    set_avp: {leg: \"$rU\"}\n    dlg_manage: true\n")


def test_cdr_dialogs_survive(workload: list[SipMessage], tmp_path: Path) -> None:
    """With dialog CDRs on (cdr.py): a call answered before the cut and hung up after it gets
    its CDR, with the start time of its INVITE; without the state it gets none."""
    pytest.importorskip("sipsniff_acc.cdr")
    rules = parse_rules(CDR_RULES)
    if getattr(AccPipeline(rules), "cdr", None) is None:
        pytest.skip("AccPipeline has no CDR engine in this build")
    whole = rows(run_all(rules, workload))
    cdrs = [r for r in whole if r["kind"] == "cdr"]
    assert len(cdrs) > 100
    at = len(workload) // 2
    got, res = run_split(rules, workload, at, tmp_path / "st")
    assert res.sections.get("cdr dialogs", (0, 0))[0] > 20, res.summary()
    assert "cdr dialogs" in res.summary()
    assert rows(got) == whole
    msgs = fresh(workload)
    first, second = AccPipeline(rules), AccPipeline(rules)
    lost = [r for m in msgs[:at] for r in first.feed(m)] + [r for m in msgs[at:] for r in second.feed(m)]
    assert len([r for r in lost if r.kind == "cdr"]) < len(cdrs)


def test_reported_save_failure_is_one_line(rules: RulesFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the CLI's reporter a save that cannot be written says one line and returns 0: the
    stop it belongs to goes on (outputs flushed, exit status); loads say their line too."""
    lines: list[str] = []
    monkeypatch.setattr(state, "REPORT", lines.append)
    acc = AccPipeline(rules)
    for m in answered_call(Call(), t=1000.0)[:6]:
        acc.feed(m)
    (tmp_path / "file").write_text("")
    assert save_state(tmp_path / "file" / "st", acc) == 0  # its directory is a file
    assert len(lines) == 1 and lines[0].startswith("error: state ") and "not saved" in lines[0]
    assert save_state(tmp_path / "st", acc) > 0
    assert "saved 3 transactions, 1 dialogs" in lines[-1] or "saved " in lines[-1]
    load_state(tmp_path / "st", AccPipeline(rules), now=1001.0)
    assert lines[-1].startswith(f"state {tmp_path / 'st'}: restored ")


def test_several_restarts_in_a_row(rules: RulesFile, workload: list[SipMessage], tmp_path: Path) -> None:
    """Restored state is saved again whole: three restarts in one run change no record."""
    whole = rows(run_all(rules, workload))
    msgs = fresh(workload)
    cuts = [len(msgs) // 5, len(msgs) // 2, len(msgs) * 4 // 5]
    acc = AccPipeline(rules)
    out: list[AccRecord] = []
    prev = 0
    for i, at in enumerate([*cuts, len(msgs)]):
        out += [r for m in msgs[prev:at] for r in acc.feed(m)]
        prev = at
        if at < len(msgs):
            save_state(tmp_path / "st", acc)
            acc = AccPipeline(rules)
            assert load_state(tmp_path / "st", acc).status == "restored", i
    assert rows(out + acc.finish()) == whole


def test_file_from_an_older_version(rules: RulesFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transaction saved without a field this version has (an upgrade added it) gets the
    field's default; a field this version no longer has is ignored."""
    from sipsniff_acc.tracker import Transaction
    names, _get = state._SLOTTED[Transaction]
    older = tuple(n for n in names if n != "retransmissions") + ("gone_field",)

    def values(t: Transaction) -> tuple[object, ...]:
        return tuple(getattr(t, n) if n != "gone_field" else 1 for n in older)

    monkeypatch.setitem(state._SLOTTED, Transaction, (older, values))
    acc = AccPipeline(rules)
    for m in answered_call(Call(), t=1000.0)[:6]:
        acc.feed(m)
    save_state(tmp_path / "st", acc)
    monkeypatch.undo()
    b = AccPipeline(rules)
    res = load_state(tmp_path / "st", b, now=1001.0)
    assert res.status == "restored" and res.transactions == len(acc.tracker.txns) > 0
    assert all(t.retransmissions == 0 and not hasattr(t, "gone_field") for t in b.tracker.txns.values())
