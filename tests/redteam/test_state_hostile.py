"""Red team on the state file: a state loaded once must not be loaded again. The run that
loaded it may end without saving (SIGKILL, OOM, a full disk at the save); the next start
then found the same old file and restored calls that run had already accounted: answered
INVITEs came back open, and --open-as-408 gave them a 408 missed call (a wrong record)."""

from __future__ import annotations

from pathlib import Path

from sipsniff_acc.processrun import AccPipeline
from sipsniff_acc.rules import RulesFile, parse_rules
from sipsniff_acc.state import load_state, save_state
from tests.restart.test_state import RULES, fresh, messages_of, rows  # noqa: F401 - shared workload helpers
from tests.flows import Call, answered_call


def test_a_state_is_loaded_once(tmp_path: Path) -> None:
    rules: RulesFile = parse_rules(RULES)
    msgs = answered_call(Call(call_id="X", ftag="X-tag"), t=1000.0)
    cut = next(i for i, m in enumerate(msgs) if m.method == "INVITE") + 1  # the INVITE in, not yet answered
    path = tmp_path / "state"

    first = AccPipeline(rules, open_as_408=True)
    for m in msgs[:cut]:
        first.feed(m)
    save_state(path, first)  # SIGTERM: saved with the INVITE open

    second = AccPipeline(rules, open_as_408=True)
    assert load_state(path, second).status == "restored"
    done = [r for m in msgs[cut:] for r in second.feed(m)]
    assert "INVITE" in {r.method for r in done}  # answered and accounted in the second run...
    # ...which is then killed: no save

    third = AccPipeline(rules, open_as_408=True)
    res = load_state(path, third)
    assert res.status != "restored", res.summary()  # the old state is not restored again
    wrong = [r for r in third.finish() if r.method == "INVITE"]
    assert wrong == [], rows(wrong)
    assert (tmp_path / "state.loaded").exists()  # kept for a look, under another name


def test_clock_gone_backwards_and_symlinks(tmp_path: Path) -> None:
    """A wall clock stepped back an hour between save and load: the open INVITE is kept (not
    'expired' by a negative age) and answered after the restart. A --state that is a symlink
    to someone's file is refused before the work; one to a state file loads, and the save
    replaces the link, never writing through it."""
    import os

    import pytest

    from sipsniff_acc.state import StateUsageError, check_state_path

    rules: RulesFile = parse_rules(RULES)
    msgs = answered_call(Call(call_id="Y", ftag="Y-tag"), t=5000.0)
    cut = next(i for i, m in enumerate(msgs) if m.method == "INVITE") + 1
    first = AccPipeline(rules)
    for m in msgs[:cut]:
        first.feed(m)
    real = tmp_path / "real-state"
    save_state(real, first, now=5001.0)
    link = tmp_path / "state"
    link.symlink_to(real)
    check_state_path(link)
    second = AccPipeline(rules)
    res = load_state(link, second, now=5001.0 - 3600)
    assert res.status == "restored" and res.expired == 0 and res.transactions >= 1
    out = [r for m in msgs[cut:] for r in second.feed(m)]
    assert ("INVITE", "200") in {(r.method, r.code) for r in out}
    save_state(link, second, now=5010.0)
    assert not link.is_symlink() and link.is_file()

    victim = tmp_path / "passwd"
    victim.write_text("root:x:0:0:root:/root:/bin/bash\n")
    bad = tmp_path / "bad-state"
    bad.symlink_to(victim)
    with pytest.raises(StateUsageError, match="not a sipsniff-acc state file"):
        check_state_path(bad)
    assert victim.read_text().startswith("root:")
    os.unlink(bad)
