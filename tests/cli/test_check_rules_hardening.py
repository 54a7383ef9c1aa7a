"""`check-rules` and `process` on hostile or broken rules files, as a user runs them (issue 10).

Every error is one line and exit 2, within a bounded time and (for the billion laughs) a
512 MB address-space limit; a backtracking rule regex against a crafted R-URI no longer
stalls `process`. Each subprocess has a timeout, so the old code fails these tests rather
than hanging them.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.builders import ether, ip4_udp, pcap_bytes, sip_request, sip_response

REPO = Path(__file__).resolve().parents[2]
ADDRESS_SPACE = 512 << 20


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def sipsniff(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess with at most 512 MB of address space (it needs ~60 MB resident)."""
    return subprocess.run([sys.executable, "-m", "sipsniff_acc", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                          preexec_fn=_limit_memory)


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr, res.stderr[-2000:]
    return lines[0]


BILLION_LAUGHS = "".join(
    [f"l0: &l0 [{', '.join(['lol'] * 9)}]\n"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)]
    + ["acc: {log_extra: *l8}\n"])


def test_billion_laughs_one_line_in_512_mb(tmp_path: Path) -> None:
    """The old loader grew past 2.4 GB on these ~570 bytes (MemoryError under the limit)."""
    f = tmp_path / "laughs.yaml"
    f.write_text(BILLION_LAUGHS)
    assert len(f.read_bytes()) < 600
    line = one_error_line(sipsniff("check-rules", str(f), cwd=tmp_path))
    assert line.startswith(f"error: {f}:") and "more than 100000 values" in line, line


@pytest.mark.parametrize(("content", "expected"), [
    (b"acc: " + b"[" * 5000 + b"]" * 5000 + b"\n", ":1: "),  # was a RecursionError traceback
    (b"acc:\n  log_flag: 1\n  log_extra: \"caf\xe9=$fU\"\n", ":3: byte 0xE9 at offset 36 is not UTF-8"),  # Latin-1
    (b"route: &r [*r]\n", ":1: alias *r is inside its own anchor (a cycle)"),
    (b"acc:\n  log_flag: " + b"9" * 5000 + b"\n", ":2: not valid YAML: cannot read this value"),
    (b"", ":1: the file is empty"),
    (b"- INVITE\n", ":1: the file must be a mapping"),
    (b"acc:\n  log_extra: \x1b]0;owned\x07\n", ":2: not valid YAML: character '\\x1b' is not allowed"),
])
def test_broken_files_are_one_line(tmp_path: Path, content: bytes, expected: str) -> None:
    f = tmp_path / "rules.yaml"
    f.write_bytes(content)
    line = one_error_line(sipsniff("check-rules", str(f), cwd=tmp_path))
    assert line.startswith(f"error: {f}{expected}"), line


def test_backreference_is_refused_with_its_line(tmp_path: Path) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text("acc: {log_flag: 1}\nroute:\n  - if: {method: INVITE}\n    setflag: [1]\n"
                 "  - if: {ruri: '^sip:(\\w+)@\\1'}\n    setflag: [2]\n")
    line = one_error_line(sipsniff("check-rules", str(f), cwd=tmp_path))
    assert line.startswith(f"error: {f}:5: route.1.if.ruri: bad regular expression ") and "backreferences" in line


def test_bad_limits_one_line_each(tmp_path: Path) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text("acc: {log_flag: 1}\nlimits:\n  max_transactions: -5\n  max_calls: 10\n")
    res = sipsniff("check-rules", str(f), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert lines[0] == f"error: {f}:3: limits.max_transactions: a positive integer, not -5"
    assert lines[1].startswith(f"error: {f}:4: limits.max_calls: unknown limit (known: max_transactions, ")
    assert len(lines) == 2


def test_limits_and_catastrophic_regex_are_accepted(tmp_path: Path) -> None:
    """The pattern itself is fine on RE2: check-rules takes it and reports the limits set."""
    f = tmp_path / "rules.yaml"
    f.write_text("acc: {log_flag: 1}\nlimits: {max_transactions: 5000}\n"
                 "route:\n  - if: {ruri: '^sip:(a+)+$'}\n    setflag: [1]\n")
    res = sipsniff("check-rules", str(f), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "ok: profile kamailio-5.6, 1 route rule(s)" in res.stdout and "limits: max_transactions=5000" in res.stdout


def _call_pcap(path: Path, ruri: str, n: int = 1) -> None:
    frames = []
    for i in range(n):
        cid, branch, t = f"call-{i}@example.com", f"z9hG4bK-{i}", 1000.0 + i
        frames.append((t, ether(ip4_udp(sip_request("INVITE", ruri=ruri, call_id=cid, branch=branch)))))
        frames.append((t + 0.5, ether(ip4_udp(sip_response(200, "OK", call_id=cid, branch=branch),
                                              src="192.0.2.2", dst="192.0.2.1"))))
    path.write_bytes(pcap_bytes(frames))


def test_process_is_not_stalled_by_a_crafted_ruri(tmp_path: Path) -> None:
    """`^sip:(a+)+$` and sip:aaa...a! (40 a's): Python's re needs hours per INVITE; RE2 microseconds.

    Compared with the same run on a benign R-URI, so a loaded machine's start-up time doesn't count.
    """
    rules = tmp_path / "rules.yaml"
    rules.write_text("acc: {log_flag: 1}\nroute:\n  - if: {method: INVITE}\n    setflag: [1]\n"
                     "  - if: {ruri: '^sip:(a+)+$'}\n    setflag: [2]\n")
    timings = {}
    for name, ruri in (("benign", "sip:bob@example.com"), ("crafted", "sip:" + "a" * 40 + "!")):
        pcap = tmp_path / f"{name}.pcap"
        _call_pcap(pcap, ruri, n=20)
        t0 = time.perf_counter()
        res = sipsniff("process", "--rules", str(rules), "--no-db", "--log", "-", "-j", "0", "--no-progress",
                       str(pcap), cwd=tmp_path, timeout=90)
        timings[name] = time.perf_counter() - t0
        assert res.returncode == 0, res.stderr[-2000:]
        assert len([x for x in res.stdout.splitlines() if "ACC: transaction answered" in x]) == 20, res.stdout
    assert timings["crafted"] < timings["benign"] + 5, timings
