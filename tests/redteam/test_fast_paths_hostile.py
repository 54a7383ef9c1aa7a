"""Red team on this session's fast paths: the C capture front (_capture.c) and its wiring,
and `process`/`messages -j N` on capture files, where every forked worker reads the files
itself (filerun.py, messagerun._reread_lines).

* a pcapng packet block shorter than its own fixed fields is damage named by a SourceError
  (it raised struct.error out of the reader, C path and Python path alike);
* a FIFO (or /dev/stdin, or `<(tcpdump -w -)`) given as -r is read once, by the front: in
  the file mode every worker opened it and each got a share of the writer's bytes;
* a capture that grows while the workers read it gives the records of the file as it was
  when the run began, in every worker alike; one cut shorter or replaced fails the run with
  one line (each worker read its own copy: they would have accounted different captures);
* memory: frames and datagrams built in C (untracked by the GC) are all freed.
"""

from __future__ import annotations

import gc
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sipsniff_acc import filerun
from sipsniff_acc.events import Counters
from sipsniff_acc.messagerun import file_frames
from sipsniff_acc.processrun import RunResult
from sipsniff_acc.rules import load_rules
from sipsniff_acc.shard import WorkerDied
from sipsniff_acc.sources import pcapfile
from sipsniff_acc.sources.pcapfile import CaptureReader, SourceError, open_captures
from tests.conftest import PCAPS

REPO = Path(__file__).resolve().parents[2]
CASES = REPO / "tests" / "conformance" / "cases"
CALLS = CASES / "volume_mixed" / "capture.pcap"


def _read(path: Path) -> tuple[list[tuple[float, int, bytes, int]], str]:
    out, err = [], ""
    try:
        for f in CaptureReader(path):
            out.append((f.ts, f.linktype, f.data, f.no))
    except SourceError as e:
        err = str(e)
    return out, err


def _block(btype: int, body: bytes, blen: int | None = None) -> bytes:
    body += bytes(-len(body) % 4)
    n = len(body) + 12 if blen is None else blen
    return struct.pack("<II", btype, n) + body + struct.pack("<I", n)


SHB = _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
IDB = _block(1, struct.pack("<HHI", 1, 0, 0))
EPB = _block(6, struct.pack("<IIIII", 0, 0, 7, 4, 4) + b"abcd")


@pytest.mark.parametrize("tail", [
    struct.pack("<III", 6, 12, 12),  # an enhanced packet block of 12 bytes, at the end of the file
    struct.pack("<II", 6, 16) + bytes(4) + struct.pack("<I", 16),
    struct.pack("<II", 2, 28) + bytes(16) + struct.pack("<I", 28),  # obsolete packet block, 28 < 32
    struct.pack("<III", 6, 12, 12) + EPB,  # not at the end: the next block read as its fields
], ids=["epb12-eof", "epb16-eof", "pb28-eof", "epb12-mid"])
@pytest.mark.parametrize("c", [True, False], ids=["c", "py"])
def test_pcapng_packet_block_shorter_than_its_fields_is_named_damage(tmp_path: Path, tail: bytes, c: bool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "short.pcapng"
    path.write_bytes(SHB + IDB + EPB + tail)
    if not c:
        monkeypatch.setattr(pcapfile, "speedups", None)
    frames, err = _read(path)
    assert len(frames) == 1 and frames[0][2] == b"abcd"  # the frame before the damage
    assert "corrupt pcapng block" in err and f"offset {len(SHB + IDB + EPB)}" in err


@pytest.mark.parametrize("opt", [struct.pack("<HH", 14, 8), struct.pack("<HH", 14, 9), struct.pack("<HH", 9, 1)])
def test_pcapng_interface_option_running_past_its_block_is_not_a_crash(tmp_path: Path, opt: bytes) -> None:
    """An if_tsoffset (or if_tsresol) whose value would lie past the block, in the last block of
    the file: its value is cut at the block (struct.error out of the reader before)."""
    path = tmp_path / "idb.pcapng"
    path.write_bytes(SHB + _block(1, struct.pack("<HHI", 1, 0, 0) + opt))
    assert _read(path) == ([], "")


# --- -j N on files: only what can be read again alike -----------------------------------------

def _stream(*paths: Path | str) -> pcapfile.CaptureStream:
    return open_captures([CaptureReader(p) for p in paths], [])


def test_a_fifo_is_not_read_by_every_worker(tmp_path: Path) -> None:
    fifo = tmp_path / "cap.fifo"
    os.mkfifo(fifo)
    assert file_frames(_stream(fifo)) is None
    assert file_frames(_stream(PCAPS / "sample.pcap", fifo)) is None
    assert file_frames(_stream(PCAPS / "sample.pcap")) is not None


def sipsniff(*args: str, cwd: Path, stdin: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sipsniff_acc", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, stdin=stdin)


@pytest.mark.parametrize("command", ["process", "messages"])
def test_a_fifo_given_as_capture_gives_the_records_of_one_process(tmp_path: Path, command: str) -> None:
    """`-r <fifo> -j 2` (a `tcpdump -w fifo` or `<(...)` source): the front reads it once."""
    fifo = tmp_path / "cap.fifo"
    os.mkfifo(fifo)
    data = CALLS.read_bytes()
    outs = []
    for j in ("0", "2"):
        writer = threading.Thread(target=lambda: Path(fifo).write_bytes(data))
        writer.start()
        out = tmp_path / f"out{j}"
        if command == "process":
            res = sipsniff("process", str(fifo), "-j", j, "--no-db", "--log", str(out), "-q", cwd=tmp_path)
        else:
            res = sipsniff("messages", str(fifo), "-j", j, "-o", str(out), "-q", cwd=tmp_path)
        writer.join(30)
        assert res.returncode == 0, res.stderr
        outs.append(out.read_text())
    assert outs[0].count("\n") > 10
    assert outs[0] == outs[1]


def _run_files(stream: pcapfile.CaptureStream, workers: int = 2) -> list[object]:
    found = file_frames(stream)
    assert found is not None
    delivered: list[object] = []
    filerun.run_files(found[0], found[1], load_rules(None), delivered.extend, Counters(), False, workers,
                      RunResult())
    return delivered


def test_a_capture_that_grows_while_the_workers_read_it_is_read_as_it_was(tmp_path: Path) -> None:
    """tcpdump still writing: every worker reads the bytes that were there when the run began
    (whichever moment each one opens the file), so they account the same capture."""
    path = tmp_path / "growing.pcap"
    data = CALLS.read_bytes()
    path.write_bytes(data)
    want = _run_files(_stream(path))
    assert len(want) > 10
    stream = _stream(path)
    found = file_frames(stream)  # the run decides on the file mode: the files as they are now
    assert found is not None
    with open(path, "ab") as f:  # then more records (a later call) arrive before the workers read
        f.write((CASES / "cdr_answered" / "capture.pcap").read_bytes()[24:])
    delivered: list[object] = []
    filerun.run_files(found[0], found[1], load_rules(None), delivered.extend, Counters(), False, 2, RunResult())
    assert delivered == want


@pytest.mark.parametrize("change", ["cut", "replaced", "removed"])
def test_a_capture_cut_or_replaced_under_the_workers_fails_the_run(tmp_path: Path, change: str) -> None:
    path = tmp_path / "cap.pcap"
    data = CALLS.read_bytes()
    path.write_bytes(data)
    stream = _stream(path)
    found = file_frames(stream)
    assert found is not None
    if change == "cut":
        path.write_bytes(data[: len(data) // 2])
    elif change == "removed":
        path.unlink()
    else:
        other = tmp_path / "other.pcap"
        other.write_bytes(data)
        os.replace(other, path)
    with pytest.raises(WorkerDied, match="cap.pcap.*changed"):
        filerun.run_files(found[0], found[1], load_rules(None), [].extend, Counters(), False, 2, RunResult())


def test_a_pinned_reader_of_a_cut_capture_says_so(tmp_path: Path) -> None:
    """The reader of a pinned file that ends early raises CaptureChanged (not SourceError: a
    worker must not count it as ordinary damage that the others did not see)."""
    path = tmp_path / "cap.pcap"
    data = CALLS.read_bytes()
    path.write_bytes(data)
    reader = CaptureReader(path)
    reader.pin()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(pcapfile.CaptureChanged, match="changed"):
        list(reader)


def test_j8_on_a_tiny_and_an_empty_capture(tmp_path: Path) -> None:
    one = tmp_path / "one.pcap"
    from tests.builders import pcap_bytes  # noqa: PLC0415
    frames = [(f.ts, f.data) for f in CaptureReader(CALLS)][:3]
    one.write_bytes(pcap_bytes(frames))
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(pcap_bytes([]))
    for cap in (one, empty):
        outs = []
        for j in ("0", "8"):
            res = sipsniff("process", str(cap), "-j", j, "--no-db", "--log", str(tmp_path / f"l{j}"), "-q",
                           cwd=tmp_path)
            assert res.returncode == 0, res.stderr
            res2 = sipsniff("messages", str(cap), "-j", j, "-o", str(tmp_path / f"m{j}"), "-q", cwd=tmp_path)
            assert res2.returncode == 0, res2.stderr
            outs.append(((tmp_path / f"l{j}").read_text(), (tmp_path / f"m{j}").read_text()))
        assert outs[0] == outs[1]


# --- memory ------------------------------------------------------------------------------------

def test_frames_and_datagrams_built_in_c_are_freed(tmp_path: Path) -> None:
    """Reading and decoding a capture twice: no object built in C outlives its use (they are
    untracked by the GC, so a reference cycle through one could never be collected)."""
    pytest.importorskip("sipsniff_acc._capture")
    from sipsniff_acc.events import Datagram, Frame  # noqa: PLC0415
    from sipsniff_acc.pipeline import MessagePipeline  # noqa: PLC0415

    def once() -> int:
        pipe = MessagePipeline()
        n = 0
        for frame in CaptureReader(CALLS):
            n += len(pipe.feed(frame))
        return n

    once()
    gc.collect()
    import tracemalloc  # noqa: PLC0415
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(3):
        assert once() > 10
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert after - before < 64 << 10, (before, after)
    frame = next(iter(CaptureReader(CALLS)))
    refs = (sys.getrefcount(frame), sys.getrefcount(frame.data))  # (outside assert: pytest keeps its operands)
    assert refs == (2, 2) and not gc.is_tracked(frame)
    from sipsniff_acc import decode as dec  # noqa: PLC0415
    d = dec.decode(frame)
    assert isinstance(d, Datagram) and isinstance(frame, Frame)
    refs = (sys.getrefcount(d), sys.getrefcount(d.payload), sys.getrefcount(d.src), sys.getrefcount(frame))
    assert refs == (2, 2, 2, 2) and not gc.is_tracked(d)


# --- a worker that dies: one line, exit 70, for `messages` as for `process` -------------------

_DYING = """
import os, sys
from sipsniff_acc import messagerun
orig = messagerun._line_producer
def patched(frames, k, *a):
    p = orig(frames, k, *a)
    def produce(inbox):
        for i, item in enumerate(p(inbox)):
            if k == 1 and i == 1:
                os._exit(9)  # as the OOM killer would
            yield item
    return produce
messagerun._line_producer = patched
from sipsniff_acc.cli import main
sys.argv = ["sipsniff-acc", "messages", sys.argv[1], "-j", "2", "-o", os.devnull, "-q"]
main()
"""


def test_messages_with_a_worker_that_dies_says_one_line_and_exits_70(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-c", _DYING, str(CALLS)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert res.returncode == 70, res.stderr
    assert res.stderr.count("\n") == 1 and "error: worker 1" in res.stderr


# --- stdin left non-blocking by whoever shared it -----------------------------------------------

@pytest.mark.parametrize("speedups", ["c", "py"])
def test_a_non_blocking_stdin_is_read_to_its_end(tmp_path: Path, speedups: str) -> None:
    """A pipe whose O_NONBLOCK another process set: a read with nothing there yet is not the end
    (the C walk crashed on readinto1's None; the Python one took read1's b"" for the end of the
    capture and stopped there, exit 0, silently)."""
    import time  # noqa: PLC0415
    data = CALLS.read_bytes()
    want = sipsniff("messages", str(CALLS), "-o", str(tmp_path / "want"), "-q", cwd=tmp_path)
    assert want.returncode == 0, want.stderr
    r, w = os.pipe()
    os.set_blocking(r, False)
    code = "import sys; from sipsniff_acc.cli import main; main()"
    if speedups == "py":
        code = "from sipsniff_acc.sources import pcapfile; pcapfile.speedups = None; " + code
    proc = subprocess.Popen([sys.executable, "-c", code, "messages", "-", "-o", str(tmp_path / "got"), "-q"],
                            stdin=r, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    os.close(r)
    try:
        for i in range(0, len(data), 300_000):
            time.sleep(0.3)  # the reader finds the pipe empty meanwhile
            os.write(w, data[i : i + 300_000])
    except BrokenPipeError:
        pass
    finally:
        os.close(w)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 0, err
    assert (tmp_path / "got").read_bytes() == (tmp_path / "want").read_bytes()


_CUT_UNDER_WORKERS = """
import sys
from pathlib import Path
from sipsniff_acc import filerun
orig = filerun.run_files
p = Path(sys.argv[1])
def run_files(*a, **k):  # the capture is cut after the front pinned it, before the workers read
    p.write_bytes(p.read_bytes()[:100000])
    return orig(*a, **k)
filerun.run_files = run_files
from sipsniff_acc.cli import main
sys.argv = ["sipsniff-acc", "process", sys.argv[1], "-j", "2", "--no-db", "--log", sys.argv[2], "-q"]
main()
"""


def test_process_on_a_capture_cut_under_the_workers_fails_with_one_line(tmp_path: Path) -> None:
    cap = tmp_path / "cap.pcap"
    cap.write_bytes(CALLS.read_bytes())
    res = subprocess.run([sys.executable, "-c", _CUT_UNDER_WORKERS, str(cap), str(tmp_path / "log")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 70, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "error: worker" in lines[0] and "cap.pcap: the capture changed (cut" in lines[0], lines


def _out_of_order(tmp_path: Path, back: float) -> Path:
    """volume_mixed with windows of 40 frames shuffled, one in ten of them ``back`` s earlier."""
    import random  # noqa: PLC0415
    from tests.builders import pcap_bytes  # noqa: PLC0415
    frames = [(f.ts, f.data) for f in CaptureReader(CALLS)]
    rnd = random.Random(7)
    for i in range(0, len(frames) - 40, 40):
        window = frames[i : i + 40]
        rnd.shuffle(window)
        shift = -back if rnd.random() < 0.1 else 0.0
        frames[i : i + 40] = [(ts + shift, data) for ts, data in window]
    cap = tmp_path / "shuffled.pcap"
    cap.write_bytes(pcap_bytes(frames))
    return cap


def _both(tmp_path: Path, cap: Path) -> list[tuple[list[str], str]]:
    outs = []
    for j in ("0", "2"):
        res = sipsniff("process", str(cap), "-j", j, "--no-db", "--log", str(tmp_path / f"l{j}"), "--open-as-408",
                       "-q", cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        res2 = sipsniff("messages", str(cap), "-j", j, "-o", str(tmp_path / f"m{j}"), "-q", cwd=tmp_path)
        assert res2.returncode == 0, res2.stderr
        # (records made at one Tick or at the end come worker by worker with -j N: the set is compared)
        outs.append((sorted((tmp_path / f"l{j}").read_text().splitlines()), (tmp_path / f"m{j}").read_text()))
    assert len(outs[0][0]) > 10
    return outs


def test_frames_out_of_time_order_give_the_records_of_one_process(tmp_path: Path) -> None:
    """Packet time that goes back a little (a merged or re-ordered capture): the workers' Ticks
    and timers follow the same frames in the same order as -j 0."""
    outs = _both(tmp_path, _out_of_order(tmp_path, 0.0))
    assert outs[0] == outs[1]


def test_packet_time_going_back_minutes_gives_the_records_of_one_process(tmp_path: Path) -> None:
    """Packet time going back 300 s: the tracker sweeps at the Ticks only (``ticked``), alike in
    every mode; a sweep in ``feed`` at the times of the messages each shard sees made -j 0 give
    2 records twice that -j 2 gave once."""
    outs = _both(tmp_path, _out_of_order(tmp_path, 300.0))
    assert outs[0] == outs[1]
