"""The service config file (``--config FILE`` or ``SIPSNIFF_CONFIG``): every option of every
command, in YAML, as click's ``default_map`` (so an option on the command line wins).

    process:
      interface: [eth0]
      rules: /etc/sipsniff-acc/rules.yaml
      metrics: 127.0.0.1:9466

Why validated here and not left to click: click would read a wrong value only when the
command runs, with no file or line, and would ignore an unknown key (a typo silently does
nothing). Each key is checked against the command's own parameters, each value against the
parameter's type, and a problem is one line ``FILE:LINE: process.key: why`` before any work.
The YAML is read with the rules loader's bounds (size, depth, alias expansion).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, get_args

import yaml

from sipsniff_acc.rules import MAX_RULES_BYTES, RulesError, _load_yaml

MAX_CONFIG_BYTES = MAX_RULES_BYTES  #: a config file is a few hundred bytes


#: top-level keys of rules.yaml: a --config naming the rules file by mistake is said so
RULES_KEYS = frozenset({"profile", "proxy", "acc", "route", "failure_route", "dialog", "limits", "db_url", "modparams"})


class ConfigError(ValueError):
    """The config file is wrong: the message is one line FILE:LINE: key: why."""


def option_names(param: Any) -> list[str]:
    """The keys a config file may use for ``param``: its long option names without dashes,
    with - or _ (``db-url``, ``db_url``), and its parameter name (``rules_file``)."""
    names = {param.name or ""}
    for opt in param.opts:
        if opt.startswith("--"):
            names |= {opt[2:], opt[2:].replace("-", "_")}
    return sorted(n for n in names if n)


def read_config(path: str | Path) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """(data, line of each key path) of a config file, bounded like rules.yaml."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)  # never more: a FIFO or /dev/zero cannot make it grow
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: over {MAX_CONFIG_BYTES >> 20} MiB: not a config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 (byte 0x{data[e.start]:02X})") from None
    try:
        doc, node = _load_yaml(text.removeprefix("\ufeff"), str(p))
    except RulesError as e:
        raise ConfigError(e.problems[0]) from None
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _key_lines(node, (), lines, str(p))
    return doc, lines


def _key_lines(node: yaml.Node, where: tuple[Any, ...], out: dict[tuple[Any, ...], int], path: str) -> None:
    """The line of each key (not of its value); a key given twice in a mapping is an error
    (YAML would silently keep the last one: a setting the user believes in would vanish)."""
    if not isinstance(node, yaml.MappingNode):
        return
    for k, v in node.value:
        key = (*where, k.value if isinstance(k, yaml.ScalarNode) else repr(k.value))
        line = k.start_mark.line + 1
        if key in out:
            raise ConfigError(f"{path}:{line}: {'.'.join(map(str, key))}: given twice (line {out[key]} too)")
        out[key] = line
        _key_lines(v, key, out, path)


def load_config(path: str | Path, group: Any, ctx: Any) -> dict[str, Any]:
    """The ``default_map`` for ``group`` from the file at ``path``; ``ConfigError`` if wrong."""
    doc, lines = read_config(path)
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}:1: the config file must be a mapping of commands "
                          f"({', '.join(sorted(group.commands))}) to their options")
    rules_keys = sorted((k for k in doc if k in RULES_KEYS and k not in group.commands),
                        key=lambda k: _line(lines, (k,)))
    if rules_keys and not any(isinstance(k, str) and k in group.commands for k in doc):
        raise ConfigError(f"{path}:{_line(lines, (rules_keys[0],))}: this is a rules file ({', '.join(rules_keys)}), "
                          "not a service config: give it with --rules/-m (or as process: rules: FILE in the config)")
    return _section(doc, group, ctx, str(path), lines, ())


def _line(lines: dict[tuple[Any, ...], int], where: tuple[Any, ...]) -> int:
    while where and where not in lines:
        where = where[:-1]
    return lines.get(where, 1)


def _section(doc: dict[Any, Any], group: Any, ctx: Any, path: str,
             lines: dict[tuple[Any, ...], int], where: tuple[Any, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, body in doc.items():
        key = (*where, name)
        at = f"{path}:{_line(lines, key)}: {'.'.join(map(str, key))}"
        cmd = group.commands.get(str(name)) if isinstance(name, str) else None
        if cmd is None:
            close = difflib.get_close_matches(str(name), list(group.commands), 1)
            hint = f" (did you mean {close[0]}?)" if close else f" (commands: {', '.join(sorted(group.commands))})"
            raise ConfigError(f"{at}: not a command{hint}")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{at}: expected the options of `{name}` as a mapping (key: value)")
        if hasattr(cmd, "commands"):  # a group (spool status|export|retry)
            out[name] = _section(body, cmd, ctx, path, lines, key)
        else:
            out[name] = _options(body, cmd, ctx, path, lines, key)
    return out


def _options(body: dict[Any, Any], cmd: Any, ctx: Any, path: str,
             lines: dict[tuple[Any, ...], int], where: tuple[Any, ...]) -> dict[str, Any]:
    by_key: dict[str, Any] = {}
    for p in cmd.params:
        if p.name in ("help", "version", "config"):
            continue
        for n in option_names(p):
            by_key[n] = p
    out: dict[str, Any] = {}
    for key, value in body.items():
        at = f"{path}:{_line(lines, (*where, key))}: {'.'.join(map(str, (*where, key)))}"
        param = by_key.get(key) if isinstance(key, str) else None
        if param is None:
            close = difflib.get_close_matches(str(key), list(by_key), 1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{at}: not an option of `{'.'.join(map(str, where))}`{hint}")
        assert param.name is not None
        if param.name in out:
            raise ConfigError(f"{at}: given twice (as another spelling of --{param.name.replace('_', '-')})")
        out[param.name] = _value(value, param, at)
    return out


def _value(value: Any, param: Any, at: str) -> Any:
    """The value checked against the parameter's type (strictly: YAML's 5 is not the string
    "5", yes is not a path); lists for repeatable options. Returned as written: the command
    line parser converts it when the command runs, as a value typed on the command line."""
    desc = param.type_descriptor
    many = param.multiple or param.nargs == -1
    if value is None:
        return None
    if many:
        items = value if isinstance(value, list) else [value]
        base = (get_args(desc.annotation) or (str,))[0]
        for v in items:
            _check_one(v, base, desc, at)
        return items
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{at}: expected one value, not a {'list' if isinstance(value, list) else 'mapping'}")
    _check_one(value, desc.annotation, desc, at)
    return value


def _check_one(v: Any, base: Any, desc: Any, at: str) -> None:
    if base is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{at}: expected true or false, not {_shown(v)}")
    elif base is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{at}: expected a whole number, not {_shown(v)}")
    elif base is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{at}: expected a number, not {_shown(v)}")
    elif not isinstance(v, str):
        raise ConfigError(f"{at}: expected a string, not {_shown(v)}")
    elif desc.is_choice and desc.choices:
        names = [str(getattr(c, "value", c)) for c in desc.choices]
        if v not in names:
            raise ConfigError(f"{at}: {v!r} is not one of {', '.join(names)}")


def _shown(v: Any) -> str:
    if isinstance(v, (list, dict)):
        return "a list" if isinstance(v, list) else "a mapping"
    return f"str {v[:60]!r}" if isinstance(v, str) else f"{type(v).__name__} {str(v)[:60]}"
