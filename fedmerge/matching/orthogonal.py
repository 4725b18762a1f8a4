"""The ``"orthogonal"`` aligner: n models into one common space by (generalised) orthogonal Procrustes.

Specification: the orthogonal re-basin papers (``orthogonal-rebasin-mnist-mlp``,
``orthogonal-rebasin-resnet20-cifar10``): per group of hidden units an orthogonal ``Q`` maximising
the agreement of two models, in closed form by an SVD (``Q = U Vᵀ`` for the score ``S = U Σ Vᵀ``,
:meth:`fedmerge.symmetry.Orthogonal.best_response`), the producing layer's weights rotated and the
consuming layer's counter-rotated.  Extended here to ``n`` models without a reference
(generalised Procrustes): every model's map is re-solved against the mean of the *other* models
in the common space, as MergeMany does, until the objective ``sum_{p<q} <U_p, U_q>`` (Eq. 4 of
C²M³) stops improving.  Every map goes from a model *into* the common space, so pairwise maps
``T_i T_j⁻¹`` are cycle-consistent by construction.

Two ways to score a group:

* **weights** (default, data-free): the score of a group is ``sum <W_source, W_target>`` over
  every tensor it acts on, the other groups held at their current maps; groups are first solved
  once in forward order using only the layers that produce them (whose inputs are already
  aligned: Procrustes propagated layer to layer, exact for a hidden rotation of full-rank
  layers), then improved by coordinate ascent (every step a best response, so the objective
  never decreases; with several coupled groups the result is a stationary point).
* **activations** (``inputs=`` calibration data and ``model=``): per group, the outputs ``X`` of
  the layers that produce its units (forward hooks on ``torch.func.functional_call``), and
  ``Q = argmax <X_source Q, X_target>`` (``min ||X_source Q - X_target||_F``).  Groups do not
  interact, so this is exact per group.  ``standardize=True`` centres every unit's outputs and
  scales them to unit variance first, so the score is the units' cross-correlation (the
  activation matching of Git Re-Basin and REPAIR) rather than their raw cross-products, which
  units of large scale dominate.

What is exact, and what is not
------------------------------
A group's map is a symmetry of the network only if it is an element of the group's **kind** in
the spec (:mod:`fedmerge.symmetry`; :func:`fedmerge.spec_from_module` infers it).  By default
(``relax=False``) the aligner returns exactly that: orthogonal groups (units with only linear
maps between producer and consumers) get Procrustes rotations, permutation and signed-permutation
groups get their own best response (a LAP), so every aligned model computes the function of the
original.  ``relax=True`` searches every group over all rotations ``O(d)`` — a relaxation on
ReLU units, whose nonlinearity does not commute with a rotation — and then projects the map of
each group that is not declared orthogonal to the nearest element of its kind (a LAP on the
rotation), so what is returned is again exact.  ``project="permutation"`` projects the maps of
orthogonal groups to the nearest permutation as well.  To *keep* rotations on ReLU units (the
"orthogonal" rows of the papers; the aligned models then no longer compute their own functions,
and :func:`fedmerge.alignment_metrics.relu_residual` measures by how much) declare them
orthogonal: ``spec=relaxed_spec(spec)``.

BatchNorm normalises every channel by its own statistics, so no rotation other than a
(signed) permutation commutes with it; its running variance would not even stay positive.
Rotating a group that carries BatchNorm statistics is refused: project it to a permutation
(``relax=True`` does) or fold the BatchNorm into the producing layer first
(:mod:`fedmerge.batchnorm`: ``fold_batchnorm(model)`` gives the BatchNorm-free template, its spec
and ``fold``/``unfold`` of state_dicts; ``fedmerge.batchnorm.merge`` folds, merges, unfolds).
Folding removes the statistics, not the ReLU: on a ReLU network a rotation is still a relaxation.
LayerNorm over the units commutes with ``Q`` only if ``Q`` fixes the constant vector
(centring) and the affine scale is uniform; the tracer lowers such groups to permutations, and
``relax=True`` projects them back to permutations, which are exact.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..activations import calibration_batches, run_with_hooks
from ..progress import STOPPED, Callback, report
from ..spec import SymmetrySpec
from ..symmetry import KINDS
from ..transforms import apply_transform, identity_transform
from ._stack import matricize
from .git_rebasin import float_entries

__all__ = ["orthogonal_matching", "relaxed_spec", "group_features"]

SOLVERS = ("svd", "stiefel")
INITS = ("propagate", "permutation")
_BN_STATS = ("running_mean", "running_var")


def relaxed_spec(spec: SymmetrySpec, groups: Iterable[str] | None = None) -> SymmetrySpec:
    """``spec`` with ``groups`` (all by default) declared orthogonal.

    A relaxation wherever the spec said otherwise (ReLU units): a rotation of those units no longer
    leaves the network's function unchanged, and :func:`fedmerge.check_spec` rejects the result.
    Use it to merge with the rotations themselves, as the orthogonal re-basin papers do.
    """
    names = list(spec.sizes) if groups is None else list(groups)
    unknown = sorted(set(names) - set(spec.sizes))
    if unknown:
        raise ValueError(f"relaxed_spec: the spec has no groups {unknown}")
    return spec.with_kinds({g: "orthogonal" for g in names})


# --------------------------------------------------------------------------- scores and best responses
def _score(target: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], spec: SymmetrySpec,
           g: str, places: Sequence[tuple[str, int]], transform: Mapping[str, Any]) -> torch.Tensor:
    """``S[k, i] = <unit k of source, unit i of target>`` over ``places``, other groups at ``transform``."""
    d = spec.sizes[g]
    device = next(iter(source.values())).device
    score = torch.zeros(d, d, dtype=torch.float64, device=device)
    for key, a in places:
        src = source[key]
        for b, h in enumerate(spec.axes[key]):
            if h is not None and b != a and h in transform:
                src = spec.group(h).act(src, b, transform[h])
        ms, _ = matricize(src.unsqueeze(0), a, d)
        mt, _ = matricize(target[key].unsqueeze(0), a, d)
        score += (ms[0].double() @ mt[0].double().T)
    return score


def _stiefel_response(score: torch.Tensor, start: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor:
    """``argmax <score, Q>`` over the Stiefel manifold ``St(d, d) = O(d)`` by pymanopt, from ``start``.

    Riemannian conjugate gradients stay on the connected component of ``start`` (rotations of
    ``det start``), so unlike the SVD this cannot reach a reflection from the identity.
    """
    try:
        import pymanopt
        from pymanopt.manifolds import Stiefel
        from pymanopt.optimizers import ConjugateGradient
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("solver='stiefel' needs pymanopt: pip install 'fedmerge[manifold]'") from err
    s = score.double().cpu().numpy()
    scale = max(float(np.abs(s).max()), 1e-300)
    s = s / scale
    d = s.shape[0]
    manifold = Stiefel(d, d)

    @pymanopt.function.numpy(manifold)
    def cost(q):
        return -float(np.sum(s * q))

    @pymanopt.function.numpy(manifold)
    def euclidean_gradient(q):
        return -s

    problem = pymanopt.Problem(manifold, cost, euclidean_gradient=euclidean_gradient)
    optimizer = ConjugateGradient(verbosity=0, log_verbosity=0,
                                  max_iterations=int(options.get("max_iterations", 100)),
                                  min_gradient_norm=float(options.get("min_gradient_norm", 1e-6)))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # pymanopt's conjugate-gradient beta divides by a zero gradient change once converged
        warnings.simplefilter("ignore", RuntimeWarning)
        point = optimizer.run(problem, initial_point=start.double().cpu().numpy()).point
    if not np.isfinite(point).all():
        return start  # no step: coordinate ascent keeps the current map
    q, r = np.linalg.qr(point)  # back onto O(d) exactly (the retraction drifts by rounding)
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0).reshape(1, -1)
    return torch.as_tensor(q, dtype=torch.float32, device=score.device)


class _Responder:
    """The best response of each group under the search kinds, by SVD or on the Stiefel manifold."""

    def __init__(self, search: SymmetrySpec, solver: str, stiefel_options: Mapping[str, Any]):
        self.search, self.solver, self.options = search, solver, dict(stiefel_options)

    def __call__(self, g: str, score: torch.Tensor, current: Any) -> Any:
        kind = self.search.group(g)
        if kind.kind == "orthogonal" and self.solver == "stiefel":
            return _stiefel_response(score, current, self.options)
        return kind.best_response(score)


def _improves(kind: str, new: float, old: float) -> bool:
    # exact ties for the discrete kinds; the end of the (continuous) ascent for rotations
    return new > old + (1e-12 if kind != "orthogonal" else 1e-13) * max(1.0, abs(old))


# --------------------------------------------------------------------------- weight-based alignment
def _end_sweep(history: list[float], value: float, callback: Callback | None, nit: int, max_iter: int, tol: float,
               what: str) -> tuple[bool, bool, str | None]:
    """Record a sweep's objective and report it: ``(stop, converged, message)``.

    Stops when the callback asks to (not converged) or when the sweep gained less than ``tol``
    (relative) over the previous one.
    """
    history.append(value)
    if report(callback, method="orthogonal", phase="sweep", nit=nit, max_iter=max_iter, objective=value):
        return True, False, STOPPED
    if value - history[-2] <= tol * max(1.0, abs(value)):
        return True, True, f"{what}: a sweep improved the objective by less than tol"
    return False, False, None


def _forward_order(spec: SymmetrySpec) -> list[str]:
    """Groups in the order their producing layers (axis 0 of a weight) appear in the state_dict."""
    order: list[str] = []
    for key, ax in spec.axes.items():
        if ax and ax[0] is not None and ax[0] not in order:
            order.append(ax[0])
    return order + [g for g in spec.sizes if g not in order]


def _propagate(target, source, search: SymmetrySpec, places, respond: _Responder, device) -> dict[str, Any]:
    """One pass in forward order, each group from the layers producing it with their inputs already solved."""
    t = identity_transform(search, device)
    solved: set[str] = set()
    for g in _forward_order(search):
        if not places[g]:
            continue
        producing = [(k, a) for k, a in places[g]
                     if a == 0 and all(h is None or h == g or h in solved
                                       for b, h in enumerate(search.axes[k]) if b != a)]
        use = producing or places[g]
        t[g] = respond(g, _score(target, source, search, g, use, t), t[g])
        solved.add(g)
    return t


def _ascend(target, source, search: SymmetrySpec, places, respond: _Responder, transform, *,
            max_iter: int, tol: float, rng: np.random.Generator) -> tuple[dict[str, Any], int]:
    """Coordinate ascent over the groups (random order per sweep) of ``<target, T(source)>``.

    Each step is a group's best response with the others fixed, whose score gain is exactly the
    objective's gain; sweeps end when one gains less than ``tol`` relative to the objective (the
    continuous ascent over rotations otherwise creeps on by rounding-sized steps).
    """
    t = dict(transform)
    groups = [g for g in search.sizes if places[g]]
    moved = apply_transform(source, search, t, check=False)
    value = sum(float((moved[k].double() * target[k].double()).sum()) for k in target)
    sweeps = 0
    for sweeps in range(1, max_iter + 1):
        gain = 0.0
        for g in rng.permutation(groups):
            kind = search.group(g)
            score = _score(target, source, search, g, places[g], t)
            new = respond(g, score, t[g])
            old_value, new_value = kind.score(score, t[g]), kind.score(score, new)
            if _improves(kind.kind, new_value, old_value):
                t[g] = new
                gain += new_value - old_value
        value += gain
        if gain <= tol * max(1.0, abs(value)):
            break
    return t, sweeps


# --------------------------------------------------------------------------- activation-based alignment
def _producers(model: nn.Module, spec: SymmetrySpec) -> dict[str, list[str]]:
    """``{group: [module names]}``: the Linear/Conv layers whose output units are the group's."""
    out: dict[str, list[str]] = {g: [] for g in spec.sizes}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            ax = spec.axes.get(f"{name}.weight")
            if ax and ax[0] is not None:
                out[ax[0]].append(name)
    return out


def group_features(model: nn.Module, state_dicts: Sequence[Mapping[str, torch.Tensor]], spec: SymmetrySpec,
                   inputs: Any, *, batch_size: int = 256) -> Iterable[dict[str, torch.Tensor]]:
    """Per batch of ``inputs``, ``{group: (n, rows, d)}``: every model's outputs of the layers producing a group.

    The outputs of a group's producing Linear/Conv layers (before any norm or activation), one row
    per sample and position, rows of several producers (a residual stream) stacked.  The model runs
    in eval mode through ``torch.func.functional_call`` with each state_dict; nothing is trained.
    """
    producers = _producers(model, spec)
    names = {n for ns in producers.values() for n in ns}
    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = {name: (lambda name: lambda mod, args, output: captured.__setitem__(name, output.detach()))(name)
             for name in names}
    for x in calibration_batches(inputs, batch_size=batch_size):
        per_model: list[dict[str, torch.Tensor]] = []
        for sd in state_dicts:
            captured.clear()
            run_with_hooks(model, sd, [x], hooks)
            feats = {}
            for g, ns in producers.items():
                rows = []
                for n in ns:
                    out = captured[n]
                    out = out.movedim(1, -1) if isinstance(modules[n], nn.modules.conv._ConvNd) else out
                    rows.append(out.reshape(-1, out.shape[-1]))
                if rows:
                    feats[g] = torch.cat(rows)
            per_model.append(feats)
        yield {g: torch.stack([f[g] for f in per_model]) for g in per_model[0]}


def _activation_alignment(state_dicts, spec: SymmetrySpec, search: SymmetrySpec, respond: _Responder, *,
                          model: nn.Module, inputs: Any, batch_size: int, max_iter: int, tol: float,
                          rng: np.random.Generator, callback: Callback | None, standardize: bool = False):
    """Generalised Procrustes on activations: per group, ``C_ij = X_iᵀ X_j`` and sweeps over the models.

    ``standardize``: ``C_ij`` of the centred, unit-variance outputs (the cross-correlations), from
    the same pass (sums and sums of squares pooled over the batches).
    """
    n = len(state_dicts)
    cross: dict[str, torch.Tensor] = {}
    sums: dict[str, list] = {}
    for feats in group_features(model, state_dicts, spec, inputs, batch_size=batch_size):
        for g, x in feats.items():
            x = x.double()
            c = torch.einsum("irk,jrl->ijkl", x, x)
            cross[g] = cross[g] + c if g in cross else c
            if standardize:
                acc = sums.setdefault(g, [0, 0.0])
                acc[0] += x.shape[1]
                acc[1] = acc[1] + x.sum(1)
    missing = [g for g in spec.sizes if g not in cross]
    if missing:
        raise ValueError(f"inputs=: no Linear/Conv module of the model produces groups {missing}; "
                         "activation-based alignment needs the layers that produce every group")
    if standardize:
        for g, (rows, total) in sums.items():
            mean = total / rows  # (n, d)
            cov = cross[g] / rows - torch.einsum("ik,jl->ijkl", mean, mean)
            std = torch.stack([cov[i, i].diagonal() for i in range(n)]).clamp_min(0).sqrt()  # (n, d)
            std = torch.where(std > 1e-12 * max(1.0, float(std.max())), std, torch.ones_like(std))  # dead units
            cross[g] = cov / torch.einsum("ik,jl->ijkl", std, std)
    device = next(iter(state_dicts[0].values())).device
    transforms = [identity_transform(search, device) for _ in range(n)]
    mats = {g: [torch.eye(d, dtype=torch.float64, device=device) for _ in range(n)] for g, d in spec.sizes.items()}
    for g in spec.sizes:  # start: every model against model 0
        for i in range(1, n):
            transforms[i][g] = respond(g, cross[g][i, 0], transforms[i][g])
            mats[g][i] = search.group(g).matrix(transforms[i][g]).double()

    def objective() -> float:
        return float(sum(((torch.stack(mats[g])[:, None].transpose(-1, -2) @ cross[g]
                           @ torch.stack(mats[g])[None]).diagonal(dim1=-2, dim2=-1).sum(-1).triu(1).sum())
                         for g in spec.sizes))

    history = [objective()]
    converged, message, sweeps = False, f"reached max_iter={max_iter}", 0
    for sweeps in range(1, max_iter + 1):
        for i in rng.permutation(n):
            for g in spec.sizes:
                kind = search.group(g)
                score = sum(cross[g][i, j] @ mats[g][j] for j in range(n) if j != i)
                new = respond(g, score, transforms[i][g])
                if _improves(kind.kind, kind.score(score, new), kind.score(score, transforms[i][g])):
                    transforms[i][g] = new
                    mats[g][i] = kind.matrix(new).double()
        stop, done, why = _end_sweep(history, objective(), callback, sweeps, max_iter, tol, "activation Procrustes")
        if stop:
            converged, message = done, why
            break
    return transforms, sweeps, converged, message, history


# --------------------------------------------------------------------------- the aligner
def orthogonal_matching(state_dicts: Sequence[Mapping[str, torch.Tensor]], spec: SymmetrySpec, *,
                        relax: bool = False, project: str | None = None, inputs: Any = None,
                        model: nn.Module | None = None, solver: str = "svd", init: str | None = None,
                        max_iter: int = 100,
                        inner_max_iter: int = 20, tol: float = 1e-6, seed: int | None = 0,
                        batch_size: int = 256, stiefel_options: Mapping[str, Any] | None = None,
                        standardize: bool = False, callback: Callback | None = None) -> dict:
    """Align ``n >= 2`` models into a common space by generalised orthogonal Procrustes.

    Parameters
    ----------
    relax:
        Search permutation and signed-permutation groups over all rotations too, then project each
        of their maps to the nearest element of its kind (a LAP on the rotation); ``False``: every
        group is solved within its own kind (see the module docstring for what is exact).
    project:
        ``"permutation"``: also project the maps of orthogonal groups to the nearest permutation
        (returned as permutation matrices, elements of the orthogonal group).
    inputs, model:
        Calibration inputs (a tensor, or an iterable of batches or ``(inputs, targets)`` pairs) and
        the template module they run through: activation-based Procrustes instead of weights.
    solver:
        ``"svd"`` (closed form) or ``"stiefel"``: the same per-group problem by Riemannian conjugate
        gradients on the Stiefel manifold (pymanopt; ``stiefel_options`` ``max_iterations=100``,
        ``min_gradient_norm=1e-6`` on the score scaled to a largest entry of 1), warm-started from
        the current map.  Much slower than the SVD, and it stays on the connected component of its
        start (no reflections from the identity).
    standardize:
        With ``inputs``: score the units by the cross-correlation of their outputs (each unit
        centred and scaled to unit variance; a unit constant on the inputs is only centred)
        instead of the raw cross-products ``X_sourceᵀ X_target``.
    init:
        How the weight-based search starts, every model against model 0: ``"propagate"`` (default
        without ``relax``): Procrustes layer by layer in forward order, then coordinate ascent;
        ``"permutation"`` (default with ``relax``): the permutation matching (LAPs, the same
        propagation and ascent), which the rotations then improve, so the relaxed objective is never
        below the permutation one.  Propagation is exact for a hidden rotation only where a layer's
        fan-in is at least its width (otherwise its Procrustes score is rank-deficient).
    max_iter, inner_max_iter, tol, seed:
        Sweeps over the models (each model re-solved against the mean of the others), coordinate
        ascent sweeps per model (weights), relative objective improvement that ends the sweeps, and
        the seed of the visiting orders.

    Returns
    -------
    dict
        ``transforms`` (one ``{group: element}`` per model into the common space, each element of
        its group's kind in ``spec``), ``nit``, ``converged``, ``message``, ``history`` (objective
        after each sweep), ``objective`` and, with ``relax`` or ``project``, ``rotations``: the maps
        before projection (orthogonal matrices, for :mod:`fedmerge.alignment_metrics`).
    """
    n = len(state_dicts)
    if n < 2:
        raise ValueError("orthogonal alignment needs at least two models")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if project not in (None, "permutation"):
        raise ValueError(f"project={project!r}: expected None or 'permutation'")
    if not isinstance(relax, bool):
        raise ValueError(f"relax must be True or False, got {relax!r}")
    for name, value in (("max_iter", max_iter), ("inner_max_iter", inner_max_iter), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if inputs is not None and model is None:
        raise ValueError("inputs= (activation-based Procrustes) needs model=, the module the inputs run through "
                         "(merge/match pass theirs: merge(sds, model=m, align='orthogonal', "
                         "align_options={'inputs': x}))")
    if inputs is not None and not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if stiefel_options is not None and solver != "stiefel":
        raise ValueError("stiefel_options= is only used with solver='stiefel'")
    if not isinstance(standardize, bool):
        raise ValueError(f"standardize must be True or False, got {standardize!r}")
    if standardize and inputs is None:
        raise ValueError("standardize=True scores activations: it needs inputs= (and model=)")

    if init is None:
        init = "permutation" if relax and inputs is None else "propagate"
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if init == "permutation" and inputs is not None:
        raise ValueError("init='permutation' is for the weight-based alignment; inputs= starts from Procrustes")
    search = relaxed_spec(spec) if relax else spec
    rotated = {g for g, k in search.kinds.items() if k == "orthogonal"}
    if project is None:
        for g in sorted(rotated):
            if spec.kinds[g] == "orthogonal":
                bn = [k for k, _ in spec.groups[g] if k.rsplit(".", 1)[-1] in _BN_STATS]
                if bn:
                    raise ValueError(
                        f"group {g!r} is declared orthogonal but carries BatchNorm statistics ({bn[0]!r}): a "
                        "rotation of BatchNorm channels is not a symmetry (each channel is normalised by its own "
                        "statistics). Pass project='permutation', or fold the BatchNorm into the producing layer "
                        "first: fedmerge.batchnorm.fold_batchnorm(model), or fedmerge.batchnorm.merge(...)")
    respond = _Responder(search, solver, stiefel_options or {})
    rng = np.random.default_rng(seed)
    device = next(iter(state_dicts[0].values())).device

    if inputs is not None:
        transforms, nit, converged, message, history = _activation_alignment(
            state_dicts, spec, search, respond, model=model, inputs=inputs, batch_size=batch_size,
            max_iter=max_iter, tol=tol, rng=rng, callback=callback, standardize=standardize)
    else:
        originals = [float_entries(sd, spec) for sd in state_dicts]
        places = {g: [(k, a) for k, a in ps if k in originals[0]] for g, ps in spec.groups.items()}
        if init == "permutation":  # permutations are rotations: start from the permutation matching
            start_spec = spec.with_kinds({g: "permutation" for g in spec.sizes})
            start_respond = _Responder(start_spec, "svd", {})
        else:
            start_spec, start_respond = search, respond
        transforms = [identity_transform(search, device)]
        for i in range(1, n):  # start: every model propagated layer by layer onto model 0, then ascent
            t = _propagate(originals[0], originals[i], start_spec, places, start_respond, device)
            t, _ = _ascend(originals[0], originals[i], start_spec, places, start_respond, t,
                           max_iter=inner_max_iter, tol=tol, rng=rng)
            if start_spec is not search:
                t = {g: search.group(g).from_permutation(e).to(device) for g, e in t.items()}
            transforms.append(t)
        aligned = [apply_transform(o, search, t, check=False) for o, t in zip(originals, transforms)]
        total = {k: torch.stack([a[k].double() for a in aligned]).sum(0) for k in originals[0]}
        squares = sum(float(v.double().pow(2).sum()) for o in originals for v in o.values())

        def objective() -> float:
            return (sum(float(v.pow(2).sum()) for v in total.values()) - squares) / 2

        history = [objective()]
        converged, message, nit = False, f"reached max_iter={max_iter}", 0
        for nit in range(1, max_iter + 1):
            for i in rng.permutation(n):
                others = {k: (total[k] - aligned[i][k].double()) / (n - 1) for k in total}
                new, _ = _ascend(others, originals[i], search, places, respond, transforms[i],
                                 max_iter=inner_max_iter, tol=tol, rng=rng)
                moved = apply_transform(originals[i], search, new, check=False)
                for k in total:
                    total[k] += moved[k].double() - aligned[i][k].double()
                transforms[i], aligned[i] = new, moved
            stop, done, why = _end_sweep(history, objective(), callback, nit, max_iter, tol, "generalised Procrustes")
            if stop:
                converged, message = done, why
                break

    out = {"nit": nit, "converged": converged, "message": message, "history": history}
    projected = relax or project is not None
    if projected:
        out["rotations"] = [dict(t) for t in transforms]
        transforms = [_project(t, spec, search, project) for t in transforms]
        out["message"] = message + "; maps projected to " + (
            "permutations" if project else "the kinds of the spec")
    elif inputs is None:
        out["objective"] = history[-1]  # Eq. 4 on the weights; fedmerge.match computes it otherwise
    out["transforms"] = transforms
    return out


def _project(transform: Mapping[str, Any], spec: SymmetrySpec, search: SymmetrySpec, project: str | None):
    """Each searched rotation as an element of the spec's kind (nearest by a LAP), or of permutations."""
    out = {}
    for g, e in transform.items():
        kind = spec.group(g)
        if search.kinds[g] != "orthogonal":
            out[g] = e  # searched within its own kind already
        elif kind.kind != "orthogonal":
            out[g] = kind.best_response(e.to(torch.float64))
        elif project == "permutation":
            out[g] = kind.from_permutation(KINDS["permutation"].best_response(e.to(torch.float64))).to(e.device)
        else:
            out[g] = e
    return out
