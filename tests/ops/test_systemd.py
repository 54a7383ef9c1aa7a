"""contrib/sipsniff-acc.service: verified by systemd itself, its capabilities documented, its
stop timeout above our stop watchdog, and a capture that works with only its two capabilities."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sipsniff_acc import stopping
from tests.conftest import require_program

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "contrib" / "sipsniff-acc.service"
EXAMPLE = REPO / "contrib" / "sipsniff-acc.yaml"
CAPS = {"CAP_NET_RAW", "CAP_NET_ADMIN"}


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify, with ExecStart pointed at the installed binary: no error and no
    warning about our unit (verify exits 0 on a directive it ignores, so its lines are read)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        require_program("systemd-analyze")
        return
    binary = Path(sys.executable).with_name("sipsniff-acc")
    assert binary.exists(), f"{binary}: the package's console script (pip install -e .)"
    unit = tmp_path / "sipsniff-acc.service"
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/sipsniff-acc " in text
    unit.write_text(text.replace("ExecStart=/usr/local/bin/sipsniff-acc ", f"ExecStart={binary} "))
    res = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    ours = [ln for ln in (res.stdout + res.stderr).splitlines() if str(unit) in ln or unit.name in ln]
    assert res.returncode == 0, res.stderr
    assert not ours, "\n".join(ours)


def test_unit_runs_unprivileged_with_documented_capabilities() -> None:
    text = UNIT.read_text()
    d = directives(text)
    assert d["User"] == ["sipsniff"] and "root" not in d["User"]
    assert set(d["AmbientCapabilities"][0].split()) == CAPS
    assert set(d["CapabilityBoundingSet"][0].split()) == CAPS
    for cap in CAPS:  # each one says what it is for, in the unit's own comments
        assert re.search(rf"^#\s+{cap}\s+\S", text, re.M), f"{cap} is not documented in {UNIT.name}"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "Restart": "on-failure", "KillSignal": "SIGTERM",
                       "ExecReload": "/bin/kill -HUP $MAINPID"}.items():
        assert d[key] == [value], key
    assert d["StateDirectory"] == ["sipsniff-acc"] and d["LogsDirectory"] == ["sipsniff-acc"]
    # our clean stop on SIGTERM exits 143 (128 + 15, after the flush): not a failure for systemd
    assert {"143", "130"} <= set(d["SuccessExitStatus"][0].split())
    assert "sipsniff-acc" in (REPO / "contrib" / "sipsniff-acc.sysusers").read_text()


def test_stop_timeout_covers_the_stop_watchdog() -> None:
    """systemd's SIGKILL must not cut our own bounded stop: TimeoutStopSec > drain_timeout of
    the example config + the watchdog's FORCE_AFTER + HARD_AFTER."""
    d = directives(UNIT.read_text())
    timeout = float(d["TimeoutStopSec"][0].removesuffix("s"))
    drain = float(yaml.safe_load(EXAMPLE.read_text())["process"]["drain-timeout"])
    assert timeout > drain + stopping.FORCE_AFTER + stopping.HARD_AFTER


def test_example_config_is_valid() -> None:
    """The shipped example goes through the same checks as a user's file (every key an
    option of its command, every value of the option's type)."""
    import typer.main

    from sipsniff_acc.cli import app
    from sipsniff_acc.config import load_config

    group = typer.main.get_command(app)
    doc = load_config(EXAMPLE, group, None)
    assert doc["process"]["rules_file"] == "/etc/sipsniff-acc/rules.yaml"
    assert doc["process"]["metrics"] == "127.0.0.1:9466"


SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand out capabilities (setpriv)")
@pytest.mark.parametrize("caps", ["-all,+net_raw,+net_admin", "-all,+net_raw"], ids=["unit", "net_raw-alone"])
def test_capture_with_only_the_units_capabilities(tmp_path: Path, caps: str) -> None:
    """`process -i lo --duration 1` as nobody, holding only CAP_NET_RAW and CAP_NET_ADMIN
    (ambient, bounding set reduced to them, no new privileges), as the unit runs it; and with
    CAP_NET_RAW alone, as the unit's comment says.

    The interpreter is the system's (the venv's lives under /root, which nobody cannot enter),
    with the venv's site-packages on the path: the same ABI (CPython 3.11)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        require_program("setpriv")
        return
    site = next((REPO / ".venv" / "lib").glob("python3*/site-packages"), None)
    if not Path(SYSTEM_PYTHON).exists() or site is None:
        pytest.skip("no system python3 or no venv site-packages to run as an unprivileged user")
    ver = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(f'python{sys.version_info[0]}.{sys.version_info[1]}')"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
    if ver != site.parent.name:
        pytest.skip(f"system {ver} is not the venv's {site.parent.name}")
    os.chmod(tmp_path, 0o777)
    err = tmp_path / "stderr"
    proc = subprocess.Popen(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--no-new-privs", f"--inh-caps={caps}",
         f"--ambient-caps={caps}", f"--bounding-set={caps}", "env", f"PYTHONPATH={REPO}:{site}",
         f"HOME={tmp_path}", SYSTEM_PYTHON, "-m", "sipsniff_acc", "process", "-i", "lo", "--duration", "3",
         "--no-db", "--log", "none", "--stats", "stats.json"],  # relative: pytest's parents are 0700
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err.open("wb"))
    try:
        deadline = time.monotonic() + 30
        while "listening on lo" not in err.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        options = (b"OPTIONS sip:probe@127.0.3.2 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.3.1:5062;branch=z9hG4bK-s3\r\n"
                   b"From: <sip:s3@127.0.3.1>;tag=s3\r\nTo: <sip:probe@127.0.3.2>\r\nCall-ID: s3-caps\r\n"
                   b"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.3.1", 0))
            for _ in range(5):
                s.sendto(options, ("127.0.3.2", 5060))
        status = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert status == 0, err.read_text()[-3000:]
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["sip_messages"] >= 5, stats  # captured as nobody: the capabilities were enough
