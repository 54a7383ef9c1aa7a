"""Stopping on SIGTERM/SIGINT: in bounded time, never in the middle of handing records on.

Why not simply raise from the signal handler: the exception lands wherever the main thread
happens to be. Inside multiprocessing's queue code it leaves a lock taken, and the exit
handlers then wait on it for ever; inside a ``__del__`` or a weakref callback (SQLAlchemy's
pool has them) Python swallows it and the run goes on as if nothing happened; between the
spool's commit and the emitter's bookkeeping it duplicates a batch. So:

* The handler records the signal. It raises ``Stopped`` at once only when the main thread
  is in the reading/parsing part (``guarded == 0``, ``locked == 0``); inside a guarded
  section (records being handed to the outputs) or a locked one (a queue operation) the
  section's end raises it. The run's loops also call ``check()`` at safe points, so a
  swallowed exception cannot lose the stop.
* While closing (``closing``), nothing is raised: every output is closed, the spool gets
  what is buffered and the backends are drained for ``--drain-timeout`` seconds.
* A second signal (or the watchdog) forces: the drain is cut short (``drain_timeout = 0``),
  a guarded section is interrupted (its buffer is still in memory and goes to the spool at
  close), and once nothing is left in memory that is not in the spool the process exits at
  once with 128 + the first signal's number.
* SIGHUP never stops anything: its handler only counts (``hups()``), and the run acts on it
  at a safe point (``service.ServiceControl``: reload rules.yaml, reopen the log files).
* A watchdog thread bounds the whole stop: ``drain_timeout + FORCE_AFTER`` seconds after the
  first signal it forces, and ``HARD_AFTER`` seconds later it ends the process with
  ``os._exit`` (the spool is SQLite in WAL mode: an interrupted transaction is rolled back
  on the next open, nothing committed is lost).
"""

from __future__ import annotations

import _thread
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

FORCE_AFTER = 6.0  #: seconds past the drain timeout before a stop is forced
HARD_AFTER = 3.0  #: seconds past the forced stop before the process simply exits
RECHECK = 0.05  #: seconds between checks, once forced, that everything in memory is spooled
SIGNALS = (signal.SIGTERM, signal.SIGINT)
_hups = 0  #: SIGHUPs received by this process (module-level: a run's reset must not lose one)


def hups() -> int:
    """How many SIGHUPs arrived so far: a reader compares with the count it last acted on
    (an int read: cheap enough for a per-packet safe point)."""
    return _hups


def _hup(_signum: int, _frame: object) -> None:
    """SIGHUP: counted, acted on at the next safe point; never raises (it is not a stop)."""
    global _hups
    _hups += 1


class Stopped(BaseException):
    """SIGTERM/SIGINT: unwinds the run like KeyboardInterrupt. A BaseException, so no
    ``except Exception`` in a driver or library can take it for an error and carry on."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Buffering(Protocol):
    """A spooled output: records in ``buffer`` are in memory only; ``drain_timeout`` bounds its close."""

    buffer: list[Any]
    drain_timeout: float


@dataclass
class StopState:
    """Process-wide (signal handlers are): what the handler and the run's safe points share."""

    signum: int = 0  #: the first stop signal received, 0 while running
    guarded: int = 0  #: > 0: records are being handed to the outputs; a stop waits for the end
    locked: int = 0  #: > 0: inside a queue operation; a stop waits for the end, even when forced
    waiting: bool = False  #: blocked on the source's next(): nothing in flight, a stop is taken there
    closing: bool = False  #: closing the outputs: never raise, exit early only when forced
    forced: bool = False
    raised: bool = False  #: Stopped was raised by the handler (it may have been swallowed)
    overdue: bool = False  #: the watchdog forced the stop (not a second signal)
    drain_timeout: float = 0.0
    spooled: Sequence[Buffering] = ()
    flush: list[Callable[[], None]] = field(default_factory=list)  #: best effort before a forced exit
    done: threading.Event = field(default_factory=threading.Event)

    def reset(self, spooled: Sequence[Buffering], drain_timeout: float) -> None:
        """A new run: in place, since the run's modules hold this object."""
        fresh = StopState(spooled=spooled, drain_timeout=drain_timeout)
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))


STATE = StopState()
T = TypeVar("T")


def _say(text: str) -> None:
    """stderr without Python's buffered writer: a handler may run while it holds its lock."""
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass


def unspooled() -> int:
    """Records held in memory only (not yet in the durable spool)."""
    return sum(len(sp.buffer) for sp in STATE.spooled)


def _exit_now(why: str, flush: bool = True) -> None:
    st = STATE
    if flush:  # not from the watchdog thread: the main thread may hold a stream's lock for ever
        for f in st.flush:
            try:
                f()
            except Exception:  # noqa: BLE001, S110 - best effort: the process ends now whatever happens
                pass
    lost = unspooled()
    _say(f"{why}: exiting now{f'; {lost} record(s) not yet in the spool are lost' if lost else ''}\n")
    os._exit(128 + st.signum)


def _forced_exit_or_raise() -> None:
    """Forced: exit once everything in memory is spooled; interrupt a guarded section (its
    records are still in the buffers, spooled at close) so the close comes sooner."""
    st = STATE
    if not st.locked and unspooled() == 0:
        name = signal.Signals(st.signum).name
        _exit_now(f"{f'stopping on {name} is overdue' if st.overdue else f'{name} again'}: not waiting for the "
                  "backends any longer (what they did not get is in the spool)")
    if not st.closing and not st.locked and not st.raised:
        st.raised = True
        raise Stopped(st.signum)


def _force() -> None:
    st = STATE
    st.forced = True
    for sp in st.spooled:
        sp.drain_timeout = 0.0
    signal.setitimer(signal.ITIMER_REAL, RECHECK, RECHECK)
    _forced_exit_or_raise()


def _recheck(_signum: int, _frame: object) -> None:
    if STATE.forced:
        _forced_exit_or_raise()


def _handler(signum: int, _frame: object) -> None:
    st = STATE
    if st.signum:
        _force()
        return
    st.signum = signum
    threading.Thread(target=_watchdog, args=(st.done,), name="stop-watchdog", daemon=True).start()
    if st.closing:  # the run had ended: the backends are being drained
        name = signal.Signals(signum).name
        _say(f"stopping on {name}: the outputs are being closed; the backends get up to {st.drain_timeout:g} s "
             f"more ({name} again: stop now, the spool keeps the rest)\n")
    if (not st.guarded or st.waiting) and not st.locked and not st.closing:
        st.raised = True
        raise Stopped(signum)


def _watchdog(done: threading.Event) -> None:
    """Bounds the stop even if the main thread is stuck in C code (a driver's connect)."""
    st = STATE
    started = time.monotonic()
    if done.wait(st.drain_timeout + FORCE_AFTER):
        return
    _say(f"stopping on {signal.Signals(st.signum).name} takes too long: forcing\n")
    st.overdue = True
    _thread.interrupt_main(signal.Signals(st.signum))  # runs _handler in the main thread: the forced path
    if done.wait(HARD_AFTER):
        return
    _exit_now(f"stopping on {signal.Signals(st.signum).name} took over "
              f"{time.monotonic() - started:.0f} s", flush=False)  # measured: drain_timeout may have changed


def check() -> None:
    """A safe point: raise the stop a signal asked for (the handler's own raise may have been
    swallowed by a ``__del__``)."""
    st = STATE
    if st.signum and not st.guarded and not st.locked and not st.closing:
        st.raised = True
        raise Stopped(st.signum)


@contextmanager
def locked() -> Iterator[None]:
    """A section a stop must never interrupt (queue operations: a lock taken and never released
    makes the exit hang). Keep it short: even a forced stop waits for it."""
    st = STATE
    st.locked += 1
    try:
        yield
    finally:
        st.locked -= 1


@contextmanager
def guarded() -> Iterator[None]:
    """Records being handed to the outputs: a first stop waits for the end of the section."""
    st = STATE
    st.guarded += 1
    try:
        yield
    finally:
        st.guarded -= 1
    check()


def waiting_on(source: Iterable[T]) -> Iterator[T]:
    """``source``'s items, with ``STATE.waiting`` set while its next() runs: a quiet pipe or
    capture blocks there with nothing in flight (the previous item was handled whole), so a
    stop is taken at once even inside a run-long guard (--state holds one so that calls are
    saved whole), and the run's ``except Stopped`` saves. Only then: a generator's frame costs
    ~0.1 µs per item."""
    st = STATE
    it = iter(source)
    while True:
        st.waiting = True
        if st.signum and not st.locked and not st.closing:  # a stop that came just before
            st.waiting = False
            st.raised = True
            raise Stopped(st.signum)
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            st.waiting = False
        yield item


def _before_run(signum: int, _frame: object) -> None:
    _say(f"stopping on {signal.Signals(signum).name}: nothing to flush yet\n")
    raise SystemExit(128 + signum)


def before_run() -> None:
    """From the start of a command until ``Watch``: a stop ends it at once with 128 + signal,
    quietly (no traceback from wherever the setup was), since nothing was produced yet."""
    for s in SIGNALS:
        signal.signal(s, _before_run)
    signal.signal(signal.SIGHUP, _hup)  # from now on a HUP (logrotate) never kills the process


class Watch:
    """Install the handlers for a run: ``with Watch(spooled, drain) as st: ...``; restores the
    previous handlers (and stops the watchdog) on exit. The state is reset in place: the run's
    modules hold a reference to it."""

    def __init__(self, spooled: Sequence[Buffering], drain_timeout: float) -> None:
        self.spooled, self.drain_timeout = spooled, drain_timeout
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopState:
        st = STATE
        st.reset(self.spooled, self.drain_timeout)
        for s in SIGNALS:
            self.previous[s] = signal.signal(s, _handler)
        self.previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, _recheck)
        self.previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _hup)
        return st

    def __exit__(self, *_: object) -> None:
        STATE.done.set()
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in self.previous.items():
            signal.signal(s, h)
