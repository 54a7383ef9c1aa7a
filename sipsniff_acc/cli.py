"""The command line (typer): wiring sources → pipeline → outputs, no logic of its own."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, BinaryIO, TextIO

import typer

from sipsniff_acc import __version__
from sipsniff_acc.anomalies import ANOMALIES
from sipsniff_acc.messagelog import TABLE_HEADER
from sipsniff_acc.messagerun import message_lines
from sipsniff_acc.events import Counters
from sipsniff_acc.events import Datagram
from sipsniff_acc.sources import CaptureReader, SourceError, expand_paths, open_captures
from sipsniff_acc.sources.live import LiveCapture
from sipsniff_acc.sources.pcapfile import FrameSource
from sipsniff_acc.sources.tlskeys import TlsEngineError, decrypted_sip

app = typer.Typer(
    help="Passive SIP accounting sniffer: Kamailio acc records from the wire or from pcaps.",
    no_args_is_help=True,
    add_completion=False,
)

EXIT_INPUT_ERROR = 1  #: a capture was damaged or unreadable; everything before the damage was processed
PROGRESS_MIN_BYTES = 16 << 20  #: below this a file is read in well under a second: no bar
MAX_AUTO_WORKERS = 4  #: the reading process saturates near 4 parsers (it costs ~1/3 of a parser per message)


class MessageFormat(str, Enum):
    jsonl = "jsonl"
    table = "table"


def _open_readers(files: list[str]) -> list[CaptureReader]:
    paths = expand_paths(files)
    if not paths:
        raise typer.BadParameter("no capture files found", param_hint="FILE")
    readers = []
    for p in paths:
        if p != "-" and not os.path.isfile(p):
            raise typer.BadParameter(f"{p}: no such file", param_hint="FILE")
        readers.append(CaptureReader(p))
    return readers


def _open_sources(
    files: list[str] | None, interface: str | None, count: int | None, duration: float | None,
) -> list[FrameSource]:
    if interface is None:
        if count is not None or duration is not None:
            raise typer.BadParameter("--count and --duration go with --interface")
        return list(_open_readers(files or []))
    if files:
        raise typer.BadParameter("give capture files or --interface, not both", param_hint="FILE")
    if count is None and duration is None:
        raise typer.BadParameter("a live capture needs --count or --duration (every capture is bounded)")
    return [LiveCapture(interface, count, duration)]


def _summary(counters: Counters, errors: list[SourceError], out: TextIO) -> None:
    c = counters
    print(
        f"summary: {c.frames} packets, {c.bytes} bytes, {c.sip_messages} SIP messages, "
        f"{c.keepalives} keep-alives, {c.fragments} fragments ({c.datagrams_reassembled} datagrams reassembled), "
        f"{sum(c.skipped.values())} non-SIP skipped, {sum(c.anomalies.values())} malformed/anomalies, "
        f"{len(errors)} input errors",
        file=out,
    )
    if c.streams["tls"]:
        why = "" if c.tls_decrypted else " (give --tls-keylog to decrypt)"
        print(f"  TLS: {c.streams['tls']} directions seen, {c.tls_decrypted} SIP messages decrypted, "
              f"{c.tls_unreadable} directions not readable{why}", file=out)
    if c.duplicates:
        print(f"  mirrored duplicates dropped: {c.duplicates}", file=out)
    for name, n in sorted(c.streams.items()):
        print(f"  tcp directions carrying {name}: {n}", file=out)
    for name, n in sorted(c.skipped.items()):
        print(f"  skipped {name}: {n}", file=out)
    for name, n in sorted(c.anomalies.items()):
        print(f"  anomaly {name}: {n}  ({ANOMALIES.get(name, '')})", file=out)
    for err in errors:
        print(f"error: {err}", file=out)


@app.command()
def messages(
    files: Annotated[list[str] | None, typer.Argument(help="pcap/pcapng files (.gz too), directories, or - for stdin")] = None,
    fmt: Annotated[MessageFormat, typer.Option("--format", "-f", help="jsonl: one JSON object a line; table: columns")] = MessageFormat.jsonl,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write here instead of stdout")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no summary on stderr")] = False,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="progress bar (default: on a terminal, for big inputs)")] = None,
    stats: Annotated[Path | None, typer.Option("--stats", help="write the run's counters as JSON to this file")] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", help="parser processes; 0 parses in the reading process; -1: one per CPU (at most 4)")] = -1,
    tls_keylog: Annotated[Path | None, typer.Option("--tls-keylog", help="SSLKEYLOGFILE-format key log: SIP over TLS is decrypted by tshark")] = None,
    interface: Annotated[str | None, typer.Option("--interface", "-i", help="capture live from this interface (Linux, root) instead of files")] = None,
    count: Annotated[int | None, typer.Option("--count", "-c", help="live: stop after this many packets")] = None,
    duration: Annotated[float | None, typer.Option("--duration", help="live: stop after this many seconds")] = None,
) -> None:
    """Every SIP message found in the captures, one per line (like `tshark -Y sip`).

    Example: sipsniff-acc messages capture.pcapng --format table
    """
    readers = _open_sources(files, interface, count, duration)
    errors: list[SourceError] = []
    counters = Counters()
    if workers < 0:
        workers = 0 if (os.cpu_count() or 1) < 2 else min((os.cpu_count() or 1), MAX_AUTO_WORKERS)
    out: BinaryIO = open(output, "wb") if output else sys.stdout.buffer  # noqa: SIM115
    write = out.write
    if fmt is MessageFormat.table:
        write(TABLE_HEADER)
    decrypted = _decrypt_tls(readers, tls_keylog) if tls_keylog is not None else []
    frames = open_captures(readers, errors)
    total = sum(r.size for r in readers)
    show = progress if progress is not None else (sys.stderr.isatty() and total >= PROGRESS_MIN_BYTES)
    try:
        if show:
            frames = _with_progress(frames, readers, total)
        for text in message_lines(frames, fmt.value, workers, counters, decrypted):
            write(text)
        out.flush()
    except BrokenPipeError:  # `| head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(0) from None
    finally:
        if output:
            out.close()
    counters.tls_decrypted = len(decrypted)
    readable = len({(d.src, d.sport, d.dst, d.dport) for d in decrypted})
    counters.tls_unreadable = max(0, counters.streams["tls"] - readable)
    if stats:
        doc = counters.as_dict() | {"errors": [str(e) for e in errors]}
        stats.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    if not quiet:
        _summary(counters, errors, sys.stderr)
    if errors:
        if quiet:
            for err in errors:
                print(f"error: {err}", file=sys.stderr)
        raise typer.Exit(EXIT_INPUT_ERROR)


def _decrypt_tls(readers: list[FrameSource], keylog: Path) -> list[Datagram]:
    """SIP inside TLS, decrypted by tshark, in time order (stdin cannot be read twice)."""
    if not keylog.is_file():
        raise typer.BadParameter(f"{keylog}: no such file", param_hint="--tls-keylog")
    if any(not isinstance(r, CaptureReader) or r.path == "-" for r in readers):
        raise typer.BadParameter("needs capture files (not stdin or an interface): they are read twice",
                                 param_hint="--tls-keylog")
    decrypted: list[Datagram] = []
    try:
        for r in readers:
            decrypted.extend(decrypted_sip(r.path, str(keylog)))
    except TlsEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_INPUT_ERROR) from None
    decrypted.sort(key=lambda d: d.ts)
    return decrypted


def _with_progress(frames, readers: list[FrameSource], total: int):  # type: ignore[no-untyped-def]
    """Wrap the frame iterator in a rich progress bar (on stderr) driven by bytes read.

    Refreshed by hand, not by rich's timer thread: worker processes are forked, and a fork
    should not copy a process with a thread running.
    """
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), transient=True, auto_refresh=False, console=Console(stderr=True),
    ) as bar:
        task = bar.add_task("reading", total=total)
        for i, frame in enumerate(frames):
            if not i & 0x3FFF:
                bar.update(task, completed=sum(r.bytes_read for r in readers))
                bar.refresh()
            yield frame
        bar.update(task, completed=total)
        bar.refresh()


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


def main() -> None:
    app()
