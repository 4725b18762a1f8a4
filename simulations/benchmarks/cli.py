"""Command-line pieces of the benchmark scripts: the shared options and argparse ``type``s."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Sequence

import torch

__all__ = ["add_common_arguments", "ensure_stdout_utf8", "int_at_least", "parse_choice_list", "parse_int_list",
           "positive_float", "positive_int", "torch_device"]


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The options every benchmark script shares: threads, model cache, JSON output, progress bars."""
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--cache-dir", default=None,
                   help="root of the model cache (default: $FEDMERGE_CACHE or ~/.cache/fedmerge); "
                        "models go to <root>/bench")
    p.add_argument("--out", default=None, help="write all results as JSON to this file")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bars on stderr (default: on)")


def parse_int_list(text: str, *, minimum: int = 1) -> list[int]:
    """``"2,5,20"`` -> ``[2, 5, 20]`` (an argparse ``type``: bad input becomes a one-line error)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    bad = [v for v in values if v < minimum]
    if bad:
        raise argparse.ArgumentTypeError(f"values must be >= {minimum}, got {bad[0]}")
    return values


def parse_choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse ``type`` for a comma-separated subset of ``choices`` (order kept, duplicates dropped)."""
    def parse(text: str) -> list[str]:
        values = []
        for part in text.split(","):
            name = part.strip().lower().replace("_", "-")
            if not name:
                continue
            if name not in choices:
                raise argparse.ArgumentTypeError(f"unknown choice {part.strip()!r}; choose from {','.join(choices)}")
            if name not in values:
                values.append(name)
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one of {','.join(choices)}")
        return values
    return parse


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for one integer ``>= minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)


def positive_float(text: str) -> float:
    """An argparse ``type`` for one finite float ``> 0``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def torch_device(text: str) -> str:
    """An argparse ``type`` for a torch device string (``cpu``, ``cuda``, ``cuda:1``)."""
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from None
    return text


def ensure_stdout_utf8() -> None:
    """Avoid UnicodeEncodeError for '²' / '—' on consoles with a legacy encoding."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and (sys.stdout.encoding or "").lower() not in ("utf-8", "utf8"):
        try:
            reconfigure(errors="replace")
        except (ValueError, OSError):
            pass
