"""`process -j N` on capture files: every worker reads the files itself (filerun.py).

The records, their order and the summary counters must be those of `-j 0`; a worker that
dies fails the run (exit 70) after what was produced before."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sipsniff_acc import filerun
from sipsniff_acc.messagerun import file_frames
from sipsniff_acc.events import Counters, Frame
from sipsniff_acc.processrun import RunResult
from sipsniff_acc.rules import load_rules
from sipsniff_acc.shard import WorkerDied
from sipsniff_acc.sources.pcapfile import CaptureReader, SourceError, open_captures
from tests.conftest import PCAPS, require_shared

REPO = Path(__file__).resolve().parents[2]
CASES = REPO / "tests" / "conformance" / "cases"
RULES = ('acc: {log_flag: 1, log_missed_flag: 2, db_flag: 1, db_missed_flag: 2, failed_transaction_flag: 3,'
         ' report_ack: true, log_extra: "ua=$hdr(User-Agent);ts=$TS"}\nroute:\n'
         '  - if: {method: BYE}\n    setflag: [1, 3]\n  - if: {in_dialog: true}\n    stop: true\n'
         '  - setflag: [1, 2, 3]\n')
#: TCP (split, out of order, lost, mid-stream), IPv4/IPv6 fragments, SCTP, a gzip'd capture, calls
#: across several files merged in time order, and a damaged file (its error counted once)
GROUPS = {
    "tcp_frag": [PCAPS / n for n in ("sipp_tcp.pcap", "tcp_outoforder.pcap", "tcp_lost.pcap", "tcp_midstream.pcap",
                                     "frag4_outoforder.pcap", "frag6_outoforder.pcap", "sctp.pcap", "nanos.pcap.gz")],
    "calls": [CASES / c / "capture.pcap" for c in ("volume_mixed", "parallel_fork_one_answers", "report_ack")],
    "sample": [PCAPS / "sample.pcap"],
}


def sipsniff(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sipsniff_acc", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_workers_reading_the_files_give_the_records_of_one_process(tmp_path: Path, group: str) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    captures = [str(p) for p in GROUPS[group]]
    if group == "sample":  # a damaged copy beside it: the run goes on, the error is reported once
        cut = tmp_path / "cut.pcap"
        data = (PCAPS / "sample.pcap").read_bytes()
        cut.write_bytes(data[: len(data) * 2 // 3])
        captures.append(str(cut))
    outs = {}
    for j in ("0", "2", "3"):
        res = sipsniff("process", *captures, "--rules", str(rules), "-j", j, "--log", str(tmp_path / f"log{j}"),
                       "--jsonl", str(tmp_path / f"r{j}"), "--no-db", "--stats", str(tmp_path / f"s{j}"), cwd=tmp_path)
        assert res.returncode == (1 if group == "sample" else 0), res.stderr
        stats = json.loads((tmp_path / f"s{j}").read_text())
        outs[j] = ((tmp_path / f"log{j}").read_text(), (tmp_path / f"r{j}").read_text(),
                   # as text: the same counts in the same order (a -j N front merges the workers' counts)
                   json.dumps({k: v for k, v in stats.items() if "time" not in k and "elapsed" not in k
                               and "rate" not in k}, indent=1),
                   res.stderr.count("error: "))
    assert outs["0"][0].count("\n") > (2 if group == "sample" else 20)
    assert outs["0"] == outs["2"] == outs["3"]


@pytest.mark.parametrize("name", ["heplify_rtp_rtcp_sip_ipv4_udp.pcap", "heplify_sip_ipv4_tcp_fragmented.pcap"])
def test_workers_write_the_stats_of_one_process_in_its_order(tmp_path: Path, name: str) -> None:
    """Real captures whose dialogs end in several states, counted by workers in another order
    than one process counts them: the --stats file is the same text (a diff of two runs' stats
    must show nothing)."""
    capture = require_shared() / name
    texts = []
    for j in ("0", "2"):
        res = sipsniff("process", str(capture), "--rules", str(REPO / "rules.yaml"), "-j", j, "--log", "/dev/null",
                       "--no-db", "--stats", str(tmp_path / f"s{j}"), cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        texts.append((tmp_path / f"s{j}").read_text())  # (no wall-clock figure in it)
    assert '"dialogs": {' in texts[0] and texts[0] == texts[1]


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_messages_from_workers_reading_the_files_equal_one_process(tmp_path: Path, group: str) -> None:
    """`messages -j N`: the same lines in the same order, and the same counters (--stats)."""
    captures = [str(p) for p in GROUPS[group]]
    outs = {}
    for fmt in ("table", "jsonl"):
        for j in ("0", "2", "3"):
            res = sipsniff("messages", *captures, "-T", fmt, "-j", j, "-o", str(tmp_path / f"m{j}"),
                           "--stats", str(tmp_path / f"s{j}"), "-q", cwd=tmp_path)
            assert res.returncode == 0, res.stderr
            stats = json.loads((tmp_path / f"s{j}").read_text())
            outs[j] = ((tmp_path / f"m{j}").read_bytes(),
                       {k: v for k, v in stats.items() if "time" not in k and "elapsed" not in k and "rate" not in k})
        assert outs["0"][0].count(b"\n") > 20
        assert outs["0"] == outs["2"] == outs["3"]


def test_only_unstarted_streams_over_files_are_read_again(tmp_path: Path) -> None:
    """file_frames knows open_captures' shapes (one file, several, in the progress bar); stdin,
    or a stream already started, stays with the front's round loop."""
    errors: list[SourceError] = []
    one = open_captures([CaptureReader(PCAPS / "sample.pcap")], errors)
    found = file_frames(one)
    assert found is not None and found[1] is errors and found[0](0) is one and found[0](1) is one
    several = open_captures([CaptureReader(PCAPS / "sample.pcap"), CaptureReader(PCAPS / "ipv6.pcap")], errors)
    assert file_frames(several) is not None
    from sipsniff_acc.cli import _WithProgress  # noqa: PLC0415
    wrapped = _WithProgress(one, [], 1)
    found = file_frames(wrapped)
    assert found is not None and found[0](0) is wrapped and found[0](1) is one  # the bar: worker 0 only
    assert file_frames(open_captures([CaptureReader("-")], errors)) is None
    started = open_captures([CaptureReader(PCAPS / "sample.pcap")], errors)
    next(iter(started))
    assert file_frames(started) is None
    begun_bar = _WithProgress(open_captures([CaptureReader(PCAPS / "sample.pcap")], errors), [], 1)
    next(iter(begun_bar))
    assert file_frames(begun_bar) is None
    assert file_frames(iter([])) is None


def test_a_worker_that_dies_fails_the_run() -> None:
    """Worker 1 dies in the middle of the file: WorkerDied, and the records before went out."""
    errors: list[SourceError] = []
    rules = load_rules(None)

    def dying(frames: Iterator[Frame]) -> Iterator[Frame]:
        for i, f in enumerate(frames):
            if i == 30:
                os._exit(9)
            yield f

    frames = open_captures([CaptureReader(PCAPS / "sample.pcap")], errors)
    delivered: list[object] = []
    with pytest.raises(WorkerDied, match="exited with code 9"):
        filerun.run_files(lambda k: frames if k == 0 else dying(frames), errors, rules, delivered.extend,
                          Counters(), False, 2, RunResult())


def test_a_killed_worker_exits_70(tmp_path: Path) -> None:
    """SIGKILL (the OOM killer) on a worker of a real run: one error line, exit 70."""
    pcap = tmp_path / "calls.pcap"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gen_workload.py"), str(pcap), "--calls", "5000",
                    "--seed", "3"], check=True, capture_output=True, timeout=120)
    proc = subprocess.Popen([sys.executable, "-m", "sipsniff_acc", "process", str(pcap), "-j", "2", "--no-db",
                             "--log", "none", "-q"], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    kids: list[str] = []
    deadline = time.monotonic() + 60
    while len(kids) < 2 and time.monotonic() < deadline and proc.poll() is None:
        try:
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except OSError:
            pass
        time.sleep(0.01)
    assert len(kids) == 2, "the workers never started"
    time.sleep(0.1)
    os.kill(int(kids[1]), signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 70, err
    assert "error: worker 1" in err and "exited with code -9" in err
