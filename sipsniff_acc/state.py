"""State across restarts (issue 11, "restarts lose no call"): the acc stages' memory in a file.

A call answered before a restart or an upgrade and ended after it must still get its BYE
record (and its CDR): on SIGTERM (and at the end of a run) ``save_state`` writes what later
records depend on; at start ``load_state`` puts it back into a fresh ``AccPipeline``.

What is saved:

* the tracker's transactions (open and completed, in their eviction order, with the held
  request/final reply headers, branches and the acc engine's per-transaction flags/AVPs),
  the server INVITE index, the CSeq index, the dialogs, and the ACK memory;
* the engine's run start (Kamailio's ``$TS``: the proxy did not restart) and its record-id
  window (a twin record after the restart is numbered as without the restart);
* extra sections registered by other stages (``register_section``), e.g. dialog CDR state:
  a file with a section this build does not know is loaded without it (counted).

Not saved: the compiled rules (closures; rules.yaml is read at start, so a restart is also
how new rules apply), the counters (a run's summary is its own), and the reassembly (IP
fragments, TCP/SCTP buffers, the duplicate filter): the packets that arrive while the
sniffer is down are lost whatever we keep, so a half message from before the restart
could only be completed by bytes we never see; the TCP reassembler resynchronises on the
next message, and fragments live 30 s. The deadline heap is rebuilt from the transactions.

The ACK memory is keyed by Python's ``hash()`` (tracker.py), which is salted per process
unless PYTHONHASHSEED is fixed: it is restored only when the saved salt probe matches,
otherwise dropped and counted (an ACK retransmitted within 32 s of the restart is then taken
for a first one; ``report_ack`` is unaffected: the INVITE keeps the To-tags already acked).

File: one header line (magic, then JSON: format version, shard i of N, clock, payload length
and BLAKE2b digest), then the payload: a pickle read back by an unpickler that resolves
only an allow-list of our state classes (pickle keeps the object graph: branches point to
their server transaction, messages are shared) and is checked field by field after loading.
Written to a temporary file, fsynced, renamed over the old one, mode 0600. A file above
``MAX_STATE_BYTES`` is neither written nor read.

Load decisions: a missing file is a first start (nothing restored). A file that is not a
state file at all (no magic), a directory, a state of another ``-j``: one line, exit 2,
before any packet (``check_state_path``; the run would otherwise overwrite someone's file
at its end, or split calls across shards differently). A damaged, truncated, oversized or
newer-format state file: one line, the run starts empty (a sensor that refuses to start
loses every call, an empty start loses only the calls open across the restart), and the
damaged file is kept beside as ``FILE.bad`` for a look.
"""

from __future__ import annotations

import copyreg
import dataclasses
import hashlib
import heapq
import io
import json
import operator
import os
import pickle
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sipsniff_acc.acc import _NO_AVPS, TxnAcc
from sipsniff_acc.sip import SipMessage
from sipsniff_acc import stopping
from sipsniff_acc import tracker as tracker_module
from sipsniff_acc.tracker import RETAIN, SWEEP_EVERY, Dialog, Transaction, TransactionTracker

if TYPE_CHECKING:
    from sipsniff_acc.processrun import AccPipeline

MAGIC = b"SIPSNIFF-ACC-STATE "
VERSION = 1  #: format version written; a file with a higher one is "too new"
MAX_HEADER = 4096  #: bytes of the header line
#: bytes of a state file, written or read: the tracker's default budget is 80 MiB of real
#: bytes (header blocks + objects; pickled they take less), plus up to 1 M record ids
#: (~40 bytes each pickled) and 50,000 dialogs
MAX_STATE_BYTES = 256 << 20
DIALOG_EXPIRY = 43200.0  #: seconds a dialog is kept without news (the tracker's 12 h)
_HASH_PROBE = ("sipsniff-acc", "ack-hash-probe")


#: where load_state/save_state say what they did, one line each (the CLI sets it to stderr
#: with --state; None in library use). Set before -j N forks, so the workers say it too.
REPORT: Callable[[str], None] | None = None
#: A saved clock this far from the wall clock of its save means the state came from a capture
#: file (packet time is not the wall clock): its expiry is left to the packet time that follows
LIVE_SKEW = 600.0


def report_to(say: Callable[[str], None] | None) -> None:
    """Have every load and save say its line (restored/saved counts, or why not) to ``say``."""
    global REPORT
    REPORT = say


def _say(line: str) -> None:
    if REPORT is not None:
        REPORT(line)


class StateUsageError(Exception):
    """A --state argument that can never work (one line; the CLI exits 2 before the run)."""


class StateFileError(Exception):
    """A state file we cannot use (damaged, too new, too big): one line; the run starts empty."""


# --- extension sections ----------------------------------------------------------------

Dump = Callable[["AccPipeline"], object]
Restore = Callable[["AccPipeline", object, "float | None"], tuple[int, int]]

#: name -> (dump, restore): restore returns (restored, expired)
SECTIONS: dict[str, tuple[Dump, Restore]] = {}
#: (module, qualname) -> class: what the unpickler may build besides plain containers
ALLOWED: dict[tuple[str, str], Any] = {}


#: slots dataclasses: their field names (one shared tuple, pickled once) and a getter of the
#: values. Pickled as (names, values) and set back by _set_slots: object.__reduce_ex__ on a
#: slots object was 17 us an object (a dict of slots built each time), this is a few.
_SLOTTED: dict[type, tuple[tuple[str, ...], Callable[[Any], Any]]] = {}


def allow(*classes: type) -> None:
    """Let the unpickler build these classes (a section's own state objects). Plain data
    classes only: the unpickler calls ``cls.__new__`` and sets their fields (compiled by mypyc,
    ``__new__`` runs ``__init__``: every state class must be constructible without arguments,
    as SipMessage's ``raw`` default and the dataclasses' interpreted ``__init__`` make them)."""
    for cls in classes:
        ALLOWED[(cls.__module__, cls.__qualname__)] = cls
        names = _field_names(cls)
        if names is not None:
            _SLOTTED[cls] = (names, _values_getter(names))


def _field_names(cls: type) -> tuple[str, ...] | None:
    """The fields saved as (names, values): a mypyc-compiled class's attributes, a slots
    dataclass's fields, or one of our plain classes' annotated attributes (SipMessage, whose
    defaults live on the class); None: pickle's own way (containers)."""
    compiled = cls.__dict__.get("__mypyc_attrs__")
    if compiled is not None:
        return tuple(compiled)
    if dataclasses.is_dataclass(cls) and "__slots__" in cls.__dict__:
        return tuple(f.name for f in dataclasses.fields(cls))
    if cls.__module__.startswith("sipsniff_acc.") and not dataclasses.is_dataclass(cls):
        return tuple(cls.__dict__.get("__annotations__", ()))
    return None


def _values_getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """A C-speed getter of the fields' values as a tuple (attrgetter of one name gives the value)."""
    get = operator.attrgetter(*names)
    if len(names) > 1:
        return get

    def one(obj: Any) -> tuple[Any, ...]:
        return (get(obj),)
    return one


def _set_slots(obj: Any, state: Any) -> None:
    """The unpickler's setter for a slots dataclass: fields by name; a name this version does
    not have is ignored, one it lacks is filled in by the checks after loading."""
    entry = _SLOTTED.get(type(obj))
    if entry is None or type(state) is not tuple or len(state) != 2:
        raise StateFileError("damaged (field values for a class that takes none)")
    names, values = state
    if type(names) is not tuple or type(values) is not tuple:
        raise StateFileError("damaged (field values)")
    known = entry[0]
    for name, value in zip(names, values):
        if name in known:
            object.__setattr__(obj, name, value)


def register_section(name: str, dump: Dump, restore: Restore, classes: tuple[type, ...] = ()) -> None:
    """Save/restore another stage's state with ours (e.g. CDR dialogs): ``dump(acc)`` returns
    plain data (containers, str/bytes/numbers, allowed classes) or None for nothing to save;
    ``restore(acc, data, now)`` puts it back, dropping what expired, and returns
    (restored, expired) counts for the start line."""
    SECTIONS[name] = (dump, restore)
    allow(*classes)


allow(Transaction, Dialog, SipMessage, TxnAcc, OrderedDict)
ALLOWED[(__name__, "_set_slots")] = _set_slots


# --- results -------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """What a load put back, and what it dropped (expired at load, or unusable)."""

    path: str = ""
    status: str = "missing"  #: restored, missing, unusable
    problem: str = ""  #: why an unusable file was not used (one line)
    transactions: int = 0
    dialogs: int = 0
    acks: int = 0
    record_ids: int = 0
    expired_transactions: int = 0
    expired_dialogs: int = 0
    expired_acks: int = 0
    acks_rehashed: int = 0  #: ACK entries dropped: saved by a process with another hash salt
    sections: dict[str, tuple[int, int]] = field(default_factory=dict)  #: name -> (restored, expired)
    unknown_sections: list[str] = field(default_factory=list)
    saved_at: float = 0.0  #: wall clock of the save

    @property
    def expired(self) -> int:
        return (self.expired_transactions + self.expired_dialogs
                + sum(e for _r, e in self.sections.values()))

    def merge(self, other: LoadResult) -> None:
        """Add a shard's result (-j N: one file per worker)."""
        for name in ("transactions", "dialogs", "acks", "record_ids", "expired_transactions", "expired_dialogs",
                     "expired_acks", "acks_rehashed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name, (r, e) in other.sections.items():
            r0, e0 = self.sections.get(name, (0, 0))
            self.sections[name] = (r0 + r, e0 + e)
        self.unknown_sections += [s for s in other.unknown_sections if s not in self.unknown_sections]
        if other.status == "unusable" or self.status == "missing":
            self.status, self.problem = other.status, self.problem or other.problem
        self.saved_at = max(self.saved_at, other.saved_at)

    def summary(self) -> str:
        """The start line: 'state FILE: restored N transactions, M dialogs (K expired dropped)'."""
        if self.status == "missing":
            return f"state {self.path}: no saved state yet, starting empty"
        if self.status == "unusable":
            return f"state {self.path}: {self.problem}; starting empty"
        extra = "".join(f", {r} {name}" for name, (r, _e) in sorted(self.sections.items()))
        line = (f"state {self.path}: restored {self.transactions} transactions, {self.dialogs} dialogs{extra} "
                f"({self.expired} expired dropped)")
        if self.acks_rehashed:
            line += f"; {self.acks_rehashed} ACK entries not restored (another hash salt)"
        if self.unknown_sections:
            line += f"; sections this version does not know, skipped: {', '.join(self.unknown_sections)}"
        if self.problem:
            line += f"; {self.problem}"
        return line


# --- paths ---------------------------------------------------------------------------------


def shard_path(path: str | os.PathLike[str], shard: int = 0, shards: int = 1) -> Path:
    """The file of one shard: FILE for one process (-j 0), FILE.0 ... FILE.{N-1} for -j N."""
    p = Path(path)
    return p if shards <= 1 else p.with_name(f"{p.name}.{shard}")


def check_state_path(path: str | os.PathLike[str], shards: int = 1) -> None:
    """Before the run: raise ``StateUsageError`` (one line) for a --state that can never work:
    a directory, an unwritable directory, a file that is not a state file, a state saved
    with another number of shards. Damaged state files pass (the load says so and starts empty)."""
    p = Path(path)
    if p.is_dir():
        raise StateUsageError(f"--state {p}: is a directory; give a file path (it is created)")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise StateUsageError(f"--state {p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StateUsageError(f"--state {p}: directory {parent} is not writable (the state is saved there at exit)")
    mine = [shard_path(p, i, shards) for i in range(shards)]
    for f in dict.fromkeys([p, *mine]):  # FILE itself too: a state path naming someone's file is a mistake
        if f.is_dir():
            raise StateUsageError(f"--state {p}: {f} is a directory")
        if f.exists():
            head = _peek(f)
            if head is not None and not head.startswith(MAGIC[: len(head)]):
                raise StateUsageError(f"--state {p}: {f} is not a sipsniff-acc state file "
                                      "(it would be overwritten at exit); give another path")
    saved = saved_shards(p)
    if saved is not None and saved != shards:
        raise StateUsageError(_shards_mismatch(p, saved, shards))


def _ours(f: Path) -> bool:
    return f.is_file() and (_peek(f) or b"").startswith(MAGIC)


def saved_shards(path: str | os.PathLike[str]) -> int | None:
    """How many shards the state files at ``path`` were saved by (1: FILE, N: FILE.0 ...
    FILE.{N-1}), or None when there are none. From the files present (a run saves all its
    shards at once), so it does not depend on who wrote the headers."""
    p = Path(path)
    n = 0
    while n < 1024 and _ours(shard_path(p, n, 2)):
        n += 1
    if n:
        return n
    return 1 if _ours(p) else None


def _shards_mismatch(p: Path, saved: int, shards: int) -> str:
    def j(n: int) -> str:
        return "-j 0" if n <= 1 else f"-j {n}"
    return (f"--state {p}: saved by a run with {j(saved)}, this run has {j(shards)} (calls are sharded by Call-ID): "
            f"run with {j(saved)} once more, or remove the old state files")


def _peek(f: Path) -> bytes | None:
    try:
        with open(f, "rb") as fh:
            return fh.read(len(MAGIC))
    except OSError:
        return None


# --- save ----------------------------------------------------------------------------------


_NEWOBJ = getattr(copyreg, "__newobj__")  # noqa: B009 - the name pickle turns into its NEWOBJ opcode


class _Pickler(pickle.Pickler):
    """Refuses, at save time, any class the loading side would refuse: a file we write is
    one we can read."""

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        slotted = _SLOTTED.get(cls)
        if slotted is not None:
            return _NEWOBJ, (cls,), (slotted[0], slotted[1](obj)), None, None, _set_slots
        if cls.__module__ != "builtins" and (cls.__module__, cls.__qualname__) not in ALLOWED:
            raise StateFileError(f"cannot save a {cls.__module__}.{cls.__qualname__} (not an allowed state class)")
        return NotImplemented


def _snapshot(acc: AccPipeline) -> dict[str, Any]:
    tr, eng = acc.tracker, acc.engine
    ids = eng.ids
    sections: dict[str, object] = {}
    for name, (dump, _restore) in SECTIONS.items():
        data = dump(acc)
        if data is not None:
            sections[name] = data
    return {
        "tracker": {
            "txns": tr.txns, "open": list(tr._open), "done": list(tr._done), "invites": tr.invites,
            "dialogs": tr.dialogs, "acks": tr.acks,
        },
        "engine": {"start": eng.start, "ids_seen": ids._seen, "ids_old": ids._old, "ids_start": ids._start},
        "sections": sections,
    }


def _clock(acc: AccPipeline) -> float:
    """The newest packet time the state knows (for a file's continuation: expiry is left to
    the tracker's sweep at the next packet)."""
    tr = acc.tracker
    newest = 0.0
    for t in tr.txns.values():
        newest = max(newest, t.final_ts, t.request.ts)
    if tr.acks:
        newest = max(newest, next(reversed(tr.acks.values())))
    # a live run's timers advance the sweep from the wall clock (Idle) when no SIP comes
    return max(newest, tr._next_sweep - SWEEP_EVERY)


def save_state(path: str | os.PathLike[str], acc: AccPipeline, now: float | None = None,
               shard: int = 0, shards: int = 1) -> int:
    """Write ``acc``'s state to ``path`` (see ``write_state``). With a reporter set (the CLI's
    --state), it says "state FILE: saved ..." and a failure is one line and 0, not an
    exception: the stop it is part of must go on (outputs flushed, exit status)."""
    if REPORT is None:
        return write_state(path, acc, now, shard, shards)
    try:
        # a second SIGTERM (or the stop's watchdog) waits for the file rather than cutting it
        # short: the old file would stay, and the calls since it would be lost
        with stopping.locked():
            n = write_state(path, acc, now, shard, shards)
    except StateFileError as e:
        _say(f"error: state {path}: not saved: {e}")
        return 0
    except OSError as e:
        _say(f"error: state {path}: not saved: {e.strerror or e}")
        return 0
    cdr = getattr(acc, "cdr", None)
    extra = f", {len(cdr.dialogs)} cdr dialogs" if cdr is not None else ""
    _say(f"state {path}: saved {len(acc.tracker.txns)} transactions, {len(acc.tracker.dialogs)} dialogs{extra} "
         f"({n} bytes)")
    return n


def write_state(path: str | os.PathLike[str], acc: AccPipeline, now: float | None = None,
                shard: int = 0, shards: int = 1) -> int:
    """Write ``acc``'s state to ``path`` atomically (temp file, fsync, rename; 0600). ``now``:
    the clock of the save (wall clock for a live capture; None: the newest packet time held).
    Returns the bytes written. Raises ``StateFileError`` (one line) when it cannot be written
    (too big, an unsaveable object) and ``OSError`` from the filesystem; the old file stays."""
    p = Path(path)
    buf = io.BytesIO()
    try:
        _Pickler(buf, protocol=5).dump(_snapshot(acc))
    except RecursionError:
        raise StateFileError("state too deeply nested to save") from None
    payload = buf.getbuffer()
    if len(payload) + MAX_HEADER > MAX_STATE_BYTES:
        raise StateFileError(f"state of {len(payload)} bytes is over the {MAX_STATE_BYTES}-byte bound: not saved")
    header = {
        "version": VERSION, "shard": shard, "shards": shards, "saved_at": time.time(),
        "clock": now if now is not None else _clock(acc), "live": now is not None, "hash_probe": hash(_HASH_PROBE),
        "length": len(payload), "blake2b": hashlib.blake2b(payload, digest_size=32).hexdigest(),
        "sections": sorted(_snapshot_names(acc)),
    }
    line = MAGIC + json.dumps(header, separators=(",", ":")).encode() + b"\n"
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(line)
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)  # O_CREAT's mode is only for a new file
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(p.parent if str(p.parent) else ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # the rename is done; a directory that cannot be fsynced (some filesystems) is not an error
    return len(line) + len(payload)


def _snapshot_names(acc: AccPipeline) -> list[str]:
    return ["tracker", "engine", *SECTIONS]


# --- load ----------------------------------------------------------------------------------


class _Unpickler(pickle.Unpickler):
    """Builds only allow-listed classes; everything else (os.system, eval, ...) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        cls = ALLOWED.get((module, name))
        if cls is None:
            raise StateFileError(f"damaged (refers to {module}.{name}, not a state class)")
        return cls


def _read_header(fh: Any) -> dict[str, Any]:
    line = fh.readline(MAX_HEADER)
    if not line.startswith(MAGIC):
        raise StateFileError("not a sipsniff-acc state file")
    if not line.endswith(b"\n"):
        raise StateFileError("damaged (header cut or too long)")
    try:
        header = json.loads(line[len(MAGIC):])
    except ValueError:
        raise StateFileError("damaged (header is not JSON)") from None
    if not isinstance(header, dict):
        raise StateFileError("damaged (header is not an object)")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise StateFileError("damaged (no format version)")
    if version > VERSION:
        raise StateFileError(f"written by a newer sipsniff-acc (state format {version}, this one reads up to {VERSION})")
    return header


def _read(p: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and payload of a state file, checked (size, magic, version, digest, classes)."""
    size = p.stat().st_size
    if size > MAX_STATE_BYTES:
        raise StateFileError(f"{size} bytes, over the {MAX_STATE_BYTES}-byte bound")
    with open(p, "rb") as fh:
        header = _read_header(fh)
        length = header.get("length")
        if not isinstance(length, int) or length < 0 or length > MAX_STATE_BYTES:
            raise StateFileError("damaged (bad payload length)")
        payload = fh.read(length + 1)
    if len(payload) != length:
        raise StateFileError(f"damaged (payload of {len(payload)} bytes, the header says {length})")
    if hashlib.blake2b(payload, digest_size=32).hexdigest() != header.get("blake2b"):
        raise StateFileError("damaged (checksum mismatch)")
    try:
        data = _Unpickler(io.BytesIO(payload)).load()
    except StateFileError:
        raise
    except RecursionError:
        raise StateFileError("damaged (nested too deeply)") from None
    except Exception as e:  # noqa: BLE001 - any decoding failure of a bad file is "damaged", one line
        raise StateFileError(f"damaged ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(data, dict):
        raise StateFileError("damaged (payload is not a state)")
    return header, data


def _bad(what: str) -> StateFileError:
    return StateFileError(f"damaged ({what})")


def _complete(obj: Any, cls: type) -> None:
    """Check a restored object's class and give fields a newer version added their defaults
    (a slots dataclass restored from an older file lacks them)."""
    if type(obj) is not cls:
        raise _bad(f"{type(obj).__name__} where a {cls.__name__} belongs")
    if not dataclasses.is_dataclass(cls):
        return
    for f in dataclasses.fields(cls):
        try:
            getattr(obj, f.name)
        except AttributeError:
            if f.default is not dataclasses.MISSING:
                setattr(obj, f.name, f.default)
            elif f.default_factory is not dataclasses.MISSING:
                setattr(obj, f.name, f.default_factory())
            else:
                raise _bad(f"{cls.__name__} without {f.name}") from None


def _check_message(m: Any) -> None:
    if type(m) is not SipMessage:
        raise _bad(f"{type(m).__name__} where a SIP message belongs")
    if not isinstance(m.raw, bytes) or not isinstance(m.ts, float) or not isinstance(m.method, str):
        raise _bad("SIP message with bad fields")


def _check_txn(t: Any, seen: set[int]) -> None:
    if id(t) in seen:
        return
    seen.add(id(t))
    _complete(t, Transaction)
    k = t.key
    if not (type(k) is tuple and len(k) == 4 and all(isinstance(x, str) for x in k[:3]) and isinstance(k[3], int)):
        raise _bad("transaction key")
    _check_message(t.request)
    if t.final is not None:
        _check_message(t.final)
    if t.acc is not None:
        _complete(t.acc, TxnAcc)
        if not isinstance(t.acc.avps, dict) or not isinstance(t.acc.flags, int):
            raise _bad("transaction acc state")
        if not t.acc.avps:
            t.acc.avps = _NO_AVPS  # shared again, as the engine made it
    if not isinstance(t.branches, (list, tuple)) or not isinstance(t.final_ts, float) or not isinstance(t.size, int):
        raise _bad("transaction fields")
    if type(t.first_branch) is not int or t.first_branch < 0:
        raise _bad("transaction failure round")
    if not isinstance(t.to_tags_2xx, (tuple, frozenset)) or not isinstance(t.acked, (tuple, frozenset)):
        raise _bad("transaction To-tags")
    for b in t.branches:
        _check_txn(b, seen)
    if t.parent is not None:
        _check_txn(t.parent, seen)


def _dict(d: Any, what: str) -> dict[Any, Any]:
    if not isinstance(d, dict):
        raise _bad(what)
    return d


def load_state(path: str | os.PathLike[str], acc: AccPipeline, now: float | None = None,
               shard: int = 0, shards: int = 1) -> LoadResult:
    """Restore a state file into a fresh ``acc``. ``now``: the clock at start (wall clock for a
    live capture): transactions past their timers, dialogs past their expiry and ACKs past
    32 s are dropped and counted; None (a capture file continuing another) keeps everything
    and lets the tracker's sweep expire it at the next packet. A missing file restores
    nothing; an unusable one is reported in the result (``status``, ``problem``), renamed to
    FILE.bad when damaged, and nothing is restored. Never raises for the file's content."""
    p = Path(path)
    res = LoadResult(path=str(p))
    tr = acc.tracker
    if tr.txns or tr.dialogs or acc.engine.ids._seen:
        raise ValueError("load_state into a pipeline that already holds state")
    if not p.exists():
        _say(res.summary())
        return res
    try:
        header, data = _read(p)
        clock, saved_at = header.get("clock"), header.get("saved_at")
        if (now is not None and header.get("live") is not True and isinstance(clock, (int, float))
                and isinstance(saved_at, (int, float)) and abs(saved_at - clock) > LIVE_SKEW):
            now = None  # saved from a capture file: its clock is packet time, the next packets expire it
        plan = _plan(data, header, now, res, tr)
    except StateFileError as e:
        res.status, res.problem = "unusable", str(e)
        if "damaged" in res.problem:
            try:
                os.replace(p, p.with_name(p.name + ".bad"))
                res.problem += f" (kept as {p.name}.bad)"
            except OSError:
                pass
        _say(res.summary())
        return res
    except OSError as e:
        res.status, res.problem = "unusable", f"cannot read ({e.strerror or e})"
        _say(res.summary())
        return res
    _apply(plan, acc, now, res)
    res.status = "restored"
    res.saved_at = float(header.get("saved_at", 0.0) or 0.0)
    # loaded once: if this run ends without a save (SIGKILL, OOM, a full disk), the next start
    # must not restore it again: the calls this run accounted would come back open (an
    # answered INVITE given a 408 by --open-as-408, a second CDR at dialog expiry). Missing
    # the calls open across a crash is the lesser harm; the file stays as FILE.loaded.
    try:
        os.replace(p, p.with_name(p.name + ".loaded"))
    except OSError as e:
        res.problem = f"cannot set it aside as {p.name}.loaded ({e.strerror or e}): a crash would restore it again"
    _say(res.summary())
    return res


@dataclass
class _Plan:
    """A checked payload, split into kept and expired (nothing applied yet: a bad file
    leaves the pipeline untouched)."""

    txns: dict[Any, Transaction]
    open: list[Any]
    done: list[Any]
    invites: dict[Any, Transaction]
    dialogs: OrderedDict[Any, Dialog]
    acks: OrderedDict[int, float]
    engine: dict[str, Any]
    sections: dict[str, object]
    timed_out: list[Transaction]
    expired_dialogs: list[Dialog]


def _plan(data: dict[str, Any], header: dict[str, Any], now: float | None, res: LoadResult,
          tr: TransactionTracker) -> _Plan:
    trd = _dict(data.get("tracker"), "no tracker state")
    eng = _dict(data.get("engine"), "no engine state")
    txns = _dict(trd.get("txns"), "transactions")
    seen: set[int] = set()
    for k, t in txns.items():
        _check_txn(t, seen)
        if t.key != k:
            raise _bad("transaction key mismatch")
    order_open, order_done = trd.get("open"), trd.get("done")
    if not isinstance(order_open, list) or not isinstance(order_done, list):
        raise _bad("transaction order")
    if any(k not in txns for k in order_open) or any(k not in txns for k in order_done):
        raise _bad("transaction order names an unknown transaction")
    invites = _dict(trd.get("invites"), "INVITE index")
    if any(type(v) is not Transaction for v in invites.values()):
        raise _bad("INVITE index")
    dialogs = trd.get("dialogs")
    if not isinstance(dialogs, OrderedDict):
        raise _bad("dialogs")
    for d in dialogs.values():
        _complete(d, Dialog)
        if not isinstance(d.created, float) or not isinstance(d.state, str):
            raise _bad("dialog fields")
    acks = trd.get("acks")
    if not isinstance(acks, OrderedDict) or not all(isinstance(v, float) for v in acks.values()):
        raise _bad("ACK memory")
    start = eng.get("start")
    if not isinstance(start, float) or not isinstance(eng.get("ids_seen"), dict) or not isinstance(eng.get("ids_old"), dict):
        raise _bad("engine state")
    for ids in (eng["ids_seen"], eng["ids_old"]):
        if not all(type(k) is bytes and type(v) is int for k, v in ids.items()):
            raise _bad("record ids")
    sections = _dict(data.get("sections", {}), "sections")

    # expiry, on the clock of the start (the tracker's own rules, as its sweep applies them)
    timed_out: list[Transaction] = []
    kept: dict[Any, Transaction] = {}
    for k, t in txns.items():
        if now is not None and _past(t, now, tr):
            if t.final is None:
                timed_out.append(t)
            res.expired_transactions += 1
        else:
            kept[k] = t
    expired_dialogs: list[Dialog] = []
    kept_dialogs: OrderedDict[Any, Dialog] = OrderedDict()
    for k, d in dialogs.items():
        if now is not None and now - d.created > DIALOG_EXPIRY:
            expired_dialogs.append(d)
        else:
            kept_dialogs[k] = d
    res.expired_dialogs = len(expired_dialogs)
    kept_acks: OrderedDict[int, float] = OrderedDict()
    if header.get("hash_probe") != hash(_HASH_PROBE):
        res.acks_rehashed = len(acks)
    else:
        for k, ts in acks.items():
            if now is not None and now - ts > RETAIN:
                res.expired_acks += 1
            else:
                kept_acks[k] = ts
    kept_invites: dict[Any, Transaction] = {}
    for k, server in invites.items():
        held = kept.get(server.key)
        if held is not None and held is server:
            kept_invites[k] = held
    return _Plan(kept, [k for k in order_open if k in kept], [k for k in order_done if k in kept],
                 kept_invites, kept_dialogs, kept_acks, eng, sections, timed_out, expired_dialogs)


def _past(t: Transaction, now: float, tr: TransactionTracker) -> bool:
    """The tracker's sweep rule, with the timers of the run that loads (rules.yaml may have
    changed them: the new ones apply): open past its timer + 32 s, completed past
    max(32 s, wait_timer)."""
    if t.final is not None:
        return not now - t.final_ts < max(RETAIN, tr.wait_timer)
    return not now - tr._started(t) < tr._timeout(t) + RETAIN  # (a serial fork's round: its branch)


def _apply(plan: _Plan, acc: AccPipeline, now: float | None, res: LoadResult) -> None:
    tr, eng = acc.tracker, acc.engine
    tr.txns = dict(plan.txns)
    tr._open = OrderedDict((k, plan.txns[k]) for k in plan.open)
    tr._done = OrderedDict((k, plan.txns[k]) for k in plan.done)
    for k, t in plan.txns.items():  # a transaction in neither order list (should not be): by its state
        if k not in tr._open and k not in tr._done:
            (tr._done if t.final is not None else tr._open)[k] = t
    tr.held_bytes = sum(t.size for t in plan.txns.values())
    tr.invites = dict(plan.invites)
    by_cseq: dict[Any, Any] = {}
    heap: list[tuple[float, Any]] = []
    for k, t in plan.txns.items():
        ckey = (k[2], k[3], k[1])
        same = by_cseq.get(ckey)
        by_cseq[ckey] = t if same is None else [*same, t] if isinstance(same, list) else [same, t]
        if t.final is not None:
            heap.append((t.final_ts + max(RETAIN, tr.wait_timer), k))
        else:
            heap.append((tr._started(t) + tr._timeout(t) + RETAIN, k))
    heapq.heapify(heap)
    tr.by_cseq = by_cseq
    tr._deadlines = heap
    tr._heap_cap = len(heap) + len(heap) // 2 + 4096
    tr.dialogs = plan.dialogs
    tr._dialog_limit = max(4096, 2 * len(plan.dialogs))
    tr.acks = plan.acks
    tr._next_sweep = 0.0
    if getattr(tr, "open_as_408", False) and isinstance(getattr(tr, "_timers", None), list):
        # --open-as-408 during the run (the proxy's timer 408): the open server transactions' timers
        grace = float(getattr(tracker_module, "TIMER_GRACE", 0.0))
        timers = [(tr._started(t) + tr._timeout(t) + grace, k) for k, t in plan.txns.items()
                  if t.role == "server" and t.final is None and not getattr(t, "timer_408", False)
                  and t.method not in ("ACK", "CANCEL")]
        heapq.heapify(timers)
        tr._timers = timers
    for t in plan.timed_out:  # past its timer while we were down: counted as the sweep would
        if t.role == "server":
            tr.stats.timed_out[t.method] += 1
    for d in plan.expired_dialogs:
        tr.stats.dialogs[d.state] += 1
    e = plan.engine
    if e["start"]:
        eng.start = e["start"]
    ids = eng.ids
    ids._seen, ids._old = e["ids_seen"], e["ids_old"]
    ids._start = float(e.get("ids_start", float("-inf")))
    res.transactions, res.dialogs, res.acks = len(tr.txns), len(tr.dialogs), len(tr.acks)
    res.record_ids = len(ids)
    for name, data in plan.sections.items():
        entry = SECTIONS.get(name)
        if entry is None:
            res.unknown_sections.append(name)
            continue
        res.sections[name] = entry[1](acc, data, now)


# --- dialog CDRs (cdr.py), when the rules enable them ----------------------------------------


def _dump_cdr(acc: AccPipeline) -> object:
    cdr = getattr(acc, "cdr", None)
    if cdr is None:
        return None
    return {"dialogs": cdr.dialogs, "by_txn": cdr.by_txn, "timers": cdr._timers}


def _restore_cdr(acc: AccPipeline, data: object, now: float | None) -> tuple[int, int]:
    """The CDR engine's dialogs (they hold their INVITE/BYE transactions, shared with the
    tracker's in the same file). Dropped at load: dialogs never answered past fr_inv_timer +
    32 s (tm gave up: no CDR either way), confirmed ones past their lifetime when
    ``cdr_expired_dlg_enable`` is off (no CDR either way). With it on, an expired dialog is
    kept: the first tick fires its CDR, dated at its expiry, as the proxy wrote it."""
    cdr = getattr(acc, "cdr", None)
    if cdr is None or _cdr is None:
        return (0, 0)  # saved with CDRs on, loaded with them off: nothing to put them in
    d = _dict(data, "CDR state")
    dialogs, by_txn, timers = d.get("dialogs"), d.get("by_txn"), d.get("timers")
    if not isinstance(dialogs, OrderedDict) or not isinstance(by_txn, dict) or not isinstance(timers, list):
        return (0, 0)
    seen: set[int] = set()
    kept: OrderedDict[Any, Any] = OrderedDict()
    expired = 0
    for k, dlg in dialogs.items():
        try:
            _complete(dlg, _cdr.Dialog)
            _check_txn(dlg.invite, seen)
            if dlg.bye is not None:
                _check_txn(dlg.bye, seen)
        except StateFileError:
            expired += 1
            continue
        if now is not None and (
                (dlg.state == _cdr.EARLY and now >= dlg.invite.created + cdr.unanswered_life)
                or (dlg.state != _cdr.EARLY and dlg.expires <= now and not cdr.expired_enable)):
            expired += 1
            continue
        kept[k] = dlg
    cdr.dialogs = kept
    live = {id(v) for v in kept.values()}
    cdr.by_txn = {k: v for k, v in by_txn.items() if id(v) in live}
    cdr._timers = [t for t in timers if isinstance(t, tuple) and len(t) == 3 and (t[1], t[2]) in kept]
    heapq.heapify(cdr._timers)
    return (len(kept), expired)


try:
    from sipsniff_acc import cdr as _cdr
except ImportError:  # a build without dialog CDRs
    _cdr = None  # type: ignore[assignment]
else:
    register_section("cdr dialogs", _dump_cdr, _restore_cdr, (_cdr.Dialog,))
