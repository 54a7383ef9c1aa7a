"""`sipsniff-acc spool`: show, export and retry pending and dead-lettered records."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `spool` command group to the CLI (filled in by the spool work)."""
