"""Warm-started linear assignment: a shortest-augmenting-path solver that reuses the last solution.

Frank-Wolfe and block-coordinate refinement solve the same (model, group) assignment problem again
and again on a cost matrix that changed a little since the last visit.  Solving each from scratch
(``scipy.optimize.linear_sum_assignment``) repeats all ``d`` augmentations every time.  This solver
is the same algorithm — successive shortest augmenting paths with dual potentials (Jonker and
Volgenant; the variant of Crouse, "On implementing 2D rectangular assignment algorithms", IEEE TAES
2016, that scipy implements) — started from the previous visit's column potentials ``v`` and
assignment instead of from zero:

* the row potentials are set to ``u_i = min_j (c_ij - v_j)``, which makes every reduced cost
  ``c_ij - u_i - v_j`` non-negative (dual feasibility holds for *any* ``v``);
* a previous pair ``(i, j)`` whose reduced cost is still zero stays matched (complementary
  slackness holds for it);
* only the rows left without a pair are augmented, each by one Dijkstra search on reduced costs.

The result is an optimal assignment of the *current* matrix (the usual optimality certificate of
the primal-dual pair), whatever the start; the start only decides how many rows need a search.  On
the matrices of a matching run most previous pairs stay tight, so a warm solve does a fraction of
a cold one's work.  Ties between optimal assignments may be broken differently from scipy's.

The kernel is compiled with Numba (a dependency of fedmerge); where Numba cannot be imported the
callers fall back to scipy's solver, cold, with the same results up to ties.
"""

from __future__ import annotations

import numpy as np

__all__ = ["WarmStart", "available", "solve"]


def _kernel(score, v, prev, out):
    """Maximise ``sum_i score[row[i], i]``; ``v`` (column potentials, updated in place), ``prev``.

    ``prev[j]`` is the row matched to column ``j`` at the last solve (``-1``: none).  Writes the
    row matched to each column into ``out`` and returns the number of rows augmented (``-1`` if a
    score is not finite).  Costs are ``-score`` (minimisation).
    """
    n = score.shape[0]
    inf = np.inf
    u = np.empty(n)
    col4row = np.full(n, -1, np.int64)
    row4col = np.full(n, -1, np.int64)
    for i in range(n):
        m = inf
        for j in range(n):
            c = -score[i, j]
            if not np.isfinite(c):
                return -1
            r = c - v[j]
            if r < m:
                m = r
        u[i] = m
    for j in range(n):
        i = prev[j]
        if i >= 0 and col4row[i] == -1 and -score[i, j] - v[j] <= u[i]:
            col4row[i] = j
            row4col[j] = i
    path = np.empty(n, np.int64)
    spc = np.empty(n)
    remaining = np.empty(n, np.int64)
    sr = np.zeros(n, np.bool_)
    sc = np.zeros(n, np.bool_)
    augmented = 0
    for cur in range(n):
        if col4row[cur] != -1:
            continue
        augmented += 1
        # Dijkstra from row `cur` on reduced costs, to the nearest free column
        for j in range(n):
            spc[j] = inf
            sr[j] = False
            sc[j] = False
            remaining[j] = n - 1 - j
        num_remaining = n
        min_val = 0.0
        i = cur
        sink = -1
        while sink == -1:
            index = -1
            lowest = inf
            sr[i] = True
            ui = u[i]
            for it in range(num_remaining):
                j = remaining[it]
                r = min_val - score[i, j] - ui - v[j]
                if r < spc[j]:
                    path[j] = i
                    spc[j] = r
                if spc[j] < lowest or (spc[j] == lowest and row4col[j] == -1):
                    lowest = spc[j]
                    index = it
            min_val = lowest
            j = remaining[index]
            if row4col[j] == -1:
                sink = j
            else:
                i = row4col[j]
            sc[j] = True
            num_remaining -= 1
            remaining[index] = remaining[num_remaining]
        # potentials: keep reduced costs non-negative and the new path tight
        u[cur] += min_val
        for r_ in range(n):
            if sr[r_] and r_ != cur:
                u[r_] += min_val - spc[col4row[r_]]
        for j in range(n):
            if sc[j]:
                v[j] -= min_val - spc[j]
        # augment along the path
        j = sink
        while True:
            i = path[j]
            row4col[j] = i
            k = col4row[i]
            col4row[i] = j
            j = k
            if i == cur:
                break
    for j in range(n):
        out[j] = row4col[j]
    return augmented


_COMPILED: list = []  # [kernel or None], filled on first use: importing fedmerge does not import Numba


def _compiled():
    if not _COMPILED:
        try:
            from numba import njit
            _COMPILED.append(njit(cache=True, nogil=True)(_kernel))
        except Exception:  # noqa: BLE001 - Numba missing or broken on this platform: the callers use scipy
            _COMPILED.append(None)
    return _COMPILED[0]


def available() -> bool:
    """Whether the compiled kernel can be used (Numba imports); otherwise callers solve cold with scipy."""
    return _compiled() is not None


class WarmStart:
    """The potentials and assignment one (model, group) block carries from one solve to the next."""

    __slots__ = ("v", "perm", "solves", "augmented")

    def __init__(self, d: int):
        self.v = np.zeros(d)
        self.perm = np.full(d, -1, np.int64)
        self.solves = 0
        self.augmented = 0


def solve(score: np.ndarray, state: WarmStart) -> np.ndarray:
    """The permutation ``perm`` maximising ``sum_i score[perm[i], i]``, warm-started from ``state``.

    ``score`` is a square float32 or float64 array; ``state`` is updated in place with the new
    potentials and assignment.  Raises ``FloatingPointError`` on a non-finite score.
    """
    d = score.shape[0]
    if score.shape != (d, d) or state.v.shape != (d,):
        raise ValueError(f"warm-started LAP needs a square score matching its state ({state.v.shape[0]}), "
                         f"got {tuple(score.shape)}")
    kernel = _compiled()
    if kernel is None:
        raise RuntimeError("the warm-started LAP needs Numba (pip install numba); "
                           "fedmerge.assignment falls back to scipy without it")
    out = np.empty(d, np.int64)
    augmented = kernel(np.ascontiguousarray(score), state.v, state.perm, out)
    if augmented < 0:
        state.v[:] = 0.0
        state.perm[:] = -1
        raise FloatingPointError("assignment scores are not finite; are the weights finite?")
    state.perm = out
    state.solves += 1
    state.augmented += augmented
    return out
