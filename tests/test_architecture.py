"""The architecture rules, checked: pure stages do no I/O, and the package type-checks strictly."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PURE = ["events", "anomalies", "decode", "ipfrag", "tcpstream", "wsframe", "sctp", "sip", "pipeline", "messagelog",
        "tracker", "acc", "pv", "records", "rules"]
#: what a pure stage may not import: the I/O edges, clocks, threads, processes
FORBIDDEN = {"sipsniff_acc.sources", "sipsniff_acc.emitters", "sipsniff_acc.shard", "sipsniff_acc.cli",
             "time", "datetime", "threading", "multiprocessing", "subprocess", "asyncio", "os", "sqlalchemy", "pyrad"}


@pytest.mark.parametrize("module", PURE)
def test_pure_stages_import_no_io(module: str) -> None:
    tree = ast.parse((ROOT / "sipsniff_acc" / f"{module}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    bad = {m for m in imported for f in FORBIDDEN if m == f or m.startswith(f + ".")}
    assert not bad, f"{module} imports {bad}"


def test_mypy_strict() -> None:
    if shutil.which("mypy") is None and subprocess.run([sys.executable, "-m", "mypy", "--version"],
                                                       capture_output=True).returncode != 0:
        pytest.skip("mypy is not installed (it comes with the test extras)")
    res = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:]
