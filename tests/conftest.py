"""Shared fixtures: paths, the tshark reference, and the skip-or-fail rule for real peers.

A test that needs a real program (tshark, tcpdump, SIPp, a database...) skips with the
reason when it is missing, unless SIPSNIFF_REQUIRE_SERVERS=1 (CI sets it): then a
missing program fails the test, so CI can never go green by skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PCAPS = ROOT / "tests" / "pcaps"
SHARED = ROOT.parent / "shared"
PUBLIC = SHARED / "pcaps" / "public"

#: What a run without options reads and writes in its working directory: the user's own
#: records live there. No test may touch them (a spool left in the project folder was once
#: delivered into a test's temporary database: the user's records vanished).
USER_FILES = ("sipsniff-acc.spool", "sipsniff-acc.spool-wal", "sipsniff-acc.spool-shm", "sipsniff-acc.spool-journal",
              "acc.db", "acc.db-wal", "acc.db-shm", "acc.db-journal")
#: The environment a user's run takes its database from: never a test's.
USER_ENV = ("SIPSNIFF_DB_URL", "SIPSNIFF_DB_PASSWORD", "SIPSNIFF_RADIUS_SECRET")


def pytest_configure(config: pytest.Config) -> None:
    """Stop before the first test when a built module is older than its source: Python imports
    the .so (mypyc's compiled modules, the C extensions) and the edited .py or .c would not be
    what is tested. (A mypyc module's code is in the group library ``_compiled__mypyc``.)"""
    package = ROOT / "sipsniff_acc"
    group = max((so.stat().st_mtime for so in package.glob("_compiled__mypyc*.so")), default=0.0)
    stale = []
    for so in package.rglob("*.so"):
        stem = so.name.split(".", 1)[0]
        built = so.stat().st_mtime if stem.startswith("_") else max(so.stat().st_mtime, group)
        for src in (so.with_name(stem + ".py"), so.with_name(stem + ".c")):
            if src.exists() and src.stat().st_mtime > built:
                stale.append(str(src.relative_to(ROOT)))
    if stale:
        pytest.exit(f"built modules older than their sources ({', '.join(sorted(stale))}): rebuild them "
                    "(.venv/bin/python setup.py build_ext --inplace --force) or delete sipsniff_acc's .so files",
                    returncode=4)


def _fingerprint(folder: Path) -> dict[str, tuple[int, int, int] | None]:
    """(size, mtime_ns, inode) of each user file in ``folder``; None when absent."""
    out: dict[str, tuple[int, int, int] | None] = {}
    for name in USER_FILES:
        try:
            st = (folder / name).stat()
            out[name] = (st.st_size, st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            out[name] = None
    return out


@pytest.fixture(autouse=True, scope="session")
def _project_folder_untouched() -> Iterator[None]:
    """At the end of the session the project folder's spool and acc.db are as they were: a
    test that ran a command there (or consumed a spool found there) fails the session."""
    before = _fingerprint(ROOT)
    yield
    after = _fingerprint(ROOT)
    changed = [name for name in USER_FILES if before[name] != after[name]]
    if changed:
        pytest.fail(f"a test touched the project folder's own files: {', '.join(changed)} in {ROOT} "
                    "(run commands with cwd= a temp dir or explicit --spool/--db-url)")


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test (and every command it starts without cwd=) runs in a fresh empty directory,
    without the user's SIPSNIFF_DB_* settings: the defaults ./sipsniff-acc.spool and
    ./acc.db are the test's own."""
    work = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(work)
    for name in USER_ENV:
        monkeypatch.delenv(name, raising=False)
    return work


def require_program(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    reason = f"{name} is not installed"
    if os.environ.get("SIPSNIFF_REQUIRE_SERVERS") == "1":
        pytest.fail(f"{reason}, and SIPSNIFF_REQUIRE_SERVERS=1 forbids skipping")
    pytest.skip(reason)


def require_shared() -> Path:
    if not PUBLIC.is_dir():
        pytest.skip("../shared/pcaps/public is not beside this checkout")
    return PUBLIC


Key = tuple[str, int, str, str]


def _find(node: object, key: str) -> str | None:
    """First value of ``key`` anywhere in a tshark JSON layer."""
    if isinstance(node, dict):
        if key in node:
            v = node[key]
            return v[0] if isinstance(v, list) else v
        for v in node.values():
            r = _find(v, key)
            if r is not None:
                return r
    elif isinstance(node, list):
        for v in node:
            r = _find(v, key)
            if r is not None:
                return r
    return None


def _keep_repeats(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """tshark's JSON repeats the "sip" key when a frame holds several messages: keep them all."""
    out: dict[str, object] = {}
    for k, v in pairs:
        if k == "sip" and k in out:
            prev = out[k]
            out[k] = (prev if isinstance(prev, list) else [prev]) + [v]
        else:
            out[k] = v
    return out


def tshark_sip_keys(path: Path, extra: tuple[str, ...] = ()) -> set[Key]:
    """(Call-ID, CSeq number, CSeq method, method-or-status) of every SIP message tshark dissects.

    JSON output keeps each SIP message of a frame (several over TCP) as its own layer.
    """
    tshark = require_program("tshark")
    cmd = [tshark, "-n", "-r", str(path), *extra, "-Y", "sip", "-T", "json", "-J", "sip"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    keys: set[Key] = set()
    for pkt in json.loads(res.stdout or "[]", object_pairs_hook=_keep_repeats):
        layer = pkt["_source"]["layers"].get("sip", [])
        for msg in layer if isinstance(layer, list) and layer and isinstance(layer[0], dict) else [layer]:
            seq = _find(msg, "sip.CSeq.seq")
            what = _find(msg, "sip.Method") or _find(msg, "sip.Status-Code") or ""
            keys.add((
                _find(msg, "sip.Call-ID") or "", int(seq) if seq and seq.isdigit() else -1,
                _find(msg, "sip.CSeq.method") or "", what,
            ))
    return keys


def our_messages(*paths: Path | str, args: tuple[str, ...] = ()) -> tuple[list[dict[str, object]], subprocess.CompletedProcess[str]]:
    """Run ``sipsniff-acc messages`` as a user would; parsed JSON lines and the process."""
    cmd = [sys.executable, "-m", "sipsniff_acc", "messages", *map(str, paths), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()], res


def our_keys(rows: list[dict[str, object]]) -> set[Key]:
    return {
        (str(r["call_id"] or ""), int(r["cseq"]) if r["cseq"] is not None else -1,  # type: ignore[call-overload]
         str(r["cseq_method"]), str(r["method"] or r["status"]))
        for r in rows
    }
