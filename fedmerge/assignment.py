"""Linear assignment problems, solved with ``scipy.optimize.linear_sum_assignment``, or warm-started.

Frank-Wolfe solves one LAP per model and permutation group each iteration; they are independent,
so they run on a small thread pool (scipy and the warm-started kernel release the GIL while
solving).  A caller that solves the same block again and again passes that block's
:class:`~fedmerge.warm_lap.WarmStart`: the solve then starts from the last potentials and
assignment (:mod:`fedmerge.warm_lap`), with the same optimum; without Numba it is scipy's, cold.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from . import warm_lap
from .warm_lap import WarmStart

_POOL: ThreadPoolExecutor | None = None

#: Running totals for benchmarks: LAPs solved (``calls``) and wall seconds spent in the solver
#: functions (``seconds``, including the copy to NumPy); :func:`reset_stats` zeroes them.
STATS = {"calls": 0, "seconds": 0.0}


def reset_stats() -> dict:
    """Zero :data:`STATS` and return the totals it held."""
    old = dict(STATS)
    STATS.update(calls=0, seconds=0.0)
    return old


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


def _solve_warm(score: np.ndarray, warm: WarmStart | None) -> np.ndarray:
    if warm is None or not warm_lap.available():
        return _solve(np.asarray(score, dtype=np.float64))
    return warm_lap.solve(score, warm)


def solve_lap(score: torch.Tensor, warm: WarmStart | None = None) -> torch.Tensor:
    """The permutation ``perm`` maximising ``sum_i score[perm[i], i]``.

    ``score[k, i]`` rates sending model unit ``k`` to common-space unit ``i``; the result uses
    fedmerge's convention (``perm[i]`` = model unit that becomes unit ``i``).  ``warm``: the
    block's state from its last solve (updated in place), for a warm start.
    """
    start = time.perf_counter()
    perm = torch.from_numpy(_solve_warm(score.detach().cpu().numpy(), warm)).to(score.device)
    STATS["calls"] += 1
    STATS["seconds"] += time.perf_counter() - start
    return perm


def solve_lap_groups(scores: Mapping[str, torch.Tensor],
                     warm: Mapping[str, Sequence[WarmStart]] | None = None) -> dict[str, torch.Tensor]:
    """:func:`solve_lap` for every matrix of several batches ``{group: (m, d, d)}``, in parallel.

    Returns ``{group: (m, d)}``.  ``warm[group][i]``: the state of matrix ``i``'s block, for warm
    starts (updated in place).  All problems go to the pool together, largest first, so that
    the threads do not wait for one another at the end of each group (one Frank-Wolfe iteration
    solves one LAP per model and group, of as many sizes as there are groups).
    """
    start = time.perf_counter()
    # no float64 copy of whole batches: each matrix is converted in the thread that solves it
    arrays = {g: s.detach().cpu().numpy() for g, s in scores.items()}

    def solve(job):
        g, i = job
        return _solve_warm(arrays[g][i], None if warm is None else warm[g][i])
    jobs = sorted(((g, i) for g, a in arrays.items() for i in range(len(a))), key=lambda j: -arrays[j[0]].shape[1])
    if len(jobs) == 1:
        solved = [solve(jobs[0])]
    else:
        solved = list(_pool().map(solve, jobs))
    out = {g: np.empty((len(a), a.shape[1]), dtype=np.int64) for g, a in arrays.items()}
    for (g, i), perm in zip(jobs, solved):
        out[g][i] = perm
    STATS["calls"] += len(jobs)
    STATS["seconds"] += time.perf_counter() - start
    return {g: torch.from_numpy(o).to(scores[g].device) for g, o in out.items()}
