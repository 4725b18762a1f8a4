"""The models the benchmarks match and merge: the C²M³ paper's MLP trained on MNIST (cached on disk) and
seeded random initialisations, plus the benchmark names of fedmerge's methods.

* :func:`trained_mlps` trains the paper's MLP (784-256-512-512-256-10) on MNIST from different
  seeds and caches every model on disk, so the benchmarks only pay for training once.
* :func:`random_models` gives seeded random initialisations of any model.
* :func:`method_call` maps a benchmark method name to a ``fedmerge.merge`` call, :func:`warmup`
  runs each once so that one-time set-up cost is never timed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fedmerge.matching.c2m3 import PAPER_STOP
from simulations.benchmarks.output import atomic_write

__all__ = ["METHOD_VARIANTS", "PAPER_WIDTHS", "bench_cache_dir", "method_call", "mlp_cache_path", "mlp_name",
           "random_models", "trained_mlps", "warmup"]

#: Benchmark method names that are fedmerge methods with extra options.  ``c2m3+refine`` runs Frank-Wolfe to the
#: paper's stopping rule (or ``--max-iter``) before refining, not to the default's earlier one.
METHOD_VARIANTS: dict[str, tuple[str, dict]] = {
    "c2m3+refine": ("c2m3", {"refine": True, **PAPER_STOP})}


def method_call(method: str) -> tuple[str, dict]:
    """``"c2m3+refine"`` -> ``("c2m3", {"refine": True, ...})``; a plain method name maps to itself."""
    return METHOD_VARIANTS.get(method, (method, {}))


#: Hidden widths of the paper's MNIST MLP (784-256-512-512-256-10).
PAPER_WIDTHS: tuple[int, ...] = (256, 512, 512, 256)


StateDict = dict[str, torch.Tensor]


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


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


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
