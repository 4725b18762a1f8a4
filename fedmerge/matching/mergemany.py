"""The ``"mergemany"`` aligner: MergeMany (Ainsworth et al.; Appendix A.3 / Algorithm 4 of the C²M³ paper).

MergeMany alternates matching and averaging: in random order, each model is weight-matched to
the mean of all the *other* models (already aligned), until a whole sweep changes no transform.
The mean of the others is kept as a running sum, so a sweep costs O(n) matchings and O(n·|θ|)
memory.  Transforms are always taken from the *original* model to the common space (warm-started
from the previous sweep), so they never accumulate rounding.  It serves every kind of group
through :func:`~fedmerge.matching.weight_matching.weight_matching`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..progress import STOPPED, Callback, report
from ..spec import SymmetrySpec
from ..symmetry import group_of_element
from ..transforms import apply_transform, identity_transform
from .git_rebasin import float_entries
from .weight_matching import weight_matching

__all__ = ["mergemany_matching"]


def _same(a: Any, b: Any) -> bool:
    return group_of_element(a).equal(a, b)


def mergemany_matching(state_dicts: Sequence[Mapping[str, torch.Tensor]], spec: SymmetrySpec, *,
                       max_iter: int = 100, inner_max_iter: int = 100, seed: int | None = 0,
                       init: Sequence[Mapping[str, Any]] | None = None,
                       callback: Callback | None = None) -> dict:
    """Match ``n >= 2`` models into a common space with MergeMany.

    ``max_iter`` caps the sweeps over all models, ``inner_max_iter`` each weight matching.
    ``init`` (one transform per model) starts from a given alignment instead of the models as
    they are; every step still increases the C²M³ objective, so this polishes another aligner's
    result (C²M³'s ``refine`` option).  ``callback`` is called after each sweep (phase
    ``"sweep"``, with ``changed``, the number of models whose transform changed).
    """
    n = len(state_dicts)
    if n < 2:
        raise ValueError("MergeMany needs at least two models")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    rng = np.random.default_rng(seed)
    originals = [float_entries(sd, spec) for sd in state_dicts]
    device = next(iter(originals[0].values())).device
    if init is None:
        perms = [identity_transform(spec, device) for _ in range(n)]
        aligned = [dict(o) for o in originals]
    else:
        if len(init) != n:
            raise ValueError(f"init has {len(init)} transforms for {n} models")
        perms = [{g: e.to(device) for g, e in q.items()} for q in init]
        aligned = [apply_transform(o, spec, q, check=False) for o, q in zip(originals, perms)]
    total = {k: torch.stack([a[k] for a in aligned]).sum(0) for k in originals[0]}
    history = []
    converged, message, sweeps = False, f"reached max_iter={max_iter}", 0
    for sweeps in range(1, max_iter + 1):
        changed = 0
        for i in rng.permutation(n):
            others = {k: (total[k] - aligned[i][k]) / (n - 1) for k in total}
            new, _, _ = weight_matching(others, originals[i], spec, init=perms[i],
                                        max_iter=inner_max_iter, seed=int(rng.integers(2**31)))
            if any(not _same(new[g], perms[i][g]) for g in new):
                changed += 1
                perms[i] = new
                moved = apply_transform(originals[i], spec, new, check=False)
                for k in total:
                    total[k] += moved[k] - aligned[i][k]
                aligned[i] = moved
        history.append(changed)
        if changed == 0:
            converged, message = True, "a whole sweep changed no transform"
            report(callback, method="mergemany", phase="sweep", nit=sweeps, max_iter=max_iter, changed=changed)
            break
        if report(callback, method="mergemany", phase="sweep", nit=sweeps, max_iter=max_iter, changed=changed):
            message = STOPPED
            break
    return {"transforms": perms, "nit": sweeps, "converged": converged, "message": message, "history": history}
