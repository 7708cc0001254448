"""argparse types shared by the bench scripts: a bad number is refused before any work starts,
in argparse's one line (exit status 2), instead of a traceback or a long run that fails late.

    import bench_args as ba    # bench/ is on sys.path when a bench script runs
    ap.add_argument("--n", type=ba.positive, default=8)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """A whole number ``lo <= v`` (and ``v <= hi`` when given)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is not in {lo}..{hi}" if hi is not None else f"{v} is below {lo}")
        return v

    return parse


positive = at_least(1)
non_negative = at_least(0)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0 < v < float("inf")):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number > 0")
    return v


def imgsz(text: str) -> int:
    """An input size in pixels: a positive multiple of 32, the YOLOv8 stride (ultralytics would
    otherwise round it up with a warning, and the bench would report a size it did not run)."""
    v = positive(text)
    if v % 32:
        raise argparse.ArgumentTypeError(f"{v} is not a multiple of 32 (the model's stride)")
    return v


def ascending_counts(text: str) -> list[int]:
    """Comma-separated whole numbers >= 1, strictly ascending."""
    vs = [positive(t.strip()) for t in text.split(",")]
    if any(b <= a for a, b in zip(vs, vs[1:])):
        raise argparse.ArgumentTypeError(f"{text!r} is not in ascending order without repeats")
    return vs


def names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """Comma-separated names, each one of ``allowed``."""

    def parse(text: str) -> list[str]:
        vs = [t.strip() for t in text.split(",")]
        bad = [v for v in vs if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(map(repr, bad))}: not one of {', '.join(allowed)}")
        return vs

    return parse
