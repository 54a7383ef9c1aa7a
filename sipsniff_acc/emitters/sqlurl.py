"""Database URLs and the SQL errors, without SQLAlchemy at import time.

Why a module of its own: importing SQLAlchemy costs ~0.12 s, paid by every command that
imports emitters/sql.py (``messages``, ``process --no-db``). The command line only needs
these to check a URL before the work and to name the errors it catches; SQLAlchemy is
imported when a URL is actually checked (a database in use).
"""

from __future__ import annotations

import os
import re
from typing import Any


class SqlError(RuntimeError):
    """The database refused or could not be reached; the message never holds the password."""


class SqlUsageError(SqlError):
    """A database URL that can never work (unparseable, unknown dialect, driver not installed,
    port out of range, an in-memory SQLite database): a usage mistake (exit 2), found before
    the work, not an outage to retry for the whole drain time."""


def check_url(url: str) -> None:
    """Raise SqlUsageError (one line, no password) when ``url`` can never be a database we write to.

    An in-memory SQLite database is refused: its rows vanish when the run ends, while the run
    would report them as delivered."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    try:
        u = make_url(url)
        port = u.port
    except (ArgumentError, ValueError, TypeError):
        redacted = re.sub(r"(?<=://)[^@/]*@", "***@", url)  # an unparseable URL may still hold a password
        raise SqlUsageError(f"{redacted!r} is not a database URL: use dialect+driver://user@host[:port]/name, "
                            "e.g. sqlite:///acc.db or postgresql+psycopg://acc@db/acc") from None
    shown = safe_url(url)
    try:
        u.get_dialect().import_dbapi()  # the driver module: not installed is a usage mistake, found now
    except ImportError as e:
        raise SqlUsageError(f"{shown}: the database driver is not installed ({e.name or e}); "
                            "pip install 'sipsniff-acc[postgresql]' or '[mysql]'") from None
    except (ArgumentError, ValueError, TypeError) as e:
        raise SqlUsageError(f"{shown}: unknown database dialect or driver {u.drivername!r} ({e})") from None
    if port is not None and not 1 <= port <= 65535:
        raise SqlUsageError(f"{shown}: port {port} is out of range (1-65535)")
    if u.get_backend_name() == "sqlite" and _sqlite_in_memory(u.database, u.query):
        raise SqlUsageError(f"{shown}: an in-memory SQLite database loses every row when the run ends: "
                            "give a file, e.g. sqlite:///acc.db")


def _sqlite_in_memory(database: str | None, query: Any) -> bool:
    """sqlite://, sqlite:///, sqlite:///:memory:, and file: URIs that name a memory database."""
    if not database or database == ":memory:":
        return True
    if database.startswith("file:"):
        return database.startswith("file::memory:") or "mode=memory" in database or \
            str(dict(query or {}).get("mode", "")) == "memory"
    return False


def safe_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for messages
        return "<unparseable URL>"


def destination(url: str) -> str:
    """The spool's key for a database: ``sql:`` + the URL without its password (SQLite: the
    absolute path), so records are only ever delivered to the database they were meant for."""
    from sqlalchemy.engine import make_url
    try:
        u = make_url(url)
    except Exception:  # noqa: BLE001 - create_engine reports it properly
        return "sql:<unparseable URL>"
    u = u._replace(password=None)  # URL is a NamedTuple; set(password=None) would keep it
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:" \
            and not u.database.startswith("file:"):
        u = u.set(database=os.path.abspath(u.database))
    return "sql:" + u.render_as_string(hide_password=False)


def sqlite_file(url: str) -> str | None:
    """The file of an SQLite URL (None for other databases and in-memory ones)."""
    from sqlalchemy.engine import make_url
    try:
        u = make_url(url)
    except Exception:  # noqa: BLE001
        return None
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:" \
            or u.database.startswith("file:"):
        return None
    return u.database
