"""Shared helpers of the benchmark scripts: trained/random models, tables, JSON, environment.

* :func:`trained_mlps` trains the C²M³ paper's MLP (784-256-512-512-256-10) on MNIST from
  different seeds and caches every model on disk, so the benchmarks only pay for training once.
* :func:`random_models` gives seeded random initialisations of any model.
* :func:`markdown_table`, :func:`write_json` and :func:`environment` format the results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = [
    "METHOD_VARIANTS", "add_common_arguments", "finish", "PAPER_WIDTHS", "method_call", "bench_cache_dir", "cpu_model", "ensure_stdout_utf8", "environment", "format_environment",
    "int_at_least", "markdown_table", "mlp_cache_path", "mlp_name", "parse_choice_list", "parse_int_list",
    "positive_float", "positive_int", "random_models", "set_threads", "torch_device", "trained_mlps", "warmup",
    "write_json",
]

#: Benchmark method names that are fedmerge methods with extra options.
METHOD_VARIANTS: dict[str, tuple[str, dict]] = {"c2m3+refine": ("c2m3", {"refine": True})}


def method_call(method: str) -> tuple[str, dict]:
    """``"c2m3+refine"`` -> ``("c2m3", {"refine": True})``; a plain method name maps to itself."""
    return METHOD_VARIANTS.get(method, (method, {}))


#: Hidden widths of the paper's MNIST MLP (784-256-512-512-256-10).
PAPER_WIDTHS: tuple[int, ...] = (256, 512, 512, 256)

StateDict = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- models

def bench_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir or $FEDMERGE_CACHE or ~/.cache/fedmerge>/bench``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser() / "bench"
    from fedmerge.data import cache_dir as fedmerge_cache_dir
    return fedmerge_cache_dir() / "bench"


def mlp_name(widths: Sequence[int] = PAPER_WIDTHS, input_size: int = 784, num_classes: int = 10) -> str:
    """``mlp-784-256-512-512-256-10`` for the paper's MLP."""
    return "mlp-" + "-".join(str(int(d)) for d in (input_size, *widths, num_classes))


def mlp_cache_path(seed: int, *, epochs: int, widths: Sequence[int] = PAPER_WIDTHS,
                   train_size: int | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`trained_mlps` keeps model ``seed``.

    ``.../bench/mlp-784-256-512-512-256-10-e{epochs}-seed{seed}.pt`` for the paper's setting; a
    training subset adds ``-n{train_size}`` before the seed.
    """
    subset = "" if train_size is None else f"-n{int(train_size)}"
    return bench_cache_dir(cache_dir) / f"{mlp_name(widths)}-e{int(epochs)}{subset}-seed{int(seed)}.pt"


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
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


def _atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def trained_mlps(count: int, *, epochs: int = 3, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True, widths: Sequence[int] = PAPER_WIDTHS, train_size: int | None = None,
                 batch_size: int = 128, lr: float = 0.05, momentum: float = 0.9,
                 device: str | torch.device | None = None) -> list[StateDict]:
    """``count`` MLPs trained on MNIST, model ``i`` from seed ``i``; state_dicts on the CPU.

    Each model is built after ``torch.manual_seed(i)`` (so the initialisations differ) and
    trained with SGD (``lr`` 0.05, momentum 0.9, batch 128) for ``epochs`` epochs on the full
    MNIST training set (or its first ``train_size`` images), shuffled with seed ``i``.  Models
    are cached at :func:`mlp_cache_path` (written atomically) and reused from there; a model
    trained here has its test accuracy printed.  ``device``: ``None`` = CUDA if available.
    """
    from fedmerge.data import load_dataset
    from fedmerge.models import MLP
    from fedmerge.training import evaluate, train

    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    widths = tuple(int(w) for w in widths)
    paths = [mlp_cache_path(i, epochs=epochs, widths=widths, train_size=train_size, cache_dir=cache_dir)
             for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    models: dict[int, StateDict] = {}
    for i, p in enumerate(paths):
        if i not in missing:
            try:
                models[i] = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - name the file, whatever went wrong
                raise RuntimeError(f"cannot read cached model {p} ({exc}); delete it to retrain") from exc

    if missing:
        from tqdm.auto import tqdm
        train_set = load_dataset("mnist", train=True)
        test_set = load_dataset("mnist", train=False)
        x, y = train_set.images, train_set.labels
        if train_size is not None:
            x, y = x[:train_size], y[:train_size]
        bar = tqdm(missing, desc=f"training {mlp_name(widths)} ({epochs} epochs)", unit="model",
                   disable=not progress)
        for i in bar:
            torch.manual_seed(i)
            model = MLP(train_set.input_shape, train_set.num_classes, widths=widths)
            train(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, seed=i,
                  device=device, progress=progress)
            stats = evaluate(model, test_set.images, test_set.labels, device=device)
            sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            _atomic_torch_save(sd, paths[i])
            models[i] = sd
            message = (f"trained {mlp_name(widths)} seed {i}: test accuracy {stats['accuracy']:.2%}, "
                       f"loss {stats['loss']:.4f} -> {paths[i]}")
            if progress:
                tqdm.write(message)
            else:
                print(message, flush=True)
    return [models[i] for i in range(count)]


def random_models(make: Callable[[], torch.nn.Module], count: int, *, seed: int = 0) -> list[StateDict]:
    """State_dicts of ``count`` fresh models, model ``i`` built after ``torch.manual_seed(seed + i)``."""
    out = []
    for i in range(count):
        torch.manual_seed(seed + i)
        model = make()
        out.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    return out


def warmup(methods: Sequence[str], device: str | torch.device = "cpu") -> None:
    """Run every matcher once on three tiny models, so one-time import/setup cost is never timed.

    ``methods`` may hold fedmerge's method names plus ``"pairwise"`` (pairwise Git Re-Basin) and
    ``"mean"`` (nothing to warm up).
    """
    import fedmerge
    from fedmerge.models import MLP

    def make() -> torch.nn.Module:
        return MLP((1, 4, 4), 3, widths=(4, 4))

    sds = [{k: v.to(device) for k, v in sd.items()} for sd in random_models(make, 3, seed=10_000)]
    spec = make().permutation_spec()
    for method in methods:
        if method == "pairwise":
            fedmerge.pairwise_cycle_error(sds, spec, max_iter=2)
        elif method not in ("mean", "identity"):
            name, extra = method_call(method)
            fedmerge.merge(sds, align=name, spec=spec, max_iter=2, **extra)


# --------------------------------------------------------------------------- output

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


def finish(result: dict, notes: Sequence[str], out: str | os.PathLike | None) -> dict:
    """Print the notes, write ``result`` to ``out`` (if given) and return it: the end of every benchmark."""
    if notes:
        print()
        for note in notes:
            print(f"Note: {note}")
    if out:
        print(f"\nwrote {write_json(out, result)}")
    return result


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON (NaN/inf become null), atomically; returns the path."""
    path = Path(path).expanduser()

    def dump(f) -> None:
        json.dump(_jsonable(obj), f, indent=2, ensure_ascii=False, allow_nan=False)
        f.write("\n")

    _atomic_write(path, dump, "w")
    return path


# --------------------------------------------------------------------------- environment / CLI

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
