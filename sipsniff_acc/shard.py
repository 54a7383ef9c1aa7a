"""Run the per-message half of the pipeline in worker processes, results in input order.

Why: parsing a SIP message costs 5–7 µs in CPython whatever the technique (perf-notes),
so one core tops out near 150 k messages/s. The front process keeps the cheap, stateful
part (reading, decoding, IP/TCP reassembly, SIP detection, ~3 µs a packet) and ships
candidates in batches to workers that parse them; results come back in batch order, so
output is identical to the single-process run.

Batches go round-robin for stateless work (``ordered_map``: ``messages``). Stateful work
(the acc tracker, ``process``) uses ``sharded_map``: each round is split by Call-ID hash
and worker k always gets part k, so a call's transactions stay in one process.

Queues, not pipes: ``multiprocessing.Queue.put`` hands the batch to a feeder thread and
never blocks, so the front cannot deadlock against a worker that is itself blocked
writing a large result. Batches are pickled by the caller, so the feeder thread only
copies bytes: pickling in the feeder thread made it fight the reading thread for the GIL
(measured 5.4 s against 4.4 s on a 50k-call capture). Memory stays bounded by
``workers * depth`` batches in flight.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import functools
import multiprocessing as mp
import os
import pickle
import queue
import signal
import time
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import Any, Final, TypeVar

from sipsniff_acc import stopping

B = TypeVar("B")
R = TypeVar("R")

BATCH: Final = 1000  #: messages per batch: large enough that pickling overhead is amortised
DEPTH: Final = 4  #: batches in flight per worker
POLL: Final = 1.0  #: seconds between liveness checks while waiting for a result
STOP_WAIT: Final = 5.0  #: seconds workers get to exit after the last batch before they are killed
PR_SET_PDEATHSIG: Final = 1  #: prctl(2)
WORKER_NICENESS: Final = 5  #: workers yield the CPU to the reading process
SLACK: Final = 64  #: results a producing worker may be ahead of the slowest one (streamed_map)
PIPE_SIZE: Final = 1 << 20  #: a producing worker's pipe (Linux's default pipe-max-size)
F_SETPIPE_SZ: Final = 1031  #: fcntl(2), Linux


def max_workers() -> int:
    """The most workers a pool takes: max(8, 4 x CPUs). Each is a forked process holding its
    share of the state plus its queues; far beyond the CPUs they only compete for the cores and
    the memory (-j 5000 forked ~750 processes on 2 cores before the OOM killer stepped in). The
    command line refuses more before the work (one line, exit 2); a pool asked for more is a bug."""
    return max(8, 4 * (os.cpu_count() or 1))


class WorkerDied(RuntimeError):
    """A worker process exited without returning its batch."""


def _serve(inbox: Any, outbox: Any, work: Callable[[Any], Any], parent: int) -> None:
    # The reading process is the one that cannot be split; without this the scheduler gives
    # it 2/3 of a core on a 2-core machine with two workers, and it becomes the bottleneck.
    os.nice(WORKER_NICENESS)
    # Ctrl-C and a service manager's SIGTERM reach the whole process group: the front decides
    # (it stops the workers itself), so a worker is never interrupted inside a queue's lock.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    _die_with(parent)
    while True:
        try:
            data = inbox.get(timeout=POLL)
        except queue.Empty:
            if os.getppid() != parent:  # the front was killed (SIGKILL): do not linger
                os._exit(0)
            continue
        if data is None:
            outbox.close()
            outbox.join_thread()
            return
        outbox.put(pickle.dumps(work(pickle.loads(data)), pickle.HIGHEST_PROTOCOL))


#: a producing worker's view of its inbox: the next control item the front sent, or None
Inbox = Callable[[], Any]


class _Failed:
    """A producing worker's last item when it raised one of ``streamed_map``'s ``fatal``
    exceptions: the front fails the run with this reason (one line, no traceback)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _produce(inbox: Any, outbox: Connection, produce: Callable[[Inbox], Iterable[Any]], parent: int,
             fatal: tuple[type[BaseException], ...] = ()) -> None:
    """A worker that makes its own input (``streamed_map``): every item ``produce`` yields goes
    to the front, then None (or a _Failed). Not niced: the front only merges, the workers are
    the work."""
    for s in (signal.SIGINT, signal.SIGTERM):  # the front decides, as in _serve
        signal.signal(s, signal.SIG_IGN)
    _die_with(parent)

    def poll() -> Any:
        return None if inbox.empty() else pickle.loads(inbox.get())

    # Straight into the pipe, no Queue feeder thread: its GIL hand-offs cost a worker ~8 % (py-spy,
    # 50k calls). A full pipe blocks the worker until the front reads: the backpressure.
    try:
        for item in produce(poll):
            outbox.send_bytes(pickle.dumps(item, pickle.HIGHEST_PROTOCOL))
    except fatal as exc:
        outbox.send_bytes(pickle.dumps(_Failed(str(exc))))
    else:
        outbox.send_bytes(pickle.dumps(None))
    outbox.close()


def _die_with(parent: int) -> None:
    """Linux: the kernel kills this worker when the front dies (SIGKILL, OOM killer). The
    polling of getppid() in ``_serve`` is not enough alone: a front killed in the middle of
    writing a batch leaves the worker blocked for ever reading the rest of it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the getppid() poll only
        return
    if os.getppid() != parent:  # died before prctl took effect
        os._exit(0)


#: pools whose workers are alive: killed at exit whatever path the exit takes, before
#: multiprocessing's own exit handler (it sends SIGTERM, which workers ignore, and joins
#: without a timeout)
_LIVE: set[_Pool] = set()


class _Pool:
    """Forked workers, one inbox and one outbox queue each; stopped and reaped on close.

    Every queue operation of the front runs in ``stopping.locked()``: a stop signal never
    lands inside one (a queue lock left taken makes the interpreter's exit hang on it), and
    reads use a timeout so that a dead or stuck worker, or a stop, is noticed."""

    def __init__(self, works: Sequence[Callable[..., Any]], serve: Callable[..., None] = _serve) -> None:
        """Worker k runs ``serve(inbox, outbox, works[k], front's pid)``."""
        workers = len(works)
        if not 0 < workers <= max_workers():
            raise ValueError(f"{workers} workers: 1 to {max_workers()}")
        ctx = mp.get_context("fork")  # fork: the work function and its config need no pickling
        self.procs, self.inboxes, self.outboxes = [], [], []
        with stopping.locked():
            _LIVE.add(self)
            for work in works:
                inbox, outbox = ctx.Queue(), self._outbox(ctx)
                inbox.cancel_join_thread()  # never wait at exit for a feeder writing to a dead worker
                p = ctx.Process(target=serve, args=(inbox, outbox, work, os.getpid()), daemon=True)
                p.start()
                self.procs.append(p)
                self.inboxes.append(inbox)
                self.outboxes.append(outbox)
                self._started(outbox)

    def _outbox(self, ctx: Any) -> Any:
        return ctx.Queue()

    def _started(self, outbox: Any) -> None:
        """Worker started with ``outbox`` (its end of a pipe can be closed in the front now)."""

    def put(self, k: int, item: Any) -> None:
        data = pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
        with stopping.locked():
            self.inboxes[k].put(data)

    def get(self, k: int) -> Any:
        while True:
            with stopping.locked():
                try:
                    data = self.outboxes[k].get(timeout=POLL)
                except queue.Empty:
                    data = None
            if data is not None:
                return pickle.loads(data)
            stopping.check()
            if not self.procs[k].is_alive():
                p = self.procs[k]
                raise WorkerDied(f"worker {k} (pid {p.pid}) exited with code {p.exitcode}")

    def ready(self) -> bool:
        """Every worker has a result waiting (a hint: Queue.empty() may lag)."""
        return all(not q.empty() for q in self.outboxes)

    def close(self) -> None:
        """The work is done: workers are told to stop, given STOP_WAIT seconds, then killed."""
        try:
            with stopping.locked():
                for inbox in self.inboxes:
                    inbox.put(None)
            deadline = time.monotonic() + STOP_WAIT
            for p in self.procs:
                p.join(max(0.0, deadline - time.monotonic()))
        finally:
            self.abort()

    def abort(self) -> None:
        """Stopped or failed: the workers' state is pure (nothing to save), so they are killed by
        PID at once and reaped; the queues are dropped without waiting on their feeder threads."""
        with stopping.locked():
            for p in self.procs:
                if p.is_alive():
                    p.kill()
            for p in self.procs:
                p.join(STOP_WAIT)
            for q in self.inboxes + self.outboxes:
                q.cancel_join_thread()
            _LIVE.discard(self)


class _Streams(_Pool):
    """Producing workers (``streamed_map``): each writes its results into a pipe of its own.

    The front reads whichever pipe has data into a backlog of up to SLACK items per worker:
    read in worker order only, the workers ran in lock step (a pipe holds ~1 round), and
    one worker descheduled stalled the other (50k calls at load 3: 28 s wall against 16)."""

    def _outbox(self, ctx: Any) -> Any:
        reader, writer = ctx.Pipe(duplex=False)
        try:
            fcntl.fcntl(writer.fileno(), F_SETPIPE_SZ, PIPE_SIZE)  # Linux: more slack in the pipe itself
        except (OSError, AttributeError):
            pass
        self.readers.append(reader)
        return writer

    def __init__(self, works: Sequence[Callable[..., Any]], fatal: tuple[type[BaseException], ...] = ()) -> None:
        self.readers: list[Connection] = []
        self.backlog: list[deque[bytes]] = [deque() for _ in works]
        self.ended: list[bool] = [False] * len(works)  #: the pipe is at EOF
        super().__init__(works, functools.partial(_produce, fatal=fatal))
        self.outboxes = []  # the writing ends, closed in the front: no queue to drop

    def _started(self, outbox: Any) -> None:
        outbox.close()  # the front keeps only the reading end: a dead worker reads as EOF

    def get(self, k: int) -> Any:
        backlog = self.backlog[k]
        while not backlog:
            if self.ended[k]:  # EOF before its end marker: the worker died
                p = self.procs[k]
                p.join(STOP_WAIT)
                raise WorkerDied(f"worker {k} (pid {p.pid}) exited with code {p.exitcode}")
            if not self._read():
                stopping.check()
        item = pickle.loads(backlog.popleft())
        if item.__class__ is _Failed:
            raise WorkerDied(f"worker {k}: {item.reason}")
        return item

    def _read(self) -> bool:
        """Whatever the pipes hold, into the backlogs (a full backlog's pipe is left to fill
        up: that worker then blocks, which bounds the memory); False if nothing came in POLL."""
        open_ = [r for r, b, e in zip(self.readers, self.backlog, self.ended) if not e and len(b) < SLACK]
        with stopping.locked():
            ready = mp_wait(open_, POLL)
            for r in ready:
                k = self.readers.index(r)  # type: ignore[arg-type]
                try:
                    self.backlog[k].append(r.recv_bytes())  # type: ignore[union-attr]
                except EOFError:
                    self.ended[k] = True
        return bool(ready)


@atexit.register
def _kill_workers() -> None:
    for pool in list(_LIVE):
        pool.abort()


def ordered_map(batches: Iterable[B], work: Callable[[B], R], workers: int, depth: int = DEPTH) -> Iterator[R]:
    """``map(work, batches)`` over ``workers`` forked processes, in order, bounded in memory."""
    pool = _Pool([work] * workers)
    inflight: deque[int] = deque()
    try:
        k = 0
        for batch in batches:
            if len(inflight) >= workers * depth:
                yield pool.get(inflight.popleft())
            pool.put(k, batch)
            inflight.append(k)
            k = (k + 1) % workers
        while inflight:
            yield pool.get(inflight.popleft())
    except BaseException:  # a stop, a dead worker, or the consumer gone (GeneratorExit)
        pool.abort()
        raise
    pool.close()


def sharded_map(rounds: Iterable[tuple[list[B] | None, bool]], work: Callable[[B], R], workers: int,
                depth: int = DEPTH) -> Generator[list[R], None, None]:
    """Stateful sharding: round r's part k goes to worker k (which keeps its state between
    parts); yields, per round and in order, the list of the workers' results.

    ``rounds`` yields ``(parts, urgent)``: ``parts`` None is a poll (time passed: hand on the
    results already back, put nothing); ``urgent`` waits for every round in flight (a live
    source fell silent: nothing else is coming, the records must not wait for the next round)."""
    pool = _Pool([work] * workers)
    pending = 0
    try:
        for parts, urgent in rounds:
            if parts is not None:
                if pending >= depth:
                    yield [pool.get(k) for k in range(workers)]
                    pending -= 1
                for k in range(workers):
                    pool.put(k, parts[k])
                pending += 1
            if urgent:
                while pending:
                    yield [pool.get(k) for k in range(workers)]
                    pending -= 1
            while pending and pool.ready():  # results already back: hand them on now, not rounds later
                yield [pool.get(k) for k in range(workers)]
                pending -= 1
        while pending:
            yield [pool.get(k) for k in range(workers)]
            pending -= 1
    except BaseException:  # a stop, a dead worker, or the consumer gone (GeneratorExit)
        pool.abort()
        raise
    pool.close()


def streamed_map(produces: Sequence[Callable[[Inbox], Iterable[R]]], control: Callable[[], Any] | None = None,
                 fatal: tuple[type[BaseException], ...] = ()) -> Generator[list[R], None, None]:
    """Workers that read their input themselves: worker k runs ``produces[k]``; yields, round
    by round, the list of the workers' k-th items (every worker must yield as many). What
    waits unread is bounded by the pipes' buffers (a worker blocks writing into a full one).
    ``control()``, asked after each round: something to hand every worker (its ``Inbox``
    returns it), or None. ``fatal``: exceptions that, raised in a worker, fail the run with
    their message (WorkerDied, one line); any other one is a bug (its traceback, exit 1)."""
    pool = _Streams(produces, fatal)
    workers = len(produces)
    try:
        while True:
            items = [pool.get(k) for k in range(workers)]
            if any(item is None for item in items):
                if not all(item is None for item in items):
                    raise RuntimeError("workers out of step: one ended before the others")
                break
            yield items
            note = control() if control is not None else None
            if note is not None:
                for k in range(workers):
                    pool.put(k, note)
    except BaseException:  # a stop, a dead worker, or the consumer gone (GeneratorExit)
        pool.abort()
        raise
    pool.close()


def batched(items: Iterable[B], size: int = BATCH) -> Iterator[list[B]]:
    batch: list[B] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
