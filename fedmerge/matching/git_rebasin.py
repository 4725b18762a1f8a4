"""The ``"git-rebasin"`` aligner: Git Re-Basin weight matching of every model to one reference model.

Specification: Ainsworth et al., "Git Re-Basin"; for ``n`` models, the common space is the
reference's own and pairwise maps between the other models go through it (so they are cycle-
consistent by construction, with the reference's choice as the bias that C²M³ removes).  With
``n = 2`` this is exactly pairwise Git Re-Basin.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..progress import STOPPED, Callback, report
from ..spec import SymmetrySpec
from ..transforms import identity_transform
from .weight_matching import weight_matching

__all__ = ["git_rebasin_matching", "float_entries"]


def float_entries(sd: Mapping[str, torch.Tensor], spec: SymmetrySpec) -> dict[str, torch.Tensor]:
    """The floating-point entries some group acts on, in float32: what every aligner compares."""
    return {k: sd[k].float() for k in spec.permuted_keys if torch.is_floating_point(sd[k])}


def git_rebasin_matching(state_dicts: Sequence[Mapping[str, torch.Tensor]], spec: SymmetrySpec, *,
                         reference: int = 0, max_iter: int = 100, seed: int | None = 0,
                         callback: Callback | None = None) -> dict:
    """Weight-match every model to model ``reference`` (``max_iter`` sweeps each, group order from ``seed``).

    ``callback`` is called after each model (phase ``"model"``).
    """
    n = len(state_dicts)
    if n < 2:
        raise ValueError("Git Re-Basin needs at least two models")
    if not isinstance(reference, int) or not 0 <= reference < n:
        raise ValueError(f"reference={reference} is not a model index (0..{n - 1})")
    target = float_entries(state_dicts[reference], spec)
    device = next(iter(target.values())).device
    perms, nit, converged = [], 0, True
    message = None
    for i in range(n):
        if i == reference:
            perms.append(identity_transform(spec, device))
        else:
            p, sweeps, ok = weight_matching(target, float_entries(state_dicts[i], spec), spec,
                                            max_iter=max_iter, seed=seed)
            perms.append(p)
            nit = max(nit, sweeps)
            converged &= ok
        if report(callback, method="git-rebasin", phase="model", nit=i + 1, max_iter=n) and i + 1 < n:
            perms += [identity_transform(spec, device) for _ in range(i + 1, n)]
            converged, message = False, STOPPED
            break
    if message is None:
        message = "every weight matching converged" if converged else f"some matching reached max_iter={max_iter}"
    return {"transforms": perms, "nit": nit, "converged": converged, "message": message, "history": []}
