"""RADIUS and Diameter peers on loopback for the backend tests: FreeRADIUS 3.2 and an
Erlang/OTP `diameter` accounting server. Started from our fixtures on 127.0.3.x, stopped by PID.
A missing binary skips the test, or fails it under SIPSNIFF_REQUIRE_SERVERS=1."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_program
from tests.servers import free_port, stop_process

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OURS = Path(__file__).resolve().parents[1] / "sipsniff_acc" / "data" / "dictionary.sipsniff"
SYSTEM_DICT = Path("/usr/share/freeradius/dictionary")
SECRET = "testing123"
RADIUS_IP = "127.0.3.1"


class FreeRadius:
    """freeradius -X from tests/fixtures/radius, accounting on 127.0.3.1:<free port>."""

    def __init__(self, tmp: Path, ip: str = RADIUS_IP) -> None:
        self.binary = shutil.which("freeradius") or shutil.which("radiusd") or require_program("freeradius")
        if not SYSTEM_DICT.exists():
            require_program("freeradius-dictionaries")
        self.ip, self.port = ip, free_port()
        self.dir = tmp / "raddb"
        (self.dir / "dict").mkdir(parents=True)
        for sub in ("var/log", "var/radacct", "var/run"):
            (self.dir / sub).mkdir(parents=True)
        (self.dir / "radiusd.conf").write_text((FIXTURES / "radius" / "radiusd.conf.in").read_text().format(
            ip=ip, port=self.port, auth_port=free_port(), secret=SECRET, clients="127.0.3.0/24"))
        # The system dictionary without dictionary.columbia_university, whose VSAs take the names
        # Sip-Method & co.; then ours (the non-IANA Kamailio numbers), loaded last so they win.
        text = SYSTEM_DICT.read_text()
        text = re.sub(r"^\$INCLUDE dictionary\.", f"$INCLUDE {SYSTEM_DICT.parent}/dictionary.", text, flags=re.M)
        text = re.sub(r"^(\$INCLUDE .*dictionary\.columbia_university)$", r"#\1", text, flags=re.M)
        (self.dir / "dict" / "dictionary").write_text(text)
        sip = [ln for ln in OURS.read_text().splitlines()
               if re.match(r"(ATTRIBUTE|VALUE)\s+(Sip|SIP)-", ln) or re.match(r"VALUE\s+Service-Type\s+Sip-Session", ln)]
        (self.dir / "dictionary").write_text("\n".join(sip) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def jsonl(self) -> Path:
        return self.dir / "var" / "radacct" / "acct.jsonl"

    def start(self) -> None:
        out = open(self.dir / "radiusd.out", "ab")  # noqa: SIM115 - kept by the process
        self.proc = subprocess.Popen([self.binary, "-d", str(self.dir), "-D", str(self.dir / "dict"), "-X"],
                                     stdout=out, stderr=out)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if "Ready to process requests" in (self.dir / "radiusd.out").read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise RuntimeError((self.dir / "radiusd.out").read_text(errors="replace")[-2000:])
            time.sleep(0.05)
        raise RuntimeError("FreeRADIUS did not become ready")

    def stop(self) -> None:
        stop_process(self.proc)
        (self.dir / "radiusd.out").write_text("")  # the next start waits for a fresh "Ready"

    def records(self) -> list[dict[str, Any]]:
        """acct.jsonl entries: {attribute: [values]} in the order FreeRADIUS decoded them."""
        if not self.jsonl.exists():
            return []
        out = []
        for line in self.jsonl.read_text().splitlines():
            doc = json.loads(line)
            out.append({k: v["value"] for k, v in doc.items()})
        return out


@pytest.fixture
def freeradius(tmp_path: Path):  # type: ignore[no-untyped-def]
    server = FreeRadius(tmp_path)
    try:
        yield server
    finally:
        server.stop()


class OtpDiameterPeer:
    """Erlang/OTP diameter (tests/fixtures/diameter/acct_peer.escript) on 127.0.3.20:<free port>."""

    def __init__(self, tmp: Path, ip: str = "127.0.3.20") -> None:
        self.escript = shutil.which("escript") or require_program("escript")
        if not list(Path("/usr/lib/erlang/lib").glob("diameter-*")) and shutil.which("erl"):
            require_program("erlang-diameter")
        self.ip, self.port = ip, free_port()
        self.host, self.realm = "peer.test.example", "test.example"
        self.records_file = tmp / "diameter-records.jsonl"
        self.out = tmp / "diameter-peer.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        import socket as s_
        out = open(self.out, "ab")  # noqa: SIM115 - kept by the process
        self.proc = subprocess.Popen([self.escript, str(FIXTURES / "diameter" / "acct_peer.escript"), self.ip,
                                      str(self.port), str(self.records_file), self.host, self.realm],
                                     stdout=out, stderr=out)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.out.read_text(errors="replace")[-2000:])
            with s_.socket() as s:
                if s.connect_ex((self.ip, self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("the Diameter peer did not listen in time")

    def stop(self) -> None:
        stop_process(self.proc)

    def events(self) -> list[dict[str, Any]]:
        if not self.records_file.exists():
            return []
        return [json.loads(line) for line in self.records_file.read_text().splitlines()]

    def acrs(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["event"] == "acr"]


@pytest.fixture
def diameter_peer(tmp_path: Path):  # type: ignore[no-untyped-def]
    peer = OtpDiameterPeer(tmp_path)
    try:
        yield peer
    finally:
        peer.stop()
