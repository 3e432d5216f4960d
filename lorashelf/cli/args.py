"""Argument types that validate where arguments are parsed, and a one-line error parser.

A number that makes no sense (``--batch-size 0``, ``--limit -3``, ``--shots 10000``)
is refused by argparse before any work starts, with the flag named and exit code 2.
:class:`OneLineParser` prints that error as one line (``lorashelf: error: ...``)
instead of the usage block plus the error, so every user error looks the same.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lorashelf: error: {message} (see `{self.prog} --help`)\n")


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[low, high]`` (``high`` None: no bound)."""
    bound = f"at least {low}" if high is None else f"between {low} and {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, not {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {bound}, not {value}")
        return value

    parse.__name__ = "integer"
    return parse


positive_int = int_range(1)
nonneg_int = int_range(0)


def float_range(
    low: float, high: float | None = None, *, low_open: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite float in ``[low, high]`` (``(low, high]`` if low_open)."""
    left = "(" if low_open else "["
    bound = f"in {left}{low:g}, {'inf' if high is None else f'{high:g}'}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {bound}, not {text}")
        return value

    parse.__name__ = "number"
    return parse


fraction = float_range(0.0, 1.0)
positive_float = float_range(0.0, low_open=True)


def nonempty(text: str) -> str:
    """An argparse type: a string that is not empty or blank (e.g. ``--name ""``)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def output_path(text: str) -> Path:
    """An argparse type: a path to write that is not inside a lorashelf library."""
    from lorashelf.library.schema import owning_library

    path = Path(text)
    lib = owning_library(path)
    if lib is not None:
        raise argparse.ArgumentTypeError(
            f"{text} lies inside the library {lib}; writing there would replace the "
            "library's own files, so write it elsewhere"
        )
    return path


def device(text: str) -> str:
    """An argparse type: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (checked
    against the machine later, by the runtime)."""
    kind, _, index = text.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}; use auto, cpu, cuda, cuda:N or mps"
        )
    return text
