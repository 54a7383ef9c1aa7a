"""Running as a service: SIGHUP (reload rules.yaml, reopen log files), alarms for journald.

Why a module of its own: the run loop must stay free of I/O decisions. It asks
``ServiceControl.pending_rules()`` at its safe points (an int compare when nothing happened)
and swaps in what it returns; everything a HUP does besides (reading and validating the
file, reopening outputs after logrotate, saying what happened) is here.

A reload is all or nothing: the new file is validated exactly as at start-up (bounded YAML,
RE2, FILE:LINE problems) and must not change what the running outputs and tables were built
from (profile, limits, dialog/CDR settings, tables and columns, RADIUS/Diameter peers):
those need a restart, and a file that changes them is refused whole, so the running rules
are never a mix of two files.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from sipsniff_acc import stopping
from sipsniff_acc.events import CaptureGap
from sipsniff_acc.outfiles import open_private
from sipsniff_acc.rules import RulesError, RulesFile, load_rules
from sipsniff_acc.sysloglines import escape

ALARM_INTERVAL = 10.0  #: seconds: one line per kind of alarm at most this often (the rest counted in the next)
WARNING, NOTICE = 4, 5  #: syslog priorities (sd-daemon's "<N>" prefix under journald)

#: acc keys the engine reads for each transaction or record: they may change on a reload.
#: Every other key (tables, columns, db_extra, peers, log format) built an output at start.
LIVE_ACC_KEYS = frozenset({
    "early_media", "failed_transaction_flag", "failed_filter", "report_ack", "report_cancels",
    "detect_direction", "reason_from_hf", "local_reason", "log_flag", "log_missed_flag", "log_extra",
    "db_flag", "db_missed_flag",
})
#: top-level sections fixed at start: the profile (the log prefix, the tracker's relay mode),
#: dialog settings (CDR timers) and the memory limits (tables sized once). ``proxy`` and ``tm``
#: may change: the run applies them to transactions created after the reload.
FIXED_TOP = ("profile", "dialog", "limits")


def _journald() -> bool:
    """stderr is systemd's journal stream (JOURNAL_STREAM names its device:inode): it reads
    a "<N>" prefix as the line's priority."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


class Alarms:
    """One-line alarms on stderr, rate-limited per kind: a storm of drops or an outage gives
    one line per ALARM_INTERVAL, and the next line says how many were held back."""

    def __init__(self, out: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, interval: float = ALARM_INTERVAL) -> None:
        self.out = out
        self.clock, self.interval = clock, interval
        self.last: dict[str, float] = {}
        self.held: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()  #: lines written, by kind (the metrics' alarms_total)
        self.journald = _journald()

    def __call__(self, msg: str, kind: str | None = None, level: int = WARNING, limited: bool = True) -> bool:
        """Say ``msg`` unless a line of the same ``kind`` went out less than ``interval`` ago
        (then it is counted and mentioned by the next one); ``limited=False`` for answers to
        an operator's action (a reload), which are always said. True if the line was written."""
        kind = kind or msg
        now = self.clock()
        last = self.last.get(kind)
        if limited and last is not None and now - last < self.interval:
            self.held[kind] += 1
            return False
        self.last[kind] = now
        held = self.held.pop(kind, 0)
        more = f" ({held} more like this in the last {now - last:.0f} s)" if held and last is not None else ""
        word = "alarm" if level <= WARNING else "notice"
        line = f"{'<%d>' % level if self.journald else ''}{word}: {escape(msg)}{more}\n"
        self.sent[kind] += 1
        if self.out is not None:
            self.out(line)
        else:
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass  # stderr gone (a closed pipe): an alarm must never stop the run
        return True


#: The process' alarms (``alarm("...")``): used by the run loop, the outputs and this module.
alarm = Alarms()


class AlarmStream:
    """The text stream handed to outputs that write their own alarm lines (the spooled
    backends' ``alarms=``: backend down/back, dead letters, spool full). Each line goes to
    stderr unchanged, with journald's priority prefix under systemd (<4> for ``alarm:``,
    <5> for ``note:``), and is counted in ``sent``."""

    def __init__(self) -> None:
        self.journald = _journald()
        self.pending = ""
        self.sent = 0

    def write(self, text: str) -> int:
        self.pending += text
        while "\n" in self.pending:
            line, _, self.pending = self.pending.partition("\n")
            prefix = (f"<{NOTICE if line.startswith('note:') else WARNING}>" if self.journald else "")
            self.sent += 1
            try:
                sys.stderr.write(f"{prefix}{line}\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass  # stderr gone: an alarm must never stop the run
        return len(text)

    def flush(self) -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


class ReopenableFile:
    """An output file (``--log FILE``, ``--jsonl FILE``) that follows logrotate: after a
    SIGHUP the next write (or ``ServiceControl``'s reopen) goes to a new file at the same
    path, opened for appending and 0600, and the old one is flushed and closed. If the path
    cannot be opened again, the old file is kept (with an alarm): no record is lost."""

    def __init__(self, path: str | Path, mode: str, encoding: str | None = None) -> None:
        self.path, self.encoding = str(path), encoding
        self.file: IO[Any] = open_private(path, mode, encoding) if encoding else open_private(path, mode)
        self.mode = "a" + mode[1:]  #: later opens append: a rotation never truncates
        self.seen = stopping.hups()
        self.reopened = 0

    def write(self, data: Any) -> int:
        if stopping._hups != self.seen:  # noqa: SLF001 - an int compare per write, not a call
            self.reopen()
        return self.file.write(data)

    def reopen(self) -> None:
        """The file at ``path`` from now on; idempotent for one SIGHUP."""
        self.seen = stopping.hups()
        try:
            new = open_private(self.path, self.mode, self.encoding) if self.encoding else \
                open_private(self.path, self.mode)
        except OSError as e:
            alarm(f"cannot reopen {self.path}: {e.strerror or e}; still writing to the file opened before",
                  kind=f"reopen {self.path}")
            return
        old, self.file = self.file, new
        try:
            old.flush()
        finally:
            old.close()
        self.reopened += 1

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    @property
    def closed(self) -> bool:
        return bool(self.file.closed)

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, buffer...: the current file's
        return getattr(self.file, name)


def fixed_changes(old: RulesFile, new: RulesFile) -> list[str]:
    """The keys that differ between two rules files and cannot change while running."""
    out: list[str] = []
    for top in FIXED_TOP:
        if getattr(old, top, None) != getattr(new, top, None):
            out.append(top)
    a, b = old.acc.model_dump(), new.acc.model_dump()
    out += [f"acc.{k}" for k in a if k not in LIVE_ACC_KEYS and a[k] != b.get(k)]
    if backends_called(old) != backends_called(new):
        out.append("acc_rad_request/acc_diam_request (a RADIUS or Diameter output)")
    return out


def backends_called(rules: RulesFile) -> frozenset[str]:
    """The AAA outputs the rules need (their flags or acc_*_request calls): each is a connection
    opened at start, so a reload may not add or remove one."""
    used = {b for r in (*rules.route, *rules.failure_route) for b, _c in r.acc_calls()}
    a = rules.acc
    out = set()
    if a.radius_flag is not None or a.radius_missed_flag is not None or "radius" in used:
        out.add("radius")
    if a.diameter_flag is not None or a.diameter_missed_flag is not None or "diameter" in used:
        out.add("diameter")
    return frozenset(out)


SETTLE = 0.5  #: seconds a rules file must be unchanged before a SIGHUP reads it


def _stamp(path: Path) -> tuple[int, int, float] | None:
    """(size, inode, mtime) of the rules file, None if it cannot be stat'ed (the load says why)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_ino, st.st_mtime


class ServiceControl:
    """What a SIGHUP asks of a running ``process``: handed to the run loop (``control=``)."""

    def __init__(self, rules_path: Path | None, rules: RulesFile, files: Sequence[ReopenableFile] = (),
                 say: Alarms | None = None) -> None:
        self.rules_path = rules_path
        self.rules = rules
        self.files = list(files)
        self.say = say or alarm
        self.loaded_at = time.time()
        self.seen = stopping.hups()
        self.reloads: Counter[str] = Counter()  #: "ok" / "refused" (the metrics' rule_reloads_total)
        self.deferred = False  #: a HUP came while the rules file was still being written: retried
        self._said_deferred = False

    def pending_rules(self) -> RulesFile | None:
        """At a safe point of the run: the new rules once after a SIGHUP that brought a valid
        file, else None (no HUP, no --rules, or the file refused: the old rules stay). The
        log files are reopened on every HUP."""
        if stopping._hups == self.seen and not self.deferred:  # noqa: SLF001 - the per-packet path
            return None
        if stopping._hups != self.seen:  # noqa: SLF001
            self.seen = stopping.hups()
            self.reopen()
        return self.reload()

    def reopen(self) -> None:
        for f in self.files:
            if f.seen != self.seen:
                f.reopen()

    def reload(self) -> RulesFile | None:
        """Read and validate the rules file as at start-up; say in one line what happened."""
        if self.rules_path is None:
            self.say("SIGHUP: no --rules file (built-in rules): nothing to reload; log files reopened",
                     kind="reload", level=NOTICE, limited=False)
            return None
        path = self.rules_path
        loaded = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.loaded_at))
        # a file written in place (`cat > rules.yaml`, a config manager) may be read half
        # written, and half a rules file is often valid YAML with rules missing: read it
        # only once unchanged for SETTLE seconds, and unchanged while it was read
        before = _stamp(path)
        if before is not None and time.time() - before[2] < SETTLE:
            self._defer(path)
            return None
        try:
            new = load_rules(path)
        except RulesError as e:
            if _stamp(path) != before:
                self._defer(path)
                return None
            self.deferred = self._said_deferred = False
            first = e.problems[0] if e.problems else f"{path}: invalid"
            more = f" (and {len(e.problems) - 1} more: sipsniff-acc check-rules {path})" if len(e.problems) > 1 else ""
            self._refused(f"{first}{more}", loaded)
            return None
        if _stamp(path) != before:
            self._defer(path)
            return None
        self.deferred = self._said_deferred = False
        fixed = fixed_changes(self.rules, new)
        if fixed:
            self._refused(f"{path}: {', '.join(fixed)} changed: these need a restart", loaded)
            return None
        self.rules = new
        self.loaded_at = time.time()
        self.reloads["ok"] += 1
        self.say(f"rules reloaded from {path}: {len(new.route)} route rule(s), {len(new.failure_route)} "
                 "failure_route rule(s); transactions already open keep their flags", kind="reload", level=NOTICE,
                 limited=False)
        return new

    def _defer(self, path: Path) -> None:
        self.deferred = True
        if not self._said_deferred:
            self._said_deferred = True
            self.say(f"SIGHUP: {path} changed less than {SETTLE:g} s ago (still being written?): "
                     "reloading once it has settled", kind="reload", level=NOTICE, limited=False)

    def _refused(self, why: str, loaded: str) -> None:
        self.reloads["refused"] += 1
        self.say(f"rules reload refused: {why}; keeping the rules loaded at {loaded}", kind="reload", limited=False)


GAPS_QUIET = 10.0  #: seconds without a drop report before drops on an interface are said to have stopped


class GapWatch:
    """Drop reports (``CaptureGap``) in a live frame stream: counted for the metrics, and an
    alarm when drops start on an interface and when they have stopped (none for GAPS_QUIET
    seconds of packet time), with the total lost between. The stream passes through as is."""

    def __init__(self, say: Alarms | None = None, quiet: float = GAPS_QUIET) -> None:
        self.say = say or alarm
        self.quiet = quiet
        self.gaps: Counter[str] = Counter()  #: reports, by interface
        self.dropped: Counter[tuple[str, str]] = Counter()  #: packets, by (interface, where)
        self.losing: dict[str, tuple[float, float, int]] = {}  #: interface -> (first, last report time, lost since)

    def watch(self, frames: Iterable[Any]) -> Iterator[Any]:
        losing = self.losing
        for f in frames:
            if f.__class__ is CaptureGap:
                self._gap(f)
            elif losing and f.ts - min(last for _first, last, _n in losing.values()) >= self.quiet:
                self._stopped(f.ts)
            yield f

    def _gap(self, g: CaptureGap) -> None:
        self.gaps[g.interface] += 1
        self.dropped[(g.interface, g.where)] += g.dropped
        first, _last, lost = self.losing.get(g.interface, (g.ts, g.ts, 0))
        if not lost:
            self.say(f"capture drops on {g.interface}: {g.dropped} packet(s) lost ({g.where}); records of calls "
                     "open now are marked capture_gaps", kind=f"drops {g.interface}", limited=False)
        self.losing[g.interface] = (first, g.ts, lost + g.dropped)

    def _stopped(self, now: float) -> None:
        for iface, (first, last, lost) in list(self.losing.items()):
            if now - last >= self.quiet:
                del self.losing[iface]
                span = f"{_clock(first)} to {_clock(last)}"
                self.say(f"capture drops on {iface} stopped: {lost} packet(s) lost from {span}",
                         kind=f"drops {iface}", level=NOTICE, limited=False)


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))
