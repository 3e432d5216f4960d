"""The ``lorashelf`` command line: verb -> function table, parsing only.

Each area of the package contributes one module here (``cli/data.py``,
``cli/library.py``, ...) with a ``register(subparsers)`` function that adds its verbs
and points each at a thin handler calling the Python API. Side effects that belong to
the entry point (cache root from ``LORASHELF_HOME``, device, dtype, seeding, logging,
threads) are resolved here once and passed down as arguments.

User errors (:class:`LorashelfError`) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lorashelf.cli.args import OneLineParser, device, positive_int
from lorashelf.errors import LorashelfError

# Modules under lorashelf.cli that register verbs, in data-flow order.
VERB_MODULES = (
    "models",
    "data",
    "train",
    "library",
    "cluster",
    "merge",
    "gates",
    "compose",
    "evaluate",
    "export",
    "serve",
    "demo",
)


def default_home() -> Path:
    """The cache root: ``$LORASHELF_HOME`` or ``~/.cache/lorashelf`` (entry point only)."""
    env = os.environ.get("LORASHELF_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorashelf"


GLOBAL_OPTIONS_WITH_VALUE = ("--home", "--device", "--threads")


def active_verb(argv: Sequence[str]) -> str | None:
    """The verb ``argv`` runs (the first word that is no global option or its value)."""
    it = iter(argv)
    for a in it:
        if a in GLOBAL_OPTIONS_WITH_VALUE:
            next(it, None)
        elif not a.startswith("-"):
            return a
    return None


def build_parser(active: str | None = None) -> argparse.ArgumentParser:
    """The whole parser. ``active`` names the verb about to run: verbs whose flags come
    from the methods' option dataclasses import those only when they are the active
    one (or when ``active`` is None), so ``library ls`` starts without torch."""
    parser = OneLineParser(
        prog="lorashelf",
        description="Modular LLMs from a library of LoRA experts.",
    )
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="cache root for models and data (default: $LORASHELF_HOME or ~/.cache/lorashelf)",
    )
    parser.add_argument(
        "--device",
        type=device,
        default="auto",
        help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps",
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in VERB_MODULES:
        try:
            mod = importlib.import_module(f"lorashelf.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"lorashelf.cli.{name}":
                continue  # area not built yet
            raise
        if len(inspect.signature(mod.register).parameters) > 1:
            mod.register(sub, active)
        else:
            mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    # PEFT calls a transformers API that transformers 5 deprecates; users can do
    # nothing about it, and it would split our one-line errors.
    warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
    # transformers warns that its own generate/forward passes past_key_values
    warnings.filterwarnings("ignore", ".*past_key_values.*")
    # datasets logs a parse failure with its traceback before raising; the error the
    # user sees is lorashelf's one line about it
    import logging

    logging.getLogger("datasets").setLevel(logging.CRITICAL)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(active_verb(argv))
    args = parser.parse_args(argv)
    if args.home is None:
        args.home = default_home()
    try:
        # Verbs that never touch a model (library ls, data ls) set needs_runtime=False,
        # so they answer without paying for importing torch.
        if getattr(args, "needs_runtime", True):
            from lorashelf.runtime import setup_runtime

            setup_runtime(args)
        rc = args.func(args)
        return int(rc or 0)
    except LorashelfError as e:
        print(f"lorashelf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorashelf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
