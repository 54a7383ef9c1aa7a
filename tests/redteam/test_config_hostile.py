"""Red team on --config: the careless operator's mistakes are one line naming the fix, exit
2, before any work: rules.yaml given as --config, a YAML bomb, a string for a number, a
list for one value, -r with -i."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PCAPS

REPO = Path(__file__).resolve().parents[2]

BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def run(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sipsniff_acc", *args], capture_output=True, text=True, cwd=tmp,
                          timeout=60)


@pytest.mark.parametrize(("config", "words"), [
    ((REPO / "rules.yaml").read_text(), ["rules.yaml:8:", "this is a rules file", "--rules"]),
    (BOMB, ["more than", "values"]),
    ("process:\n  count: '10'\n", ["process.count", "whole number"]),
    ("process:\n  rules: [a.yaml, b.yaml]\n", ["process.rules", "one value"]),
    ("process:\n  interface: lo\n  read-file: x.pcap\n", ["not both"]),
])
def test_config_mistakes_are_one_line(tmp_path: Path, config: str, words: list[str]) -> None:
    (tmp_path / "rules.yaml").write_text(config)
    res = run(tmp_path, "--config", "rules.yaml", "process", "-r", str(PCAPS / "compact.pcap"), "--no-db",
              "--log", "none") if "read-file" not in config else run(tmp_path, "--config", "rules.yaml", "process",
                                                                      "--no-db", "--log", "none")
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for w in words:
        assert w in lines[0], lines[0]
