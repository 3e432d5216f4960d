"""CLI flags built from the methods' own option dataclasses, and ``--set key=value``.

A default lives once, in the dataclass: :func:`add_option_flags` adds one ``--field``
flag per field of the given dataclasses (default unset, so the dataclass decides),
typed from the field's default, with help naming which methods take it and their
defaults. ``--set key=value`` (repeatable) is the one generic spelling; values parse
as JSON (``--set density=0.3``, ``--set space='"params"'`` or plainly
``--set space=params``). :func:`collect_settings` merges both into one flat mapping
that :func:`lorashelf.methods.make_config` hands to each method.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from lorashelf.errors import LorashelfError

FLAG_DEST = "_option_{}"


def _kind(value: Any) -> type | None:
    for t in (bool, int, float, str):
        if isinstance(value, t):
            return t
    return None


def add_option_flags(
    parser: argparse.ArgumentParser | Any, classes: Mapping[str, type], skip: Sequence[str] = ()
) -> None:
    """One ``--name`` flag per field of ``classes`` (``{method name: options class}``)."""
    fields: dict[str, list[tuple[str, Any]]] = {}
    for method, cls in classes.items():
        for f in dataclasses.fields(cls):
            if f.name in skip or f.name.startswith("_"):
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            fields.setdefault(f.name, []).append((method, default))
    for name, users in sorted(fields.items()):
        kinds = {_kind(d) for _, d in users} - {None}
        kind = kinds.pop() if len(kinds) == 1 else str
        where = ", ".join(f"{m} ({d})" for m, d in users)
        flag = "--" + name.replace("_", "-")
        dest = FLAG_DEST.format(name)
        if kind is bool:
            parser.add_argument(
                flag, dest=dest, default=None, action=argparse.BooleanOptionalAction,
                help=f"option of {where}",
            )  # fmt: skip
        else:
            parser.add_argument(
                flag, dest=dest, type=kind, default=None, metavar=name.upper(),
                help=f"option of {where}",
            )  # fmt: skip


def add_set_flag(parser: argparse.ArgumentParser | Any) -> None:
    parser.add_argument(
        "--set",
        dest="set_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option, e.g. --set density=0.3 (repeatable; values are JSON)",
    )


def parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise LorashelfError(f"--set {pair!r}: use KEY=VALUE, e.g. --set density=0.2")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare word is a string: --set space=params
        out[key.strip().replace("-", "_")] = value
    return out


def collect_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The typed flags that were given, then ``--set`` pairs (which win)."""
    prefix = FLAG_DEST.format("")
    out = {
        k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None
    }
    out.update(parse_sets(getattr(args, "set_options", None) or []))
    return out


def method_option_classes(kinds: Sequence[str] = ("merge", "router")) -> dict[str, type]:
    """``{method: options class}`` of every registered merge and/or router (imports them)."""
    from lorashelf.merge import MERGES
    from lorashelf.route import ROUTERS

    out: dict[str, type] = {}
    if "merge" in kinds:
        out.update({n: m.config_cls for n, m in MERGES.items()})
    if "router" in kinds:
        out.update({n: m.config_cls for n, m in ROUTERS.items()})
    return out


CONFIG_DEST = "_config_{}"


def add_config_flags(
    group: Any,
    cls: type,
    helps: Mapping[str, str],
    types: Mapping[str, Any] | None = None,
    flags: Mapping[str, str] | None = None,
) -> None:
    """One flag per field of ``cls`` named in ``helps`` (in that order), default unset so
    ``cls`` keeps the default: the help text shows it. ``types`` overrides a field's
    argparse type (a validator), ``flags`` a flag's name (``{"dtype": "--compute-dtype"}``)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, text in helps.items():
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
        dest = CONFIG_DEST.format(name)
        shown = f"{text} (default: {default})" if default is not None else text
        if isinstance(default, bool):
            group.add_argument(
                flag, dest=dest, default=None, action=argparse.BooleanOptionalAction, help=text
            )
            continue
        kind = (types or {}).get(name) or _kind(default) or str
        group.add_argument(
            flag, dest=dest, type=kind, default=None, metavar=name.upper(), help=shown
        )


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the user set with :func:`add_config_flags` flags."""
    prefix = CONFIG_DEST.format("")
    return {
        k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None
    }
