"""Argument types for the command line: numbers with their valid range.

argparse calls these on the flag's text; a value out of range becomes a usage error (exit 2) whose
message names the flag, e.g. ``argument --threshold: must be between 0 and 1, got 2``.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable


def _number(kind: type, lo: float | None, hi: float | None, lo_open: bool, what: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        if too_low or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, 1, None, False, "a positive integer (1 or more)")
non_negative_int = _number(int, 0, None, False, "0 or more")
positive_float = _number(float, 0.0, None, True, "a positive number")
probability = _number(float, 0.0, 1.0, False, "between 0 and 1")
overlap = _number(float, 0.0, 1.0, True, "an IoU above 0 and at most 1")


def overlap_or_none(text: str) -> float | str | None:
    """An IoU in (0, 1], "none" (None) or "model" (the weights' own setting, the flags' default)."""
    word = text.strip().lower()
    if word in ("none", "model"):
        return None if word == "none" else "model"
    return overlap(text)


overlap_or_none.__name__ = "an IoU in (0, 1], none or model"


def count_or_model(text: str) -> int | str:
    """A positive whole number, or "model" (the weights' own setting, the flag's default)."""
    return "model" if text.strip().lower() == "model" else positive_int(text)


count_or_model.__name__ = "a positive whole number or model"
