"""The mypyc-compiled modules (setup.py ``COMPILED``) against their pure-Python sources.

The .py files are the reference and the fallback where nothing is compiled; CI runs the
compiled ones. Here the same captures go through both, as separate runs of ``process``:
a copy of the package without the compiled modules is the pure one. The records, the
counters and the exit status must be the same. The workload mixes everything a call does
(407 challenges, CANCEL, proxy-made 404s, retransmissions, TCP, compact headers)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sipsniff_acc
from tests.conftest import PCAPS, ROOT

PACKAGE = Path(sipsniff_acc.__file__).parent


def _compiled_modules() -> list[Path]:
    """The package's mypyc modules (their shared library is ``_compiled__mypyc``)."""
    return [p for p in PACKAGE.rglob("*.so") if not p.name.startswith("_")]


def _pure_copy(dest: Path) -> Path:
    """The package as Python sources, with the C extensions (_speedups, _capture, _ring: their
    own equivalence tests cover them) but not the mypyc modules."""
    shutil.copytree(PACKAGE, dest / "sipsniff_acc", ignore=shutil.ignore_patterns("__pycache__", "_compiled__mypyc*"))
    for so in (dest / "sipsniff_acc").rglob("*.so"):
        if not so.name.startswith("_"):
            so.unlink()
    return dest


def _process(pythonpath: Path, capture: Path, out: Path, *extra: str) -> tuple[int, str, dict[str, object]]:
    stats = out / "stats.json"
    log = out / "acc.log"
    res = subprocess.run(
        [sys.executable, "-m", "sipsniff_acc", "process", "--quiet", "--no-progress", "--no-db", "--log", str(log),
         "--stats", str(stats), *extra, str(capture)],
        cwd=out, env={**os.environ, "PYTHONPATH": str(pythonpath)}, capture_output=True, text=True, timeout=300,
    )
    got = json.loads(stats.read_text()) if stats.exists() else {}
    for volatile in ("elapsed_s", "wall_s", "cpu_s", "peak_rss_mb", "started", "finished"):
        got.pop(volatile, None)
    return res.returncode, log.read_text() if log.exists() else "", got


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("workload") / "w.pcap"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gen_workload.py"), str(out), "--calls", "400",
                    "--window", "60", "--seed", "7", "--tcp-share", "0.2"], check=True, capture_output=True, timeout=300)
    return out


def test_compiled_records_equal_pure_python(tmp_path: Path, workload: Path) -> None:
    if not _compiled_modules():
        pytest.skip("no mypyc-compiled module is built here (SIPSNIFF_PURE_PYTHON, or no mypyc): nothing to compare")
    pure = _pure_copy(tmp_path / "pure")
    captures = [workload, PCAPS / "sample.pcap", *sorted(PCAPS.glob("*.pcap"))]
    compared = 0
    for capture in dict.fromkeys(captures):
        for extra in ((), ("--open-as-408",)):
            a, b = tmp_path / "a", tmp_path / "b"
            for d in (a, b):
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir()
            compiled = _process(ROOT, capture, a, *extra)
            python = _process(pure, capture, b, *extra)
            assert compiled == python, f"{capture.name} {extra}: the compiled modules differ from the Python sources"
            compared += compiled[1].count("ACC:")
    assert compared > 1000  # the workload's records were compared, not empty logs


def test_a_state_file_crosses_between_the_builds(tmp_path: Path) -> None:
    """A --state file saved by the pure build is restored by the compiled one and the other way
    round (an upgrade, or a run without mypyc, keeps the open calls): the records of the two
    halves equal those of one run over the whole capture."""
    if not _compiled_modules():
        pytest.skip("no mypyc-compiled module is built here: one build only")
    from sipsniff_acc.sources.pcapfile import CaptureReader
    from tests.builders import pcap_bytes

    pure = _pure_copy(tmp_path / "pure")
    frames = list(CaptureReader(PCAPS / "sample.pcap"))
    half = len(frames) // 2
    for name, part in (("a.pcap", frames[:half]), ("b.pcap", frames[half:])):
        (tmp_path / name).write_bytes(pcap_bytes([(f.ts, f.data) for f in part], linktype=frames[0].linktype))

    def run(pythonpath: Path, capture: Path, jsonl: str, *extra: str) -> str:
        res = subprocess.run(
            [sys.executable, "-m", "sipsniff_acc", "process", "--no-progress", "--no-db", "--log", "none",
             "--jsonl", str(tmp_path / jsonl), *extra, str(capture)],
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(pythonpath)}, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        return res.stderr

    run(ROOT, PCAPS / "sample.pcap", "whole.jsonl")
    want = (tmp_path / "whole.jsonl").read_text()
    assert want.count("\n") >= 20
    for first, second, name in ((pure, ROOT, "pure-then-compiled"), (ROOT, pure, "compiled-then-pure")):
        state = tmp_path / f"{name}.state"
        run(first, tmp_path / "a.pcap", f"{name}-a.jsonl", "--state", str(state))
        err = run(second, tmp_path / "b.pcap", f"{name}-b.jsonl", "--state", str(state))
        assert "restored" in err and "0 expired dropped" in err, err
        got = (tmp_path / f"{name}-a.jsonl").read_text() + (tmp_path / f"{name}-b.jsonl").read_text()
        assert got == want, name
