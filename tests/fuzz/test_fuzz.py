"""Continuous fuzzing (issue 10): the seed corpus and every crasher ever found replay clean,
and a bounded fuzzing run (atheris when installed, else the mutation fuzzer) finds nothing.

SIPSNIFF_FUZZ_SECONDS sets the run's length (default 45 s; 0 skips the run, the replays
still run). A crash prints the traceback and the input; add the ``crash-*`` file to
tests/fuzz/crashers/ so it is replayed by every run from then on. A crasher whose bug is
in another stage's module is listed in crashers/XFAIL.json (file name -> exception name)
and replayed as a strict xfail until that bug is fixed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.harness import run_one

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CORPUS = HERE / "corpus"
CRASHERS = HERE / "crashers"
XFAIL: dict[str, str] = json.loads((CRASHERS / "XFAIL.json").read_text()) if (CRASHERS / "XFAIL.json").exists() else {}
SECONDS = float(os.environ.get("SIPSNIFF_FUZZ_SECONDS", "45"))


def _crashers() -> list[object]:
    out: list[object] = []
    for path in sorted(CRASHERS.glob("crash-*")):
        exc = XFAIL.get(path.name)
        marks = [pytest.mark.xfail(strict=True, reason=f"{exc}: another stage's bug (see XFAIL.json)")] if exc else []
        out.append(pytest.param(path, marks=marks, id=path.name[:20]))
    return out


def test_seed_corpus_replays_clean() -> None:
    seeds = sorted(CORPUS.iterdir())
    assert 20 <= len(seeds) and sum(p.stat().st_size for p in seeds) < 2 << 20
    records = sum(run_one(p.read_bytes()) for p in seeds)
    assert records > 0  # the seeds reach the engine, not just the decoder


@pytest.mark.parametrize("path", _crashers())
def test_crasher_replays_clean(path: Path) -> None:
    run_one(path.read_bytes())


def test_xfail_list_names_existing_crashers() -> None:
    assert all((CRASHERS / name).exists() for name in XFAIL)


@pytest.mark.skipif(SECONDS <= 0, reason="SIPSNIFF_FUZZ_SECONDS=0")
def test_fuzz_for_a_bounded_time(tmp_path: Path) -> None:
    """The harness in a subprocess (libFuzzer owns its process), bounded in time; any crash or
    hang fails with the crasher printed."""
    cmd = [sys.executable, "-m", "tests.fuzz.fuzz", "--seconds", str(SECONDS), "--artifacts", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=SECONDS + 180)
    found = sorted(p.name for p in tmp_path.glob("crash-*"))
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0 and not found, f"fuzzing found {found} (exit {proc.returncode}):\n{tail}"
    ran = [line for line in (proc.stdout + proc.stderr).splitlines()
           if "number_of_executed_units" in line or " inputs, " in line]
    print(*ran, sep="\n")
    assert ran, tail
