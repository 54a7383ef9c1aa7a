"""The command line (typer): wiring sources → pipeline → outputs, no logic of its own."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import sys
from enum import Enum
from pathlib import Path
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Annotated, Any, TextIO

import typer

from sipsniff_acc import __version__
from sipsniff_acc.anomalies import ANOMALIES
from sipsniff_acc.messagelog import TABLE_HEADER
from sipsniff_acc.messagerun import message_lines
from sipsniff_acc.events import Counters
from sipsniff_acc.events import Datagram
from sipsniff_acc.sources import (
    CapturePathError, CaptureReader, SourceError, check_capture, expand_paths, open_captures,
)
from sipsniff_acc.sources.pcapfile import is_capture_magic
from sipsniff_acc.sources.live import DEFAULT_RING_MB, CaptureUsageError, LiveCapture
from sipsniff_acc.sources.pcapfile import FrameSource
from sipsniff_acc.sources.tlskeys import TlsEngineError, decrypted_sip
from sipsniff_acc.emitters import Emitter
from sipsniff_acc.emitters.calls import CallsOutput, open_table, table_name_problem
from sipsniff_acc.emitters.jsonl import JsonlEmitter
from sipsniff_acc.emitters.diameter import DiameterConfigError, DiameterEmitter, DiscEmitter
from sipsniff_acc.emitters.radius import RadiusConfigError, RadiusEmitter
from sipsniff_acc.emitters.spool import DEFAULT_SPOOL, Backend, DurableSpool, SpooledEmitter, SpoolFull, create_private
from sipsniff_acc.emitters.sqlurl import SqlError, SqlUsageError, check_url, safe_url, sqlite_file  # no SQLAlchemy yet
from sipsniff_acc.emitters.syslog import LogEmitter, SyslogTargetError
from sipsniff_acc.outfiles import (
    EXIT_OUTPUT_ERROR, OutputPathError, Writing, check_output, open_private, release_stdout, write_failed,
    write_private_or_say,
)
from sipsniff_acc import stopping
from sipsniff_acc.processrun import RunResult, run
from sipsniff_acc.metrics import MetricsAddressError, MetricsServer, RunView
from sipsniff_acc.service import AlarmStream, GapWatch, ReopenableFile, ServiceControl
from sipsniff_acc.shard import WorkerDied, max_workers
from sipsniff_acc.tracker import TIMER_GRACE
from sipsniff_acc.sysloglines import escape
from sipsniff_acc.rules import RulesError, RulesFile, load_rules

DEFAULT_DB_URL = "sqlite:///acc.db"

app = typer.Typer(
    help="Passive SIP accounting sniffer: Kamailio acc records from the wire or from pcaps.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,  # a traceback of ours must never print a DB password held in a local
)

#: Short flags follow tshark/tcpdump where they mean the same thing: -r FILE reads a capture,
#: -i an interface, -c a count, -T the output format, -j workers, -f a BPF capture filter. rules.yaml gets -m, the one letter tshark, sngrep and tcpdump's
#: usage line leave free (tcpdump's -m loads SMI MIB modules, only in libsmi builds).
RULES_FLAGS = ("--rules", "-m")


def _version_option(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _top(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="print the version and exit", is_eager=True,
                                          callback=_version_option)] = False,
    config: Annotated[Path | None, typer.Option("--config", envvar="SIPSNIFF_CONFIG", help="YAML file of options by command (process: {interface: eth0, rules: ...}); options on the command line win")] = None,
) -> None:
    """Passive SIP accounting sniffer: Kamailio acc records from the wire or from pcaps."""
    if config is not None and str(config):
        from sipsniff_acc.config import ConfigError, load_config
        try:  # checked whole before the command runs: FILE:LINE: command.key: why, exit 2
            ctx.default_map = load_config(config, ctx.command, ctx)
        except ConfigError as e:
            raise usage_error(str(e)) from None


def usage_error(message: str, status: int = 2) -> typer.Exit:
    """Print one line `error: ...` naming what to fix; the caller raises what this returns."""
    print(f"error: {escape(message)}", file=sys.stderr)
    return typer.Exit(status)


def _check_outputs(inputs: list[FrameSource], **paths: str | Path | None) -> None:
    """Every output path of the run, checked before any work (option name -> path; None,
    '-' and 'none' are not files); none of them may be one of the captures being read."""
    captures = [r.path for r in inputs if isinstance(r, CaptureReader) and r.path != "-"]
    for option, path in paths.items():
        if path is None or str(path) in ("-", "none"):
            continue
        name = "--" + option.replace("_", "-")
        try:
            check_output(path, name)
        except OutputPathError as e:
            raise usage_error(str(e)) from None
        for c in captures:
            if os.path.exists(path) and os.path.samefile(path, c):
                raise usage_error(f"{name} {path} is the capture being read: it would be overwritten")

EXIT_INPUT_ERROR = 1  #: a capture was damaged or unreadable; everything before the damage was processed
PROGRESS_MIN_BYTES = 16 << 20  #: below this a file is read in well under a second: no bar
MAX_AUTO_WORKERS = 4  #: the reading process saturates near 4 parsers (it costs ~1/3 of a parser per message)


class MessageFormat(str, Enum):
    jsonl = "jsonl"
    table = "table"


def _check_workers(workers: int) -> None:
    """-j's mistakes, found before the work: below -1, or above ``max_workers()``."""
    top = max_workers()
    if workers < -1 or workers > top:
        raise usage_error(f"-j/--workers {workers}: use -1 (one per CPU), 0 (no worker process) "
                          f"or 1 to {top} (the most this machine takes: 4 per CPU, at least 8)")


def _auto_workers(workers: int) -> int:
    """-1: one worker per CPU, at most MAX_AUTO_WORKERS; none on a single CPU."""
    if workers >= 0:
        return workers
    cpus = os.cpu_count() or 1
    return 0 if cpus < 2 else min(cpus, MAX_AUTO_WORKERS)


def _open_readers(files: list[str]) -> list[CaptureReader]:
    """Readers for the captures named, each checked before the work starts (exists, readable,
    not empty, not a rules file). A directory stands for the captures inside; an empty one
    found there is reported as an input error at the end, like a damaged one."""
    for f in files:
        try:
            check_capture(f)
        except CapturePathError as e:
            raise usage_error(str(e), e.status) from None
    paths = expand_paths(files)
    if not paths:
        raise usage_error("no capture files found: give files, directories holding .pcap/.pcapng, - for stdin, "
                          "or -i INTERFACE")
    return [CaptureReader(p) for p in paths]


def _open_sources(
    files: list[str] | None, interface: list[str] | str | None, count: int | None, duration: float | None,
    quiet: bool = False, capture_filter: str | None = None, promisc: bool = True, ring_mb: float | None = None,
) -> list[FrameSource]:
    """Capture files (positional and -r, merged in time order) or live interfaces (-i, repeatable):
    one LiveCapture over all of them. Every mistake (no such interface, a filter libpcap refuses,
    a bad ring size) is one line, exit 2, before anything opens. A live capture with neither
    --count nor --duration runs until it is stopped (SIGTERM/SIGINT)."""
    interfaces = [interface] if isinstance(interface, str) else list(interface or [])
    if not interfaces:
        if count is not None or duration is not None:
            raise usage_error("--count and --duration go with --interface")
        if capture_filter is not None or ring_mb is not None or not promisc:
            raise usage_error("-f/--filter, --ring-size and --no-promisc go with --interface (capture files are "
                              "read as they are; the output format is -T/--format)")
        return list(_open_readers(files or []))
    if files:
        raise usage_error("give capture files or --interface, not both")
    try:
        # (a FrameSource whose stream also carries Idle and CaptureGap: the run loops take them)
        return [LiveCapture(interfaces, count, duration, capture_filter, promisc,  # type: ignore[list-item]
                            DEFAULT_RING_MB if ring_mb is None else ring_mb, None if quiet else _listening)]
    except CaptureUsageError as e:
        raise usage_error(str(e)) from None


def _listening(interfaces: str) -> None:
    """tcpdump's start line: the capture sockets are bound, packets from now on are seen."""
    print(f"listening on {interfaces}", file=sys.stderr, flush=True)


HELP_HEP_LISTEN = ("receive HEP (v2/v3, as Kamailio siptrace, heplify, Asterisk send) on udp://ADDR:PORT or "
                   "tcp://ADDR:PORT (repeatable) instead of capturing; runs until stopped unless --count/--duration")


def _open_hep(urls: list[str] | None, files: list[str], interface: list[str] | None, count: int | None,
              duration: float | None, quiet: bool, password: str | None, reorder_ms: float, workers: int,
              capture_options: bool, max_payload: int | None = None) -> Any:
    """--hep-listen's source (sources/hep.py), its sockets bound: every mistake (a bad URL, an
    address taken, files or -i beside it, -j N) is one line, exit 2, before the work.
    ``max_payload``: limits.max_sip_message (None: its default)."""
    if not urls:
        return None
    from sipsniff_acc.sources.hep import HepListener, HepUsageError  # noqa: PLC0415 - only with --hep-listen

    if files or interface:
        raise usage_error("give capture files, --interface or --hep-listen, not two of them")
    if capture_options:
        raise usage_error("-f/--filter, --ring-size and --no-promisc go with --interface, not --hep-listen")
    if workers > 0:
        raise usage_error(f"--hep-listen runs in one process: use -j 0 (or leave -j out), not -j {workers}")
    if not reorder_ms == reorder_ms or reorder_ms in (float("inf"), float("-inf")):
        raise usage_error("--hep-reorder: give milliseconds, 0 to 10000")
    try:
        return HepListener(urls, password, reorder_ms / 1000, count, duration, None if quiet else _listening,
                           *(() if max_payload is None else (max_payload,)))
    except HepUsageError as e:
        raise usage_error(str(e)) from None


def _open_hep_out(url: str | None, agent_id: int, password: str | None) -> Any:
    """--hep-out's sender (emitters/hep.py); a bad URL or agent id is one line, exit 2."""
    if url is None:
        return None
    from sipsniff_acc.emitters.hep import HepOut  # noqa: PLC0415 - only with --hep-out
    from sipsniff_acc.sources.hep import HepUsageError  # noqa: PLC0415

    from sipsniff_acc.service import AlarmStream  # noqa: PLC0415
    try:
        return HepOut(url, agent_id, password, AlarmStream())  # type: ignore[arg-type]
    except HepUsageError as e:
        raise usage_error(str(e)) from None


HELP_INTERFACE = ("capture live from this interface (Linux; root or CAP_NET_RAW+CAP_NET_ADMIN); repeatable; "
                  "runs until stopped unless --count/--duration")
HELP_FILTER = ("live: BPF capture filter as in tcpdump (e.g. 'udp port 5060 or tcp port 5060'), compiled by libpcap, "
               "run in the kernel; IP fragments always pass; default: everything but RTP/RTCP")
HELP_RING = f"live: capture ring per interface, in MB (default {DEFAULT_RING_MB}; 1 to 4096)"
HELP_NO_PROMISC = "live: leave the interfaces out of promiscuous mode (default: on while capturing)"


def _live_capture(sources: list[FrameSource]) -> LiveCapture | None:
    return next((s for s in sources if isinstance(s, LiveCapture)), None)


def _capture_doc(capture: LiveCapture | None) -> dict[str, Any]:
    """--stats' "capture" part: per interface (LiveCapture.stats()) and the totals."""
    if capture is None:
        return {}
    per_if = capture.stats()
    return {"capture": {"kernel_packets": sum(int(s["packets"]) for s in per_if.values()),
                        "kernel_drops": sum(int(s["dropped"]) for s in per_if.values()),
                        "filter": capture.bpf_filter, "interfaces": per_if}}


def _capture_summary(capture: LiveCapture | None, out: TextIO) -> None:
    """The capture lines of the summary: what the kernel passed and dropped, per interface; a
    drop is a loud line (the records made meanwhile are marked capture_gaps)."""
    if capture is None:
        return
    for iface, st in capture.stats().items():
        mode = "promiscuous" if st["promisc"] else "not promiscuous"
        print(f"  capture {iface}: {st['packets']} packets passed the kernel filter, {st['dropped']} dropped, "
              f"{st['frames']} read ({mode}, ring {int(st['ring_bytes']) >> 20} MB)", file=out)
    lost = {i: st["dropped"] for i, st in capture.stats().items() if st["dropped"]}
    if lost:
        where = ", ".join(f"{n} on {i}" for i, n in lost.items())
        print(f"WARNING: the kernel DROPPED {sum(lost.values())} packet(s) ({where}): records of calls open then "
              "may be incomplete (marked capture_gaps); give a larger --ring-size, -j N, or a narrower -f", file=out)
    cut = {i: st.get("truncated", 0) for i, st in capture.stats().items() if st.get("truncated")}
    if cut:
        print(f"WARNING: {sum(cut.values())} frame(s) cut short by the kernel "
              f"({', '.join(f'{n} on {i}' for i, n in cut.items())}): larger than a ring frame (BIG TCP, GRO?); "
              "their SIP messages may be incomplete", file=out)
    if capture.filter_note:
        print(f"  capture: {capture.filter_note}", file=out)


class TerminalSafe:
    """A text stream whose writes have control characters escaped (``sysloglines.escape``),
    but for print's own line end: a summary that quotes captured values (methods, reasons,
    file names) cannot move the cursor, clear the screen or forge a line."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, text: str) -> int:
        return self.out.write(text if text == "\n" else escape(text))

    def flush(self) -> None:
        self.out.flush()


def _summary(counters: Counters, errors: list[SourceError], out: TextIO) -> None:
    out = TerminalSafe(out)  # type: ignore[assignment]
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
    read: Annotated[list[str] | None, typer.Option("--read-file", "-r", help="a capture to read, as in tshark/tcpdump (repeatable; beside FILE...)")] = None,
    fmt: Annotated[MessageFormat, typer.Option("--format", "-T", help="jsonl: one JSON object a line; table: columns")] = MessageFormat.jsonl,
    capture_filter: Annotated[str | None, typer.Option("--filter", "-f", help=HELP_FILTER)] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write here instead of stdout (created 0600)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no summary on stderr")] = False,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="progress bar (default: on a terminal, for big inputs)")] = None,
    stats: Annotated[Path | None, typer.Option("--stats", help="write the run's counters as JSON to this file (created 0600)")] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", help="parser processes; 0 parses in the reading process; -1: one per CPU (at most 4); at most max(8, 4 x CPUs)")] = -1,
    tls_keylog: Annotated[Path | None, typer.Option("--tls-keylog", help="SSLKEYLOGFILE-format key log: SIP over TLS is decrypted by tshark")] = None,
    interface: Annotated[list[str] | None, typer.Option("--interface", "-i", help=HELP_INTERFACE)] = None,
    count: Annotated[int | None, typer.Option("--count", "-c", help="live: stop after this many packets")] = None,
    duration: Annotated[float | None, typer.Option("--duration", help="live: stop after this many seconds")] = None,
    ring_mb: Annotated[float | None, typer.Option("--ring-size", help=HELP_RING)] = None,
    no_promisc: Annotated[bool, typer.Option("--no-promisc", help=HELP_NO_PROMISC)] = False,
    rules_file: Annotated[Path | None, typer.Option(*RULES_FLAGS, help="rules.yaml: its limits: apply (max_sip_message: bytes of one SIP message over TCP/SCTP/WebSocket, default 1 MiB)")] = None,
    hep_listen: Annotated[list[str] | None, typer.Option("--hep-listen", help=HELP_HEP_LISTEN)] = None,
    hep_password: Annotated[str | None, typer.Option("--hep-password", envvar="SIPSNIFF_HEP_PASSWORD", help="--hep-listen: drop HEP packets without this auth key (counted)")] = None,
    hep_reorder: Annotated[float, typer.Option("--hep-reorder", help="--hep-listen: ms a message waits for earlier ones; 0 to 10000")] = 50.0,
) -> None:
    """Every SIP message found in the captures, one per line (like `tshark -Y sip`).

    Example: sipsniff-acc messages -r capture.pcapng -T table
    """
    _check_workers(workers)
    limits = _rules_or_exit(rules_file).limits if rules_file is not None else None
    hep = _open_hep(hep_listen, [*(read or ()), *(files or ())], interface or None, count, duration, quiet,
                    hep_password, hep_reorder, workers,
                    capture_filter is not None or ring_mb is not None or no_promisc,
                    limits.max_sip_message if limits is not None else None)
    readers = [hep] if hep is not None else _open_sources([*(read or ()), *(files or ())], interface, count, duration,
                                                          quiet, capture_filter, not no_promisc, ring_mb)
    _check_outputs(readers, output=output, stats=stats)
    errors: list[SourceError] = []
    counters = Counters()
    if hep is not None:
        hep.counters = counters
    workers = _auto_workers(workers)
    decrypted = _decrypt_tls(readers, tls_keylog) if tls_keylog is not None else []
    out: IO[bytes] = open_private(output, "wb") if output else sys.stdout.buffer
    write = out.write
    frames: Iterable[Any] = open_captures(readers, errors)
    died = ""  #: a -j N worker's death (WorkerDied)
    total = sum(r.size for r in readers)
    show = progress if progress is not None else (sys.stderr.isatty() and total >= PROGRESS_MIN_BYTES)
    # the output failed (disk full...): the run stops there, one line, exit 3
    with Writing(out, f"--output {output}" if output else "stdout", owned=bool(output)) as writing:
        if fmt is MessageFormat.table:
            write(TABLE_HEADER)
        if show:
            frames = _WithProgress(frames, readers, total)
        if hep is not None:  # whole messages from HEP senders, printed as they are handed on
            for text in _hep_lines(frames, fmt.value, counters):
                write(text)
                out.flush()
        else:
            try:
                for text in message_lines(frames, fmt.value, workers, counters, decrypted, limits):
                    write(text)
            except WorkerDied as e:  # the OOM killer, or a bug: what was written stays; one line, as process
                died = str(e)
        out.flush()
    if writing.reader_left:  # `| head`: the reader left; not an error of ours
        raise typer.Exit(0)
    if died:
        print(f"error: {escape(died)}; the messages before it are written", file=sys.stderr)
        raise typer.Exit(EXIT_WORKER_DIED)
    failed = writing.failed
    counters.tls_decrypted = len(decrypted)
    readable = len({(d.src, d.sport, d.dst, d.dport) for d in decrypted})
    counters.tls_unreadable = max(0, counters.streams["tls"] - readable)
    stats_ok = True
    if stats:
        doc = counters.as_dict() | {"errors": [str(e) for e in errors]} | _capture_doc(_live_capture(readers))
        if hep is not None:
            doc |= hep.stats_doc()
        stats_ok = write_private_or_say(stats, json.dumps(doc, indent=1) + "\n", f"--stats {stats}")
    if not quiet:
        _summary(counters, errors, sys.stderr)
        _capture_summary(_live_capture(readers), TerminalSafe(sys.stderr))  # type: ignore[arg-type]
        if hep is not None:
            print(escape(hep.summary_line()), file=sys.stderr)
    if failed:
        print(escape(failed), file=sys.stderr)
    if quiet:
        for err in errors:
            print(f"error: {escape(str(err))}", file=sys.stderr)
    if failed or not stats_ok:
        raise typer.Exit(EXIT_OUTPUT_ERROR)
    if errors:
        raise typer.Exit(EXIT_INPUT_ERROR)


def _hep_candidates(items: Any) -> Any:
    """``process --hep-listen -j N``: HEP's whole messages (Datagrams) as the round loop's
    candidates, with the Ticks of packet time frames would give (messagerun.timed_candidates
    passes both through); heartbeats and gaps as they are."""
    from sipsniff_acc.messagerun import TICK, Tick, as_candidate  # noqa: PLC0415

    next_tick = float("-inf")
    for item in items:
        if item.__class__ is Datagram:
            ts = item.ts
            if ts >= next_tick:
                if next_tick != float("-inf"):
                    yield Tick(ts)
                next_tick = ts + TICK
            yield as_candidate(item)
        else:
            yield item


def _hep_lines(items: Any, fmt: str, counters: Counters) -> Any:
    """``messages --hep-listen``: the lines of HEP's whole SIP messages, a chunk per batch
    handed on (at most 256 messages, and at every heartbeat)."""
    from sipsniff_acc.messagerun import as_candidate, format_batch  # noqa: PLC0415

    work = format_batch(fmt)
    batch: list[Any] = []
    for item in items:
        if item.__class__ is Datagram:
            batch.append(as_candidate(item))
            if len(batch) < 256:
                continue
        if batch:
            text, (parsed, anomalies) = work(batch)
            batch = []
            counters.sip_messages += parsed
            counters.anomalies.update(anomalies)
            yield text
    if batch:
        text, (parsed, anomalies) = work(batch)
        counters.sip_messages += parsed
        counters.anomalies.update(anomalies)
        yield text


def _check_tls(readers: list[FrameSource], keylog: Path) -> None:
    """--tls-keylog's mistakes, found before the work starts."""
    if not keylog.is_file():
        raise usage_error(f"--tls-keylog {keylog}: no such file")
    if any(not isinstance(r, CaptureReader) or r.path == "-" for r in readers):
        raise usage_error("--tls-keylog needs capture files (not stdin or an interface): they are read twice")


def _decrypt_tls(readers: list[FrameSource], keylog: Path) -> list[Datagram]:
    """SIP inside TLS, decrypted by tshark, in time order (stdin cannot be read twice)."""
    _check_tls(readers, keylog)
    decrypted: list[Datagram] = []
    try:
        for r in readers:
            decrypted.extend(decrypted_sip(r.path, str(keylog)))
    except TlsEngineError as exc:
        raise usage_error(str(exc), EXIT_INPUT_ERROR) from None
    decrypted.sort(key=lambda d: d.ts)
    return decrypted


class _WithProgress:
    """The frames, behind a rich progress bar (on stderr) driven by bytes read.

    ``inner`` is what it wraps: with -j N on files, worker 0 iterates the bar and the others
    the files alone (messagerun.file_frames). Refreshed by hand, not by rich's timer thread:
    worker processes are forked, and a fork should not copy a process with a thread running.
    """

    def __init__(self, frames: Any, readers: list[FrameSource], total: int) -> None:
        self.inner, self.readers, self.total = frames, readers, total
        self.started = False

    def __iter__(self) -> Any:
        self.started = True
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        readers, total = self.readers, self.total
        with Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), transient=True, auto_refresh=False, console=Console(stderr=True),
        ) as bar:
            task = bar.add_task("reading", total=total)
            for i, frame in enumerate(self.inner):
                if not i & 0x3FFF:
                    bar.update(task, completed=sum(r.bytes_read for r in readers))
                    bar.refresh()
                yield frame
            bar.update(task, completed=total)
            bar.refresh()



EXIT_BACKEND_ERROR = 3  #: a backend refused records; they were saved to an unsent file (named in the message)


def _rules_or_exit(path: Path | None) -> RulesFile:
    """The rules, or every problem as one line `error: FILE:LINE: key: why` (a quoted value
    is escaped: a rules file is not trusted to drive the terminal) and exit 2. A capture
    given where rules go (-m capture.pcap) is named as such."""
    if path is not None and path.is_file():
        with open(path, "rb") as f:
            head = f.read(4)
        if is_capture_magic(head):
            raise usage_error(f"{path} is a capture, not rules.yaml: read it with -r {path} (or give it as FILE)")
    try:
        return load_rules(path)
    except RulesError as e:
        for p in e.problems:
            print(f"error: {escape(str(p))}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None


EXIT_USAGE = 2


_RUN_TAKES_STATE = "state" in __import__("inspect").signature(run).parameters


def _check_state(path: Path, workers: int, live_or_pipe: bool, quiet: bool) -> None:
    """--state: a path that can never work (a directory, someone else's file, a state saved
    with another -j) is one line, exit 2, before any packet; then every load and save of the
    run says its line on stderr (errors even with -q)."""
    from sipsniff_acc import state as state_mod  # noqa: PLC0415 - only with --state

    if not _RUN_TAKES_STATE:
        raise usage_error("--state: this build's run loop cannot restore state")
    effective = 0 if workers < 0 and live_or_pipe else workers
    try:
        state_mod.check_state_path(path, max(1, _auto_workers(effective)))
    except state_mod.StateUsageError as e:
        raise usage_error(str(e)) from None

    def say(line: str) -> None:
        if not quiet or line.startswith("error"):
            print(escape(line), file=sys.stderr, flush=True)

    state_mod.report_to(say)


@app.command()
def process(
    files: Annotated[list[str] | None, typer.Argument(help="pcap/pcapng files (.gz too), directories, or - for stdin")] = None,
    read: Annotated[list[str] | None, typer.Option("--read-file", "-r", help="a capture to read, as in tshark/tcpdump (repeatable; beside FILE...)")] = None,
    rules_file: Annotated[Path | None, typer.Option(*RULES_FLAGS, help="rules.yaml (default: built-in OpenSER-style rules)")] = None,
    db_url: Annotated[str | None, typer.Option("--db-url", help="SQLAlchemy URL (default: rules' db_url, else sqlite:///acc.db)")] = None,
    no_db: Annotated[bool, typer.Option("--no-db", help="write no SQL rows")] = False,
    log: Annotated[str | None, typer.Option("--log", help="ACC log lines: - for stdout (default), a file (appended; created 0600), or 'none'")] = "-",
    syslog_target: Annotated[str | None, typer.Option("--syslog", help="also send ACC lines to syslog: local, unix:///path, udp://host:port, tcp://host:port")] = None,
    jsonl_file: Annotated[Path | None, typer.Option("--jsonl", help="write every record as JSON lines here (- for stdout; created 0600)")] = None,
    open_as_408: Annotated[bool, typer.Option("--open-as-408", help="account transactions still open at the end as the 408 the proxy's timer would send")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no summary on stderr")] = False,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="progress bar (default: on a terminal, for big inputs)")] = None,
    stats: Annotated[Path | None, typer.Option("--stats", help="write the run's counters as JSON to this file (created 0600)")] = None,
    interface: Annotated[list[str] | None, typer.Option("--interface", "-i", help=HELP_INTERFACE)] = None,
    count: Annotated[int | None, typer.Option("--count", "-c", help="live: stop after this many packets")] = None,
    duration: Annotated[float | None, typer.Option("--duration", help="live: stop after this many seconds")] = None,
    capture_filter: Annotated[str | None, typer.Option("--filter", "-f", help=HELP_FILTER)] = None,
    ring_mb: Annotated[float | None, typer.Option("--ring-size", help=HELP_RING)] = None,
    no_promisc: Annotated[bool, typer.Option("--no-promisc", help=HELP_NO_PROMISC)] = False,
    spool_path: Annotated[Path, typer.Option("--spool", help="durable spool (SQLite file) between the engine and the database")] = Path(DEFAULT_SPOOL),
    drain_timeout: Annotated[float, typer.Option("--drain-timeout", help="seconds to keep retrying an unreachable database at the end")] = 60.0,
    db_password_file: Annotated[Path | None, typer.Option("--db-password-file", help="read the database password from this file (or set SIPSNIFF_DB_PASSWORD)")] = None,
    db_timezone: Annotated[str, typer.Option("--db-timezone", help="utc (default) or local: how DATETIME columns are written (not SQLite)")] = "utc",
    workers: Annotated[int, typer.Option("--workers", "-j", help="processes that parse and account, calls sharded by Call-ID; 0: all in one process; -1: one per CPU (at most 4) for files, 0 for a live capture or stdin; at most max(8, 4 x CPUs)")] = -1,
    tls_keylog: Annotated[Path | None, typer.Option("--tls-keylog", help="SSLKEYLOGFILE-format key log: SIP over TLS is decrypted by tshark")] = None,
    metrics: Annotated[str | None, typer.Option("--metrics", help="serve Prometheus metrics on HOST:PORT (e.g. 127.0.0.1:9466) while running")] = None,
    state_file: Annotated[Path | None, typer.Option("--state", help="keep open calls across restarts: restored from this file at start, saved to it at the end and on SIGTERM/SIGINT (-j N: FILE.0 ... FILE.N-1; created 0600)")] = None,
    calls_file: Annotated[Path | None, typer.Option("--calls", help="one JSON line per call (forks aggregated, Call-ID reuse split; - for stdout; created 0600); runs in one process (-j 0)")] = None,
    calls_table: Annotated[str | None, typer.Option("--calls-table", help="also write one row per call to this table of the --db-url database (created if missing; not spooled)")] = None,
    hep_listen: Annotated[list[str] | None, typer.Option("--hep-listen", help=HELP_HEP_LISTEN)] = None,
    hep_password: Annotated[str | None, typer.Option("--hep-password", envvar="SIPSNIFF_HEP_PASSWORD", help="HEP auth key: --hep-listen drops packets without it (counted), --hep-out sends it")] = None,
    hep_reorder: Annotated[float, typer.Option("--hep-reorder", help="--hep-listen: ms a message waits for earlier ones (HEP order is not the wire's); 0 to 10000")] = 50.0,
    hep_out: Annotated[str | None, typer.Option("--hep-out", help="send every SIP message seen as HEPv3 to udp://HOST:PORT or tcp://HOST:PORT (Homer, sipcapture); never blocks the accounting")] = None,
    hep_agent_id: Annotated[int, typer.Option("--hep-agent-id", help="--hep-out: our HEP capture agent id (0 to 4294967295)")] = 0,
    consume: Annotated[str | None, typer.Option("--consume", help="a scale-out worker: account the SIP messages sensors (sipsniff-acc capture --publish) put on NATS JetStream, nats://HOST:PORT[,…]; needs --partitions and --state; runs until stopped")] = None,
    partitions: Annotated[str | None, typer.Option("--partitions", help="--consume: the partitions this worker owns, e.g. 0-3 or 0,2,5-7 (each owned by one worker)")] = None,
    durable: Annotated[str, typer.Option("--durable", help="--consume: durable consumer name prefix (NAME_<partition>), where acknowledgements are kept")] = "sipsniff",
    nats_stream: Annotated[str, typer.Option("--stream", help="--consume: the JetStream stream the sensors publish to")] = "sip",
    reorder_window: Annotated[float, typer.Option("--reorder-window", help="--consume: ms a message waits for earlier ones from other sensors (0 to 60000)")] = 200.0,
) -> None:
    """The main job: the acc records a Kamailio proxy would write for the traffic in the captures.

    SIGHUP re-reads --rules (an invalid file is refused, the old rules stay) and reopens
    --log/--jsonl files (logrotate).

    Example: sipsniff-acc process -r capture.pcap -m rules.yaml --db-url sqlite:///acc.db
    """
    stopping.before_run()  # a stop during the setup: exit 128 + signal at once, no traceback
    _check_workers(workers)
    if calls_file is not None or calls_table is not None:  # --calls: built beside the engine in one process
        if workers > 0:
            raise usage_error(f"--calls/--calls-table build the calls in one process: use -j 0 (or leave -j out), not -j {workers}")
        workers = 0
        if calls_table is not None and (problem := table_name_problem(calls_table) or (
                "--calls-table writes to the database: drop --no-db" if no_db else None)):
            raise usage_error(problem)
    rules = _rules_or_exit(rules_file)
    files = [*(read or ()), *(files or ())]
    interface = interface or None  # (typer may give [] for an option never given)
    hep = _open_hep(hep_listen, files, interface, count, duration, quiet, hep_password, hep_reorder, min(workers, 0),
                    capture_filter is not None or ring_mb is not None or no_promisc, rules.limits.max_sip_message)
    if hep is not None:
        if consume is not None or partitions is not None:
            hep.close()
            raise usage_error("--hep-listen or --consume, not both (a sensor publishes HEP: sipsniff-acc capture "
                              "--hep-listen ... --publish)")
        workers = max(workers, 0)  # live: one process unless -j N is given (as -i)
    consumer = None
    consumer_saved = False  #: --consume: the run's state holds every message fed (set when the run ends)
    if consume is not None or partitions is not None:  # a NATS JetStream worker (sources/nats.py)
        from sipsniff_acc.sources.nats import NatsUsageError, consumer_from_options  # noqa: PLC0415
        try:
            consumer = consumer_from_options(consume, partitions, durable, nats_stream, reorder_window, files,
                                             interface, state_file, workers,
                                             "--count" if count is not None else "--duration" if duration is not None
                                             else "-f/--filter" if capture_filter is not None else None)
        except NatsUsageError as e:
            raise usage_error(escape(str(e))) from None
        workers = 0
    sources: list[FrameSource] = (
        [hep] if hep is not None else [consumer] if consumer is not None  # type: ignore[list-item]
        else _open_sources(files, interface, count, duration, quiet, capture_filter, not no_promisc, ring_mb))
    hep_copy = _open_hep_out(hep_out, hep_agent_id, hep_password)
    _check_outputs(sources, log=log, jsonl=jsonl_file, stats=stats, spool=None if no_db else spool_path, calls=calls_file)
    if state_file is not None:
        _check_state(state_file, workers, interface is not None or "-" in files or hep is not None, quiet)
    if consumer is not None:  # NATS unreachable, a stream or partitions that do not match: one line, exit 2
        try:
            consumer.open()
        except NatsUsageError as e:
            raise usage_error(escape(str(e))) from None
    if tls_keylog is not None:
        _check_tls(sources, tls_keylog)
    view = RunView(Counters())
    server = None
    if metrics is not None:  # listening before any output is opened: a port taken is one line, exit 2
        try:
            server = MetricsServer(metrics, view)
        except MetricsAddressError as e:
            raise usage_error(str(e)) from None
    if stats is not None:
        open_private(stats, "a").close()  # created 0600 now; the run's end rewrites it in place
    emitters: list[Emitter] = []
    opened: list[IO[Any]] = []
    try:
        if log and log != "none":
            stream: IO[str] = sys.stdout if log == "-" else ReopenableFile(log, "a")  # type: ignore[assignment]
            if log != "-":
                opened.append(stream)
            emitters.append(LogEmitter(rules, stream, syslog_target))
        elif syslog_target:
            emitters.append(LogEmitter(rules, None, syslog_target))
        if jsonl_file is not None:
            jout: IO[bytes] = sys.stdout.buffer if str(jsonl_file) == "-" else ReopenableFile(jsonl_file, "wb")  # type: ignore[assignment]
            if str(jsonl_file) != "-":
                opened.append(jout)
            emitters.append(JsonlEmitter(jout))
        if calls_file is not None or calls_table is not None:  # --calls, --calls-table (emitters/calls.py)
            cout: IO[bytes] | None = None
            if calls_file is not None:
                cout = sys.stdout.buffer if str(calls_file) == "-" else ReopenableFile(calls_file, "wb")  # type: ignore[assignment]
                if str(calls_file) != "-":
                    opened.append(cout)  # type: ignore[arg-type]
            table = None
            if calls_table is not None:
                plain = db_url or os.environ.get("SIPSNIFF_DB_URL") or rules.acc.db_url or DEFAULT_DB_URL
                try:
                    check_url(plain)
                except SqlUsageError as e:
                    raise usage_error(str(e)) from None
                table = open_table(with_password(plain, db_password_file), calls_table)
            emitters.append(CallsOutput(cout, table, quiet=quiet,
                                        what="stdout" if str(calls_file) == "-" else str(calls_file or "")))
        spooled: list[SpooledEmitter] = []
        spool: DurableSpool | None = None
        for backend in _backends(rules, no_db, db_url, db_password_file, db_timezone):
            spool = spool or DurableSpool(spool_path)
            spooled.append(SpooledEmitter(backend, spool, drain_timeout=drain_timeout, alarms=AlarmStream()))  # type: ignore[arg-type]  # writes lines only
        # The spooled backends first: a batch is in the spool before a copy output (log, JSON
        # lines, stdout) can fail on it (a full disk), so the failure stops the run without a loss.
        emitters[:0] = spooled
        if hep_copy is not None:
            emitters.append(hep_copy)  # ticked and closed with the outputs (never fails the run)
    except (SyslogTargetError, SqlError, OSError, sqlite3.Error, RadiusConfigError, DiameterConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE if isinstance(e, SyslogTargetError) else EXIT_BACKEND_ERROR) from None
    errors: list[SourceError] = []
    counters = Counters()
    if hep is not None:
        hep.counters = counters  # drops by reason: --stats, the summary, /metrics
    if consumer is not None:
        consumer.counters = counters  # the bus's anomalies (late, heap full, bad messages) in the same places
    decrypted = _decrypt_tls(sources, tls_keylog) if tls_keylog is not None else []
    frames: Any = consumer if consumer is not None else open_captures(sources, errors)  # (NatsSource: Datagram, Tick, Idle)
    total = sum(getattr(r, "size", 0) for r in sources)
    show = progress if progress is not None else (sys.stderr.isatty() and total >= PROGRESS_MIN_BYTES)
    if show:
        frames = _WithProgress(frames, sources, total)
    stopped_by = 0
    result = RunResult()
    # SIGHUP: rules reloaded and files reopened at the run's safe points (service.py)
    control = ServiceControl(rules_file, rules, [f for f in opened if isinstance(f, ReopenableFile)])
    gaps = GapWatch()
    if any(isinstance(s, LiveCapture) for s in sources):
        frames = gaps.watch(frames)  # drops: counted for the metrics, alarmed when they start and stop
    view.counters, view.result, view.spooled, view.sources = counters, result, spooled, list(sources)
    view.control, view.gaps, view.logs = control, gaps, [em for em in emitters if isinstance(em, LogEmitter)]
    copies: list[CopyOutput] = []
    # SIGTERM/SIGINT: the run stops at a safe point, every output is closed (the spool gets what
    # is buffered, backends are drained for --drain-timeout), exit 128 + signal; bounded by a
    # watchdog; a second signal exits as soon as nothing is left outside the spool (stopping.py).
    # Nothing spooled, nothing to drain: the watchdog's bound (and the time its message states)
    # is then FORCE_AFTER + HARD_AFTER, not the unused --drain-timeout on top of it.
    with stopping.Watch(spooled, drain_timeout if spooled else 0.0) as stop:
        stop.flush = [em.close for em in emitters if em not in spooled] + [f.flush for f in opened]
        paths = {id(em.stream): "stdout" if log == "-" else str(log) for em in emitters if isinstance(em, LogEmitter)}
        paths |= {id(em.out): str(jsonl_file) for em in emitters if isinstance(em, JsonlEmitter)}
        paths |= {id(em.out): str(calls_file) for em in emitters if isinstance(em, CallsOutput) and em.out is not None}
        try:
            try:
                if workers < 0 and (interface is not None or "-" in (files or [])):
                    workers = 0  # live or a pipe: every record goes out at once, not a round later
                copies = [CopyOutput(em, _output_name(em, paths)) for em in emitters if em not in spooled]
                if hep is not None and workers > 0:
                    frames = _hep_candidates(frames)  # -j N: the round loop takes whole messages as candidates
                result = run(frames, rules, [*spooled, *copies], counters, open_as_408, result,
                             _auto_workers(workers), decrypted, control=control,
                             state=str(state_file) if state_file is not None else None,
                             live=interface is not None or hep is not None,
                             calls=next((em for em in emitters if isinstance(em, CallsOutput)), None),
                             **({"tap": hep_copy.send} if hep_copy is not None else {}))
            finally:
                stop.closing = True  # from here on a signal only marks the stop: the close is not cut
                if server is not None:
                    server.close()
                if consumer is not None:  # the state was saved whole (a clean stop): acknowledged after the close
                    failure = sys.exc_info()[1]
                    consumer_saved = failure is None or isinstance(failure, stopping.Stopped) and not stop.forced
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            _close_outputs(emitters, opened, paths)
            raise typer.Exit(0) from None
        except (KeyboardInterrupt, stopping.Stopped) as e:  # clean shutdown: what was produced is flushed below
            stopped_by = e.signum if isinstance(e, stopping.Stopped) else signal.SIGINT
            name = signal.Signals(stopped_by).name
            more = (f" (the backends get up to {drain_timeout:g} s; {name} again: stop now, the spool keeps the rest)"
                    if spooled else "")
            print(f"stopping on {name}: flushing{more}", file=sys.stderr)
        except SpoolFull as e:
            print(f"error: {e}", file=sys.stderr)
            stopped_by = -1
        except OSError as e:  # an output file or stream failed (disk full, ...): stop, keep what is spooled
            print(f"error: writing the output: {e}", file=sys.stderr)
            stopped_by = -1
        except WorkerDied as e:  # the OOM killer, or a bug (its traceback is above): what was produced is kept
            print(f"error: {e}; the records produced before are delivered or spooled", file=sys.stderr)
            stopped_by = -EXIT_WORKER_DIED
        except BaseException:  # anything else still closes every output (records to the spool) first
            _close_outputs(emitters, opened, paths)
            raise
        broken = [c for c in copies if c.failed]
        for c in broken:  # said once already: closed quietly (their buffers cannot be written either)
            c.discard(opened)
        if broken and stopped_by == 0:
            stopped_by = -1
        live = [em for em in emitters if not any(c.em is em for c in broken)]
        outputs_failed = _close_outputs(live, opened, paths)
        if outputs_failed and stopped_by == 0:
            stopped_by = -1
        if consumer is not None:  # records in the spool, state saved: now what they cover is acknowledged
            consumer.close(consumer_saved and not outputs_failed, quiet)
        if not quiet:
            for c in broken:
                print(f"  {escape(c.what)}: {c.lost} record(s) not written after it failed "
                      "(the database/spool got every record)", file=sys.stderr)
        if stop.signum:  # also when it arrived while closing (the close was not cut short)
            stopped_by = stop.signum
        _finish_process(result, counters, errors, rules, spooled, emitters, stats, quiet, stopped_by, spool_path,
                        _live_capture(sources), [x for x in (hep, hep_copy) if x is not None])


def _finish_process(result: RunResult, counters: Counters, errors: list[SourceError], rules: RulesFile,
                    spooled: list[SpooledEmitter], emitters: list[Emitter], stats: Path | None, quiet: bool,
                    stopped_by: int, spool_path: Path, capture: LiveCapture | None = None,
                    hep: Sequence[Any] = ()) -> None:
    """Stats, summary and the exit status: 128 + signal when stopped by one, 3 when an output
    or a backend failed, 1 when a capture was damaged."""
    tstats = result.tracker
    if stats:
        doc = counters.as_dict() | {"errors": [str(e) for e in errors], "records": dict(result.records),
                                    "records_by_backend": dict(result.by_backend), "tracker": tstats.as_dict(),
                                    "records_with_capture_gaps": result.capture_gaps,
                                    "capture_gap_reports": result.gaps, "rule_reloads": result.rule_reloads,
                                    "delivered": {sp.backend.name: sp.delivered for sp in spooled},
                                    "pending_in_spool": {sp.backend.name: sp.pending for sp in spooled},
                                    "backends": {sp.backend.name: sp.stats() for sp in spooled}} | _capture_doc(capture)
        for h in hep:  # --hep-listen, --hep-out
            doc |= h.stats_doc()
        if not write_private_or_say(stats, json.dumps(doc, indent=1) + "\n", f"--stats {stats}") and stopped_by == 0:
            stopped_by = -1  # an output failed: exit 3 (the records are in the database/spool all the same)
    if not quiet:
        _summary(counters, errors, sys.stderr)
        _capture_summary(capture, TerminalSafe(sys.stderr))  # type: ignore[arg-type]
        for h in hep:
            print(escape(h.summary_line()), file=sys.stderr)
        _acc_summary(result, rules, spooled, sys.stderr, [e for e in emitters if isinstance(e, LogEmitter)])
    if stopped_by > 0:
        raise typer.Exit(128 + stopped_by)
    if stopped_by == -EXIT_WORKER_DIED:
        raise typer.Exit(EXIT_WORKER_DIED)
    stuck = [sp for sp in spooled if sp.pending]
    for sp in stuck:
        print(f"error: {sp.label} {sp.backend.where}: {sp.last_error or 'not reachable'}; {sp.pending} "
              f"record(s) kept in the spool {spool_path}: they are delivered first by the next run "
              f"(or `sipsniff-acc deliver --spool {spool_path}`)", file=sys.stderr)
    if stuck:
        raise typer.Exit(EXIT_BACKEND_ERROR)
    if stopped_by < 0:
        raise typer.Exit(EXIT_BACKEND_ERROR)
    if errors:
        if quiet:
            for err in errors:
                print(f"error: {err}", file=sys.stderr)
        raise typer.Exit(EXIT_INPUT_ERROR)


EXIT_WORKER_DIED = 70  #: sysexits' EX_SOFTWARE: a worker process died (-j); what was produced before is kept


def _close_outputs(emitters: list[Emitter], opened: list[IO[Any]], paths: dict[int, str]) -> bool:
    """Close every output, each one tried whatever the others do; one line per failure; True if
    any failed. The spooled backends first: the billing records reach the durable spool (and
    the database) before anything that can fail or block (a full disk, a stuck pipe) is
    touched; the log and JSON lines are copies. ``paths``: id(stream) → what the user named."""
    failed: set[str] = set()
    spooled = [em for em in emitters if isinstance(em, SpooledEmitter)]
    for em in [*spooled, *(em for em in emitters if not isinstance(em, SpooledEmitter))]:
        try:
            em.close()
        except Exception as e:  # noqa: BLE001 - any output's failure: one line, and the others still closed
            what = _output_name(em, paths)
            failed.add(what)
            print(f"error: closing {what}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
    for f in opened:
        try:
            f.close()
        except OSError as e:
            what = paths.get(id(f), "an output file")
            if not any(what in x for x in failed):  # its emitter already said so
                print(f"error: closing {what}: {e.strerror or e}", file=sys.stderr)
            failed.add(what)
    return bool(failed)


class CopyOutput:
    """A copy output of ``process`` (log lines, JSON lines, syslog; not the spooled backends):
    a write that fails (a full disk) is one line naming the output, then the output is left out
    and the records it misses are counted, while the run goes on: every record still reaches
    the spool and the database. A closed pipe (``| head``) still ends the run, as in tshark."""

    def __init__(self, em: Emitter, what: str) -> None:
        self.em, self.what = em, what
        self.failed = False
        self.lost = 0

    def emit(self, records: list[Any]) -> None:
        if self.failed:
            self.lost += len(records)
            return
        try:
            self.em.emit(records)
        except BrokenPipeError:
            raise
        except OSError as e:
            self.failed = True
            self.lost += len(records)
            print(escape(write_failed(self.what, e)) + "; the run goes on for the database/spool", file=sys.stderr)
            if getattr(self.em, "stream", None) is sys.stdout or getattr(self.em, "out", None) is sys.stdout.buffer:
                release_stdout()

    def tick(self) -> None:
        """The run's clock (processrun.Outputs): the output's flush, failing as ``emit`` does."""
        tick = getattr(self.em, "tick", None)
        if self.failed or tick is None:
            return
        try:
            tick()
        except BrokenPipeError:
            raise
        except OSError as e:
            self.failed = True
            print(escape(write_failed(self.what, e)) + "; the run goes on for the database/spool", file=sys.stderr)
            if getattr(self.em, "stream", None) is sys.stdout or getattr(self.em, "out", None) is sys.stdout.buffer:
                release_stdout()

    def close(self) -> None:
        self.em.close()

    def discard(self, opened: list[IO[Any]]) -> None:
        """Close the failed output without a second error line (its buffer cannot be written)."""
        for f in (getattr(self.em, "stream", None), getattr(self.em, "out", None)):
            if f is not None and f in opened:
                opened.remove(f)
                try:
                    f.close()
                except OSError:
                    pass
        sock = getattr(self.em, "sock", None)
        if sock is not None:
            sock.close()


def _output_name(em: Emitter, paths: dict[int, str]) -> str:
    if isinstance(em, SpooledEmitter):
        return f"the {em.backend.name} backend {em.backend.where}"
    if isinstance(em, LogEmitter):
        return f"the log {paths.get(id(em.stream), em.target)}"
    if isinstance(em, JsonlEmitter):
        return f"the JSON lines {paths.get(id(em.out), '')}"
    if isinstance(em, CallsOutput):
        return f"the calls {paths.get(id(em.out), '')}"
    return type(em).__name__


def with_password(url: str, password_file: Path | None) -> str:
    """Put a password from a file or SIPSNIFF_DB_PASSWORD into the URL (it is never printed)."""
    password = os.environ.get("SIPSNIFF_DB_PASSWORD")
    if password_file is not None:
        try:
            password = password_file.read_text().strip()
        except OSError as e:
            raise typer.BadParameter(f"{password_file}: {e.strerror}", param_hint="--db-password-file") from None
    if not password:
        return url
    from sqlalchemy.engine import make_url
    return make_url(url).set(password=password).render_as_string(hide_password=False)


def _backends(rules: RulesFile, no_db: bool, db_url: str | None, password_file: Path | None,
              timezone: str = "utc") -> list[Backend]:
    """The spooled backends this run needs: SQL unless --no-db; RADIUS and Diameter when
    rules.yaml sets their flags or calls acc_rad_request / acc_diam_request."""
    out: list[Backend] = []
    if not no_db:
        plain = db_url or os.environ.get("SIPSNIFF_DB_URL") or rules.acc.db_url or DEFAULT_DB_URL
        try:  # a URL that can never work is a usage mistake (exit 2) before the work, not an outage to retry
            check_url(plain)
            from sipsniff_acc.emitters.sql import SqlEmitter  # SQLAlchemy: only when a database is used
            out.append(SqlEmitter(with_password(plain, password_file), rules, connect="try", timezone=timezone))
        except SqlUsageError as e:
            raise usage_error(str(e)) from None
    used = {b for r in (*rules.route, *rules.failure_route) for b, _c in r.acc_calls()}
    a = rules.acc
    if a.radius_flag is not None or a.radius_missed_flag is not None or "radius" in used:
        out.append(RadiusEmitter(rules))
    if a.diameter_flag is not None or a.diameter_missed_flag is not None or "diameter" in used:
        out.append(DiscEmitter(rules) if a.diameter_mode == "disc" else DiameterEmitter(rules))
    return out


def _backend_kind(b: Backend) -> str:
    """The name the rules' flags give this backend (by_backend's keys): db, radius, diameter."""
    return getattr(b, "kind", b.name)  # SqlEmitter "db", RadiusEmitter "radius", the Diameter ones "diameter"


def _acc_summary(result: RunResult, rules: RulesFile, spooled: list[SpooledEmitter], out: TextIO,
                 logs: list[LogEmitter]) -> None:
    out = TerminalSafe(out)  # type: ignore[assignment]
    t = result.tracker
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(result.records.items())) or "none"
    # by_backend counts the records the rules flagged for each backend; only the outputs this
    # run really had are listed as such (--no-db, --log none: the flag is there, the output not)
    used = {"log"} if logs else set()
    used |= {_backend_kind(sp.backend) for sp in spooled}
    shown = ", ".join(f"{b} {n}" for b, n in sorted(result.by_backend.items()) if b in used) or "none"
    unused = ", ".join(f"{b} {n}" for b, n in sorted(result.by_backend.items()) if b not in used)
    print(f"acc: {sum(result.records.values())} records ({kinds}); by backend: {shown}"
          f"{f' (flagged for outputs this run did not have: {unused})' if unused else ''}", file=out)
    if result.capture_gaps:
        print(f"  {result.capture_gaps} records made while packets were being dropped "
              "(capture_gaps in JSON lines: they may be incomplete)", file=out)
    for em in logs:
        if em.send_failures:
            print(f"  syslog: {em.send_failures} line(s) could not be sent to {em.target}", file=out)
    for sp in spooled:
        recovered = f", {sp.recovered} of them left in the spool by an earlier run" if sp.recovered else ""
        outages = f"; {sp.outages} outage(s), last error: {sp.last_error}" if sp.outages else ""
        dead = (f"; {sp.dead_lettered} set aside as dead letters (sipsniff-acc spool status)"
                if sp.dead_lettered else "")
        lost = f"; {sp.lost} LOST (the spool's disk was full)" if sp.lost else ""
        print(f"  {sp.label}: {sp.delivered} records delivered to {sp.backend.where}{recovered}; "
              f"{sp.pending} pending in the spool{dead}{lost}{outages}", file=out)
    roles = ", ".join(f"{n} {r}" for r, n in sorted(t.transactions.items()))
    print(f"  transactions: {roles or 'none'}; {t.retransmissions} retransmissions absorbed; "
          f"{t.replies_without_request} replies without a request in the capture", file=out)
    if rules.proxy.addresses:
        print(f"  proxy: {', '.join(rules.proxy.addresses)} (configured)", file=out)
    elif t.inferred_proxies:
        print(f"  proxy: inferred from Via hops: {', '.join(sorted(t.inferred_proxies))} "
              "(set proxy.addresses in rules.yaml to be exact)", file=out)
    else:
        print("  proxy: none seen forwarding; every server transaction was accounted (single-leg mode)", file=out)
    if t.open_at_end:
        what = _by_method(t.open_at_end)
        print(f"  open at end of input (no final reply): {what}"
              f"{'' if result.open_as_408 else ' (not accounted; --open-as-408 to account them)'}", file=out)
    if t.timed_out:
        what = _by_method(t.timed_out)
        print(f"  given up without a final reply on the wire (fr timer + 32 s): {what}", file=out)
    if t.timer_408:
        what = _by_method(t.timer_408)
        print(f"  accounted as the proxy's timer 408 during the run (no final reply by fr timer + "
              f"{TIMER_GRACE:g} s): {what}", file=out)
    if t.stateless_replies:
        print(f"  stateless replies of the proxy (never accounted): {t.stateless_replies}", file=out)
    if t.dialogs:
        print(f"  dialogs: {', '.join(f'{n} {s}' for s, n in sorted(t.dialogs.items()))}", file=out)
    if line := t.evictions():
        print(f"  {line}", file=out)


def _by_method(counts: Mapping[str, int], shown: int = 12) -> str:
    """'3 INVITE, 1 OPTIONS' for the summary; past ``shown`` methods the rest is one total (a
    hostile peer's made-up methods made a line of megabytes)."""
    items = sorted(counts.items())
    if len(items) > shown:
        items = sorted(items, key=lambda kv: -kv[1])  # the most frequent first, the rest summed
    what = ", ".join(f"{n} {m}" for m, n in items[:shown])
    if len(items) > shown:
        what += f", {sum(n for _m, n in items[shown:])} in {len(items) - shown} other method(s)"
    return what


@app.command()
def deliver(
    db_url: Annotated[str | None, typer.Option("--db-url", help="SQLAlchemy URL (default: rules' db_url, else sqlite:///acc.db)")] = None,
    rules_file: Annotated[Path | None, typer.Option("--rules", "-m", help="rules.yaml (RADIUS/Diameter settings, tables to create)")] = None,
    spool_path: Annotated[Path, typer.Option("--spool", help="the spool to empty")] = Path(DEFAULT_SPOOL),
    drain_timeout: Annotated[float, typer.Option("--drain-timeout", help="seconds to keep retrying")] = 60.0,
    db_password_file: Annotated[Path | None, typer.Option("--db-password-file", help="read the database password from this file")] = None,
    on_overlong: Annotated[str | None, typer.Option("--on-overlong", help="a value longer than its column: truncate (counted per column) or dead-letter the record (default: rules.yaml's acc.on_overlong, else truncate)")] = None,
) -> None:
    """Deliver the records a previous run left in the spool for this destination (the database was down).

    Records are only sent to the destination they were spooled for (database URL without the
    password; RADIUS/Diameter peers from --rules); others stay, and a note says how to deliver them.
    """
    from sipsniff_acc.emitters.spool import SpoolError
    from sipsniff_acc.emitters.sql import OVERLONG_POLICIES, SqlEmitter
    from sipsniff_acc.emitters.sqlurl import destination as sql_destination

    rules = _rules_or_exit(rules_file)
    if on_overlong is not None and on_overlong not in OVERLONG_POLICIES:
        raise typer.BadParameter(f"{on_overlong!r}: use {' or '.join(OVERLONG_POLICIES)}", param_hint="--on-overlong")
    plain_url = db_url or os.environ.get("SIPSNIFF_DB_URL") or rules.acc.db_url or DEFAULT_DB_URL
    try:
        check_url(plain_url)  # a URL that can never work is a mistake, not "nothing pending"
    except SqlUsageError as e:
        raise usage_error(str(e)) from None
    if not spool_path.exists():
        print(f"{spool_path}: no spool, nothing to deliver")
        return
    try:
        spool = DurableSpool(spool_path, create=False)
    except SpoolError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
    queued = spool.pending()
    backends: list[Backend] = []
    try:
        url = with_password(plain_url, db_password_file)
        if queued.get(sql_destination(url)):
            backends.append(SqlEmitter(url, rules, connect="try", on_overlong=on_overlong))
        for b in _backends(rules, True, None, None):
            if queued.get(b.name):
                backends.append(b)
            else:
                b.close()
    except (SqlError, OSError, RadiusConfigError, DiameterConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_BACKEND_ERROR) from None
    emitters = [SpooledEmitter(b, spool, drain_timeout=drain_timeout) for b in backends]
    spool.note_unclaimed(sys.stderr)
    if not emitters:
        print(f"{spool_path}: nothing pending for {sql_destination(url)}"
              f"{' or the peers of the rules' if rules_file else ''}")
    pending = 0
    for sp in emitters:
        sp.close()
        dead = f"; {sp.dead_lettered} set aside as dead letters" if sp.dead_lettered else ""
        print(f"{sp.label}: {sp.delivered} record(s) delivered to {sp.backend.where}{dead}; "
              f"{sp.pending} still in {spool_path}")
        if sp.pending:
            print(f"error: {sp.label} {sp.backend.where}: {sp.spool_error or sp.last_error or 'not reachable'}",
                  file=sys.stderr)
        pending += sp.pending
    spool.close()
    if pending:
        raise typer.Exit(EXIT_BACKEND_ERROR)


@app.command("check-rules")
def check_rules(rules_file: Annotated[Path, typer.Argument(help="the rules.yaml to check")]) -> None:
    """Validate a rules.yaml; every problem is printed as FILE:LINE: key: why (exit 2).

    The file is read as the run reads it: at most 1 MiB, UTF-8, YAML aliases and nesting
    bounded, regexes compiled on RE2 (a pattern RE2 refuses is named with its line).
    """
    from sipsniff_acc.limits import Limits
    rules = _rules_or_exit(rules_file)
    a = rules.acc
    backends = [b for b in ("log", "db", "radius", "diameter") if a.flags(False).get(b) is not None
                or a.flags(True).get(b) is not None]
    if "radius" in backends:  # the RADIUS config file and the extras' names in the dictionary
        try:
            RadiusEmitter(rules).close()
        except (RadiusConfigError, OSError) as e:
            print(f"error: {rules_file}: acc.radius_config: {e}", file=sys.stderr)
            raise typer.Exit(EXIT_USAGE) from None
    default = Limits()
    limits = [f"{k}={getattr(rules.limits, k)}" for k in Limits.names() if getattr(rules.limits, k) != getattr(default, k)]
    print(f"{rules_file}: ok: profile {rules.profile}, {len(rules.route)} route rule(s), "
          f"{len(rules.failure_route)} failure_route rule(s), backends with flags: {', '.join(backends) or 'none'}, "
          f"proxy: {', '.join(rules.proxy.addresses) or 'inferred from Via hops'}, "
          f"limits: {', '.join(limits) or 'defaults'}"
          + (f", dialog CDRs: {' + '.join('log' if b == 'log' else 'db table ' + a.cdrs_table for b in a.cdr_backends)}"
             if a.cdr_backends else ""))


CONNECT_TIMEOUT = 10  #: seconds init-db waits for a database server before calling it unreachable


def _reach_database(url: str, password_file: Path | None) -> str:
    """The URL (with its password) once the database answered, else one line and exit:
    2 for a URL that cannot work (syntax, unknown dialect, driver not installed, SQLite file
    in a missing directory), 3 for a server that cannot be reached or refuses the login."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    shown = safe_url(url)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        redacted = re.sub(r"(?<=://)[^@/]*@", "***@", url)  # a URL we cannot parse may still hold a password
        raise usage_error(f"{redacted!r} is not a database URL: use dialect+driver://user@host[:port]/name, "
                          "e.g. sqlite:///acc.db or postgresql+psycopg://acc@db/acc") from None
    try:
        dialect = parsed.get_dialect()
        dialect.import_dbapi()  # the driver module: not installed is a usage mistake, found now
    except ImportError as e:
        raise usage_error(f"{shown}: the database driver is not installed ({e.name or e}); "
                          "pip install 'sipsniff-acc[postgresql]' or '[mysql]'") from None
    except (ArgumentError, ValueError) as e:
        raise usage_error(f"{shown}: unknown database dialect or driver {parsed.drivername!r} ({e})") from None
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database or ""
        if db and db != ":memory:" and not db.startswith("file:"):
            try:
                check_output(db, "init-db")
            except OutputPathError as e:
                raise usage_error(str(e)) from None
    url = with_password(url, password_file)
    args = {} if parsed.get_backend_name() == "sqlite" else {"connect_timeout": CONNECT_TIMEOUT}
    try:
        engine = create_engine(url, connect_args=args)
    except (SQLAlchemyError, ImportError, ValueError, TypeError) as e:
        raise usage_error(f"{shown}: {_first_line(e, url)}") from None
    try:
        with engine.connect() as con:
            con.execute(text("SELECT 1"))
    except SQLAlchemyError as e:
        raise usage_error(f"{shown}: cannot connect: {_first_line(e, url)}", EXIT_BACKEND_ERROR) from None
    finally:
        engine.dispose()
    return url


def _first_line(exc: BaseException, url: str) -> str:
    """The driver's own reason, one line, never the password."""
    orig = getattr(exc, "orig", None) or exc
    line = next((ln.strip() for ln in str(orig).splitlines() if ln.strip()), type(orig).__name__)
    from sqlalchemy.engine import make_url
    try:
        password = make_url(url).password
    except Exception:  # noqa: BLE001 - only to mask a message
        password = None
    return line.replace(str(password), "***") if password else line


@app.command("init-db")
def init_db(
    url: Annotated[str, typer.Argument(help="SQLAlchemy URL, e.g. sqlite:///acc.db")],
    rules_file: Annotated[Path | None, typer.Option(*RULES_FLAGS, help="rules.yaml: table/column names, db_extra, multi_leg_info")] = None,
    check: Annotated[bool, typer.Option("--check", help="only report what is missing; create nothing")] = False,
    db_password_file: Annotated[Path | None, typer.Option("--db-password-file", help="read the database password from this file (or set SIPSNIFF_DB_PASSWORD)")] = None,
) -> None:
    """Create the Kamailio-compatible acc and missed_calls tables (or check an existing schema).

    Exit status: 0 ready (or --check: nothing missing); 2 a bad URL, unknown driver or rules
    error; 3 the database cannot be reached or refused us, or --check found something missing.
    """
    from sipsniff_acc.emitters.sql import SqlEmitter, missing_columns

    rules = _rules_or_exit(rules_file)
    try:  # the same URL checks as process and deliver: exit 2 for a URL that can never work
        check_url(url)
    except SqlUsageError as e:
        raise usage_error(str(e)) from None
    lite = sqlite_file(url)
    if lite is not None and not check and os.path.isdir(os.path.dirname(os.path.abspath(lite))):
        create_private(lite)  # 0600 as process makes it: billing data (connecting would make it 0644)
    url = _reach_database(url, db_password_file)
    if check:
        try:
            missing = missing_columns(url, rules)
        except Exception as e:  # noqa: BLE001 - any driver error after the connection test: one line
            raise usage_error(f"{safe_url(url)}: {_first_line(e, url)}", EXIT_BACKEND_ERROR) from None
        for m in missing:
            print(f"missing: {m}", file=sys.stderr)
        if missing:
            raise typer.Exit(EXIT_BACKEND_ERROR)
        print(f"{safe_url(url)}: schema ok")
        return
    try:
        emitter = SqlEmitter(url, rules)
    except SqlError as e:
        raise usage_error(str(e), EXIT_BACKEND_ERROR) from None
    names = ", ".join(emitter.tables)
    emitter.close()
    print(f"{safe_url(url)}: tables ready: {names}")


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


from sipsniff_acc.commands import spool as _spool_command  # noqa: E402  (registers on app)

_spool_command.register(app)

from sipsniff_acc.commands import audit as _audit_command  # noqa: E402

_audit_command.register(app)

from sipsniff_acc.commands import capture as _capture_command  # noqa: E402  (the NATS sensor)

_capture_command.register(app)


def main() -> None:
    """The console entry point: a usage mistake (unknown option, missing argument, bad value)
    is one line `error: ...` with exit status 2, not a usage box."""
    if len(sys.argv) == 1:
        sys.argv.append("--help")
    try:
        status = app(standalone_mode=False)
    except Exception as e:  # typer's UsageError (its click fork) is not exported: recognised by shape
        if getattr(e, "exit_code", None) != EXIT_USAGE or not hasattr(e, "format_message"):
            raise
        ctx = getattr(e, "ctx", None)
        hint = f" (see {ctx.command_path} -h)" if ctx is not None else ""
        print(f"error: {escape(e.format_message())}{hint}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.exit(status if isinstance(status, int) else 0)
