"""Linear assignment problems, solved with ``scipy.optimize.linear_sum_assignment``.

Frank-Wolfe solves one LAP per model and permutation group each iteration; they are independent,
so they run on a small thread pool (scipy releases the GIL while solving, measured ≈1.5× on two
cores).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)),
                                   thread_name_prefix="fedmerge-lap")
    return _POOL


def _solve(score: np.ndarray) -> np.ndarray:
    try:
        rows, cols = linear_sum_assignment(score, maximize=True)
    except ValueError as err:  # scipy rejects NaN/Inf entries
        raise FloatingPointError(f"assignment scores are not finite ({err}); are the weights finite?") from None
    perm = np.empty(score.shape[1], dtype=np.int64)
    perm[cols] = rows
    return perm


def solve_lap(score: torch.Tensor) -> torch.Tensor:
    """The permutation ``perm`` maximising ``sum_i score[perm[i], i]``.

    ``score[k, i]`` rates sending model unit ``k`` to common-space unit ``i``; the result uses
    fedmerge's convention (``perm[i]`` = model unit that becomes unit ``i``).
    """
    return torch.from_numpy(_solve(score.detach().double().cpu().numpy())).to(score.device)


def solve_laps(scores: torch.Tensor) -> torch.Tensor:
    """:func:`solve_lap` for a batch ``(m, d, d)``, in parallel; returns ``(m, d)``."""
    arrays = scores.detach().double().cpu().numpy()
    if len(arrays) == 1:
        perms = [_solve(arrays[0])]
    else:
        perms = list(_pool().map(_solve, arrays))
    return torch.from_numpy(np.stack(perms)).to(scores.device)
