"""Expert names: safe directory names derived from task ids.

An expert lives at ``DIR/experts/<name>/``, so its name must be one path component on
every filesystem we care about. Task ids are not (``bigbench:logical_deduction/three_objects``),
so :func:`safe_name` maps them to one with a documented rule: the separators ``:``,
``/`` and ``\\`` become ``__`` (empty parts dropped), whitespace becomes ``_``, any other
character outside ``[A-Za-z0-9._-]`` becomes ``-``, and names longer than
:data:`MAX_NAME` keep a prefix plus 8 hex digits of the id's sha256. Names are also
unique ignoring case, so a library copied to macOS or Windows stays intact.
"""

from __future__ import annotations

import hashlib
import re

from lorashelf.errors import LorashelfError

MAX_NAME = 128
_SEPARATORS = re.compile(r"[:/\\]+")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Windows device names cannot be directory names, whatever the extension.
_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}


def safe_name(task_id: str) -> str:
    """The expert name for a task id, e.g. ``bigbench:a/b`` -> ``bigbench__a__b``."""
    parts = [p for p in _SEPARATORS.split(task_id.strip()) if p]
    name = "__".join(re.sub(r"\s+", "_", p) for p in parts)
    name = _UNSAFE.sub("-", name).lstrip(".-_")
    if not name:
        raise LorashelfError(f"cannot make an expert name from {task_id!r}; pass a name")
    if len(name) > MAX_NAME:
        digest = hashlib.sha256(task_id.encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME - 9]}-{digest}"
    if name.split(".", 1)[0].lower() in _RESERVED:
        name = f"{name}_"
    return name


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid expert name, else raise naming the fix."""
    ok = (
        isinstance(name, str)
        and len(name) <= MAX_NAME
        and _VALID.fullmatch(name) is not None
        and name.split(".", 1)[0].lower() not in _RESERVED
    )
    if not ok:
        try:
            hint = f"; e.g. {safe_name(str(name))!r} (lorashelf.library.safe_name)"
        except LorashelfError:
            hint = ""
        raise LorashelfError(
            f"expert name {name!r} is not a safe directory name: use letters, digits, "
            f"'.', '_' and '-' (starting with a letter or digit, at most {MAX_NAME}){hint}"
        )
    return name
