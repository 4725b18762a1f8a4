"""MergeMany (Ainsworth et al.; Appendix A.3 / Algorithm 4 of the C²M³ paper), and Git Re-Basin to a reference.

MergeMany alternates matching and averaging: in random order, each model is weight-matched to
the mean of all the *other* models (already aligned), until a whole sweep changes no permutation.
The mean of the others is kept as a running sum, so a sweep costs O(n) matchings and O(n·|θ|)
memory.  Permutations are always taken from the *original* model to the common space (warm-started
from the previous sweep), so they never accumulate rounding.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from ..permutation import apply_permutation, identity_permutation
from ..spec import PermutationSpec
from .weight_matching import weight_matching

__all__ = ["merge_many_matching", "reference_matching"]


def _float_entries(sd: Mapping[str, torch.Tensor], spec: PermutationSpec) -> dict[str, torch.Tensor]:
    return {k: sd[k].float() for k in spec.permuted_keys if torch.is_floating_point(sd[k])}


def merge_many_matching(state_dicts: Sequence[Mapping[str, torch.Tensor]], spec: PermutationSpec, *,
                        max_iter: int = 100, inner_max_iter: int = 100, seed: int | None = 0,
                        init: Sequence[Mapping[str, torch.Tensor]] | None = None,
                        progress: bool = False) -> dict:
    """Match ``n >= 2`` models into a common space with MergeMany.

    ``max_iter`` caps the sweeps over all models, ``inner_max_iter`` each weight matching.
    ``init`` (one permutation per model) starts from a given alignment instead of the models as
    they are; every step still increases the C²M³ objective, so this polishes another matcher's
    result (C²M³'s ``refine`` option).  Returns the same fields as
    :func:`~fedmerge.matching.c2m3.frank_wolfe_matching`.
    """
    n = len(state_dicts)
    if n < 2:
        raise ValueError("MergeMany needs at least two models")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    rng = np.random.default_rng(seed)
    originals = [_float_entries(sd, spec) for sd in state_dicts]
    device = next(iter(originals[0].values())).device
    if init is None:
        perms = [identity_permutation(spec, device) for _ in range(n)]
        aligned = [dict(o) for o in originals]
    else:
        if len(init) != n:
            raise ValueError(f"init has {len(init)} permutations for {n} models")
        perms = [{g: p.to(device) for g, p in q.items()} for q in init]
        aligned = [apply_permutation(o, spec, q) for o, q in zip(originals, perms)]
    total = {k: torch.stack([a[k] for a in aligned]).sum(0) for k in originals[0]}
    history = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_iter, desc=f"MergeMany ({n} models)", unit="sweep")
    converged, message, sweeps = False, f"reached max_iter={max_iter}", 0
    for sweeps in range(1, max_iter + 1):
        changed = 0
        for i in rng.permutation(n):
            others = {k: (total[k] - aligned[i][k]) / (n - 1) for k in total}
            new, _, _ = weight_matching(others, originals[i], spec, init=perms[i],
                                        max_iter=inner_max_iter, seed=int(rng.integers(2**31)))
            if any(not torch.equal(new[g], perms[i][g]) for g in new):
                changed += 1
                perms[i] = new
                moved = apply_permutation(originals[i], spec, new)
                for k in total:
                    total[k] += moved[k] - aligned[i][k]
                aligned[i] = moved
        history.append(changed)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(changed=changed)
        if changed == 0:
            converged, message = True, "a whole sweep changed no permutation"
            break
    if bar is not None:
        bar.close()
    return {"perms": perms, "nit": sweeps, "converged": converged, "message": message, "history": history}


def reference_matching(state_dicts: Sequence[Mapping[str, torch.Tensor]], spec: PermutationSpec, *,
                       reference: int = 0, max_iter: int = 100, seed: int | None = 0,
                       progress: bool = False) -> dict:
    """Git Re-Basin for ``n`` models: weight-match every model to one reference model.

    The common space is the reference's own; pairwise maps between the other models go through
    it.  With ``n = 2`` this is exactly pairwise Git Re-Basin.
    """
    n = len(state_dicts)
    if n < 2:
        raise ValueError("Git Re-Basin needs at least two models")
    if not 0 <= reference < n:
        raise ValueError(f"reference={reference} is not a model index (0..{n - 1})")
    target = _float_entries(state_dicts[reference], spec)
    device = next(iter(target.values())).device
    perms, nit, converged = [], 0, True
    order = range(n)
    if progress:
        from tqdm.auto import tqdm
        order = tqdm(order, desc=f"Git Re-Basin ({n} models)", unit="model")
    for i in order:
        if i == reference:
            perms.append(identity_permutation(spec, device))
            continue
        p, sweeps, ok = weight_matching(target, _float_entries(state_dicts[i], spec), spec,
                                        max_iter=max_iter, seed=seed)
        perms.append(p)
        nit = max(nit, sweeps)
        converged &= ok
    message = "every weight matching converged" if converged else f"some matching reached max_iter={max_iter}"
    return {"perms": perms, "nit": nit, "converged": converged, "message": message, "history": []}

