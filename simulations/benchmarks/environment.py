"""Where a benchmark ran: the exact command, versions, threads and hardware, printed and saved with its results."""

from __future__ import annotations

import os
import platform
import shlex
from typing import Any, Mapping, Sequence

import torch

__all__ = ["cpu_model", "environment", "format_environment", "set_threads"]


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else :func:`platform.processor`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def set_threads(threads: int | None) -> int:
    """``torch.set_num_threads(threads)`` when given; returns the thread count in use."""
    if threads is not None:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def environment(module: str, argv: Sequence[str]) -> dict[str, Any]:
    """The exact command line (as ``python -m module ...``), versions, threads and hardware."""
    import fedmerge
    return {
        "command": shlex.join(["python", "-m", module, *argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fedmerge": getattr(fedmerge, "__version__", "unknown"),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def format_environment(env: Mapping[str, Any]) -> str:
    lines = [f"command: {env['command']}",
             f"torch {env['torch']}, python {env['python']}, fedmerge {env['fedmerge']}",
             f"threads: {env['threads']} (of {env['cpu_count']} logical CPUs), CPU: {env['cpu']}"]
    if env.get("cuda"):
        lines.append(f"GPU: {env['cuda']}")
    return "\n".join(lines)


def begin(module: str, parse, argv: Sequence[str] | None = None) -> tuple[Any, list[str], dict[str, Any]]:
    """The start of every benchmark's ``main``: ``(args, argv, environment)``.

    Parses ``argv`` (``sys.argv[1:]`` if None) with ``parse``, makes stdout UTF-8, sets the torch
    threads of ``args.threads`` and records the environment of the command.
    """
    import sys
    from .cli import ensure_stdout_utf8
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    ensure_stdout_utf8()
    set_threads(args.threads)
    return args, argv, environment(module, argv)
