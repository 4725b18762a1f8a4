"""The public entry points: :func:`match` (align) and :func:`merge` (align, then average, then repair).

Both are pure functions over lists of state_dicts plus a :class:`~fedmerge.spec.SymmetrySpec`;
``model`` (a template ``nn.Module``) derives the spec, runs the repair stage's forward passes and
is handed to an aligner that takes a ``model`` argument (activation-based alignment).  Every input is validated
before any work, and errors name the model index and the key.

Merging is a pipeline of three stages, each a registered name or a callable, in the manner of
``scipy.optimize.minimize(method=...)``:

``align(state_dicts, spec, *, callback=None, **align_options)``
    returns a :class:`MatchResult` (or a mapping with ``"transforms"``: one ``{group: element}``
    per model into a common space; ``nit``, ``converged``, ``message``, ``history`` optional).
    Registered: :data:`ALIGNERS`.
``average(aligned_state_dicts, weights, **average_options)``
    returns one state_dict; ``weights`` are normalised to sum to one.  Registered: :data:`AVERAGERS`.
``repair(merged, aligned_state_dicts, weights, *, spec, model, **repair_options)``
    returns the repaired state_dict.  Registered: :data:`REPAIRERS`.
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from .averaging import weighted_average
from .diagnostics import MATCH_CYCLE_TRIPLES, cycle_error, matching_objective
from .matching import MatchResult, c2m3_matching, git_rebasin_matching, mergemany_matching
from .matching.orthogonal import orthogonal_matching
from .regmean import regmean_average
from .spherical import spherical_average, spherical_projection_average
from .progress import Callback, ProgressBar, chain
from .repair import repair as repair_stage, reset as reset_stage
from .spec import SymmetrySpec
from .transforms import apply_transform, check_transform, identity_transform
from .validation import check_like, check_state_dicts, normalize_weights

__all__ = ["ALIGNERS", "AVERAGERS", "METHODS", "REPAIRERS", "match", "merge"]

StateDict = Mapping[str, torch.Tensor]


def identity_matching(state_dicts: Sequence[StateDict], spec: SymmetrySpec, *,
                      callback: Callback | None = None) -> dict:
    """The ``"identity"`` aligner: every model as it is."""
    device = next(iter(state_dicts[0].values())).device
    return {"transforms": [identity_transform(spec, device) for _ in state_dicts], "nit": 0, "converged": True,
            "message": "no alignment", "history": []}


def mean_average(state_dicts: Sequence[StateDict], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The ``"mean"`` averager: the weighted arithmetic mean (FedAvg's aggregation)."""
    return weighted_average(state_dicts, weights, check=False)


#: Aligners by name (``align=`` of :func:`merge`, ``method=`` of :func:`match`).
ALIGNERS: dict[str, Callable[..., Any]] = {
    "identity": identity_matching,
    "git-rebasin": git_rebasin_matching,
    "mergemany": mergemany_matching,
    "c2m3": c2m3_matching,
    "orthogonal": orthogonal_matching,
}

#: Averagers by name (``average=`` of :func:`merge`).
AVERAGERS: dict[str, Callable[..., Any]] = {"mean": mean_average, "spherical": spherical_average,
                                             "spherical-projection": spherical_projection_average,
                                             "regmean": regmean_average}

#: Repair stages by name (``repair=`` of :func:`merge`; :mod:`fedmerge.repair`).  Both need
#: ``model=`` and calibration ``inputs`` (``repair_options={"inputs": ...}``, or ``repair=<inputs>``).
REPAIRERS: dict[str, Callable[..., Any]] = {"repair": repair_stage, "reset": reset_stage}

#: The names :func:`match` accepts (``None`` in :func:`merge` = plain mean, no alignment).
METHODS = tuple(ALIGNERS)


def _resolve_spec(spec: SymmetrySpec | None, model: torch.nn.Module | None) -> SymmetrySpec:
    if spec is not None:
        if not isinstance(spec, SymmetrySpec):
            raise TypeError(f"spec must be a SymmetrySpec (PermutationSpec), got {type(spec).__name__}")
        return spec
    if model is None:
        raise ValueError("pass spec=SymmetrySpec(...) or model=<template nn.Module> to derive it from")
    from .tracing import spec_for
    return spec_for(model)


def _stage(value: str | Callable | None, registry: Mapping[str, Callable], what: str) -> tuple[str, Callable]:
    """``(name, function)`` of a stage given by registered name or as a callable."""
    if callable(value):
        return getattr(value, "__name__", type(value).__name__), value
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a name or a callable, got {type(value).__name__}")
    name = value.lower().replace("_", "-")
    if name not in registry:
        known = ", ".join(registry) or "none is registered; pass a callable"
        raise ValueError(f"unknown {what} {value!r}; choose one of {known}")
    return name, registry[name]


def _on_one_device(state_dicts: Sequence[StateDict]) -> list[dict[str, torch.Tensor]]:
    """Move every model to the first model's device, so mixed-device input never crashes."""
    device = next(iter(state_dicts[0].values())).device
    return [{k: v.to(device) for k, v in sd.items()} for sd in state_dicts]


def _options(options: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"{name} must be a dict of options, got {type(options).__name__}")
    return dict(options)


def match(state_dicts: Sequence[StateDict], spec: SymmetrySpec | None = None,
          method: str | Callable = "c2m3", *, model: torch.nn.Module | None = None, progress: bool = False,
          callback: Callback | None = None, **options) -> MatchResult:
    """Find, for every model, the transform that maps it into a common space.

    Parameters
    ----------
    state_dicts:
        Models of one architecture (``model.state_dict()`` values, on any device).
    spec:
        Their symmetry; derived from ``model`` when omitted.
    method:
        A name from :data:`ALIGNERS` or a callable ``method(state_dicts, spec, *, callback,
        **options)`` (see the module docstring).  Names: ``"c2m3"`` (default; cycle-consistent:
        permuted copies certified by a sequential match, otherwise Frank-Wolfe's rounding or that
        match, whichever scores higher once refined to a fixed point; options ``max_iter=200``,
        ``tol`` and ``patience`` (Frank-Wolfe's stopping rule; by default the authors' where
        the rounding is the result, looser where it only starts the refinement), ``factorize``,
        ``init="auto"``, ``refine=True``, ``paper=False`` (``True``: the paper's algorithm alone),
        ``seed``), ``"mergemany"`` (``max_iter=100`` sweeps, ``inner_max_iter``,
        ``seed``), ``"git-rebasin"`` (every model to ``reference=0``; ``max_iter``, ``seed``),
        ``"orthogonal"`` (generalised Procrustes; ``relax``, ``project``, ``inputs``, ``model``,
        ``solver``, :mod:`fedmerge.matching.orthogonal`) or ``"identity"``.
    progress:
        Show a tqdm bar per phase (:class:`fedmerge.progress.ProgressBar`).
    callback:
        ``callback(intermediate_result)`` after every iteration; return ``True`` (or raise
        ``StopIteration``) to stop early (:mod:`fedmerge.progress`).

    Returns
    -------
    MatchResult
        ``transforms`` (alias ``perms``) plus ``objective``, ``nit``, ``converged``,
        ``cycle_error``, ``seconds``, ...
    """
    name, aligner = _stage("identity" if method is None else method, ALIGNERS, "method")
    spec = _resolve_spec(spec, model)
    check_state_dicts(state_dicts, spec)
    return _align(_on_one_device(state_dicts), spec, name, aligner, user=callable(method), model=model,
                  callback=callback,
                  progress=progress, options=options)


def _takes_model(stage: Callable) -> bool:
    """Whether an aligner or averager has a ``model`` parameter (activation-based ones run the template)."""
    try:
        return "model" in inspect.signature(stage).parameters
    except (TypeError, ValueError):
        return False


def _align(state_dicts: list[dict[str, torch.Tensor]], spec: SymmetrySpec, name: str, aligner: Callable, *,
           model: torch.nn.Module | None = None,
           user: bool, callback: Callback | None, progress: bool, options: Mapping[str, Any]) -> MatchResult:
    """The alignment stage on validated models, all on one device (what :func:`match` returns)."""
    n = len(state_dicts)
    bar = ProgressBar() if progress else None
    start = time.perf_counter()
    try:
        if n == 1 and aligner is not identity_matching and not user:
            # one model is its own common space; a matcher's options stay valid (a federated
            # round may well leave a single client)
            out = identity_matching(state_dicts, spec)
            out["message"] = "a single model: nothing to align"
        else:
            if model is not None and "model" not in options and _takes_model(aligner):
                options = {**options, "model": model}  # the template of merge/match, for activation passes
            out = aligner(state_dicts, spec, callback=chain(callback, bar), **options)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    out = _checked_alignment(out, name, spec, n)
    if "objective" not in out:
        out["objective"] = matching_objective(state_dicts, spec, out["transforms"]) if n > 1 else 0.0
    result = MatchResult(method=name, n_models=n, seconds=seconds, success=out["converged"], **out)
    result.perms = result.transforms
    result.cycle_error = cycle_error(result.pairwise, n, max_triples=MATCH_CYCLE_TRIPLES)
    return result


def _checked_alignment(out: Any, name: str, spec: SymmetrySpec, n: int) -> dict:
    """An aligner's return value as a dict with every field, or a ``ValueError`` naming the aligner."""
    if not isinstance(out, Mapping):
        raise ValueError(f"aligner {name!r} returned a {type(out).__name__}, not a MatchResult or mapping")
    out = dict(out)
    if "transforms" not in out and "perms" in out:
        out["transforms"] = out.pop("perms")
    transforms = out.get("transforms")
    if not isinstance(transforms, Sequence) or len(transforms) != n:
        got = len(transforms) if isinstance(transforms, Sequence) else type(transforms).__name__
        raise ValueError(f"aligner {name!r} must return 'transforms', one per model ({n}); got {got}")
    for i, t in enumerate(transforms):
        check_transform(spec, t, name=f"aligner {name!r}, model {i}")
    out.setdefault("nit", 0)
    out.setdefault("converged", True)
    out.setdefault("message", "")
    out.setdefault("history", [])
    for key in ("method", "n_models", "seconds", "success", "cycle_error", "perms"):
        out.pop(key, None)  # recomputed by match()
    return out


def merge(state_dicts: Sequence[StateDict], *, align: str | Callable | None = "c2m3",
          average: str | Callable = "mean", repair: str | Callable | None = None,
          weights: Sequence[float] | torch.Tensor | None = None, spec: SymmetrySpec | None = None,
          model: torch.nn.Module | None = None, align_options: Mapping[str, Any] | None = None,
          average_options: Mapping[str, Any] | None = None, repair_options: Mapping[str, Any] | None = None,
          callback: Callback | None = None, progress: bool = False, full_output: bool = False, **options):
    """Merge models into one: align them in a common space, average them there, optionally repair.

    Parameters
    ----------
    align:
        ``None`` (no alignment: the plain mean, FedAvg's aggregation), a name from
        :data:`ALIGNERS` (``"c2m3"``, ``"mergemany"``, ``"git-rebasin"``, ``"orthogonal"``, ``"identity"``) or a
        callable (see :func:`match`).
    average:
        ``"mean"`` (the weighted mean), ``"spherical"`` (SLERP / weighted Karcher mean, norms restored;
        :func:`fedmerge.spherical.spherical_average`; ``"spherical-projection"``: the same direction with
        the models' mean length along it), ``"regmean"`` (least squares on every model's
        layer inputs, :func:`fedmerge.regmean.regmean_average`; options ``inputs``, ``model_inputs``
        or ``grams``, ``alpha``, ``ridge``) or a callable ``average(aligned, weights, **average_options)``
        (given ``model=`` too when it has a ``model`` parameter).
    repair:
        ``None``; calibration inputs (a tensor or an iterable of batches such as a ``DataLoader``:
        REPAIR on them, the same as ``repair="repair", repair_options={"inputs": ...}``); a name from
        :data:`REPAIRERS` (``"repair"``: REPAIR, options ``inputs``, ``target``, ``passes``,
        ``modules``, ``reset``, ``eps`` of :func:`fedmerge.repair.repair`; ``"reset"``: RESET of
        BatchNorm statistics); or a callable ``repair(merged, aligned, weights, *, spec, model,
        **repair_options)`` run on the averaged state_dict.
    weights:
        Per-model weights (e.g. client sample counts), normalised to sum to one; uniform if None.
    spec, model:
        The symmetry spec, or a template module to derive it from (not needed for ``align=None``);
        ``model`` also runs REPAIR's forward passes and goes to an aligner that takes one
        (``align="orthogonal"`` with ``align_options={"inputs": x}``).
    align_options, average_options, repair_options:
        Options of each stage, passed to that stage only.  Keyword ``**options`` are shorthand for
        ``align_options`` (``merge(sds, max_iter=50)``); give one or the other.
    callback, progress:
        Progress of the alignment, as in :func:`match`.
    full_output:
        Also return the :class:`MatchResult` (objective, nit, cycle_error, seconds, and
        ``average``, ``repair``, ``stage_seconds``).

    Returns
    -------
    dict[str, Tensor] or (dict[str, Tensor], MatchResult)
        The merged state_dict, in the common space, with the first model's dtypes and device.
    """
    if align is not None:
        align_name, aligner = _stage(align, ALIGNERS, "method")
        spec = _resolve_spec(spec, model)
    check_state_dicts(state_dicts, spec if align is not None else None)  # once, for every stage
    w = normalize_weights(weights, len(state_dicts))
    if options and align_options:
        raise TypeError("give the aligner's options either as align_options= or as keyword arguments, not both")
    align_options = _options(align_options, "align_options") or options
    average_options = _options(average_options, "average_options")
    repair_options = _options(repair_options, "repair_options")
    average_name, averager = _stage(average, AVERAGERS, "average")
    if repair is not None and not callable(repair) and not isinstance(repair, str):
        if "inputs" in repair_options:
            raise TypeError("calibration inputs given twice: as repair= and as repair_options['inputs']")
        repair, repair_options = "repair", {**repair_options, "inputs": repair}
    repair_name, repairer = (None, None) if repair is None else _stage(repair, REPAIRERS, "repair")
    if repair is None and repair_options:
        raise TypeError(f"repair_options given without a repair stage: {sorted(repair_options)}")
    stage_seconds = {}

    start = time.perf_counter()
    if align is None:
        if align_options:
            raise TypeError(f"unexpected options for align=None: {sorted(align_options)}")
        result = MatchResult(method="identity", n_models=len(state_dicts), transforms=[], perms=[], nit=0,
                             converged=True,
                             success=True, message="no alignment", history=[], objective=float("nan"),
                             cycle_error=0.0, seconds=0.0)
        aligned = list(state_dicts)
    else:
        state_dicts = _on_one_device(state_dicts)
        result = _align(state_dicts, spec, align_name, aligner, user=callable(align), model=model, callback=callback,
                        progress=progress, options=align_options)
        aligned = [apply_transform(sd, spec, t, check=False) for sd, t in zip(state_dicts, result.transforms)]
    stage_seconds["align"] = time.perf_counter() - start

    start = time.perf_counter()
    if model is not None and "model" not in average_options and _takes_model(averager):
        average_options = {**average_options, "model": model}  # e.g. RegMean's forward passes
    merged = averager(aligned, w, **average_options)
    check_like(merged, aligned[0], name=f"the result of average={average_name!r}", reference_name="the models")
    stage_seconds["average"] = time.perf_counter() - start

    if repairer is not None:
        start = time.perf_counter()
        merged = repairer(merged, aligned, w, spec=spec, model=model, **repair_options)
        check_like(merged, aligned[0], name=f"the result of repair={repair_name!r}", reference_name="the models")
        stage_seconds["repair"] = time.perf_counter() - start
    result.average, result.repair, result.stage_seconds = average_name, repair_name, stage_seconds
    if align is None:
        result.seconds = stage_seconds["average"]
    return (merged, result) if full_output else merged
