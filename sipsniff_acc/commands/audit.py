"""`sipsniff-acc audit`: what the billing database holds against what happened on the wire.

The captures are accounted in memory exactly as `process` would (same rules, nothing
written anywhere); the billing side's tables (names and columns from rules.yaml) are read
for the capture's time span only; rows are paired and every difference is one discrepancy
(``missing``, ``phantom``, ``mismatch``, ``duplicate``). Exit status like diff(1): 0 the
books agree, 1 discrepancies found, 2 trouble (usage, an unreadable capture or database, a
missing table), always one line found before the work where it can be.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import IO, Annotated

import typer

from sipsniff_acc.audit.billing import BillingError, CsvBilling, Span, SqlBilling, parse_map
from sipsniff_acc.audit.model import PHANTOM, UNVERIFIED, Discrepancy, TableSpec
from sipsniff_acc.audit.pairing import Result, pair
from sipsniff_acc.audit.report import summary, write_jsonl
from sipsniff_acc.audit.wire import WireSide, account, acc_specs, cdr_specs
from sipsniff_acc.outfiles import OutputPathError, check_output, open_private
from sipsniff_acc.rules import RulesError, RulesFile, load_rules
from sipsniff_acc.sources import CapturePathError, CaptureReader, check_capture, expand_paths
from sipsniff_acc.sysloglines import escape

EXIT_AGREE, EXIT_DISCREPANCIES, EXIT_TROUBLE = 0, 1, 2


#: what must never be printed: the --against password as typed (and its pieces), the one
#: from --db-password-file / SIPSNIFF_DB_PASSWORD; set as soon as they are known
_SECRETS: list[str] = []


def url_secrets(url: str) -> list[str]:
    """The password parts of a URL as the user typed it, parseable or not: the user info after
    its first ':' up to the last '@' before any '?' (a password with an unescaped '@' or '/'
    is still all hidden, and so are the pieces a driver then takes for a host name), its
    percent-decoded form, and any ``password=`` query value."""
    from urllib.parse import parse_qsl, unquote

    rest = url.split("://", 1)[1] if "://" in url else url
    head, _q, query = rest.partition("?")
    out: list[str] = []
    at = head.rfind("@")
    if at > 0 and ":" in head[:at]:
        pw = head[:at].split(":", 1)[1]
        out += [pw, unquote(pw), *(piece for piece in pw.split("@") if len(piece) >= 4)]
    for k, v in parse_qsl(query, keep_blank_values=False):
        if k.lower() in ("password", "passwd", "pwd"):
            out += [v]
    return sorted({x for x in out if x}, key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with every known secret replaced by ***."""
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    return text


def _trouble(message: str) -> typer.Exit:
    print(f"error: {escape(redact(message))}", file=sys.stderr)
    return typer.Exit(EXIT_TROUBLE)


def _rules(path: Path | None) -> RulesFile:
    try:
        return load_rules(path)
    except RulesError as e:
        for p in e.problems:
            print(f"error: {escape(str(p))}", file=sys.stderr)
        raise typer.Exit(EXIT_TROUBLE) from None


def _readers(files: list[str]) -> list[CaptureReader]:
    if not files:
        raise _trouble("give the capture(s) to audit: sipsniff-acc audit CAPTURE... --against DB_URL")
    for f in files:
        if f == "-":
            raise _trouble("audit reads capture files, not stdin (the billing side is read for their time span)")
        try:
            check_capture(f)
        except CapturePathError as e:
            raise _trouble(str(e)) from None
    paths = expand_paths(files)
    if not paths:
        raise _trouble("no capture files found in the directories given")
    return [CaptureReader(p) for p in paths]


def _is_csv(against: str) -> bool:
    return "://" not in against


def audit(
    files: Annotated[list[str] | None, typer.Argument(help="pcap/pcapng files (.gz too) or directories")] = None,
    read: Annotated[list[str] | None, typer.Option("--read-file", "-r", help="a capture to read (repeatable; beside FILE...)")] = None,
    rules_file: Annotated[Path | None, typer.Option("--rules", "-m", help="rules.yaml: the proxy's accounting (tables and columns too)")] = None,
    against: Annotated[str | None, typer.Option("--against", help="the billing side: an SQLAlchemy URL (sqlite:///acc.db, postgresql+psycopg://..., mysql+pymysql://...) or a CSV export")] = None,
    mapping: Annotated[list[str] | None, typer.Option("--map", help="CSV: FIELD=COLUMN pairs, comma-separated (callid=call_id,code=status,time=ts); table==NAME for a constant")] = None,
    time_tolerance: Annotated[float, typer.Option("--time-tolerance", help="seconds a row's time may differ from the wire's")] = 1.0,
    duration_tolerance: Annotated[float, typer.Option("--duration-tolerance", help="seconds a CDR's end/duration may differ")] = 1.0,
    margin: Annotated[float | None, typer.Option("--margin", help="seconds around the capture's span read from billing (default: the time tolerance)")] = None,
    db_timezone: Annotated[str, typer.Option("--db-timezone", help="utc (default) or local: how DATETIME columns were written (not SQLite)")] = "utc",
    db_password_file: Annotated[Path | None, typer.Option("--db-password-file", help="the database password (or set SIPSNIFF_DB_PASSWORD)")] = None,
    jsonl_file: Annotated[Path | None, typer.Option("--jsonl", help="every discrepancy as a JSON line here (- for stdout; created 0600)")] = None,
    html_file: Annotated[Path | None, typer.Option("--html", help="a self-contained HTML report here (created 0600)")] = None,
    open_as_408: Annotated[bool, typer.Option("--open-as-408", help="as process: transactions open at the end are the proxy's 408")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no summary (the exit status says it)")] = False,
) -> None:
    """Audit a billing database (acc, missed_calls, acc_cdrs) against the captures.

    Example: sipsniff-acc audit day.pcap -m rules.yaml --against postgresql+psycopg://acc@db/acc --jsonl diff.jsonl
    """
    if against is None:
        raise _trouble("--against is required: the billing database URL or a CSV export")
    _SECRETS[:] = url_secrets(against)
    if db_timezone not in ("utc", "local"):
        raise _trouble(f"--db-timezone {db_timezone!r}: use utc or local")
    for name, v in (("--time-tolerance", time_tolerance), ("--duration-tolerance", duration_tolerance),
                    ("--margin", margin)):
        if v is not None and not 0 <= v < 1e9:
            raise _trouble(f"{name} {v}: give a number of seconds >= 0")
    if mapping and not _is_csv(against):
        raise _trouble("--map goes with a CSV export (--against FILE.csv), not a database URL")
    rules = _rules(rules_file)
    readers = _readers([*(read or ()), *(files or ())])
    for option, path in (("--jsonl", jsonl_file), ("--html", html_file)):
        if path is not None and str(path) != "-":
            try:
                check_output(path, option)
            except OutputPathError as e:
                raise _trouble(str(e)) from None
    if html_file is not None:
        try:
            import matplotlib  # noqa: F401 - the report's plots; checked before the work
        except ImportError:
            raise _trouble("--html needs matplotlib: pip install matplotlib (or 'sipsniff-acc[audit]')") from None
    specs: list[TableSpec] = acc_specs(rules) + cdr_specs(rules)
    if not specs:
        raise _trouble("the rules write no database rows (db_flag, db_missed_flag, acc_db_request, cdrs_table): "
                       "nothing to audit")
    try:
        if _is_csv(against):
            billing: SqlBilling | CsvBilling = CsvBilling(against, specs, parse_map(mapping), db_timezone)
        else:
            billing = SqlBilling(_with_password(against, db_password_file), specs, db_timezone)
    except BillingError as e:
        raise _trouble(str(e)) from None

    try:
        wire = account(readers, rules, open_as_408)
    except KeyboardInterrupt:  # nothing was written anywhere: stop at once, no verdict, no traceback
        billing.close()
        print("stopped on SIGINT: no verdict", file=sys.stderr)
        raise typer.Exit(130) from None
    if wire.errors:  # the rest of a damaged file's calls would all look like phantoms: no verdict
        for err in wire.errors:
            print(f"error: {err}: the audit needs whole captures (its later calls would show as phantoms); "
                  "repair or leave out this file", file=sys.stderr)
        raise typer.Exit(EXIT_TROUBLE)
    if wire.first is None:
        raise _trouble("the captures hold no packets: no time span to audit")
    pad = time_tolerance if margin is None else margin
    span = Span(int(wire.first) - pad, wire.last + pad)  # type: ignore[operator]
    try:
        rows = billing.rows(span)
    except BillingError as e:
        raise _trouble(str(e)) from None
    finally:
        billing.close()
    for note in billing.notes:
        print(escape(redact(f"note: {against_label(against)}: {note}")), file=sys.stderr)
    specs = [s for s in specs if s.name in billing.audited]  # a CSV export of one table audits that table
    audited = {s.name for s in specs}
    wire_rows = [r for r in wire.rows if r.table in audited]
    res = pair(wire_rows, rows, time_tolerance, duration_tolerance)
    unverified = unjudged(res, wire)
    columns = {s.name: s.columns for s in specs}
    for d in res.discrepancies:  # a field is named as the table's column (sip_code, end_time, ...)
        if d.field:
            d.field = columns.get(d.table, {}).get(d.field, d.field)
    tables = [s.name for s in specs]
    try:
        if jsonl_file is not None:
            out: IO[bytes] = sys.stdout.buffer if str(jsonl_file) == "-" else open_private(jsonl_file, "wb")
            try:
                write_jsonl(out, res.discrepancies + unverified)
            finally:
                if out is not sys.stdout.buffer:
                    out.close()
                else:
                    out.flush()
        if html_file is not None:
            from sipsniff_acc.audit.html import render
            page = render(res, wire, wire_rows, rows, tables, against_label(against), len(unverified))
            with open_private(html_file, "wb") as f:
                f.write(page.encode())
    except BrokenPipeError:
        raise typer.Exit(EXIT_TROUBLE) from None
    except OSError as e:  # a full disk, a vanished directory: no verdict can be handed over
        raise _trouble(f"writing the report: {e}") from None
    if not quiet:
        summary(res, wire_rows, rows, tables, wire.first, wire.last,
                sys.stderr if str(jsonl_file) == "-" else sys.stdout, len(unverified))
    raise typer.Exit(EXIT_DISCREPANCIES if res.discrepancies else EXIT_AGREE)


def unjudged(res: Result, wire: WireSide) -> list[Discrepancy]:
    """Phantom candidates the capture cannot judge, taken out of the discrepancies and marked
    ``unverified``: rows of a call already in progress when the capture began (its Call-ID on
    the wire, its INVITE not), and rows timed in the capture's first or last whole second (the
    event may lie just outside it: Kamailio stores whole seconds)."""
    assert wire.first is not None and wire.last is not None
    lo, hi = math.floor(wire.first), math.floor(wire.last)
    out: list[Discrepancy] = []
    keep: list[Discrepancy] = []
    for d in res.discrepancies:
        if d.kind == PHANTOM and wire.began_before(d.callid):
            d.kind, d.field = UNVERIFIED, "began_before_capture"
            out.append(d)
        elif d.kind == PHANTOM and not lo < d.time < hi:
            d.kind, d.field = UNVERIFIED, "capture_edge"
            out.append(d)
        else:
            keep.append(d)
    res.discrepancies = keep
    return out


def against_label(against: str) -> str:
    """The billing side as shown in the report: a URL without its password."""
    if _is_csv(against):
        return redact(against)
    from sipsniff_acc.emitters.sqlurl import safe_url
    return redact(safe_url(against))


def _with_password(url: str, password_file: Path | None) -> str:
    """The URL with the password from --db-password-file or SIPSNIFF_DB_PASSWORD, if any."""
    import os

    from sqlalchemy.engine import make_url
    password = None
    if password_file is not None:
        try:
            password = password_file.read_text().strip()
        except OSError as e:
            raise _trouble(f"--db-password-file {password_file}: {e.strerror}") from None
    elif os.environ.get("SIPSNIFF_DB_PASSWORD"):
        password = os.environ["SIPSNIFF_DB_PASSWORD"]
    if password is None:
        return url
    _SECRETS[:] = sorted({*_SECRETS, password}, key=len, reverse=True)
    try:
        return make_url(url).set(password=password).render_as_string(hide_password=False)
    except Exception:  # noqa: BLE001 - an unparseable URL is reported by the reader
        return url


def register(app: typer.Typer) -> None:
    """Add `audit` to the CLI."""
    app.command("audit")(audit)
