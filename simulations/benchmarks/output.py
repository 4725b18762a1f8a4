"""What the benchmarks write: markdown tables, strict JSON (atomically), the closing notes."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = ["atomic_write", "finish", "markdown_table", "write_json"]


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through a temporary file and rename, so an interrupted run never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str | tuple[str, str]]) -> str:
    """A GitHub markdown table of ``rows`` (dicts); ``columns`` are keys or ``(key, header)`` pairs.

    Strings are shown as they are (format numbers before, for control); floats get 4 significant
    digits, ``None``/NaN a dash, booleans yes/no, missing keys a dash.  Columns are padded so the
    source reads as a table too.
    """
    cols = [(c, c) if isinstance(c, str) else (c[0], c[1]) for c in columns]
    header = [h for _, h in cols]
    body = [[_cell(row.get(k)) for k, _ in cols] for row in rows]
    widths = [max(len(str(h)), *(len(r[j]) for r in body)) if body else len(str(h))
              for j, h in enumerate(header)]
    lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in body]
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None  # strict JSON has no NaN/Infinity
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if hasattr(obj, "item"):  # numpy scalars
        return _jsonable(obj.item())
    return str(obj)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON (NaN/inf become null), atomically; returns the path."""
    path = Path(path).expanduser()

    def dump(f) -> None:
        json.dump(_jsonable(obj), f, indent=2, ensure_ascii=False, allow_nan=False)
        f.write("\n")

    atomic_write(path, dump, "w")
    return path


def finish(result: dict, notes: Sequence[str], out: str | os.PathLike | None) -> dict:
    """Print the notes, write ``result`` to ``out`` (if given) and return it: the end of every benchmark."""
    if notes:
        print()
        for note in notes:
            print(f"Note: {note}")
    if out:
        print(f"\nwrote {write_json(out, result)}")
    return result
