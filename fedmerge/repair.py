"""REPAIR and RESET: renormalise a merged model's activations (Jordan et al., ICLR 2023).

Averaging aligned models shrinks the variance of their hidden activations; REPAIR gives every
hidden unit of the merged model the per-unit mean and standard deviation that the endpoint models
have there (C²M³ paper, "Renormalizing the activations" and Appendix A.4), and folds the
correction into the layer that produces the unit, so the repaired state_dict has the original
architecture.

**Where.**  A *repair point* is a module whose output units are corrected: every ``Linear`` and
``Conv`` output, or, when such a layer feeds a normalisation layer directly (``BatchNorm``,
``GroupNorm``, ``LayerNorm`` with affine parameters), that norm's output — the pre-activation in
both cases.  Found on the ``torch.fx`` graph of the template (:func:`find_repair_points`);
``modules="hidden"`` (default) keeps the points whose units belong to a group of the spec (not
the logits), ``"all"`` adds the rest, a list names them.  In a residual network each branch's
last norm and the shortcut's norm are points; the sum of an identity shortcut and a branch is
not (its correction could not be folded into one layer without changing the architecture).

**Correction.**  With the merged model's statistics ``(μ_m, σ_m)`` at a point and the targets
``(μ_t, σ_t)``, the unit becomes ``(y - μ_m) σ_t / σ_m + μ_t``: the producing layer's weight and
bias are scaled by ``a = σ_t / σ_m`` and its bias becomes ``(b - μ_m) a + μ_t``.  A unit that is
constant on the calibration data (``σ_m <= eps``) keeps its scale; a layer without a bias gets
the scale only (with a warning).

**Targets** (``target=``), from the endpoint models' statistics with the merge weights ``w``:

* ``"std"`` (default, REPAIR's reference): ``μ_t = Σ w_i μ_i``, ``σ_t = Σ w_i σ_i`` — the
  statistics of the interpolated activation if the aligned units were perfectly correlated,
  which is what a perfect alignment makes them;
* ``"variance"`` (the C²M³ authors' code): ``σ_t² = Σ w_i σ_i²``;
* ``"pooled"``: the statistics of the mixture of the endpoints' activations (law of total
  variance, ``σ_t² = Σ w_i (σ_i² + μ_i²) - μ_t²``), what federated REPAIR computes from the
  clients' sums.  BENCHMARKS.md measures the three.

**Passes.**  Correcting one layer changes the statistics of every later one.  ``passes=
"sequential"`` (default) measures and folds one point at a time, one forward pass over the
calibration data per point: exact.  ``"single"`` does it in one pass, normalising every point's
output *in the pass* with the current batch's statistics (train-mode semantics, as the
reference's ``ResetLayer`` does), and folds with the pooled statistics of the pass; identical to
``"sequential"`` when the calibration data is one batch.

**RESET** (:func:`reset_batchnorm`) re-estimates a BatchNorm network's running statistics on the
calibration data (a fresh train-mode statistics pass, cumulative average), REPAIR's remedy for
BatchNorm networks; ``repair(..., reset=True)`` runs it before REPAIR.

All forward passes go through :func:`fedmerge.activations.run_with_hooks`
(``torch.func.functional_call``); the template module is never modified.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .activations import calibration_batches, run_with_hooks
from .spec import SymmetrySpec
from .symmetry import SignedPermutation
from .validation import normalize_weights

__all__ = ["RepairPoint", "UnitStatistics", "TARGETS", "PASSES", "find_repair_points", "unit_statistics",
           "repair_targets", "fold_repair", "map_statistics", "repair", "reset_batchnorm"]

StateDict = Mapping[str, torch.Tensor]

PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)
#: Target rules of :func:`repair_targets` (the first is the default).
TARGETS = ("std", "variance", "pooled")
#: Pass schedules of :func:`repair` (the first is the default).
PASSES = ("sequential", "single")
#: Units whose standard deviation on the calibration data is at most this keep their scale.
DEFAULT_EPS = 1e-5


@dataclass(frozen=True)
class RepairPoint:
    """A module whose output units REPAIR corrects.

    ``channel_dim`` is the axis of its output holding the units (1 for convs and norms of image
    tensors, -1 for linears and LayerNorm); ``group`` the spec group of those units (``None`` if
    no group acts on them, e.g. logits, or no spec was given); ``has_bias`` whether the mean can
    be corrected.
    """

    name: str
    channel_dim: int
    group: str | None
    has_bias: bool


@dataclass
class UnitStatistics:
    """Per-unit ``count``, ``sum`` and ``sum_sq`` of a point's outputs (float64), poolable exactly.

    ``count`` is the number of values per unit (samples × spatial positions).  ``a + b`` pools two
    sets of values (sums add); ``mean`` and ``var`` (population variance) follow.
    """

    count: float
    sum: torch.Tensor
    sum_sq: torch.Tensor

    @classmethod
    def of(cls, output: torch.Tensor, channel_dim: int) -> "UnitStatistics":
        y = output.detach().movedim(channel_dim, -1)
        y = y.reshape(-1, y.shape[-1]).double()
        return cls(float(y.shape[0]), y.sum(0), (y * y).sum(0))

    def __add__(self, other: "UnitStatistics") -> "UnitStatistics":
        if self.sum.shape != other.sum.shape:
            raise ValueError(f"cannot pool statistics of {self.sum.shape[0]} and {other.sum.shape[0]} units")
        return UnitStatistics(self.count + other.count, self.sum + other.sum.to(self.sum.device),
                              self.sum_sq + other.sum_sq.to(self.sum.device))

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def var(self) -> torch.Tensor:
        return (self.sum_sq / self.count - self.mean ** 2).clamp_min(0.0)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()


# -- where to repair --------------------------------------------------------------------------

def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1


def _foldable(module: nn.Module) -> bool:
    if isinstance(module, PRODUCERS):
        return True
    if isinstance(module, nn.LayerNorm):
        return module.elementwise_affine and len(module.normalized_shape) == 1
    if isinstance(module, nn.GroupNorm):
        return module.affine
    return isinstance(module, NORMS) and module.affine


def _point(name: str, module: nn.Module, spec: SymmetrySpec | None) -> RepairPoint:
    group = None
    if spec is not None:
        axes = spec.axes.get(f"{name}.weight")
        group = axes[0] if axes else None
    return RepairPoint(name, _channel_dim(module), group, getattr(module, "bias", None) is not None)


def _spec_of(model: nn.Module) -> SymmetrySpec | None:
    """The model's spec (hand-written for the zoo, traced otherwise), or None if it has none."""
    from .tracing import spec_for
    try:
        return spec_for(model)
    except Exception:  # noqa: BLE001 - an untraceable model: every point is then ungrouped
        return None


def find_repair_points(model: nn.Module, spec: SymmetrySpec | None = None, *,
                       modules: str | Sequence[str] = "hidden") -> list[RepairPoint]:
    """The modules REPAIR corrects, in forward order (see the module docstring).

    ``spec`` defaults to the model's own (:func:`fedmerge.spec_for`).  ``modules``: ``"hidden"``
    (points whose units are a spec group; if the model has no spec, every point but the last),
    ``"all"``, or a list of submodule names (``Linear``/``Conv``/affine norm layers).
    """
    named = dict(model.named_modules())
    if spec is None:
        spec = _spec_of(model)
    if not isinstance(modules, str):
        names = list(modules)
        if not names:
            raise ValueError("modules is an empty list: name at least one module to repair")
        points = []
        for name in names:
            if name not in named:
                raise ValueError(f"the model has no submodule {name!r}")
            if not _foldable(named[name]):
                raise ValueError(f"module {name!r} ({type(named[name]).__name__}) cannot be repaired: REPAIR "
                                 "folds into Linear, Conv or affine BatchNorm/GroupNorm/LayerNorm(one axis) layers")
            points.append(_point(name, named[name], spec))
        return points
    if modules not in ("hidden", "all"):
        raise ValueError(f"modules must be 'hidden', 'all' or a list of module names, got {modules!r}")
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - any tracing failure
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx to find its layers ({exc}); "
                         "pass modules=[<names of the layers to repair>]") from exc
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    points, seen = [], set()
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(named[node.target], PRODUCERS):
            continue
        target = node
        while len(target.users) == 1:
            user = next(iter(target.users))
            if (user.op == "call_module" and isinstance(named[user.target], NORMS) and user.args
                    and user.args[0] is target):
                target = user
            else:
                break
        name = target.target
        if name in seen or not _foldable(named[name]) or calls[name] > 1:
            continue  # a norm without affine parameters, or a module called twice: no per-unit fold
        seen.add(name)
        points.append(_point(name, named[name], spec))
    if modules == "hidden":
        points = [p for p in points if p.group is not None] if spec is not None else points[:-1]
    if not points:
        raise ValueError(f"{type(model).__name__} has no layer REPAIR can correct (modules={modules!r})")
    return points


def _check_points(points: Sequence[RepairPoint]) -> list[RepairPoint]:
    points = list(points)
    if not points or not all(isinstance(p, RepairPoint) for p in points):
        raise TypeError("points must be a non-empty list of RepairPoint (from find_repair_points)")
    return points


# -- statistics -------------------------------------------------------------------------------

def _normalise_to(y: torch.Tensor, channel_dim: int, mean: torch.Tensor, std: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """``y`` with each unit's batch statistics replaced by ``(mean, std)`` (train-mode REPAIR)."""
    stats = UnitStatistics.of(y, channel_dim)
    scale = torch.where(stats.std > eps, std / stats.std, torch.ones_like(std))
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    scale, shift = scale.view(shape), (mean - stats.mean * scale.flatten()).view(shape)
    return (y.double() * scale + shift).to(y.dtype)


def unit_statistics(model: nn.Module, state_dict: StateDict, inputs: torch.Tensor | Iterable,
                    points: Sequence[RepairPoint], *,
                    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                    eps: float = DEFAULT_EPS) -> dict[str, UnitStatistics]:
    """Per-unit statistics of ``points`` for the model ``state_dict`` on the calibration ``inputs``.

    With ``targets`` (``{point: (mean, std)}``), every point's output is renormalised to its
    target within each batch after its statistics are taken (the single-pass schedule): the
    statistics of a later point are then those it has downstream of corrected layers.
    """
    points = _check_points(points)
    batches = inputs if isinstance(inputs, list) else calibration_batches(inputs)
    stats: dict[str, UnitStatistics] = {}

    def hook_for(point: RepairPoint):
        def hook(module, args, output):
            s = UnitStatistics.of(output, point.channel_dim)
            stats[point.name] = s if point.name not in stats else stats[point.name] + s
            if targets is not None and point.name in targets:
                mean, std = targets[point.name]
                return _normalise_to(output, point.channel_dim, mean.to(s.sum.device), std.to(s.sum.device), eps)
            return None
        return hook

    run_with_hooks(model, state_dict, batches, {p.name: hook_for(p) for p in points})
    return stats


def repair_targets(statistics: Sequence[Mapping[str, UnitStatistics]], weights: Sequence[float] | None = None,
                   *, target: str = TARGETS[0]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{point: (mean, std)}`` targets from the endpoint models' statistics (module docstring)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if not statistics:
        raise ValueError("no endpoint statistics to take targets from")
    w = normalize_weights(weights, len(statistics))
    names = set(statistics[0])
    for i, s in enumerate(statistics):
        if set(s) != names:
            raise ValueError(f"endpoint {i} has statistics of {sorted(s)}, endpoint 0 of {sorted(names)}")
    out = {}
    for name in statistics[0]:
        means = torch.stack([s[name].mean for s in statistics])
        wt = torch.tensor(w, dtype=means.dtype, device=means.device).view(-1, 1)
        mean = (wt * means).sum(0)
        if target == "std":
            std = (wt * torch.stack([s[name].std for s in statistics])).sum(0)
        elif target == "variance":
            std = (wt * torch.stack([s[name].var for s in statistics])).sum(0).sqrt()
        else:
            second = (wt * torch.stack([s[name].var + s[name].mean ** 2 for s in statistics])).sum(0)
            std = (second - mean ** 2).clamp_min(0.0).sqrt()
        out[name] = (mean, std)
    return out


def map_statistics(statistics: Mapping[str, UnitStatistics], points: Sequence[RepairPoint], spec: SymmetrySpec,
                   transform: Mapping[str, Any]) -> dict[str, UnitStatistics]:
    """A model's statistics moved into the common space by its alignment ``transform``.

    Unit ``i`` of the aligned model is unit ``transform[g][i]`` of the model, so its sums move
    with the same index (for a signed permutation the sum changes sign with the unit, the sum of
    squares does not).  An orthogonal map mixes units, and per-unit sums of squares do not
    determine the mixed units' variances: unless the map is a permutation matrix this raises.
    """
    out = {}
    by_name = {p.name: p for p in points}
    for name, s in statistics.items():
        point = by_name.get(name)
        if point is None:
            raise ValueError(f"statistics of {name!r}, which is not a repair point")
        axes = spec.axes.get(f"{name}.weight")
        group = axes[0] if axes else None
        element = transform.get(group) if group is not None else None
        if element is None:
            out[name] = s
            continue
        if isinstance(element, SignedPermutation):
            index, signs = element.index, element.signs.to(s.sum.dtype)
        elif isinstance(element, torch.Tensor) and element.dim() == 1:
            index, signs = element, None
        else:
            m = element.detach().double()
            is_perm = bool(((m == 0) | (m == 1)).all()) and bool((m.sum(0) == 1).all() and (m.sum(1) == 1).all())
            if not is_perm:
                raise ValueError(f"group {group!r} is aligned by a rotation that mixes units; per-unit "
                                 "statistics cannot be mapped through it (use a permutation alignment, or "
                                 "project the map to the nearest permutation)")
            index, signs = m.argmax(0), None  # act(t, 0, Q) = Qᵀ t: unit i of the result is unit argmax(Q[:, i])
        index = index.to(s.sum.device)
        total = s.sum.index_select(0, index)
        out[name] = UnitStatistics(s.count, total if signs is None else total * signs.to(total.device),
                                   s.sum_sq.index_select(0, index))
    return out


# -- folding ------------------------------------------------------------------------------------

def fold_repair(state_dict: StateDict, points: Sequence[RepairPoint], statistics: Mapping[str, UnitStatistics],
                targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                eps: float = DEFAULT_EPS) -> dict[str, torch.Tensor]:
    """Fold ``(y - μ_m) σ_t / σ_m + μ_t`` into each point's weight and bias (a new state_dict)."""
    out = dict(state_dict)
    for point in _check_points(points):
        if point.name not in statistics or point.name not in targets:
            continue
        s = statistics[point.name]
        t_mean, t_std = (v.to(s.sum.device) for v in targets[point.name])
        scale = torch.where(s.std > eps, t_std / s.std, torch.ones_like(t_std))
        wkey, bkey = f"{point.name}.weight", f"{point.name}.bias"
        if wkey not in out:
            raise ValueError(f"the state_dict has no {wkey!r} for repair point {point.name!r}")
        w = out[wkey]
        if w.shape[0] != scale.shape[0]:
            raise ValueError(f"{wkey} has {w.shape[0]} units, its statistics {scale.shape[0]}")
        out[wkey] = (w.double() * scale.view(-1, *[1] * (w.dim() - 1)).to(w.device)).to(w.dtype)
        if bkey in out:
            b = out[bkey]
            out[bkey] = ((b.double() - s.mean.to(b.device)) * scale.to(b.device) + t_mean.to(b.device)).to(b.dtype)
        else:
            warnings.warn(f"repair point {point.name!r} has no bias: only its units' standard deviations are "
                          "corrected, not their means", stacklevel=2)
    return out


# -- RESET ------------------------------------------------------------------------------------

@contextlib.contextmanager
def _cumulative_momentum(model: nn.Module) -> Iterator[list[str]]:
    norms = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [m.momentum for _, m in norms]
    for _, m in norms:
        m.momentum = None  # running statistics = cumulative average over the pass
    try:
        yield [name for name, _ in norms]
    finally:
        for (_, m), momentum in zip(norms, saved):
            m.momentum = momentum


def reset_batchnorm(model: nn.Module, state_dict: StateDict,
                    inputs: torch.Tensor | Iterable) -> dict[str, torch.Tensor]:
    """RESET: the state_dict with every BatchNorm's running statistics re-estimated on ``inputs``.

    Equal to a fresh statistics pass in torch: statistics reset, train mode (BatchNorm only),
    cumulative averaging over the batches.  Raises ``ValueError`` if the model has no BatchNorm
    with running statistics.
    """
    batches = inputs if isinstance(inputs, list) else calibration_batches(inputs)
    out = {k: v.clone() for k, v in state_dict.items()}
    with _cumulative_momentum(model) as names:
        if not names:
            raise ValueError(f"{type(model).__name__} has no BatchNorm layer with running statistics to reset")
        for name in names:
            out[f"{name}.running_mean"].zero_()
            out[f"{name}.running_var"].fill_(1.0)
            if f"{name}.num_batches_tracked" in out:
                out[f"{name}.num_batches_tracked"].zero_()
        run_with_hooks(model, out, batches, {}, train=True)
    return out


# -- the stage ----------------------------------------------------------------------------------

def repair(merged: StateDict, aligned: Sequence[StateDict], weights: Sequence[float] | None = None, *,
           model: nn.Module | None, inputs: torch.Tensor | Iterable | None = None, spec: SymmetrySpec | None = None,
           target: str = TARGETS[0], passes: str = PASSES[0], modules: str | Sequence[str] = "hidden",
           reset: bool = False, eps: float = DEFAULT_EPS) -> dict[str, torch.Tensor]:
    """REPAIR the ``merged`` state_dict: each repair point gets the endpoints' interpolated statistics.

    Parameters
    ----------
    merged, aligned, weights:
        The merged model, the endpoint models in its (common) space, and the merge weights
        (uniform if None) — what :func:`fedmerge.merge` passes to its repair stage.
    model:
        Template ``nn.Module`` of the architecture (required: REPAIR runs forward passes).
    inputs:
        Calibration data: a tensor or an iterable of batches (tensors or ``(inputs, targets)``).
    spec:
        The symmetry spec, used to tell hidden units from logits for ``modules="hidden"``.
    target, passes, modules, eps:
        See the module docstring.
    reset:
        Re-estimate BatchNorm running statistics (RESET) of the merged model first.
    """
    if model is None:
        raise ValueError("REPAIR needs model=<template nn.Module> to run forward passes")
    if inputs is None:
        raise ValueError("REPAIR needs calibration inputs: merge(..., repair=<inputs>) or "
                         "repair_options={'inputs': <tensor or DataLoader>}")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if passes not in PASSES:
        raise ValueError(f"unknown passes {passes!r}; choose one of {', '.join(PASSES)}")
    if not aligned:
        raise ValueError("REPAIR needs the endpoint models (aligned) to take target statistics from")
    batches = calibration_batches(inputs)
    points = find_repair_points(model, spec, modules=modules)
    endpoint = [unit_statistics(model, sd, batches, points) for sd in aligned]
    targets = repair_targets(endpoint, weights, target=target)
    out = reset_batchnorm(model, merged, batches) if reset else dict(merged)
    if passes == "single":
        stats = unit_statistics(model, out, batches, points, targets=targets, eps=eps)
        return fold_repair(out, points, stats, targets, eps=eps)
    for point in points:
        stats = unit_statistics(model, out, batches, [point])
        out = fold_repair(out, [point], stats, targets, eps=eps)
    return out


def reset(merged: StateDict, aligned: Sequence[StateDict], weights: Sequence[float] | None = None, *,
          model: nn.Module | None, inputs: torch.Tensor | Iterable | None = None,
          spec: SymmetrySpec | None = None) -> dict[str, torch.Tensor]:
    """The ``repair="reset"`` stage of :func:`fedmerge.merge`: :func:`reset_batchnorm` of the merged model."""
    if model is None:
        raise ValueError("RESET needs model=<template nn.Module> to run forward passes")
    if inputs is None:
        raise ValueError("RESET needs calibration inputs: repair_options={'inputs': <tensor or DataLoader>}")
    return reset_batchnorm(model, merged, inputs)
