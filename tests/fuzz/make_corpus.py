"""Build the seed corpus (tests/fuzz/corpus/) from the public and the project's captures.

Each seed is a window of up to ``WINDOW`` consecutive frames that carries SIP (a call
setup over UDP, a TCP stream's segments, fragments with their datagram), encoded by
``harness.encode``. Identical seeds are kept once; the corpus stays under ``MAX_TOTAL``.

    .venv/bin/python -m tests.fuzz.make_corpus [/work/shared/pcaps/public] [tests/pcaps]
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from sipsniff_acc.sources import CaptureReader, SourceError
from tests.fuzz.harness import encode

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).with_name("corpus")
WINDOW = 8  #: frames per seed
PER_CAPTURE = 12  #: seeds per capture
MAX_SEED = 24 << 10  #: bytes per seed
MAX_TOTAL = 1800 << 10  #: the whole corpus (< 2 MB in the repository)


def seeds_of(path: Path) -> list[bytes]:
    try:
        frames = [(f.linktype, f.ts, f.data) for f in CaptureReader(path)]
    except (SourceError, OSError):
        return []
    out: list[bytes] = []
    for at in range(0, len(frames), WINDOW):
        window = frames[at : at + WINDOW]
        window = [w for w in window if w[0] == window[0][0]]
        if not any(b"SIP/2.0" in d or b"sip:" in d for _, _, d in window):
            continue
        seed = encode(window[0][0], [(ts, d) for _, ts, d in window])
        if len(seed) <= MAX_SEED:
            out.append(seed)
    step = max(1, len(out) // PER_CAPTURE)
    return out[::step][:PER_CAPTURE]


def main(dirs: list[str]) -> None:
    CORPUS.mkdir(exist_ok=True)
    total = 0
    for d in dirs:
        for path in sorted(Path(d).iterdir()):
            if not path.name.endswith((".pcap", ".pcapng", ".pcap.gz")):
                continue
            for seed in seeds_of(path):
                if total + len(seed) > MAX_TOTAL:
                    print(f"corpus full at {total} bytes", file=sys.stderr)
                    return
                name = CORPUS / f"{path.name.split('.')[0][:40]}-{hashlib.sha1(seed).hexdigest()[:12]}"
                if not name.exists():
                    name.write_bytes(seed)
                    total += len(seed)
    print(f"{len(list(CORPUS.iterdir()))} seeds, {total} bytes added", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:] or ["/work/shared/pcaps/public", str(ROOT / "tests" / "pcaps")])
