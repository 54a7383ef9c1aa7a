"""Run the fuzz harness for a bounded time: coverage-guided with atheris (libFuzzer) when it
imports, else a seeded mutation fuzzer (byte flips, inserts, deletions, truncation,
splices, interesting numbers). Either way a crash or a hang writes ``crash-<sha1>`` to
``--artifacts``, prints the traceback and the input (base64), and exits 1.

    .venv/bin/python -m tests.fuzz.fuzz --seconds 60 --artifacts /tmp/crashes [--engine mutate]

Last line on success: ``fuzz: <engine> <N> inputs, 0 crashes``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
HANG_SECONDS = 10  #: one input taking longer than this is a hang (the real ones take milliseconds)
RSS_LIMIT_MB = 1024  #: a run past this is a crash (an allocation a packet sized)
MAX_LEN = 32 << 10  #: longest input the fuzzers build


class Hang(Exception):
    """An input ran longer than HANG_SECONDS."""


def _report(data: bytes, artifacts: Path, err: BaseException) -> None:
    artifacts.mkdir(parents=True, exist_ok=True)
    path = artifacts / f"crash-{hashlib.sha1(data).hexdigest()}"
    path.write_bytes(data)
    print("".join(traceback.format_exception(err)), file=sys.stderr)
    print(f"crasher: {path}\nbase64: {base64.b64encode(data).decode()}", file=sys.stderr)


def _seeds() -> list[bytes]:
    return [p.read_bytes() for p in sorted(CORPUS.iterdir()) if p.is_file()] or [b"\x00"]


INTERESTING = [b"0", b"4294967295", b"2147483648", b"18446744073709551616", b"9" * 5000, b"\xff\xff", b"\x00\x00",
               b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", b"\r\n", b"\r\n\r\n", b",",
               b";tag=", b";branch=z9hG4bK", b"CSeq: ", b"Content-Length: ", b"Via: SIP/2.0/UDP a\r\n", b"\n "]


def mutate(data: bytes, rnd: random.Random, seeds: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.randint(1, 8)):
        op = rnd.randrange(8)
        at = rnd.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip bits
            i = min(at, len(buf) - 1)
            buf[i] ^= 1 << rnd.randrange(8)
        elif op == 1:  # random bytes in
            buf[at:at] = rnd.randbytes(rnd.randint(1, 8))
        elif op == 2 and buf:  # delete a run
            del buf[at : at + rnd.randint(1, 32)]
        elif op == 3:  # an interesting value in place
            v = rnd.choice(INTERESTING)
            buf[at : at + rnd.randint(0, len(v))] = v
        elif op == 4:  # truncate
            del buf[at:]
        elif op == 5:  # splice another seed's tail
            other = rnd.choice(seeds)
            j = rnd.randrange(len(other) + 1)
            buf[at:] = other[j:]
        elif op == 6 and buf:  # duplicate a run (repeated headers, chunks, segments)
            run = buf[at : at + rnd.randint(1, 64)]
            buf[at:at] = run * rnd.randint(1, 16)
        elif op == 7:  # a long run of one byte: what makes a backtracking regex or a rescanning loop slow
            buf[at:at] = rnd.choice(b" \t;,:0a\r\n") .to_bytes(1, "big") * rnd.randint(1000, 30000)
    return bytes(buf[:MAX_LEN])


def _alarm(_sig: int, _frame: FrameType | None) -> None:
    raise Hang(f"one input ran longer than {HANG_SECONDS} s")


def _signature(err: BaseException) -> str:
    """Exception type and the innermost frame of the package: one bug, however many inputs hit it."""
    tb = traceback.extract_tb(err.__traceback__)
    ours = [f for f in tb if "sipsniff_acc" in f.filename] or tb
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return f"{type(err).__name__} at {where}"


def run_mutate(seconds: float, artifacts: Path, seed: int, keep_going: bool = False) -> int:
    """The fallback fuzzer; with ``keep_going`` every distinct crash is kept and the run goes on
    (to measure how many bugs a version has), else the first crash ends it."""
    from tests.fuzz.harness import run_one

    seeds = _seeds()
    rnd = random.Random(seed)
    signal.signal(signal.SIGALRM, _alarm)
    deadline = time.monotonic() + seconds
    n = 0
    found: dict[str, int] = {}
    inputs = iter(seeds)  # the seeds themselves first
    while time.monotonic() < deadline:
        data = next(inputs, None)
        if data is None:
            data = mutate(rnd.choice(seeds), rnd, seeds)
        n += 1
        signal.alarm(HANG_SECONDS)
        try:
            run_one(data)
        except BaseException as err:  # noqa: BLE001 - every exception past the stages is the finding
            signal.alarm(0)
            sig = _signature(err)
            if sig not in found:
                _report(data, artifacts, err)
            found[sig] = found.get(sig, 0) + 1
            if not keep_going:
                break
        signal.alarm(0)
    for sig, hits in sorted(found.items()):
        print(f"fuzz: crash {sig} ({hits} inputs)")
    print(f"fuzz: mutate {n} inputs, {len(found)} crashes")
    return 1 if found else 0


def run_atheris(seconds: float, artifacts: Path, seed: int) -> int:
    import atheris

    # atheris instruments Python bytecode only: the mypyc-compiled modules (setup.py COMPILED)
    # run but give no coverage feedback. For a coverage-guided session, put a pure copy first
    # on the path (as tests/golden/test_pure_python.py makes one) or install with
    # SIPSNIFF_PURE_PYTHON=1; the compiled build still meets every input of the corpus.
    with atheris.instrument_imports(include=["sipsniff_acc"]):
        from tests.fuzz.harness import run_one

    def test_one(data: bytes) -> None:
        try:
            run_one(data)
        except BaseException as err:
            _report(data, artifacts, err)
            raise

    artifacts.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix="sipsniff-fuzz-")  # new inputs go here, never into the repository
    argv = [sys.argv[0], f"-max_total_time={max(1, int(seconds))}", f"-timeout={HANG_SECONDS}",
            f"-rss_limit_mb={RSS_LIMIT_MB}", f"-max_len={MAX_LEN}", f"-seed={seed}", "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/", work, str(CORPUS)]
    atheris.Setup(argv, test_one)
    atheris.Fuzz()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("SIPSNIFF_FUZZ_SECONDS", "60")))
    ap.add_argument("--artifacts", type=Path, default=Path(tempfile.gettempdir()) / "sipsniff-fuzz-crashes")
    ap.add_argument("--engine", choices=["auto", "atheris", "mutate"], default="auto")
    ap.add_argument("--keep-going", action="store_true", help="mutate engine: keep every distinct crash, go on")
    ap.add_argument("--seed", type=int, default=int(os.environ.get("SIPSNIFF_FUZZ_SEED", "0")) or int(time.time()))
    args = ap.parse_args()
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "mutate"
    print(f"fuzz: engine {engine}, seed {args.seed}, {args.seconds:g} s", flush=True)
    if engine == "atheris":
        return run_atheris(args.seconds, args.artifacts, args.seed)
    return run_mutate(args.seconds, args.artifacts, args.seed, args.keep_going)


if __name__ == "__main__":
    sys.exit(main())
