"""The command line (typer): wiring sources → pipeline → outputs, no logic of its own."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
from enum import Enum
from pathlib import Path
from typing import IO, Annotated, Any, BinaryIO, TextIO

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
from sipsniff_acc.emitters import Emitter
from sipsniff_acc.emitters.jsonl import JsonlEmitter
from sipsniff_acc.emitters.diameter import DiameterConfigError, DiameterEmitter, DiscEmitter
from sipsniff_acc.emitters.radius import RadiusConfigError, RadiusEmitter
from sipsniff_acc.emitters.spool import DEFAULT_SPOOL, Backend, DurableSpool, SpooledEmitter, SpoolFull
from sipsniff_acc.emitters.sql import SqlEmitter, SqlError, missing_columns, safe_url
from sipsniff_acc.emitters.syslog import LogEmitter, SyslogTargetError
from sipsniff_acc.processrun import RunResult, run
from sipsniff_acc.rules import RulesError, RulesFile, load_rules

DEFAULT_DB_URL = "sqlite:///acc.db"

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


def _auto_workers(workers: int) -> int:
    """-1: one worker per CPU, at most MAX_AUTO_WORKERS; none on a single CPU."""
    if workers >= 0:
        return workers
    cpus = os.cpu_count() or 1
    return 0 if cpus < 2 else min(cpus, MAX_AUTO_WORKERS)


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
    workers = _auto_workers(workers)
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


EXIT_BACKEND_ERROR = 3  #: a backend refused records; they were saved to an unsent file (named in the message)


def _rules_or_exit(path: Path | None) -> RulesFile:
    try:
        return load_rules(path)
    except RulesError as e:
        for p in e.problems:
            print(f"error: {p}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None


EXIT_USAGE = 2


@app.command()
def process(
    files: Annotated[list[str] | None, typer.Argument(help="pcap/pcapng files (.gz too), directories, or - for stdin")] = None,
    rules_file: Annotated[Path | None, typer.Option("--rules", "-r", help="rules.yaml (default: built-in OpenSER-style rules)")] = None,
    db_url: Annotated[str | None, typer.Option("--db-url", help="SQLAlchemy URL (default: rules' db_url, else sqlite:///acc.db)")] = None,
    no_db: Annotated[bool, typer.Option("--no-db", help="write no SQL rows")] = False,
    log: Annotated[str | None, typer.Option("--log", help="ACC log lines: - for stdout (default), a file, or 'none'")] = "-",
    syslog_target: Annotated[str | None, typer.Option("--syslog", help="also send ACC lines to syslog: local, unix:///path, udp://host:port, tcp://host:port")] = None,
    jsonl_file: Annotated[Path | None, typer.Option("--jsonl", help="write every record as JSON lines here (- for stdout)")] = None,
    open_as_408: Annotated[bool, typer.Option("--open-as-408", help="account transactions still open at the end as the 408 the proxy's timer would send")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no summary on stderr")] = False,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="progress bar (default: on a terminal, for big inputs)")] = None,
    stats: Annotated[Path | None, typer.Option("--stats", help="write the run's counters as JSON to this file")] = None,
    interface: Annotated[str | None, typer.Option("--interface", "-i", help="capture live from this interface (Linux, root)")] = None,
    count: Annotated[int | None, typer.Option("--count", "-c", help="live: stop after this many packets")] = None,
    duration: Annotated[float | None, typer.Option("--duration", help="live: stop after this many seconds")] = None,
    spool_path: Annotated[Path, typer.Option("--spool", help="durable spool (SQLite file) between the engine and the database")] = Path(DEFAULT_SPOOL),
    drain_timeout: Annotated[float, typer.Option("--drain-timeout", help="seconds to keep retrying an unreachable database at the end")] = 60.0,
    db_password_file: Annotated[Path | None, typer.Option("--db-password-file", help="read the database password from this file (or set SIPSNIFF_DB_PASSWORD)")] = None,
    db_timezone: Annotated[str, typer.Option("--db-timezone", help="utc (default) or local: how DATETIME columns are written (not SQLite)")] = "utc",
    workers: Annotated[int, typer.Option("--workers", "-j", help="processes that parse and account, calls sharded by Call-ID; 0: all in one process; -1: one per CPU (at most 4) for files, 0 for a live capture or stdin")] = -1,
    tls_keylog: Annotated[Path | None, typer.Option("--tls-keylog", help="SSLKEYLOGFILE-format key log: SIP over TLS is decrypted by tshark")] = None,
) -> None:
    """The main job: the acc records a Kamailio proxy would write for the traffic in the captures.

    Example: sipsniff-acc process capture.pcap --rules rules.yaml --db-url sqlite:///acc.db
    """
    rules = _rules_or_exit(rules_file)
    sources = _open_sources(files, interface, count, duration)
    emitters: list[Emitter] = []
    opened: list[IO[Any]] = []
    try:
        if log and log != "none":
            stream: IO[str] = sys.stdout if log == "-" else open(log, "a", encoding="utf-8")  # noqa: SIM115
            if log != "-":
                opened.append(stream)
            emitters.append(LogEmitter(rules, stream, syslog_target))
        elif syslog_target:
            emitters.append(LogEmitter(rules, None, syslog_target))
        if jsonl_file is not None:
            jout: IO[bytes] = sys.stdout.buffer if str(jsonl_file) == "-" else open(jsonl_file, "wb")  # noqa: SIM115
            if str(jsonl_file) != "-":
                opened.append(jout)
            emitters.append(JsonlEmitter(jout))
        spooled: list[SpooledEmitter] = []
        spool: DurableSpool | None = None
        for backend in _backends(rules, no_db, db_url, db_password_file, db_timezone):
            spool = spool or DurableSpool(spool_path)
            spooled.append(SpooledEmitter(backend, spool, drain_timeout=drain_timeout))
        emitters.extend(spooled)
    except (SyslogTargetError, SqlError, OSError, sqlite3.Error, RadiusConfigError, DiameterConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE if isinstance(e, SyslogTargetError) else EXIT_BACKEND_ERROR) from None
    errors: list[SourceError] = []
    counters = Counters()
    decrypted = _decrypt_tls(sources, tls_keylog) if tls_keylog is not None else []
    frames = open_captures(sources, errors)
    total = sum(getattr(r, "size", 0) for r in sources)
    show = progress if progress is not None else (sys.stderr.isatty() and total >= PROGRESS_MIN_BYTES)
    if show:
        frames = _with_progress(frames, sources, total)
    stopped_by = 0
    previous = signal.signal(signal.SIGTERM, _terminate)
    result = RunResult()
    try:
        if workers < 0 and (interface is not None or "-" in (files or [])):
            workers = 0  # live or a pipe: every record goes out at once, not a round later
        result = run(frames, rules, emitters, counters, open_as_408, result, _auto_workers(workers), decrypted)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(0) from None
    except (KeyboardInterrupt, Terminated) as e:  # clean shutdown: what was produced is flushed below
        stopped_by = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
        print(f"stopping on {signal.Signals(stopped_by).name}: flushing", file=sys.stderr)
    except SpoolFull as e:
        print(f"error: {e}", file=sys.stderr)
        stopped_by = -1
    except OSError as e:  # an output file or stream failed (disk full, ...): stop, keep what is spooled
        print(f"error: writing the output: {e}", file=sys.stderr)
        stopped_by = -1
    finally:
        signal.signal(signal.SIGTERM, previous)
        for em in emitters:
            em.close()
        for f in opened:
            f.close()
    tstats = result.tracker
    if stats:
        doc = counters.as_dict() | {"errors": [str(e) for e in errors], "records": dict(result.records),
                                    "records_by_backend": dict(result.by_backend), "tracker": tstats.as_dict(),
                                    "delivered": {sp.backend.name: sp.delivered for sp in spooled},
                                    "pending_in_spool": {sp.backend.name: sp.pending for sp in spooled}}
        stats.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    if not quiet:
        _summary(counters, errors, sys.stderr)
        _acc_summary(result, rules, spooled, sys.stderr, [e for e in emitters if isinstance(e, LogEmitter)])
    if stopped_by > 0:
        raise typer.Exit(128 + stopped_by)
    stuck = [sp for sp in spooled if sp.pending]
    for sp in stuck:
        print(f"error: {sp.backend.name} {sp.backend.where}: {sp.last_error or 'not reachable'}; {sp.pending} "
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


class Terminated(Exception):
    """SIGTERM, turned into an exception so the run unwinds and flushes like on Ctrl-C."""


def _terminate(_signum: int, _frame: object) -> None:
    raise Terminated()


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
        url = with_password(db_url or os.environ.get("SIPSNIFF_DB_URL") or rules.acc.db_url or DEFAULT_DB_URL,
                            password_file)
        out.append(SqlEmitter(url, rules, connect="try", timezone=timezone))
    used = {b for r in (*rules.route, *rules.failure_route) for b, _c in r.acc_calls()}
    a = rules.acc
    if a.radius_flag is not None or a.radius_missed_flag is not None or "radius" in used:
        out.append(RadiusEmitter(rules))
    if a.diameter_flag is not None or a.diameter_missed_flag is not None or "diameter" in used:
        out.append(DiscEmitter(rules) if a.diameter_mode == "disc" else DiameterEmitter(rules))
    return out


def _acc_summary(result: RunResult, rules: RulesFile, spooled: list[SpooledEmitter], out: TextIO,
                 logs: list[LogEmitter]) -> None:
    t = result.tracker
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(result.records.items())) or "none"
    print(f"acc: {sum(result.records.values())} records ({kinds}); by backend: "
          f"{', '.join(f'{b} {n}' for b, n in sorted(result.by_backend.items())) or 'none'}", file=out)
    for em in logs:
        if em.send_failures:
            print(f"  syslog: {em.send_failures} line(s) could not be sent to {em.target}", file=out)
    for sp in spooled:
        recovered = f", {sp.recovered} of them left in the spool by an earlier run" if sp.recovered else ""
        outages = f"; {sp.outages} outage(s), last error: {sp.last_error}" if sp.outages else ""
        print(f"  {sp.backend.name}: {sp.delivered} records delivered to {sp.backend.where}{recovered}; "
              f"{sp.pending} pending in the spool{outages}", file=out)
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
        what = ", ".join(f"{n} {m}" for m, n in sorted(t.open_at_end.items()))
        print(f"  open at end of input (no final reply): {what}"
              f"{'' if result.open_as_408 else ' (not accounted; --open-as-408 to account them)'}", file=out)
    if t.timed_out:
        what = ", ".join(f"{n} {m}" for m, n in sorted(t.timed_out.items()))
        print(f"  given up without a final reply on the wire (fr timer + 32 s): {what}", file=out)
    if t.stateless_replies:
        print(f"  stateless replies of the proxy (never accounted): {t.stateless_replies}", file=out)
    if t.dialogs:
        print(f"  dialogs: {', '.join(f'{n} {s}' for s, n in sorted(t.dialogs.items()))}", file=out)


@app.command()
def deliver(
    db_url: Annotated[str | None, typer.Option("--db-url", help="SQLAlchemy URL (default: rules' db_url, else sqlite:///acc.db)")] = None,
    rules_file: Annotated[Path | None, typer.Option("--rules", "-m", help="rules.yaml (RADIUS/Diameter settings, tables to create)")] = None,
    spool_path: Annotated[Path, typer.Option("--spool", help="the spool to empty")] = Path(DEFAULT_SPOOL),
    drain_timeout: Annotated[float, typer.Option("--drain-timeout", help="seconds to keep retrying")] = 60.0,
    db_password_file: Annotated[Path | None, typer.Option("--db-password-file", help="read the database password from this file")] = None,
    on_overlong: Annotated[str, typer.Option("--on-overlong", help="a value longer than its column: truncate (counted per column) or dead-letter the record")] = "truncate",
) -> None:
    """Deliver the records a previous run left in the spool for this destination (the database was down).

    Records are only sent to the destination they were spooled for (database URL without the
    password; RADIUS/Diameter peers from --rules); others stay, and a note says how to deliver them.
    """
    from sipsniff_acc.emitters.spool import SpoolError
    from sipsniff_acc.emitters.sql import OVERLONG_POLICIES
    from sipsniff_acc.emitters.sql import destination as sql_destination

    rules = _rules_or_exit(rules_file)
    if on_overlong not in OVERLONG_POLICIES:
        raise typer.BadParameter(f"{on_overlong!r}: use {' or '.join(OVERLONG_POLICIES)}", param_hint="--on-overlong")
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
        url = with_password(db_url or os.environ.get("SIPSNIFF_DB_URL") or rules.acc.db_url or DEFAULT_DB_URL,
                            db_password_file)
        if queued.get(sql_destination(url)):
            backends.append(SqlEmitter(url, rules, connect="try", on_overlong=on_overlong))
        backends += [b for b in _backends(rules, True, None, None) if queued.get(b.name) or b.close()]
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
        fitted = getattr(sp.backend, "fitted", None)
        if fitted:
            print(f"  values fitted to the schema: {', '.join(f'{k} {n}' for k, n in sorted(fitted.items()))}")
        if sp.pending:
            print(f"error: {sp.label} {sp.backend.where}: {sp.spool_error or sp.last_error or 'not reachable'}",
                  file=sys.stderr)
        pending += sp.pending
    spool.close()
    if pending:
        raise typer.Exit(EXIT_BACKEND_ERROR)


@app.command("check-rules")
def check_rules(rules_file: Annotated[Path, typer.Argument(help="the rules.yaml to check")]) -> None:
    """Validate a rules.yaml; every problem is printed as FILE:LINE: key: why."""
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
    print(f"{rules_file}: ok: profile {rules.profile}, {len(rules.route)} route rule(s), "
          f"{len(rules.failure_route)} failure_route rule(s), backends with flags: {', '.join(backends) or 'none'}, "
          f"proxy: {', '.join(rules.proxy.addresses) or 'inferred from Via hops'}")


@app.command("init-db")
def init_db(
    url: Annotated[str, typer.Argument(help="SQLAlchemy URL, e.g. sqlite:///acc.db")],
    rules_file: Annotated[Path | None, typer.Option("--rules", "-r", help="rules.yaml: table/column names, db_extra, multi_leg_info")] = None,
    check: Annotated[bool, typer.Option("--check", help="only report what is missing; create nothing")] = False,
) -> None:
    """Create the Kamailio-compatible acc and missed_calls tables (or check an existing schema)."""
    rules = _rules_or_exit(rules_file)
    if check:
        missing = missing_columns(url, rules)
        for m in missing:
            print(f"missing: {m}", file=sys.stderr)
        if missing:
            raise typer.Exit(EXIT_BACKEND_ERROR)
        print(f"{safe_url(url)}: schema ok")
        return
    try:
        emitter = SqlEmitter(url, rules)
    except SqlError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_BACKEND_ERROR) from None
    names = ", ".join(emitter.tables)
    emitter.close()
    print(f"{safe_url(url)}: tables ready: {names}")


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


from sipsniff_acc.commands import spool as _spool_command  # noqa: E402  (registers on app)

_spool_command.register(app)


def main() -> None:
    app()
