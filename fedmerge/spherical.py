"""Spherical averaging: SLERP of two models and the weighted Karcher mean of n on the hypersphere.

Specification: ``spherical-barycenter-multi-model-merging`` (SLERP, Shoemake 1985; the spherical
barycenter of n models and its order independence).  A tensor ``x`` is split into its norm
``||x||`` and its direction ``x / ||x||`` on the unit sphere.  Directions are averaged on the
sphere — SLERP for two, for n the weighted Karcher (Fréchet) mean
``argmin_{p ∈ S^{D-1}} sum_i w_i dist(p, u_i)²`` with ``dist`` the geodesic (angular) distance,
found by the fixed-point iteration ``p ← exp_p(sum_i w_i log_p(u_i))`` — and the norm is the
weighted mean of the norms, so the result is a model of the models' scale, not a unit vector.
For two models the Karcher mean at weights ``(1 - t, t)`` is SLERP at ``t``; being the minimiser
of one cost function, it does not depend on the order of the models.

It differs from NLERP, the normalised weighted mean (``sum_i w_i u_i`` rescaled; mergekit's
``multislerp``): NLERP is the Karcher mean's starting point and agrees with it only when the
directions are symmetric about it (e.g. equal weights on two models); with unequal weights or
three and more spread directions the two differ.  The paper's barycenter minimises the sum of
(unsquared) geodesic distances; the squared distances of the Karcher mean are what makes it
equal SLERP for two models and give it a unique minimiser on any open hemisphere.

Granularity: per tensor (default) or, as the paper does, the whole model flattened into one
vector (``granularity="model"``).  Per tensor is the default because tensors differ in scale by
orders of magnitude: on one flattened vector the largest layers fix the angle and the direction
of a small layer is averaged with weights it did not choose, and its norm is not restored.

Which norm.  Restoring the weighted mean of the norms treats the models as equally good points
at one radius and the barycenter as another; that holds when their directions are close.  When
they are far apart (aligned but barely correlated models, such as one-shot clients trained from
independent inits: BENCHMARKS.md (f) measures how far) the components that differ between models
cancel in the barycenter's direction, and rescaling it to a model's norm amplifies what they share
in every hidden layer, compounding through a ReLU network.
``restore_norm="projection"`` (the averager ``"spherical-projection"``: ``merge(average=...)``,
``--average``) gives the direction the models' mean length along it instead.

Where a direction is undefined the linear mean is used instead: tensors of one entry, and tensors
that are zero in some model.  Directions that cancel (antipodal, or summing to zero) have no
spherical mean and are refused with an error naming the entry.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from .validation import check_state_dicts, normalize_weights

__all__ = ["slerp", "karcher_mean", "nlerp", "spherical_average", "spherical_projection_average", "SOLVERS",
           "GRANULARITIES", "NORMS"]

SOLVERS = ("karcher", "trust-regions")
GRANULARITIES = ("tensor", "model")
#: ``restore_norm`` of :func:`spherical_average`: True and "mean" (the weighted mean of the norms), "projection", False.
NORMS = (True, "mean", "projection", False)


def _unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norms = torch.linalg.vector_norm(x, dim=-1)
    return x / norms.unsqueeze(-1), norms


def _log(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``log_p(u_i)`` for unit ``p`` (D,) and unit rows ``u`` (n, D): tangent vectors of length ``angle``."""
    c = u @ p
    orth = u - c.unsqueeze(-1) * p
    s = torch.linalg.vector_norm(orth, dim=-1)
    angle = torch.atan2(s, c)  # stable for small and large angles alike
    scale = torch.where(s > 0, angle / s.clamp_min(1e-300), torch.ones_like(s))
    return orth * scale.unsqueeze(-1)


def _exp(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``exp_p(v)``: the point at distance ``||v||`` from ``p`` along the tangent ``v``."""
    r = torch.linalg.vector_norm(v)
    if r == 0:
        return p
    q = torch.cos(r) * p + torch.sin(r) * (v / r)
    return q / torch.linalg.vector_norm(q)


def nlerp(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """The normalised weighted mean of the directions, with the weighted mean of the norms (the baseline)."""
    x, w = _stack(tensors, weights)
    u, norms = _unit(x)
    m = w @ u
    return (m / torch.linalg.vector_norm(m) * (w @ norms)).reshape(tensors[0].shape).to(tensors[0].dtype)


def _stack(tensors: Sequence[torch.Tensor], weights) -> tuple[torch.Tensor, torch.Tensor]:
    if len(tensors) == 0:
        raise ValueError("no tensors given")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"tensor {i}: expected a floating-point tensor")
        if t.shape != shape:
            raise ValueError(f"tensor {i} has shape {tuple(t.shape)}, tensor 0 has {tuple(shape)}")
    x = torch.stack([t.detach().reshape(-1).to(device=tensors[0].device, dtype=torch.float64) for t in tensors])
    if not bool(torch.isfinite(x).all()):
        raise ValueError("the tensors have NaN or Inf entries")
    w = torch.as_tensor(normalize_weights(weights, len(tensors)), dtype=torch.float64, device=x.device)
    return x, w


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two tensors at ``t ∈ [0, 1]``: the angle interpolated, the norm linearly.

    ``sin((1-t)ω)/sin ω · â + sin(tω)/sin ω · b̂`` with ``ω`` the angle between the directions
    ``â, b̂``, scaled to ``(1 - t)||a|| + t||b||``.  Falls back to the linear mean where a direction
    is undefined (one entry, or a zero tensor); antipodal directions raise ``ValueError``.
    """
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t={t} is outside [0, 1]")
    x, _ = _stack([a, b], None)
    out = _slerp_rows(x[0], x[1], t)
    return out.reshape(a.shape).to(a.dtype)


def _slerp_rows(x: torch.Tensor, y: torch.Tensor, t: float) -> torch.Tensor:
    nx, ny = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    if x.numel() == 1 or nx == 0 or ny == 0:
        return (1 - t) * x + t * y
    u, v = x / nx, y / ny
    omega = torch.atan2(torch.linalg.vector_norm(u - (u @ v) * v), u @ v)
    if math.pi - float(omega) < 1e-9:
        raise ValueError("slerp: the directions are antipodal; the great circle between them is not unique")
    s = torch.sin(omega)
    if float(s) < 1e-12:  # (nearly) the same direction
        direction = (1 - t) * u + t * v
    else:
        direction = torch.sin((1 - t) * omega) / s * u + torch.sin(t * omega) / s * v
    direction = direction / torch.linalg.vector_norm(direction)
    return direction * ((1 - t) * nx + t * ny)


def _start(u: torch.Tensor, w: torch.Tensor, eps: float, name: str) -> torch.Tensor:
    """NLERP, the starting point; refused when the weighted mean of the directions vanishes (to rounding)."""
    m = w @ u
    r = torch.linalg.vector_norm(m)
    if float(r) < 10 * eps:
        raise ValueError(f"{name}: the directions cancel (their weighted mean is zero); no spherical mean exists")
    return m / r


def _karcher_direction(u: torch.Tensor, w: torch.Tensor, *, tol: float, max_iter: int, eps: float,
                       name: str) -> tuple[torch.Tensor, int, bool]:
    """Weighted Karcher mean of unit rows ``u`` (n, D) by ``p ← exp_p(sum_i w_i log_p(u_i))``."""
    p = _start(u, w, eps, name)
    for it in range(1, max_iter + 1):
        step = w @ _log(p, u)
        size = float(torch.linalg.vector_norm(step))
        p = _exp(p, step)
        if size <= tol:
            return p, it, True
    return p, max_iter, False


def _trust_region_direction(u: torch.Tensor, w: torch.Tensor, start: torch.Tensor, *, tol: float,
                            max_iter: int) -> torch.Tensor:
    """The same minimiser by pymanopt's Riemannian trust-region method on the sphere (the paper's option)."""
    try:
        import pymanopt
        from pymanopt.manifolds import Sphere
        from pymanopt.optimizers import TrustRegions
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("solver='trust-regions' needs pymanopt: pip install 'fedmerge[manifold]'") from err
    uc, wc = u.detach().cpu(), w.detach().cpu()
    manifold = Sphere(uc.shape[1])

    @pymanopt.function.pytorch(manifold)
    def cost(p):  # torch autodiff gives pymanopt the gradient and Hessian-vector products
        c = uc @ p
        s = torch.linalg.vector_norm(uc - c[:, None] * p[None], dim=1)
        return 0.5 * (wc * torch.atan2(s, c) ** 2).sum()

    problem = pymanopt.Problem(manifold, cost)
    optimizer = TrustRegions(verbosity=0, log_verbosity=0, max_iterations=max_iter, min_gradient_norm=tol)
    result = optimizer.run(problem, initial_point=start.cpu().numpy())
    p = torch.as_tensor(result.point, dtype=torch.float64, device=u.device)
    return p / torch.linalg.vector_norm(p)


def karcher_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor | None = None, *,
                 tol: float = 1e-12, max_iter: int = 100, solver: str = "karcher",
                 full_output: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict]:
    """The weighted spherical (Karcher) mean of tensors of one shape, with the weighted mean of their norms.

    ``tol`` ends the iteration when the tangent step is shorter (radians); ``solver="trust-regions"``
    minimises the same cost with pymanopt's Riemannian trust-region method, started from NLERP.
    ``full_output=True`` also returns ``{"nit", "converged"}``.  Raises ``ValueError`` when the
    directions cancel, ``RuntimeError`` when ``max_iter`` iterations did not converge.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    out, info = _mean(tensors, weights, tol=tol, max_iter=max_iter, solver=solver, name="karcher_mean")
    return (out, info) if full_output else out


def _mean(tensors, weights, *, tol, max_iter, solver, name) -> tuple[torch.Tensor, dict]:
    if not tol > 0 or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{name}: need tol > 0 and an integer max_iter >= 1 (got tol={tol}, max_iter={max_iter})")
    x, w = _stack(tensors, weights)
    norms = torch.linalg.vector_norm(x, dim=1)
    first = tensors[0]
    if x.shape[1] == 1 or bool((norms[w > 0] == 0).any()):
        return (w @ x).reshape(first.shape).to(first.dtype), {"nit": 0, "converged": True}
    keep = w > 0
    x, w, norms = x[keep], w[keep], norms[keep]
    u = x / norms.unsqueeze(1)
    eps = torch.finfo(first.dtype).eps  # inputs are only known to their own precision
    if solver == "karcher":
        p, nit, ok = _karcher_direction(u, w, tol=tol, max_iter=max_iter, eps=eps, name=name)
        if not ok:
            raise RuntimeError(f"{name}: the Karcher iteration did not converge in max_iter={max_iter} "
                               "iterations; the directions are too spread (more than a hemisphere apart?)")
    else:
        p, nit, ok = _trust_region_direction(u, w, _start(u, w, eps, name), tol=tol, max_iter=max_iter), None, True
    return (p * (w @ norms)).reshape(first.shape).to(first.dtype), {"nit": nit, "converged": ok}


def spherical_average(state_dicts: Sequence[Mapping[str, torch.Tensor]],
                      weights: Sequence[float] | torch.Tensor | None = None, *, granularity: str = "tensor",
                      solver: str = "karcher", tol: float = 1e-12, max_iter: int = 100,
                      restore_norm: bool = True, check: bool = True) -> dict[str, torch.Tensor]:
    """The ``"spherical"`` averager: SLERP for two models, the weighted Karcher mean for n, norms restored.

    ``granularity="tensor"`` (default) averages every floating-point entry on its own sphere;
    ``"model"`` flattens all floating-point entries into one vector, as the paper does, and rescales
    that to the weighted mean norm.  Integer entries (BatchNorm's counter) keep the largest value,
    as in :func:`fedmerge.averaging.weighted_average`.  ``solver="trust-regions"`` uses pymanopt.
    ``restore_norm``: the norm given to the barycenter direction ``p``.  ``True`` or ``"mean"``
    (default): the weighted mean of the models' norms (SLERP's rule for two).  ``"projection"``:
    ``sum_i w_i <x_i, p>``, the models' weighted mean length along ``p`` — the norm of the linear
    mean when ``p`` is its direction, so it shrinks as the directions spread; use it for models
    whose aligned directions are far apart (one-shot merges of independently trained models, see
    "Which norm" in the module docstring).  ``False``: the unit-norm barycenter itself (per tensor,
    or for the whole model with ``granularity="model"``, the paper's recipe): only for reproducing
    that recipe, since a network with biases does not compute the same function at another scale.
    """
    if restore_norm not in NORMS:
        raise ValueError(f"restore_norm={restore_norm!r}: choose one of True ('mean'), 'projection' or False")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if check:
        check_state_dicts(state_dicts)
    w = normalize_weights(weights, len(state_dicts))
    first = state_dicts[0]
    floats = [k for k, v in first.items() if torch.is_floating_point(v)]
    out: dict[str, Any] = {}
    for k, v in first.items():
        if k not in floats:
            out[k] = torch.stack([sd[k].to(v.device) for sd in state_dicts]).amax(0)

    def average(tensors, name):
        if len(tensors) == 2 and solver == "karcher":
            x, _ = _stack(tensors, None)
            t = w[1] / (w[0] + w[1])
            out = _slerp_rows(x[0], x[1], t)
        else:
            out = _mean(tensors, w, tol=tol, max_iter=max_iter, solver=solver, name=name)[0].double()
        if restore_norm is not True and restore_norm != "mean":
            norm = torch.linalg.vector_norm(out)
            out = out / norm if norm > 0 else out
            if restore_norm == "projection" and norm > 0:
                x, wt = _stack(tensors, w)
                out = out * (wt @ (x @ out.reshape(-1)))  # sum_i w_i <x_i, p>: the models' mean length along p
        return out.reshape(tensors[0].shape).to(tensors[0].dtype)

    if granularity == "tensor":
        for k in floats:
            try:
                out[k] = average([sd[k].to(first[k].device) for sd in state_dicts], repr(k))
            except ValueError as err:
                raise ValueError(f"spherical average of {k!r}: {err}") from None
    else:
        flat = [torch.cat([sd[k].to(device=first[k].device, dtype=torch.float64).reshape(-1) for k in floats])
                for sd in state_dicts]
        merged = average(flat, "the flattened models")
        start = 0
        for k in floats:
            n = first[k].numel()
            out[k] = merged[start:start + n].reshape(first[k].shape).to(first[k].dtype)
            start += n
    return {k: out[k] for k in first}


def spherical_projection_average(state_dicts: Sequence[Mapping[str, torch.Tensor]],
                                 weights: Sequence[float] | torch.Tensor | None = None,
                                 **options: Any) -> dict[str, torch.Tensor]:
    """The ``"spherical-projection"`` averager: :func:`spherical_average` with ``restore_norm="projection"``.

    The barycenter's direction with the models' weighted mean length along it: for models whose
    aligned directions are far apart (one-shot merges of independently trained models), where
    restoring the mean of the norms inflates the network (module docstring, "Which norm").
    """
    if "restore_norm" in options:
        raise TypeError("spherical-projection fixes restore_norm='projection'; use average='spherical' to choose it")
    return spherical_average(state_dicts, weights, restore_norm="projection", **options)
