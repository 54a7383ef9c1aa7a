"""Operator mistakes: one line `error: ...` naming what to fix, found before the work starts,
with the documented exit status; command-line conventions of tshark/tcpdump; files 0600.

Issue 10 measured tracebacks for `-r capture.pcap` (read as rules.yaml), `-o` to a missing
directory or a directory, `--stats` to a missing directory (after all the work), `init-db URL
--check` with a bad scheme or an unreachable server; a 0-byte capture exiting 0; and output
files created world-readable.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PCAPS
from tests.servers import Postgres, postgres  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[2]
SAMPLE = str(PCAPS / "sample.pcap")


def run(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sipsniff_acc", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def one_line_error(res: subprocess.CompletedProcess[str], status: int, *words: str) -> str:
    """The run failed with ``status`` and said so in exactly one line `error: ...`, no traceback."""
    assert res.returncode == status, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and res.stderr.startswith("error: "), res.stderr
    assert res.stderr.count("\n") == 1, res.stderr
    for w in words:
        assert w in res.stderr, res.stderr
    return res.stderr


def test_r_reads_a_capture_as_in_tshark(tmp_path: Path) -> None:
    res = run("process", "-r", SAMPLE, "--no-db", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 20
    both = run("messages", "-q", "-r", SAMPLE, "-r", str(PCAPS / "vlan.pcap"), cwd=tmp_path)
    apart = [run("messages", "-q", p, cwd=tmp_path).stdout for p in (SAMPLE, str(PCAPS / "vlan.pcap"))]
    assert both.returncode == 0 and sorted(both.stdout.splitlines()) == sorted("".join(apart).splitlines())


def test_rules_have_their_own_flag_and_a_yaml_given_to_r_gets_a_hint(tmp_path: Path) -> None:
    rules = REPO / "rules.yaml"
    res = run("process", "-m", str(rules), SAMPLE, "--no-db", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    one_line_error(run("process", "-r", str(rules), SAMPLE, cwd=tmp_path), 2,
                   f"{rules} looks like rules.yaml, not a capture: use --rules")
    odd = tmp_path / "my-rules.txt"  # not named .yaml: recognised by its keys
    odd.write_text("acc:\n  log_flag: 1\n")
    one_line_error(run("messages", "-r", str(odd), cwd=tmp_path), 2, "looks like rules.yaml")
    one_line_error(run("process", "-m", SAMPLE, cwd=tmp_path), 2, f"{SAMPLE} is a capture, not rules.yaml: read it with -r")
    assert not list(tmp_path.glob("*.db")) and not list(tmp_path.glob("*.spool"))


def test_output_paths_are_checked_before_the_work(tmp_path: Path) -> None:
    missing = tmp_path / "nodir" / "out"
    for args in (("messages", SAMPLE, "-o", str(missing)), ("messages", SAMPLE, "-o", str(tmp_path)),
                 ("messages", SAMPLE, "--stats", str(missing)), ("process", SAMPLE, "--no-db", "--stats", str(missing)),
                 ("process", SAMPLE, "--no-db", "--log", str(tmp_path)), ("process", SAMPLE, "--no-db", "--jsonl",
                                                                           str(missing)),
                 ("process", SAMPLE, "--spool", str(missing)), ("process", SAMPLE, "--spool", str(tmp_path))):
        res = run(*args, cwd=tmp_path)
        err = one_line_error(res, 2, str(missing) if str(missing) in args else "is a directory")
        assert res.stdout == "", f"work was done before the check: {args}"
        assert ("does not exist" in err) or ("is a directory" in err)
    assert not (tmp_path / "acc.db").exists() and not (tmp_path / "sipsniff-acc.spool").exists()
    cap = tmp_path / "cap.pcap"  # an output that is the capture being read would destroy it
    cap.write_bytes((PCAPS / "sample.pcap").read_bytes())
    for args in (("messages", str(cap), "-o", str(cap)), ("process", "-r", str(cap), "--no-db", "--jsonl", str(cap))):
        one_line_error(run(*args, cwd=tmp_path), 2, "is the capture being read")
    assert cap.read_bytes() == (PCAPS / "sample.pcap").read_bytes()


def test_capture_mistakes(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    one_line_error(run("process", str(empty), "--no-db", cwd=tmp_path), 1, "empty file (0 bytes)")
    one_line_error(run("messages", str(empty), cwd=tmp_path), 1, "empty file (0 bytes)")
    one_line_error(run("messages", "-r", str(tmp_path / "nope.pcap"), cwd=tmp_path), 2, "nope.pcap: no such file")
    (tmp_path / "none").mkdir()
    one_line_error(run("messages", str(tmp_path / "none"), cwd=tmp_path), 2, "no capture files found")
    folder = tmp_path / "caps"  # an empty capture inside a directory: the others are read, exit 1 at the end
    folder.mkdir()
    (folder / "a.pcap").write_bytes((PCAPS / "sample.pcap").read_bytes())
    (folder / "b.pcap").write_bytes(b"")
    res = run("process", str(folder), "--no-db", "-q", cwd=tmp_path)
    assert res.returncode == 1 and len(res.stdout.splitlines()) == 20 and "b.pcap: empty file" in res.stderr


def test_usage_mistakes_are_one_line(tmp_path: Path) -> None:
    one_line_error(run("process", "--bogus", SAMPLE, cwd=tmp_path), 2, "--bogus", "-h")
    one_line_error(run("init-db", cwd=tmp_path), 2, "url")
    one_line_error(run("messages", "-f", "table", SAMPLE, cwd=tmp_path), 2, "-f/--filter", "--interface", "-T")
    one_line_error(run("process", SAMPLE, "--tls-keylog", str(tmp_path / "keys"), "--no-db", cwd=tmp_path), 2,
                   "--tls-keylog", "no such file")
    table = run("messages", "-T", "table", "-q", SAMPLE, cwd=tmp_path)
    assert table.returncode == 0 and table.stdout.startswith("time ")


def test_help_and_version(tmp_path: Path) -> None:
    from sipsniff_acc import __version__
    for args in (("--version",), ("version",)):
        res = run(*args, cwd=tmp_path)
        assert res.returncode == 0 and res.stdout.strip() == __version__
    for args in (("-h",), ("process", "-h"), ("messages", "-h"), ("init-db", "-h")):
        res = run(*args, cwd=tmp_path)
        assert res.returncode == 0 and "Usage" in res.stdout, args
    res = run("process", "-h", cwd=tmp_path)
    assert "--read-file" in res.stdout and "-m" in res.stdout and "--rules" in res.stdout


def test_init_db_bad_url_unknown_driver_unreachable(tmp_path: Path) -> None:
    one_line_error(run("init-db", "foo://x/y", "--check", cwd=tmp_path), 2, "unknown database dialect", "foo")
    one_line_error(run("init-db", "not a url", cwd=tmp_path), 2, "is not a database URL")
    err = one_line_error(run("init-db", "postgresql://u:s3cr3t@h:port/acc", cwd=tmp_path), 2, "is not a database URL")
    assert "s3cr3t" not in err
    one_line_error(run("init-db", "mysql+mysqldb://a@127.0.0.1/x", cwd=tmp_path), 2, "driver is not installed")
    one_line_error(run("init-db", f"sqlite:///{tmp_path}/nodir/acc.db", cwd=tmp_path), 2, "does not exist")
    for check in ((), ("--check",)):
        err = one_line_error(run("init-db", "postgresql+psycopg://acc:s3cr3t@127.0.0.1:1/acc", *check,
                                 cwd=tmp_path), 3, "cannot connect", "127.0.0.1")
        assert "s3cr3t" not in err


def test_init_db_login_refused_is_exit_3(tmp_path: Path, postgres: Postgres) -> None:  # noqa: F811
    url = postgres.url.replace("sipsniff@", "nobody:s3cr3t@")
    err = one_line_error(run("init-db", url, "--check", cwd=tmp_path), 3, "cannot connect", "nobody")
    assert "s3cr3t" not in err
    res = run("init-db", postgres.url, cwd=tmp_path)
    assert res.returncode == 0 and "tables ready" in res.stdout


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_output_files_are_created_0600(tmp_path: Path, umask: int) -> None:
    import os
    old = os.umask(umask)
    try:
        res = run("process", SAMPLE, "--no-db", "-q", "--log", str(tmp_path / "acc.log"), "--jsonl",
                  str(tmp_path / "r.jsonl"), "--stats", str(tmp_path / "s.json"), cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        msg = run("messages", SAMPLE, "-q", "-o", str(tmp_path / "m.jsonl"), "--stats", str(tmp_path / "ms.json"),
                  cwd=tmp_path)
        assert msg.returncode == 0, msg.stderr
    finally:
        os.umask(old)
    for name in ("acc.log", "r.jsonl", "s.json", "m.jsonl", "ms.json"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == 0o600, f"{name}: {oct(mode)}"
    assert json.loads((tmp_path / "s.json").read_text())["records"] == {"answered": 20}
    assert len((tmp_path / "acc.log").read_text().splitlines()) == 20
    existing = tmp_path / "shared.log"  # a file that exists keeps the mode the operator gave it
    existing.write_text("")
    existing.chmod(0o640)
    assert run("process", SAMPLE, "--no-db", "-q", "--log", str(existing), cwd=tmp_path).returncode == 0
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640 and len(existing.read_text().splitlines()) == 20
