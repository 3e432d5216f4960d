"""Frozen-dataclass configs and their JSON round trip.

Every artifact lorashelf writes carries the JSON of the config that made it (as litgpt
writes hyperparameters beside each checkpoint). ``to_json``/``from_dict`` keep that
round trip exact and reject unknown keys with a message naming the valid ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

from lorashelf.errors import LorashelfError, did_you_mean

C = TypeVar("C")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (possibly nested) dataclass; tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build ``cls`` from a dict, converting lists back to tuples where typed so."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        raise LorashelfError(
            f"unknown {cls.__name__} field {k!r}{did_you_mean(k, fields)}; "
            f"valid fields: {', '.join(fields)}"
        )
    kwargs = {}
    for k, v in data.items():
        if isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file + fsync + rename.

    Strict JSON only: a NaN or inf anywhere raises instead of writing the invalid
    token ``NaN`` that other JSON readers reject.
    """
    path = Path(path)
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    except ValueError as e:
        raise LorashelfError(f"refusing to write {path}: {e} (a NaN or inf value)") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
