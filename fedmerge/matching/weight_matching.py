"""Weight matching: align one model to a target by coordinate ascent over its symmetry groups.

Specification: Ainsworth et al., "Git Re-Basin" (weight matching), as recalled in Section 2 of the
C²M³ paper (Eq. 1).  The bilinear objective ``sum_layers <W_target, T(W_source)>`` is maximised
one group at a time: holding the others fixed, the objective is linear in that group's element,
so its optimum is the group's best response to a score matrix (:mod:`fedmerge.symmetry`): a
linear assignment problem solved exactly with ``scipy.optimize.linear_sum_assignment`` for a
permutation group, the same on absolute scores with the matched signs for a signed one, and the
orthogonal Procrustes solution ``U Vᵀ`` of an SVD for an orthogonal one.  Groups are visited in a
random (seedable) order and sweeps repeat until a whole sweep improves nothing.  The result
depends on that order — the variance C²M³ removes.

This is the two-model building block of the ``"git-rebasin"`` and ``"mergemany"`` aligners.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ..spec import SymmetrySpec
from ..transforms import identity_transform
from ._stack import matricize

__all__ = ["weight_matching"]

#: Relative improvement below which a group's new element is not taken: exact ties for the discrete
#: kinds, and the end of the (continuous) ascent for orthogonal groups.
_IMPROVEMENT = {"permutation": 1e-12, "signed-permutation": 1e-12, "orthogonal": 1e-13}


def _matched_keys(spec: SymmetrySpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, list]:
    """``{group: [(key, axis)]}`` restricted to floating-point entries (running counters are not weights)."""
    return {g: [(k, a) for k, a in places if torch.is_floating_point(tensors[k])]
            for g, places in spec.groups.items()}


def weight_matching(target: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor],
                    spec: SymmetrySpec, *, init: Mapping[str, Any] | None = None,
                    max_iter: int = 100, seed: int | None = 0) -> tuple[dict[str, Any], int, bool]:
    """Find ``t`` so that ``apply_transform(source, spec, t)`` is as close to ``target`` as possible.

    Returns ``(transform, sweeps, converged)``; ``converged`` is False when ``max_iter`` sweeps
    still improved the objective.  ``init`` warm-starts the search (MergeMany uses it).
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    device = next(iter(source.values())).device
    start = init if init is not None else identity_transform(spec, device)
    perm = {g: (e.to(device) if hasattr(e, "to") else e) for g, e in start.items()}
    places = _matched_keys(spec, source)
    groups = [g for g in spec.sizes if places[g]]
    rng = np.random.default_rng(seed)
    sweeps, converged = 0, False
    for sweeps in range(1, max_iter + 1):
        improved = False
        for g in rng.permutation(groups):
            d, kind = spec.sizes[g], spec.group(g)
            score = torch.zeros(d, d, dtype=torch.float64, device=device)
            for key, a in places[g]:
                src = source[key].float()
                for b, h in enumerate(spec.axes[key]):
                    if h is not None and b != a:
                        src = spec.group(h).act(src, b, perm[h])
                ms, _ = matricize(src.unsqueeze(0), a, d)
                mt, _ = matricize(target[key].float().unsqueeze(0), a, d)
                score += (ms[0] @ mt[0].T).double()
            new = kind.best_response(score)
            old_value, new_value = kind.score(score, perm[g]), kind.score(score, new)
            if new_value > old_value + _IMPROVEMENT[kind.kind] * max(1.0, abs(old_value)):
                perm[g] = new
                improved = True
        if not improved:
            converged = True
            break
    return perm, sweeps, converged
