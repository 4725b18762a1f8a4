"""The public entry points: :func:`match` (find the permutations) and :func:`merge` (align, then average).

Both are pure functions over lists of state_dicts plus a :class:`~fedmerge.spec.PermutationSpec`;
``model`` (a template ``nn.Module``) is only ever used to derive the spec.  Every input is
validated before any work, and errors name the model index and the key.
"""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import torch

from .averaging import weighted_average
from .diagnostics import cycle_error, matching_objective
from .matching import MatchResult, frank_wolfe_matching, merge_many_matching, reference_matching
from .permutation import apply_permutation, identity_permutation
from .spec import PermutationSpec
from .validation import check_state_dicts, normalize_weights

__all__ = ["match", "merge", "METHODS"]

#: Alignment methods accepted by :func:`match` and :func:`merge` (``None`` in ``merge`` = plain mean).
METHODS = ("identity", "git-rebasin", "mergemany", "c2m3")

_MATCHERS = {
    "git-rebasin": reference_matching,
    "mergemany": merge_many_matching,
    "c2m3": frank_wolfe_matching,
}


def _resolve_spec(spec: PermutationSpec | None, model: torch.nn.Module | None) -> PermutationSpec:
    if spec is not None:
        if not isinstance(spec, PermutationSpec):
            raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
        return spec
    if model is None:
        raise ValueError("pass spec=PermutationSpec(...) or model=<template nn.Module> to derive it from")
    from .tracing import spec_for
    return spec_for(model)


def _method(method: str | None) -> str:
    name = "identity" if method is None else str(method).lower().replace("_", "-")
    if name not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return name


def _on_one_device(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Move every model to the first model's device, so mixed-device input never crashes."""
    device = next(iter(state_dicts[0].values())).device
    return [{k: v.to(device) for k, v in sd.items()} for sd in state_dicts]


def match(state_dicts: Sequence[Mapping[str, torch.Tensor]], spec: PermutationSpec | None = None,
          method: str = "c2m3", *, model: torch.nn.Module | None = None, progress: bool = False,
          **options) -> MatchResult:
    """Find, for every model, the permutation that maps it into a common space.

    Parameters
    ----------
    state_dicts:
        Models of one architecture (``model.state_dict()`` values, on any device).
    spec:
        Their symmetry; derived from ``model`` when omitted.
    method:
        ``"c2m3"`` (default; cycle-consistent Frank-Wolfe, options ``max_iter=200``, ``tol=1e-6``,
        ``patience=5``, ``factorize``), ``"mergemany"`` (``max_iter=100`` sweeps,
        ``inner_max_iter``, ``seed``), ``"git-rebasin"`` (every model to ``reference=0``;
        ``max_iter``, ``seed``) or ``"identity"``.
    progress:
        Show a tqdm bar over iterations.

    Returns
    -------
    MatchResult
        ``perms`` plus ``objective``, ``nit``, ``converged``, ``cycle_error``, ``seconds``, ...
    """
    name = _method(method)
    spec = _resolve_spec(spec, model)
    check_state_dicts(state_dicts, spec)
    state_dicts = _on_one_device(state_dicts)
    n = len(state_dicts)
    device = next(iter(state_dicts[0].values())).device
    start = time.perf_counter()
    if name == "identity" or n == 1:
        # one model is its own common space; a matcher's options stay valid (a federated round
        # may well leave a single client), options given to "identity" are a mistake
        if name == "identity" and options:
            raise TypeError(f"unexpected options for method 'identity': {sorted(options)}")
        out = {"perms": [identity_permutation(spec, device) for _ in range(n)], "nit": 0,
               "converged": True, "message": "a single model: nothing to align" if n == 1 else "no alignment",
               "history": []}
    else:
        out = _MATCHERS[name](state_dicts, spec, progress=progress, **options)
    seconds = time.perf_counter() - start
    if "objective" not in out:
        out["objective"] = matching_objective(state_dicts, spec, out["perms"]) if n > 1 else 0.0
    result = MatchResult(method=name, n_models=n, seconds=seconds, success=out["converged"], **out)
    result.cycle_error = cycle_error(result.pairwise, n)
    return result


def merge(state_dicts: Sequence[Mapping[str, torch.Tensor]], *, align: str | None = "c2m3",
          weights: Sequence[float] | torch.Tensor | None = None, spec: PermutationSpec | None = None,
          model: torch.nn.Module | None = None, full_output: bool = False, **options):
    """Merge models into one: align them in a common space, then take the weighted mean there.

    Parameters
    ----------
    align:
        ``None`` (plain mean, FedAvg's aggregation), ``"git-rebasin"``, ``"mergemany"`` or
        ``"c2m3"``; further ``options`` go to :func:`match`.
    weights:
        Per-model weights (e.g. client sample counts), normalised to sum to one; uniform if None.
    spec, model:
        The symmetry spec, or a template module to derive it from (not needed for ``align=None``).
    full_output:
        Also return the :class:`MatchResult` (diagnostics: objective, nit, cycle_error, seconds).

    Returns
    -------
    dict[str, Tensor] or (dict[str, Tensor], MatchResult)
        The merged state_dict, in the common space, with the first model's dtypes and device.
    """
    check_state_dicts(state_dicts)
    w = normalize_weights(weights, len(state_dicts))
    if align is None:
        if options:
            raise TypeError(f"unexpected options for align=None: {sorted(options)}")
        start = time.perf_counter()
        merged = weighted_average(state_dicts, w, check=False)
        result = MatchResult(method="identity", n_models=len(state_dicts), perms=[], nit=0, converged=True,
                             success=True, message="no alignment", history=[], objective=float("nan"),
                             cycle_error=0.0, seconds=time.perf_counter() - start)
    else:
        spec = _resolve_spec(spec, model)
        result = match(state_dicts, spec, align, **options)
        state_dicts = _on_one_device(state_dicts)
        aligned = [apply_permutation(sd, spec, p) for sd, p in zip(state_dicts, result.perms)]
        merged = weighted_average(aligned, w, check=False)
    return (merged, result) if full_output else merged
