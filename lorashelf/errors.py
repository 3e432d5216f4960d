"""User-facing errors.

Anything a user can cause (a typo in a task id, a missing file, an adapter for the
wrong base model) raises :class:`LorashelfError` with a message that names the fix.
The CLI turns it into one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LorashelfError(Exception):
    """An error caused by the user's input; the message says how to fix it."""


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Return ' (did you mean: a, b?)' for close matches of ``name``, or ''."""
    cands = list(candidates)
    close = difflib.get_close_matches(name, cands, n=n, cutoff=0.6)
    if not close:
        # substring matches help with e.g. "three_objects" -> full bigbench names
        close = [c for c in cands if name and name in c][:n]
    return f" (did you mean: {', '.join(close)}?)" if close else ""
