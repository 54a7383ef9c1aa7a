"""Acceptance (issue 11, "restarts lose no call"): a real SIPp call on loopback in a network
namespace of this test's own; ``process -i lo --state F`` is SIGTERMed after the 200/ACK and
started again before the BYE. Its records (and CDR, when the build has dialog CDRs) equal
those of a ``process -i lo`` that ran through the whole call; a third one started fresh at
the restart, without the state, shows what is lost without it (the test can fail).

Needs root, ip (iproute2) and SIPp: skips with the reason without them, fails under
SIPSNIFF_REQUIRE_SERVERS=1. Processes are stopped by their PID, the namespace deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sipsniff_acc.rules import RulesError, parse_rules
from tests.conftest import require_program

UAC, UAS = "127.0.4.1", "127.0.4.2"
PAUSE_MS = 12000  #: the call's length (SIPp -d): the sniffer is restarted inside it
EXE = str(Path(sys.executable).with_name("sipsniff-acc"))

RULES = """
profile: kamailio-5.6
acc:
  log_flag: 1
  log_missed_flag: 2
  db_flag: 1
  db_missed_flag: 2
  report_ack: true
  log_extra: "src_user=$fU;started=$TS;ua=$hdr(User-Agent)"
{cdr}route:
  - if: {{method: INVITE, in_dialog: false}}
    setflag: [1, 2]
{manage}  - if: {{method: BYE, in_dialog: true}}
    setflag: [1]
  - if: {{method: ACK}}
    setflag: [1]
"""


def rules_text() -> tuple[str, bool]:
    """The rules, with dialog CDRs when this build has them."""
    with_cdr = RULES.format(cdr="  cdr_enable: true\n  cdr_extra: \"src=$fU;dst=$rU\"\n",
                            manage="    dlg_manage: true\n")
    try:
        parse_rules(with_cdr)
        return with_cdr, True
    except RulesError:
        return RULES.format(cdr="", manage=""), False


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        if os.environ.get("SIPSNIFF_REQUIRE_SERVERS") == "1":
            pytest.fail("the restart test needs root (a network namespace, a packet socket)")
        pytest.skip("the restart test needs root (a network namespace, a packet socket)")
    require_program("ip")
    require_program("sipp")
    name = f"s4-restart-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=10)


class Sniffer:
    """One ``sipsniff-acc process -i lo`` inside the namespace, writing JSON lines."""

    def __init__(self, ns: str, work: Path, name: str, workers: int, state: Path | None = None) -> None:
        self.jsonl, self.err = work / f"{name}.jsonl", work / f"{name}.err"
        args = ["ip", "netns", "exec", ns, EXE, "process", "-i", "lo", "--duration", "120", "-j", str(workers),
                "-m", str(work / "rules.yaml"), "--no-db", "--log", "none", "--jsonl", str(self.jsonl)]
        if state is not None:
            args += ["--state", str(state)]
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(args, cwd=work, stdout=subprocess.DEVNULL, stderr=err)
        self.wait_capturing()

    def capturing(self) -> bool:
        """The front process holds a packet socket (its inode is in its namespace's /proc/net/packet)."""
        pid = self.proc.pid  # ip netns exec execs the command: the same PID
        try:
            inodes = {line.split()[-1] for line in Path(f"/proc/{pid}/net/packet").read_text().splitlines()[1:]}
            fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            return False
        return any(f.startswith("socket:[") and f[8:-1] in inodes for f in fds)

    def wait_capturing(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sniffer exited {self.proc.returncode}: {self.err.read_text()[-2000:]}")
            if self.capturing():
                time.sleep(0.3)  # the socket is bound; let the ring be set up
                return
            time.sleep(0.05)
        raise AssertionError(f"sniffer not capturing after {timeout} s: {self.err.read_text()[-2000:]}")

    def records(self, call_id: str | None = None) -> list[dict[str, object]]:
        if not self.jsonl.exists():
            return []
        out = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
        return [r for r in out if call_id is None or r.get("call_id") == call_id]

    def wait_records(self, pred: object, timeout: float = 20.0) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            recs = self.records()
            if pred(recs):  # type: ignore[operator]
                return recs
            time.sleep(0.05)
        raise AssertionError(f"records not seen in {timeout} s: {self.records()}; {self.err.read_text()[-1500:]}")

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode, self.err.read_text()


def _kinds(recs: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(r["kind"], r["method"]) for r in recs]


def _key(r: dict[str, object]) -> tuple[object, ...]:
    return (r["ts"], r["kind"], r["method"])


def same(got: list[dict[str, object]], want: list[dict[str, object]]) -> bool:
    """Equal records, but for the time each packet socket stamped (two sniffers' kernel
    timestamps of one packet differ by a microsecond or so) and the id that hashes it."""
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if abs(float(g["ts"]) - float(w["ts"])) > 0.001:  # type: ignore[arg-type]
            return False
        if {k: v for k, v in g.items() if k not in ("id", "ts")} != {k: v for k, v in w.items() if k not in ("id", "ts")}:
            return False
    return True


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_mid_call_then_bye(netns: str, tmp_path: Path, workers: int) -> None:
    text, with_cdr = rules_text()
    (tmp_path / "rules.yaml").write_text(text)
    state = tmp_path / "acc.state"
    reference = Sniffer(netns, tmp_path, "reference", workers)
    sniffers = [reference]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        restarted = Sniffer(netns, tmp_path, "before", workers, state)
        sniffers.append(restarted)
        sipp = shutil.which("sipp") or "sipp"
        uas = subprocess.Popen(["ip", "netns", "exec", netns, sipp, "-sn", "uas", "-i", UAS, "-p", "5060", "-m", "1",
                                "-nostdin"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(uas)
        time.sleep(0.5)
        uac = subprocess.Popen(["ip", "netns", "exec", netns, sipp, "-sn", "uac", "-i", UAC, "-p", "5060", "-m", "1",
                                "-d", str(PAUSE_MS), f"{UAS}:5060", "-nostdin", "-timeout", "60"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(uac)
        t_ack = time.monotonic()
        # the 200 (answered) and the ACK (acknowledged) are accounted: the call is up
        before = restarted.wait_records(lambda rs: {"answered", "acked"} <= {r["kind"] for r in rs})
        call_id = str(before[0]["call_id"])
        rc, err = restarted.stop()
        assert rc == 128 + signal.SIGTERM, err
        assert "saved" in err and "dialogs" in err, err
        files = [state] if workers == 0 else [Path(f"{state}.{k}") for k in range(workers)]
        assert all(f.exists() and (f.stat().st_mode & 0o777) == 0o600 for f in files), err
        after = Sniffer(netns, tmp_path, "after", workers, state)
        sniffers.append(after)
        fresh = Sniffer(netns, tmp_path, "fresh", workers)  # the control: a restart without the state
        sniffers.append(fresh)
        assert time.monotonic() - t_ack < PAUSE_MS / 1000 - 1, "the restart took longer than the call: no BYE after it"
        assert uac.wait(60) == 0, "SIPp's call failed"
        after.wait_records(lambda rs: any(r["method"] == "BYE" for r in rs)
                           and (not with_cdr or any(r["kind"] == "cdr" for r in rs)))
        time.sleep(1.0)
    finally:
        results = {s.jsonl.stem: s.stop() for s in sniffers}
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
    assert "restored" in results["after"][1], results["after"][1]
    want = sorted(reference.records(call_id), key=_key)
    got = sorted(restarted.records(call_id) + after.records(call_id), key=_key)
    assert any(r["method"] == "BYE" for r in after.records(call_id))
    kinds = _kinds(want)
    assert ("answered", "INVITE") in kinds and ("acked", "ACK") in kinds and ("answered", "BYE") in kinds
    if with_cdr:
        assert [r for r in want if r["kind"] == "cdr"], want
    assert same(got, want), (got, want)
    # without the state the BYE's records differ ($TS restarts, no CDR): what the file saves matters
    control = sorted(fresh.records(call_id), key=_key)
    assert not same([r for r in control if r["method"] == "BYE" or r["kind"] == "cdr"],
                    [r for r in want if r["method"] == "BYE" or r["kind"] == "cdr"])
