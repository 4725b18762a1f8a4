"""Diagnostics of an alignment as functions any user can call: the figures of the orthogonal papers.

Specification: ``orthogonal-rebasin-mnist-mlp`` (Eq. 1, the ReLU residual ``E_res``; Eq. 2, the
cycle error ``E_cycle``; the sign-change share of Table 1) and ``orthogonal-rebasin-resnet20-cifar10``
(loss barrier, midpoint accuracy, linear CKA of Kornblith et al. 2019, interpolation curves by
LERP and SLERP).  Every function is pure: a template ``model`` (an ``nn.Module`` whose own
parameters are never touched), state_dicts, and data ``(inputs, targets)``; forward passes go
through ``torch.func.functional_call``.

Conventions: activations are ``(samples, units)`` matrices; an orthogonal map ``Q`` in its
matrix form (:meth:`fedmerge.symmetry.Group.matrix`) moves activations ``A`` to ``A Q``, as
:func:`fedmerge.apply_transform` moves the producing layer's weights.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .activations import calibration_batches, run_with_hooks
from .averaging import interpolate
from .spec import SymmetrySpec
from .spherical import spherical_average
from .symmetry import group_of_element
from .transforms import apply_transform

__all__ = ["relu_residual", "sign_change_share", "cycle_residual", "linear_cka", "features", "evaluate",
           "interpolation_curve", "loss_barrier"]


def _matrix(q: Any) -> torch.Tensor:
    """The matrix form of a map given as a matrix or as any group element."""
    return group_of_element(q).matrix(q).double()


def _check_activations(a: torch.Tensor, q: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(a, torch.Tensor) or a.dim() != 2:
        raise ValueError(f"{name}: activations must be a (samples, units) matrix")
    q = _matrix(q).to(a.device)
    if q.shape != (a.shape[1], a.shape[1]):
        raise ValueError(f"{name}: a map of shape {tuple(q.shape)} does not fit {a.shape[1]} units")
    return a.double(), q


def relu_residual(pre_activations: torch.Tensor, q: Any, *, relative: bool = True) -> float:
    """``E_res = ||ReLU(A) Q - ReLU(A Q)||_F`` (Eq. 1 of the MNIST orthogonal paper).

    How far the map ``Q`` (a matrix or any group element) is from commuting with ReLU on the
    pre-activations ``A``: 0 for every (positively scaled) permutation.  ``relative=True`` divides by
    ``||ReLU(A) Q||_F``, so the figure does not grow with the number of samples; ``False`` is Eq. 1
    verbatim.
    """
    a, m = _check_activations(pre_activations, q, "relu_residual")
    left = F.relu(a) @ m
    err = float(torch.linalg.matrix_norm(left - F.relu(a @ m)))
    if not relative:
        return err
    ref = float(torch.linalg.matrix_norm(left))
    return err / ref if ref > 0 else 0.0


def sign_change_share(pre_activations: torch.Tensor, q: Any) -> float:
    """The share of units whose ReLU gate differs between rotating before and after the ReLU.

    The paper reports the sign-change share beside ``E_res`` without a formula; this is our
    reading: the fraction of entries where ``A Q > 0`` (the gate of the rotated pre-activation)
    and ``ReLU(A) Q > 0`` (the rotated post-activation is positive) disagree.  0 for every
    permutation; it counts exactly the entries where the two sides of ``E_res`` switch on or off
    differently.
    """
    a, m = _check_activations(pre_activations, q, "sign_change_share")
    return float(((a @ m > 0) != (F.relu(a) @ m > 0)).double().mean())


def cycle_residual(state_dict: Mapping[str, torch.Tensor], spec: SymmetrySpec, maps: Sequence[Mapping[str, Any]],
                   *, relative: bool = False) -> float:
    """``E_cycle``: ``||maps applied in turn to θ - θ||_F`` over the entries the groups act on (Eq. 2).

    With ``maps = [T, T⁻¹]`` this is Eq. 2 of the MNIST orthogonal paper, ``||(W Q) Qᵀ - W||_F``
    (zero up to rounding exactly when ``Q`` is orthogonal); with the pairwise maps of a loop
    ``a → b → c → a`` (``result.pairwise(a, b)``, ...) it measures cycle inconsistency in weight
    units.  ``relative=True`` divides by ``||θ||_F``.
    """
    if len(maps) == 0:
        raise ValueError("cycle_residual: give at least one map")
    x = {k: state_dict[k].double() for k in spec.permuted_keys if torch.is_floating_point(state_dict[k])}
    y = x
    for t in maps:
        y = apply_transform(y, spec.with_kinds({g: group_of_element(e).kind for g, e in t.items()}), t)
    err = math.sqrt(sum(float((y[k] - x[k]).pow(2).sum()) for k in x))
    if relative:
        norm = math.sqrt(sum(float(v.pow(2).sum()) for v in x.values()))
        return err / norm if norm > 0 else 0.0
    return err


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations of the same samples, ``(samples, features)``.

    ``||Yᵀ X||_F² / (||Xᵀ X||_F ||Yᵀ Y||_F)`` on column-centred ``X, Y``: 1 for representations
    equal up to a rotation and isotropic scaling, invariant to both; the feature counts may differ.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError("linear_cka: expected two (samples, features) matrices with the same number of samples")
    if x.shape[0] < 2:
        raise ValueError("linear_cka: need at least two samples")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    num = float(torch.linalg.matrix_norm(y.T @ x)) ** 2
    den = float(torch.linalg.matrix_norm(x.T @ x)) * float(torch.linalg.matrix_norm(y.T @ y))
    return num / den if den > 0 else 0.0


def features(model: nn.Module, state_dict: Mapping[str, torch.Tensor], inputs: torch.Tensor,
             modules: Sequence[str] | None = None, *, batch_size: int = 1000) -> dict[str, torch.Tensor]:
    """The outputs of named submodules (``None``: the model's output, under ``""``) on ``inputs``.

    Each output is flattened to ``(samples, features)``; the model runs in eval mode through
    ``torch.func.functional_call`` with ``state_dict``.
    """
    names = [""] if modules is None else list(modules)
    table = dict(model.named_modules())
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"features: the model has no submodule {unknown[0]!r}")
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = {n: (lambda n: lambda m, a, out: captured[n].append(out.detach()))(n) for n in names}
    run_with_hooks(model, state_dict, calibration_batches(inputs, batch_size=batch_size), hooks)
    return {n: torch.cat([o.reshape(o.shape[0], -1) for o in outs]) for n, outs in captured.items()}


def evaluate(model: nn.Module, state_dict: Mapping[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor], *,
             batch_size: int = 1000) -> dict[str, float]:
    """``{"loss", "accuracy"}`` of ``state_dict`` on ``data = (inputs, targets)``: mean cross-entropy.

    The outputs may be logits or log-probabilities (``log_softmax`` is idempotent).
    """
    inputs, targets = _data(data)
    out = features(model, state_dict, inputs, batch_size=batch_size)[""]
    targets = targets.to(out.device)
    loss = float(F.cross_entropy(out.double(), targets, reduction="mean"))
    if not math.isfinite(loss):
        loss = float("inf")
    return {"loss": loss, "accuracy": float((out.argmax(1) == targets).double().mean())}


def _data(data) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError("data must be a pair (inputs, targets)")
    inputs, targets = data
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise ValueError("data must be a pair of tensors (inputs, targets)")
    if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
        raise ValueError(f"data: {inputs.shape[0]} inputs but {targets.shape[0]} targets (need the same, > 0)")
    return inputs, targets


METHODS = ("lerp", "slerp")


def interpolation_curve(model: nn.Module, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                        data: tuple[torch.Tensor, torch.Tensor], *, alphas: int | Sequence[float] = 11,
                        method: str = "lerp", batch_size: int = 1000) -> dict[str, list[float]]:
    """Loss and accuracy along ``θ_α`` from ``a`` (α = 0) to ``b`` (α = 1): ``{"alpha", "loss", "accuracy"}``.

    ``method="lerp"``: ``(1 - α) θ_a + α θ_b``; ``"slerp"``: per-tensor SLERP
    (:func:`fedmerge.spherical.slerp`, norms interpolated linearly).  ``alphas`` is a number of
    evenly spaced points or the points themselves.  BatchNorm running statistics are interpolated
    like every other entry (re-estimate or REPAIR them for a fair curve).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    grid = torch.linspace(0, 1, alphas).tolist() if isinstance(alphas, int) else [float(t) for t in alphas]
    if len(grid) == 0 or any(not 0 <= t <= 1 for t in grid):
        raise ValueError("alphas must be a positive count or values in [0, 1]")
    out = {"alpha": grid, "loss": [], "accuracy": []}
    for t in grid:
        theta = interpolate(a, b, t) if method == "lerp" else spherical_average([a, b], [1 - t, t])
        r = evaluate(model, theta, data, batch_size=batch_size)
        out["loss"].append(r["loss"])
        out["accuracy"].append(r["accuracy"])
    return out


def loss_barrier(model: nn.Module, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                 data: tuple[torch.Tensor, torch.Tensor], *, alphas: int | Sequence[float] = 11,
                 method: str = "lerp", definition: str = "excess", batch_size: int = 1000) -> float:
    """The loss barrier on the path from ``a`` to ``b``.

    ``definition="excess"`` (Frankle et al.; Git Re-Basin): ``max_α L(θ_α) - ((1 - α) L(θ_a) + α L(θ_b))``;
    ``"max"``: ``max_α L(θ_α)``, the ResNet-20 orthogonal paper's definition.
    """
    if definition not in ("excess", "max"):
        raise ValueError(f"definition must be 'excess' or 'max', got {definition!r}")
    curve = interpolation_curve(model, a, b, data, alphas=alphas, method=method, batch_size=batch_size)
    loss, grid = curve["loss"], curve["alpha"]
    if definition == "max":
        return max(loss)
    la = evaluate(model, a, data, batch_size=batch_size)["loss"] if grid[0] != 0 else loss[0]
    lb = evaluate(model, b, data, batch_size=batch_size)["loss"] if grid[-1] != 1 else loss[-1]
    return max(l - ((1 - t) * la + t * lb) for t, l in zip(grid, loss))
