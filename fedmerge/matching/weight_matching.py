"""Git Re-Basin weight matching: align one model to a target by coordinate descent over groups.

Specification: Ainsworth et al., "Git Re-Basin" (weight matching), as recalled in Section 2 of the
C²M³ paper (Eq. 1).  The bilinear objective ``sum_layers <W_target, P_l W_source P_{l-1}^T>`` is
maximised one permutation group at a time: holding the others fixed, the objective is linear in
that group, so its optimum is a linear assignment problem solved exactly with
``scipy.optimize.linear_sum_assignment``.  Groups are visited in a random (seedable) order and
sweeps repeat until a whole sweep improves nothing.  The result depends on that order — the
variance C²M³ removes.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..permutation import identity_permutation, permute_axis
from ..spec import PermutationSpec
from ._lap import solve_lap
from ._stack import matricize

__all__ = ["weight_matching"]


def _matched_keys(spec: PermutationSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, list]:
    """``{group: [(key, axis)]}`` restricted to floating-point entries (running counters are not weights)."""
    return {g: [(k, a) for k, a in places if torch.is_floating_point(tensors[k])]
            for g, places in spec.groups.items()}


def weight_matching(target: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor],
                    spec: PermutationSpec, *, init: Mapping[str, torch.Tensor] | None = None,
                    max_iter: int = 100, seed: int | None = 0) -> tuple[dict[str, torch.Tensor], int, bool]:
    """Find ``perm`` so that ``apply_permutation(source, spec, perm)`` is as close to ``target`` as possible.

    Returns ``(perm, sweeps, converged)``; ``converged`` is False when ``max_iter`` sweeps still
    improved the objective.  ``init`` warm-starts the search (MergeMany uses it).
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    device = next(iter(source.values())).device
    perm = {g: p.to(device).clone() for g, p in (init or identity_permutation(spec, device)).items()}
    places = _matched_keys(spec, source)
    groups = [g for g in spec.sizes if places[g]]
    rng = np.random.default_rng(seed)
    sweeps, converged = 0, False
    for sweeps in range(1, max_iter + 1):
        improved = False
        for g in rng.permutation(groups):
            d = spec.sizes[g]
            score = torch.zeros(d, d, dtype=torch.float64, device=device)
            for key, a in places[g]:
                src = source[key].float()
                for b, h in enumerate(spec.axes[key]):
                    if h is not None and b != a:
                        src = permute_axis(src, b, perm[h])
                ms, _ = matricize(src.unsqueeze(0), a, d)
                mt, _ = matricize(target[key].float().unsqueeze(0), a, d)
                score += (ms[0] @ mt[0].T).double()
            new = solve_lap(score)
            cols = torch.arange(d, device=device)
            old_value = score[perm[g], cols].sum().item()
            new_value = score[new, cols].sum().item()
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                perm[g] = new
                improved = True
        if not improved:
            converged = True
            break
    return perm, sweeps, converged

