"""The spec self-check: does transforming a model by its spec really leave its function unchanged?

A spec is a claim about a model: "transform these axes together, by any element of this group,
and the network computes the same thing".  That claim is cheap to test, and a wrong spec is
otherwise invisible until merged models are inexplicably bad, so :func:`check_spec` tests it: it
draws a random element of every group's declared kind (a permutation, random signs times a
permutation, a random rotation), transforms the weights by it, loads them into a copy of the
model and compares outputs.  When they differ it does not stop at "wrong": it finds a group whose
transformation alone breaks the model; if that group's kind is more general than permutations it
tries whether a lower kind repairs it (units followed by a ReLU have permutations, not rotations,
as their symmetry), then it looks for the first ``state_dict`` entry (in ``state_dict`` order)
where adding or removing that group on a single axis repairs it, and names that entry and axis.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .spec import SymmetrySpec
from .symmetry import KINDS, SignedPermutation, group_of_element
from .tracing import spec_for
from .transforms import random_transform

__all__ = ["SpecError", "check_spec"]

#: From the least to the most general kind (each contains the ones before it).
_KIND_ORDER = ("permutation", "signed-permutation", "orthogonal")
_A_RANDOM = {"permutation": "a random permutation", "signed-permutation": "a random signed permutation",
             "orthogonal": "a random rotation"}


class SpecError(ValueError):
    """The spec does not describe a symmetry of the model.

    ``key``, ``axis`` and ``group`` locate the error when a single-axis fix was found (else
    ``key`` and ``axis`` are ``None``); ``diff`` is the output change it causes.  When the group's
    declared kind is wrong but a lower kind works, ``kind`` is that kind (else ``None``).
    """

    def __init__(self, message: str, *, key: str | None = None, axis: int | None = None,
                 group: str | None = None, diff: float | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.key, self.axis, self.group, self.diff, self.kind = key, axis, group, diff, kind


def _without_constant_entries(state: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Replace floating-point entries whose values are all equal by distinct values of the same sign."""
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for key, t in state.items():
        if t.is_floating_point() and t.numel() > 1 and bool((t == t.reshape(-1)[0]).all()):
            c = float(t.reshape(-1)[0])
            noise = torch.rand(t.shape, generator=g, dtype=torch.float64)
            t = (c * (0.5 + noise) if c != 0 else 0.1 * (noise - 0.5)).to(dtype=t.dtype, device=t.device)
        out[key] = t
    return out


def _example_input(model: nn.Module, example_input: Any, seed: int, batch: int = 4) -> tuple:
    if example_input is not None:
        return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError(
            f"check_spec needs an example input for {type(model).__name__}: pass example_input= (a batch of "
            f"at least 2 inputs) or give the model an input_shape attribute (the shape of one input, "
            f"e.g. (3, 32, 32))")
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *tuple(shape)), generator=g)
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype)
    return (x,)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    if not a:
        return 0.0
    d = max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b))
    return d if d == d else float("inf")  # NaN counts as different


def _apply(state: Mapping[str, torch.Tensor], axes: Mapping[str, tuple], transform: Mapping[str, Any]
           ) -> dict[str, torch.Tensor]:
    """Like :func:`~fedmerge.transforms.apply_transform`, for an axes table that may not be a valid spec."""
    out = {}
    for key, t in state.items():
        for a, g in enumerate(axes[key]):
            if g is not None and g in transform:
                t = group_of_element(transform[g]).act(t, a, transform[g])
        out[key] = t
    return out


def _nontrivial(element: Any) -> Any:
    """Make a random element test something: no identity permutation (likely for tiny groups), at
    least one sign flip, and a rotation that is orthogonal to float64 precision."""
    if isinstance(element, SignedPermutation):
        index, signs = element.index, element.signs.clone()
        if not bool((signs < 0).any()):
            signs[0] = -1.0
        return SignedPermutation(_nontrivial(index), signs)
    if element.is_floating_point():  # a rotation: re-orthonormalise in float64
        q, r = torch.linalg.qr(element.double())
        d = torch.diagonal(r)
        q = q * torch.where(d < 0, -1.0, 1.0).to(q)
        if q.shape[0] == 1 and float(q[0, 0]) > 0:
            q = -q
        return q
    p = element
    if p.numel() > 1 and torch.equal(p, torch.arange(p.numel(), device=p.device)):
        return p.roll(1)
    return p


def _random_element(kind: str, d: int, generator: torch.Generator) -> Any:
    return _nontrivial(KINDS[kind].random(d, generator))


def _has_batch_statistics(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def _double(x: Any) -> Any:
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def check_spec(model: nn.Module, spec: SymmetrySpec | None = None, example_input: Any = None, *,
               atol: float = 1e-5, rtol: float = 1e-5, seed: int = 0,
               modes: Iterable[str] = ("eval", "train")) -> None:
    """Raise :class:`SpecError` unless transforming ``model`` by ``spec`` leaves its outputs unchanged.

    Every group is transformed by a random element of its declared kind (``spec.kinds``): a
    permutation, a signed permutation (with at least one sign flip) or a rotation.  ``spec``
    defaults to :func:`~fedmerge.tracing.spec_for` (the model's own ``permutation_spec()`` or the
    traced one).  ``example_input`` defaults to a random batch of ``model.input_shape``.
    Outputs are compared in eval mode and, for models with BatchNorm, in train mode too (where BN
    uses batch statistics instead of its running buffers, so both paths are checked).  Train mode is
    skipped for models with active dropout: its random masks are drawn by position, so a permuted
    model would drop different units and the comparison would be meaningless.  The model itself is
    not modified.  Outputs agree when they differ by at most ``atol + rtol * max|output|``: float32
    sums taken in another order differ by rounding, which grows with the outputs' scale, while a
    wrong spec changes outputs on the scale of the outputs themselves.  A rotation mixes every
    unit of a group into every other, which changes rounding far more than a reordering, so when
    the spec has signed or orthogonal groups the comparison runs on a float64 copy of the model
    (unless the model cannot run in float64).

    Entries whose values are all equal — a fresh model's zero biases, unit norm scales, and
    BatchNorm's initial running statistics — would hide a wrong spec, since permuting them changes
    nothing.  The check therefore runs on a copy of the weights where such entries are jittered
    (positive values stay positive), so a fresh, untrained model is checked as thoroughly as a
    trained one.
    """
    modes = tuple(modes)
    unknown = [m for m in modes if m not in ("eval", "train")]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; expected 'eval' and/or 'train'")
    if spec is None:
        spec = spec_for(model)
    state = _without_constant_entries(model.state_dict(), seed)
    try:
        spec.check_state_dict(state, name="model.state_dict()")
    except ValueError as e:
        raise SpecError(f"spec does not fit the model: {e}") from e
    inputs = _example_input(model, example_input, seed)
    run_modes = [m for m in modes
                 if m == "eval" or (_has_batch_statistics(model) and not _has_dropout(model))]

    probe = copy.deepcopy(model)

    def outputs(sd: Mapping[str, torch.Tensor], mode: str) -> list[torch.Tensor]:
        probe.load_state_dict(sd)  # also resets the running statistics a train-mode pass changes
        probe.train(mode == "train")
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
            torch.manual_seed(seed)
            return _tensors(probe(*inputs))

    if not spec.is_permutation_only:
        native = (probe, state, inputs)
        try:
            probe = copy.deepcopy(model).double()
            state = {k: _double(v) for k, v in state.items()}
            inputs = tuple(_double(x) for x in inputs)
            outputs(state, "eval")
        except Exception:  # e.g. a forward that builds float32 tensors of its own
            probe, state, inputs = native

    generator = torch.Generator().manual_seed(seed)
    transform = {g: _nontrivial(e) for g, e in random_transform(spec, generator).items()}
    for mode in run_modes:
        reference = outputs(state, mode)
        tol = atol + rtol * max((float(r.abs().max()) for r in reference if r.numel()), default=0.0)
        diff = _max_diff(reference, outputs(_apply(state, spec.axes, transform), mode))
        if not diff <= tol:
            raise _locate(spec, state, transform, reference, lambda sd, m=mode: outputs(sd, m), mode, tol, diff,
                          generator)


def _locate(spec: SymmetrySpec, state: Mapping[str, torch.Tensor], transform: Mapping[str, Any],
            reference: list[torch.Tensor], outputs: Callable, mode: str, atol: float, diff: float,
            generator: torch.Generator) -> SpecError:
    """Find where the spec is wrong: a group that breaks the model alone, its kind, then a one-axis repair."""

    def change(axes: Mapping[str, tuple], t: Mapping[str, Any]) -> float:
        return _max_diff(reference, outputs(_apply(state, axes, t)))

    order: list[str] = []  # groups by first appearance in state_dict order
    for key in state:
        for g in spec.axes[key]:
            if g is not None and g not in order:
                order.append(g)
    culprit, culprit_diff = None, 0.0
    for g in order:
        d = change(spec.axes, {g: transform[g]})
        if not d <= atol:
            culprit, culprit_diff = g, d
            break
    if culprit is None:
        verb = "permuting" if spec.is_permutation_only else "transforming"
        return SpecError(
            f"spec is wrong: {verb} all groups together changes the output by {diff:.1e} in {mode} mode, but no "
            f"group alone does; look for groups that should be one (e.g. both sides of a residual connection)",
            diff=diff)
    g, size, kind = culprit, spec.sizes[culprit], spec.kinds[culprit]
    lower_kinds = list(reversed(_KIND_ORDER[:_KIND_ORDER.index(kind)]))  # most general first
    for lower in lower_kinds:
        if change(spec.axes, {g: _random_element(lower, size, generator)}) <= atol:
            why = ("an odd nonlinearity (e.g. tanh)" if lower == "signed-permutation" else
                   "a nonlinearity that is not odd (e.g. ReLU)" if kind == "signed-permutation" else
                   "a nonlinearity")
            return SpecError(
                f"spec is wrong: group {g!r} is declared {kind} but {_A_RANDOM[kind]} of its units changes "
                f"the output by {culprit_diff:.1e} in {mode} mode, while {_A_RANDOM[lower]} leaves it "
                f"unchanged; its units are probably followed by {why}: use {lower!r} "
                f"(spec.with_kinds({{{g!r}: {lower!r}}}))", group=g, diff=culprit_diff, kind=lower)
    verb, moved = ("permuting", "permuted") if kind == "permutation" else ("transforming", "transformed")
    # one-axis repairs, with the declared kind's element, then (the kind may be wrong too) a permutation
    candidates = [transform[g]] + ([_random_element("permutation", size, generator)] if lower_kinds else [])
    for i, element in enumerate(candidates):
        single = {g: element}
        for key in state:
            shape = state[key].shape
            for a, h in enumerate(spec.axes[key]):
                if h == g:
                    fix, should = None, f"should not be {moved} by group {g!r}"
                elif size > 1 and shape[a] % size == 0:
                    fix = g
                    should = f"should be {moved} by group {g!r}" + (f" instead of {h!r}" if h is not None else "")
                else:
                    continue
                axes = dict(spec.axes)
                ax = list(axes[key])
                ax[a] = fix
                axes[key] = tuple(ax)
                if change(axes, single) <= atol:
                    also = (f"; with that repair {_A_RANDOM[kind]} still changes the output, so the group's "
                            f"declared kind {kind!r} is probably wrong too") if i else ""
                    return SpecError(
                        f"spec is wrong at {key!r}: axis {a} {should} ({verb} that group alone changes the "
                        f"output by {culprit_diff:.1e} in {mode} mode{also})", key=key, axis=a, group=g,
                        diff=culprit_diff)
    places = ", ".join(f"{k}[{a}]" for k, a in spec.groups[g])
    what = "" if kind == "permutation" else f" by {_A_RANDOM[kind]} ({kind})"
    return SpecError(
        f"spec is wrong for group {g!r}: {verb} it alone{what} changes the output by {culprit_diff:.1e} in "
        f"{mode} mode, and no change on a single axis repairs it. It acts on: {places}", group=g,
        diff=culprit_diff)
