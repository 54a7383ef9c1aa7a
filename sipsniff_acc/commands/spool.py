"""`sipsniff-acc spool`: show, export and retry pending and dead-lettered records.

The spool is a ledger (emitters/spool.py): entries keyed by destination, waiting (``queue``)
or set aside with the backend's reason (``dead``). These commands read it without the rules
and never deliver anything themselves: `spool retry` only moves dead letters back to the
queue, and the next run or `sipsniff-acc deliver` sends them.
"""

from __future__ import annotations

import base64
import datetime as dt
import sys
from pathlib import Path
from typing import IO, Annotated, Any

import orjson
import typer

from sipsniff_acc.emitters.spool import DEFAULT_SPOOL, DurableSpool, SpoolError, how_to_deliver, loads
from sipsniff_acc.outfiles import EXIT_OUTPUT_ERROR, Writing, open_private
from sipsniff_acc.sysloglines import escape, json_safe

EXIT_USAGE = 2  #: a missing, corrupt or foreign spool file, or a bad option

spool_app = typer.Typer(help="Inspect the durable spool: pending and dead-lettered records, export, retry.",
                        no_args_is_help=True, add_completion=False)

SpoolOption = Annotated[Path, typer.Option("--spool", help="the spool file")]


def _open(path: Path) -> DurableSpool:
    """The spool, read as it is (never created); one line and exit 2 when it cannot be."""
    try:
        return DurableSpool(path, create=False)
    except SpoolError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None


def _when(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


@spool_app.command("status")
def status(spool_path: SpoolOption = Path(DEFAULT_SPOOL)) -> None:
    """Pending records per destination, and dead letters per destination with their reasons."""
    spool = _open(spool_path)
    pending = spool.pending()
    dead = spool.dead_reasons()
    if not pending and not dead:
        print(f"{spool_path}: empty")
    for dest in sorted(set(pending) | set(dead)):
        reasons = dead.get(dest)
        # a backend's reason may quote the refused value (a NUL, an escape sequence): escaped for the terminal
        print(escape(f"{dest}: {pending.get(dest, 0)} pending, "
                     f"{sum(reasons.values()) if reasons else 0} dead-lettered"))
        for reason, n in (reasons.most_common() if reasons else []):
            print(f"  {n} x {escape(reason)}")
        if pending.get(dest):
            print(f"  deliver: {how_to_deliver(dest, str(spool_path))}")
        if reasons:
            print(f"  retry the dead letters: sipsniff-acc spool retry --spool {spool_path} --destination '{dest}'")
    spool.close()


def _doc(blob: bytes) -> dict[str, Any]:
    """The stored document, or its raw bytes when it is not readable (a corrupt entry)."""
    try:
        doc = loads(blob)
        if isinstance(doc, dict):
            return doc
    except ValueError:
        pass
    return {"raw_base64": base64.b64encode(bytes(blob)).decode()}


@spool_app.command("export")
def export(
    spool_path: SpoolOption = Path(DEFAULT_SPOOL),
    dead: Annotated[bool, typer.Option("--dead", help="only the dead-lettered records")] = False,
    pending: Annotated[bool, typer.Option("--pending", help="only the pending records")] = False,
    destination: Annotated[str | None, typer.Option("--destination", "-d", help="only this destination")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write the JSON lines here (default stdout)")] = None,
) -> None:
    """Records as JSON lines: {"state", "seq", "destination", "queued", "reason", "at", "entry"}."""
    if dead and pending:
        print("error: --dead and --pending exclude each other (give neither for both)", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE)
    spool = _open(spool_path)
    tables = ["dead"] if dead else ["queue"] if pending else ["queue", "dead"]
    try:
        out: IO[bytes] = open_private(output, "wb") if output else sys.stdout.buffer  # noqa: SIM115
    except OSError as e:
        print(f"error: --output {output}: {e.strerror}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
    n = 0
    # a full disk: one line naming the output, exit 3 (the spool is only read)
    with Writing(out, f"--output {output}" if output else "stdout", owned=bool(output)) as writing:
        for table in tables:
            for seq, dest, blob, queued, reason, at in spool.rows(table, destination):
                line = {"state": "dead" if table == "dead" else "pending", "seq": seq, "destination": dest,
                        "queued": _when(queued), "reason": reason, "at": _when(at), "entry": _doc(blob)}
                out.write(json_safe(orjson.dumps(line)) + b"\n")
                n += 1
        out.flush()
    spool.close()
    if writing.reader_left:  # `| head`: the reader left; not an error of ours (no count: it took fewer)
        raise typer.Exit(0)
    if writing.failed:
        print(escape(writing.failed), file=sys.stderr)
        raise typer.Exit(EXIT_OUTPUT_ERROR)
    print(f"{n} record(s) exported", file=sys.stderr)


def _ids(values: list[str] | None) -> list[int] | None:
    """--ids 3,5 --ids 9: the dead letters' seq numbers (as `spool export --dead` shows them)."""
    if not values:
        return None
    out = []
    for v in values:
        for part in v.split(","):
            if part.strip():
                if not part.strip().isdigit():
                    print(f"error: --ids: {part.strip()!r} is not a record number (see `spool export --dead`)",
                          file=sys.stderr)
                    raise typer.Exit(EXIT_USAGE)
                out.append(int(part))
    return out


@spool_app.command("retry")
def retry(
    spool_path: SpoolOption = Path(DEFAULT_SPOOL),
    destination: Annotated[str | None, typer.Option("--destination", "-d", help="only this destination's dead letters")] = None,
    ids: Annotated[list[str] | None, typer.Option("--ids", help="only these dead letters (seq numbers, comma-separated)")] = None,
) -> None:
    """Move dead-lettered records back to pending: the next run or `deliver` sends them (after
    the records already waiting). Fix the cause first (schema, on_overlong) or they come back."""
    wanted = _ids(ids)
    spool = _open(spool_path)
    moved = spool.retry(destination, wanted)
    spool.close()
    if not moved:
        print(f"{spool_path}: no dead letters{' for ' + destination if destination else ''}"
              f"{' with those numbers' if wanted else ''}")
        return
    for dest, n in sorted(moved.items()):
        print(f"{dest}: {n} record(s) moved back to pending; deliver them with {how_to_deliver(dest, str(spool_path))}")


def register(app: typer.Typer) -> None:
    """Add the `spool` command group to the CLI."""
    app.add_typer(spool_app, name="spool")
