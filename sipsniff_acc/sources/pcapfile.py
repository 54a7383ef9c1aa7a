"""Streaming readers for pcap (µs and ns), pcapng, gzip-compressed captures and stdin.

Memory stays constant: the file is read in fixed chunks and records are cut out of the
chunk with ``struct.unpack_from``. This is plain code on purpose: perf-notes measured a
struct reader at ~1 M records/s against 9 k/s for scapy's dissecting reader, and a
libpcap binding would not read pcapng-with-several-link-types or gzip for us anyway.

A damaged file never loses the frames before the damage: the reader yields everything
it could read, then raises ``SourceError`` naming the file and the byte offset.
"""

from __future__ import annotations

import gzip
import heapq
import io
import os
import re
import stat
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol

from sipsniff_acc.decode import speedups
from sipsniff_acc.events import Frame
from sipsniff_acc.sysloglines import escape

CHUNK: Final = 4 << 20  #: read size; perf-notes measured 4 MiB chunks as the fast plateau
MAX_RECORD: Final = 1 << 20  #: a record claiming more than this is corruption, not a frame
#: (libpcap's own limit for snaplen is 262144; pcapng blocks may be larger, so we allow 1 MiB)

PCAP_MAGICS: Final = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
PCAPNG_SHB: Final = b"\x0a\x0d\x0d\x0a"
GZIP_MAGIC: Final = b"\x1f\x8b"
CAPTURE_SUFFIXES: Final = (".pcap", ".pcapng", ".cap", ".gz", ".dmp", ".ntar")


#: what walks the whole records of a chunk of classic pcap: (buf, pos, big_endian, unit, linktype,
#: no, source) -> (items, pos, no), as _capture.pcap_frames (whose items are Frames)
Walker = Callable[[Any, int, bool, float, int, int, str], tuple[list[Any], int, int]]


class CaptureChanged(Exception):
    """A pinned capture (``CaptureReader.pin``) was cut shorter or replaced before a reader read
    it. Not a SourceError: each ``-j N`` worker reads its own copy of the file, and one that
    saw a change the others did not would account another capture; the run must fail."""


class SourceError(Exception):
    """A capture could not be read (further). ``offset`` is in the uncompressed stream."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        self.path = path
        self.offset = offset
        self.reason = reason
        # the path is escaped: a file named by whoever filled a directory may hold ESC or CR,
        # and this message is printed on the operator's terminal
        super().__init__(f"{escape(path)}: {reason} (at byte offset {offset})")


def _read_some(stream: BinaryIO, n: int) -> bytes:
    """Up to n bytes, without waiting for all n (read1): a live pipe (`tcpdump -w - |`) is
    processed as it arrives instead of 4 MiB at a time; b"" only at the end."""
    read1 = getattr(stream, "read1", None)
    return read1(n) if read1 is not None else stream.read(n)


class CaptureReader:
    """Iterate over the frames of one capture file (or ``-`` for stdin).

    ``bytes_read`` counts compressed bytes consumed from the file, for progress bars.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.size = 0 if self.path == "-" else os.path.getsize(self.path)
        self.frames = 0
        self._raw: BinaryIO | None = None
        self._pinned: os.stat_result | None = None
        #: a walk of classic pcap chunks other than pcap_frames (fileworker's, whose items are
        #: also Datagrams and (no, ts) pairs); taken only where pcap_frames would be
        self.walker: Walker | None = None

    def pin(self) -> None:
        """From now on read the file as it is now: its first ``size`` bytes (a capture still
        being written grows past them), and fail with CaptureChanged if it is cut shorter or
        replaced. For -j N on files, where every worker opens the file at its own moment."""
        st = os.stat(self.path)
        self.size = st.st_size
        self._pinned = st

    @property
    def bytes_read(self) -> int:
        raw = self._raw
        if raw is None or self.path == "-":
            return 0
        try:
            return raw.tell()
        except (OSError, ValueError):
            return self.size

    def _open(self) -> BinaryIO:
        if self.path == "-":
            raw: BinaryIO = sys.stdin.buffer
            try:  # O_NONBLOCK left by a process sharing the pipe: an empty read is not the end
                # (read1 returned b"", taken for the end of the capture; readinto1 None, a crash)
                os.set_blocking(raw.fileno(), True)
            except (OSError, ValueError, AttributeError):  # not a file descriptor (tests, embedding)
                pass
        elif self._pinned is not None:
            raw = io.BufferedReader(_Pinned(self.path, self._pinned))
        else:
            raw = open(self.path, "rb")  # noqa: SIM115 - closed in __iter__
        self._raw = raw
        peekable = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)  # type: ignore[type-var]
        if peekable.peek(2)[:2] == GZIP_MAGIC:
            return _GuardedStream(gzip.GzipFile(fileobj=peekable, mode="rb"))  # type: ignore[return-value]
        return peekable

    def __iter__(self) -> Iterator[Frame]:
        # the frames of each chunk as a list, flattened by chain (C): the Python generators
        # resume once a chunk, not once a frame (three levels of them cost ~0.15 us a frame)
        return chain.from_iterable(self._chunks())

    def _chunks(self) -> Iterator[list[Frame]]:
        """The frames, in lists: each list what one read of the file made whole."""
        stream = self._open()
        try:
            head = stream.read(4)
            if len(head) < 4:
                if not head and self.path == "-":
                    return  # an idle stdin holds no frames, and that is not an error
                if not head:  # a 0-byte file is no capture: tcpdump/tshark refuse it too
                    raise SourceError(self.path, 0, "empty file (0 bytes), not a capture")
                raise SourceError(self.path, 0, "file too short to be a capture")
            if head in PCAP_MAGICS:
                yield from self._pcap(stream, head)
            elif head == PCAPNG_SHB:
                yield from self._pcapng(stream, head)
            else:
                raise SourceError(self.path, 0, f"not a pcap or pcapng file (magic {head.hex()})")
            if isinstance(stream, _GuardedStream) and stream.error:
                raise SourceError(self.path, stream.offset, f"damaged compressed stream: {stream.error}")
        except OSError as exc:
            raise SourceError(self.path, -1, f"read error: {exc}") from exc
        finally:
            if self.path != "-":
                stream.close()
                if self._raw is not None:
                    self._raw.close()

    # -- classic pcap ------------------------------------------------------------------

    def _pcap(self, stream: BinaryIO, magic: bytes) -> Iterator[list[Frame]]:
        order, unit = PCAP_MAGICS[magic]
        rest = stream.read(20)
        if len(rest) < 20:
            raise SourceError(self.path, 4, "truncated pcap file header")
        _vmaj, _vmin, _zone, _sig, _snap, linktype = struct.unpack(order + "HHiIII", rest)
        linktype &= 0x0FFFFFFF  # the upper bits carry FCS length flags (pcap-linktype(7))
        if speedups is not None and isinstance(stream, io.BufferedReader):
            yield from self._pcap_c(stream, order, unit, linktype)
            return
        rec = struct.Struct(order + "IIII")
        unpack = rec.unpack_from
        path = self.path
        buf = b""
        pos = 0
        base = 24  # file offset of buf[0]
        no = 0
        while True:
            chunk = _read_some(stream, CHUNK)
            if chunk:
                buf = buf[pos:] + chunk
                base += pos
                pos = 0
            end = len(buf)
            batch: list[Frame] = []
            while pos + 16 <= end:
                sec, frac, caplen, _orig = unpack(buf, pos)
                if caplen > MAX_RECORD:
                    yield batch  # the frames before the damage first
                    raise SourceError(path, base + pos, f"corrupt record header (captured length {caplen})")
                stop = pos + 16 + caplen
                if stop > end:
                    break
                no += 1
                batch.append(Frame(sec + frac * unit, linktype, buf[pos + 16 : stop], no, path))
                pos = stop
            yield batch
            self.frames = no
            if not chunk:
                if pos < end:
                    raise _truncated(path, buf, pos, end, base, no, order)
                return

    def _pcap_c(self, stream: io.BufferedReader, order: str, unit: float, linktype: int) -> Iterator[list[Frame]]:
        """``_pcap`` with the record loop in C (``_capture.pcap_frames``: whole records of a chunk in
        one call) over one buffer read into again and again. Per frame 0.5 us against 1.0 us: no
        Frame.__init__ call, no copy of each chunk onto the last one's tail, no fresh 4 MiB of
        pages a chunk. The same frames and the same errors at the same offsets as ``_pcap``."""
        assert speedups is not None
        walk = self.walker or speedups.pcap_frames
        path = self.path
        big = order == ">"
        # room for a chunk after the tail of a record cut by the previous one (< 16 + MAX_RECORD)
        buf = bytearray(CHUNK + MAX_RECORD + 16)
        view = memoryview(buf)
        have = 0  #: bytes of buf holding data (the tail of the last chunk, then the new one)
        base = 24  #: file offset of buf[0]
        no = 0
        # What the header's reads left in the reader's own buffer goes first, alone: asked for more
        # than its buffer holds, readinto1 copies those bytes and then waits on the pipe for the rest
        # (CPython), so a live pipe's last frames stayed unread until the next packet came.
        size = len(stream.peek(0)) or CHUNK
        while True:
            n = stream.readinto1(view[have : have + size])  # one read at most: a pipe's data as it comes
            size = CHUNK
            end = have + n
            frames, pos, no = walk(view[:end], 0, big, unit, linktype, no, path)
            yield frames
            self.frames = no
            if end - pos >= 16:  # a whole header the C loop stopped at: a corrupt one
                caplen = struct.unpack_from(order + "I", view, pos + 8)[0]
                if caplen > MAX_RECORD:
                    raise SourceError(path, base + pos, f"corrupt record header (captured length {caplen})")
            if not n:
                if pos < end:
                    raise _truncated(path, bytes(view[pos:end]), 0, end - pos, base + pos, no, order)
                return
            have = end - pos
            buf[:have] = bytes(view[pos:end])  # a copy: the two ranges may overlap
            base += pos

    # -- pcapng --------------------------------------------------------------------------

    def _pcapng(self, stream: BinaryIO, first: bytes) -> Iterator[list[Frame]]:
        """Frames in a list per read, handed on before the next read (which may wait on a pipe)."""
        batch: list[Frame] = []
        try:
            yield from self._pcapng_blocks(stream, first, batch)
        except SourceError:
            yield batch  # the frames before the damage first
            raise
        yield batch

    def _pcapng_blocks(self, stream: BinaryIO, first: bytes, batch: list[Frame]) -> Iterator[list[Frame]]:
        """Walks the blocks, appending frames to ``batch``; yields (and empties) it before each read."""
        path = self.path
        buf = first + _read_some(stream, CHUNK)
        pos = 0
        base = 0
        order = "<"
        ifaces: list[tuple[int, float, float]] = []  # (linktype, tick in seconds, ts offset)
        no = 0
        last_ts = 0.0
        eof = False
        walk = speedups.pcapng_frames if speedups is not None else None
        while True:
            if len(buf) - pos < 12 and not eof:
                if batch:
                    yield batch[:]
                    batch.clear()
                more = _read_some(stream, CHUNK)
                eof = not more
                buf = buf[pos:] + more
                base += pos
                pos = 0
                continue
            end = len(buf)
            if pos >= end:
                self.frames = no
                return
            if walk is not None and ifaces:
                # a run of packet blocks in one C call: 0.4 us a frame against 1.9 us; it stops
                # at any other block, and at a packet block that is cut or damaged: read below
                frames, at, no, last_ts = walk(buf, pos, order == ">", ifaces, no, last_ts, path)
                if at != pos:
                    batch.extend(frames)
                    pos = at
                    self.frames = no
                    continue
            if end - pos < 12:
                raise SourceError(path, base + pos, f"truncated block header after frame {no}")
            btype = buf[pos : pos + 4]
            if btype == PCAPNG_SHB:
                bom = buf[pos + 8 : pos + 12]
                if bom == b"\x4d\x3c\x2b\x1a":
                    order = "<"
                elif bom == b"\x1a\x2b\x3c\x4d":
                    order = ">"
                else:
                    raise SourceError(path, base + pos, "pcapng section header with a bad byte-order magic")
                ifaces = []
            btype_n, blen = struct.unpack_from(order + "II", buf, pos)
            # a packet block shorter than its fixed fields (32 bytes) was read past its end, into
            # the next block or out of the buffer (struct.error out of the reader)
            if blen < 12 or blen % 4 or blen > MAX_RECORD or (blen < 32 and btype_n in (6, 2)):
                raise SourceError(path, base + pos, f"corrupt pcapng block (type {btype_n:#x}, length {blen})")
            if end - pos < blen:
                if eof:
                    raise SourceError(
                        path, base + pos,
                        f"truncated pcapng block after frame {no}: file ends {blen - (end - pos)} bytes short",
                    )
                if batch:
                    yield batch[:]
                    batch.clear()
                more = _read_some(stream, max(CHUNK, blen))
                eof = not more
                buf = buf[pos:] + more
                base += pos
                pos = 0
                continue
            body = pos + 8
            if btype_n == 1:  # Interface Description Block
                linktype = struct.unpack_from(order + "H", buf, body)[0]
                tick, offset = _idb_options(buf, body + 8, pos + blen - 4, order)
                ifaces.append((linktype, tick, offset))
            elif btype_n in (6, 2):  # Enhanced / obsolete Packet Block
                if btype_n == 6:
                    iface, hi, lo, caplen, _orig = struct.unpack_from(order + "IIIII", buf, body)
                    data_at = body + 20
                else:
                    iface, _drops, hi, lo, caplen, _orig = struct.unpack_from(order + "HHIIII", buf, body)
                    data_at = body + 20
                if iface >= len(ifaces):
                    raise SourceError(path, base + pos, f"packet block names undeclared interface {iface}")
                if data_at + caplen > pos + blen - 4:
                    raise SourceError(path, base + pos, f"packet block captured length {caplen} exceeds its block")
                linktype, tick, offset = ifaces[iface]
                last_ts = ((hi << 32) | lo) * tick + offset
                no += 1
                batch.append(Frame(last_ts, linktype, buf[data_at : data_at + caplen], no, path))
            elif btype_n == 3:  # Simple Packet Block: interface 0, no timestamp
                if not ifaces:
                    raise SourceError(path, base + pos, "simple packet block before any interface")
                orig = struct.unpack_from(order + "I", buf, body)[0]
                caplen = min(orig, blen - 16)
                no += 1
                batch.append(Frame(last_ts, ifaces[0][0], buf[body + 4 : body + 4 + caplen], no, path))
            pos += blen
            self.frames = no


def _truncated(path: str, buf: bytes, pos: int, end: int, base: int, no: int, order: str) -> SourceError:
    """The error of a file that ends inside the record at buf[pos:end]."""
    missing = (struct.unpack_from(order + "I", buf, pos + 8)[0] + 16 if end - pos >= 12 else 16) - (end - pos)
    return SourceError(path, base + pos, f"truncated record after frame {no}: file ends {missing} bytes short of its end")


class _Pinned(io.RawIOBase):
    """The first ``st_size`` bytes of the file ``pinned`` describes (its device and inode):
    CaptureChanged if the file at ``path`` is another one now, or ends before them."""

    def __init__(self, path: str, pinned: os.stat_result) -> None:
        super().__init__()
        self.path = path
        try:
            self.file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        except FileNotFoundError:
            raise CaptureChanged(f"{escape(path)}: the capture changed (removed) since the run began") from None
        st = os.fstat(self.file.fileno())
        if (st.st_dev, st.st_ino) != (pinned.st_dev, pinned.st_ino):
            self.file.close()
            raise CaptureChanged(f"{escape(path)}: the capture changed (replaced by another file) since the run began")
        self.left = pinned.st_size
        self.at = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self.left)
        if n <= 0:
            return 0
        with memoryview(b) as view:
            got = self.file.readinto(view[:n]) or 0
        if not got:
            raise CaptureChanged(f"{escape(self.path)}: the capture changed (cut to {self.at} bytes, "
                                 f"{self.at + self.left} when the run began) while it was being read")
        self.left -= got
        self.at += got
        return got

    def tell(self) -> int:
        return self.at

    def close(self) -> None:
        self.file.close()
        super().close()


class _GuardedStream:
    """A decompressing stream whose damage reads as end of data, remembered in ``error``.

    gzip raises on a truncated member; turning that into EOF lets the reader yield every
    frame decompressed so far before it reports the damage.
    """

    def __init__(self, inner: gzip.GzipFile) -> None:
        self.inner = inner
        self.error = ""
        self.offset = 0

    def read(self, n: int) -> bytes:
        if self.error:
            return b""
        try:
            data = self.inner.read(min(n, 1 << 16))  # small reads: less is lost at the damage
        except (EOFError, gzip.BadGzipFile, OSError, ValueError) as exc:
            self.error = str(exc) or type(exc).__name__
            return b""
        self.offset += len(data)
        return data

    def close(self) -> None:
        self.inner.close()


def _idb_options(buf: bytes, at: int, stop: int, order: str) -> tuple[float, float]:
    """The timestamp unit (if_tsresol) and offset (if_tsoffset) of an interface."""
    tick, offset = 1e-6, 0.0
    while at + 4 <= stop:
        code, length = struct.unpack_from(order + "HH", buf, at)
        if code == 0:
            break
        value = buf[at + 4 : min(at + 4 + length, stop)]  # a length past the block is cut there
        if code == 9 and value:
            v = value[0]
            tick = 2.0 ** -(v & 0x7F) if v & 0x80 else 10.0 ** -v
        elif code == 14 and len(value) >= 8:  # (struct.error out of the reader, the last block cut)
            offset = float(struct.unpack(order + "q", value[:8])[0])
        at += 4 + length + (-length % 4)
    return tick, offset


class CapturePathError(ValueError):
    """A capture named on the command line that cannot be read at all, found before the work
    starts. ``status`` is the exit status: 2 for a usage mistake, 1 for an empty capture."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


RULES_SUFFIXES: Final = (".yaml", ".yml")
_RULES_KEYS: Final = re.compile(rb"^(acc|route|failure_route|profile|proxy|tm|limits)\s*:", re.MULTILINE)


def is_capture_magic(head: bytes) -> bool:
    """The first bytes are those of a pcap, a pcapng or a gzip file."""
    return head[:4] in PCAP_MAGICS or head[:4] == PCAPNG_SHB or head[:2] == GZIP_MAGIC


def looks_like_rules(path: str, head: bytes) -> bool:
    """A YAML file where a capture was expected: ``-r rules.yaml`` by someone used to ``-r``
    meaning rules here before (tshark's ``-r`` reads a capture)."""
    if is_capture_magic(head):
        return False
    return path.lower().endswith(RULES_SUFFIXES) or _RULES_KEYS.search(head) is not None


def check_capture(path: str) -> None:
    """Before any work: a capture named by the user exists, can be read, holds bytes and is
    not a rules file. Pipes and devices (``<(tcpdump -w -)``) are not read ahead."""
    if path == "-":
        return
    if not os.path.exists(path):
        raise CapturePathError(f"{path}: no such file", 2)
    if os.path.isdir(path):
        return  # expand_paths stands it for the captures inside
    if not os.path.isfile(path):
        return
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise CapturePathError(f"{path}: cannot read: {e.strerror or e}", 2) from None
    if not head:
        raise CapturePathError(f"{path}: empty file (0 bytes), not a capture", 1)
    if looks_like_rules(path, head):
        raise CapturePathError(f"{path} looks like rules.yaml, not a capture: use --rules (-m)", 2)


def expand_paths(paths: Iterable[str | Path]) -> list[str]:
    """Files as given; a directory stands for the capture files directly inside it."""
    out: list[str] = []
    for p in paths:
        sp = str(p)
        if sp != "-" and os.path.isdir(sp):
            out.extend(
                str(c) for c in sorted(Path(sp).iterdir())
                if c.is_file() and c.name.lower().endswith(CAPTURE_SUFFIXES)
            )
        else:
            out.append(sp)
    return out


class FrameSource(Protocol):
    """What the pipeline reads frames from: a capture file, stdin, or an interface."""

    path: str
    size: int  #: bytes to read, for progress; 0 when unknown

    @property
    def bytes_read(self) -> int: ...

    def __iter__(self) -> Iterator[Frame]: ...


def _guarded(reader: FrameSource, errors: list[SourceError]) -> Iterator[Frame]:
    try:
        yield from reader
    except SourceError as exc:
        errors.append(exc)


class CaptureStream:
    """All frames of all readers in timestamp order (each file is assumed in order).

    A damaged file ends its own stream; its error is appended to ``errors`` and the
    other files go on, so one bad file loses nothing of the others.

    An iterable, not an iterator: while nobody has begun it, ``process``/``messages -j N``
    (filerun.py, messagerun.file_frames) can give each forked worker a pass of its own over
    the same files."""

    def __init__(self, readers: Sequence[FrameSource], errors: list[SourceError]) -> None:
        self.readers = list(readers)
        self.errors = errors
        self.started = False

    def walk_with(self, walker: Walker) -> bool:
        """Have one capture file, unbegun, walked by ``walker`` where its classic pcap records
        would be cut by ``_capture.pcap_frames`` (CaptureReader.walker): True if so. Every item
        then still comes in record order, and each record's ``no`` is its index in the stream."""
        if self.started or len(self.readers) != 1 or speedups is None:
            return False
        reader = self.readers[0]
        if not isinstance(reader, CaptureReader):
            return False
        reader.walker = walker
        return True

    def __iter__(self) -> Iterator[Frame]:
        self.started = True
        if len(self.readers) == 1:
            return _guarded(self.readers[0], self.errors)
        return heapq.merge(*(_guarded(r, self.errors) for r in self.readers), key=_frame_ts)

    @property
    def rereadable(self) -> bool:
        """Regular files that each open afresh when iterated, not begun. Not stdin, a live
        source, nor a FIFO or /dev/fd/N (`<(tcpdump -w -)`): each reader of those gets a share
        of the bytes, not all of them."""
        return not self.started and all(r.__class__ is CaptureReader and r.path != "-" and _regular(r.path)
                                        for r in self.readers)

    def pin(self) -> None:
        """Every reader reads its file as it is now (CaptureReader.pin): -j N's workers open the
        files each at its own moment, and must read the same bytes."""
        for r in self.readers:
            r.pin()  # type: ignore[attr-defined]


def _regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def open_captures(readers: Sequence[FrameSource], errors: list[SourceError]) -> CaptureStream:
    """The frames of ``readers`` in timestamp order (CaptureStream)."""
    return CaptureStream(readers, errors)


def _frame_ts(frame: Frame) -> float:
    return frame.ts
