"""Output files (logs, --jsonl, -o, --stats): checked before the work starts, created 0600.

Accounting records name callers, callees and their addresses: a file we create is readable
by its owner only (``os.open`` with mode 0o600; the umask can only take bits away). A file
that already exists keeps the mode it has: the operator chose it. Every mistake in a path is
found before a single packet is read, and reported as one line naming what to fix.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO, Final

PRIVATE_MODE: Final = 0o600
EXIT_OUTPUT_ERROR: Final = 3  #: an output could not be written (disk full, I/O error): said in one line


class OutputPathError(ValueError):
    """An output path that cannot be written; the message names the path and what to fix."""


def check_output(path: str | Path, option: str) -> None:
    """Raise ``OutputPathError`` unless ``path`` can be created or written as a file."""
    p = Path(path)
    if p.is_dir():
        raise OutputPathError(f"{option} {p}: is a directory; give a file name")
    parent = p.parent
    if not parent.exists():
        raise OutputPathError(f"{option} {p}: directory {parent} does not exist (create it first)")
    if not parent.is_dir():
        raise OutputPathError(f"{option} {p}: {parent} is not a directory")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise OutputPathError(f"{option} {p}: not writable (permission denied)")
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {p}: cannot create a file in {parent} (permission denied)")


def open_private(path: str | Path, mode: str = "wb", encoding: str | None = None) -> IO:  # type: ignore[type-arg]
    """``open(path, mode)`` for writing ("w"/"wb" truncate, "a"/"ab" append), but a file that
    does not exist yet is created with mode 0600 instead of 0666 & ~umask."""
    if mode not in ("w", "wb", "a", "ab"):
        raise ValueError(f"open_private: mode {mode!r} is not a write mode")
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if mode[0] == "a" else os.O_TRUNC)
    fd = os.open(path, flags, PRIVATE_MODE)
    try:
        return os.fdopen(fd, mode, encoding=None if "b" in mode else (encoding or "utf-8"))
    except BaseException:
        os.close(fd)
        raise


def write_private(path: str | Path, text: str) -> None:
    """Replace the file's content with ``text`` (UTF-8); created 0600 when new."""
    with open_private(path, "w") as f:
        f.write(text)


def write_failed(what: str, exc: OSError) -> str:
    """The one line for an output that failed: what the user named, and the system's reason."""
    return f"error: writing {what}: {exc.strerror or exc}"


def release_stdout() -> None:
    """After stdout failed (a full disk, a closed pipe): fd 1 now points at /dev/null, so the
    interpreter's flush at exit has nowhere to fail and prints no second error or traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class Writing:
    """Writing one output (a file we opened, or stdout), for ``messages`` and ``spool export``:
    a reader that left (``| head``) ends it quietly (``reader_left``); any other write error
    becomes one line (``failed``) instead of a traceback; a file we opened is closed, and a
    failure at its last flush (where a full disk often shows) counts too."""

    def __init__(self, out: IO, where: str, owned: bool) -> None:  # type: ignore[type-arg]
        self.out, self.where, self.owned = out, where, owned
        self.failed: str | None = None
        self.reader_left = False

    def __enter__(self) -> Writing:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, _tb: object) -> bool:
        handled = False
        if exc_type is not None and issubclass(exc_type, BrokenPipeError):
            release_stdout()
            self.reader_left = handled = True
        elif isinstance(exc, OSError):
            self.failed = write_failed(self.where, exc)
            if not self.owned:
                release_stdout()
            handled = True
        if self.owned:
            self.failed = self.failed or close_output(self.out, self.where)
        return handled


def close_output(out: IO, what: str) -> str | None:  # type: ignore[type-arg]
    """Close a file we opened; the failure line (a full disk shows at the last flush), or None."""
    try:
        out.close()
    except OSError as e:
        return write_failed(what, e)
    return None


def write_private_or_say(path: str | Path, text: str, what: str) -> bool:
    """``write_private``, but a failure is one line on stderr naming ``what``; False then."""
    try:
        write_private(path, text)
    except OSError as e:
        print(write_failed(what, e), file=sys.stderr)
        return False
    return True
