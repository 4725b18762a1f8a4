"""Pure functions over transforms and state_dicts.

A *transform* of a model is a ``{group: element}`` dict, one element per group of a
:class:`~fedmerge.spec.SymmetrySpec`, each an element of that group's kind
(:mod:`fedmerge.symmetry`): an index vector for a permutation group, a
:class:`~fedmerge.symmetry.SignedPermutation` for a signed one, an orthogonal matrix for an
orthogonal one.  Applying ``t`` moves every axis a group acts on; for a permutation, unit ``i`` of
the result is unit ``t[g][i]`` of the input (``index_select`` semantics).  Under that convention

* ``apply(apply(sd, a), b) == apply(sd, compose(a, b))``;
* ``apply(apply(sd, a), invert(a)) == sd``.

No module instance is needed anywhere here: everything is an operation on tensors.  The names
with ``permutation`` (``apply_permutation``...) are the same functions, kept for the common case
of permutation-only specs.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .spec import SymmetrySpec
from .symmetry import group_of_element

__all__ = ["Transform", "apply_transform", "check_transform", "compose_transforms", "identity_transform",
           "invert_transform", "is_identity", "pairwise_map", "random_transform"]

Transform = dict  # dict[str, group element]


def check_transform(spec: SymmetrySpec, transform: Mapping[str, Any], *, name: str = "transform") -> None:
    """Raise ``ValueError`` unless every element of ``transform`` belongs to its group of ``spec``."""
    if not isinstance(transform, Mapping):
        raise ValueError(f"{name}: expected a {{group: element}} dict, got {type(transform).__name__}")
    unknown = sorted(set(transform) - set(spec.sizes))
    if unknown:
        raise ValueError(f"{name} names groups {unknown} that the spec does not have")
    for g, element in transform.items():
        spec.group(g).validate(element, spec.sizes[g], f"{name}, group {g!r} ({spec.kinds[g]})")


def apply_transform(state_dict: Mapping[str, torch.Tensor], spec: SymmetrySpec, transform: Mapping[str, Any],
                    *, check: bool = True) -> dict[str, torch.Tensor]:
    """Return a new state_dict with every axis of every group moved by ``transform``.

    Groups missing from ``transform`` are left as they are (identity).  Tensors no group acts on
    are returned as they are, not copied.  ``check=False`` skips the validation of the elements
    (for inner loops that built them).
    """
    if check:
        check_transform(spec, transform)
    out = {}
    for key, t in state_dict.items():
        ax = spec.axes.get(key)
        if ax is None:
            raise ValueError(f"key {key!r} is not in the spec")
        for a, g in enumerate(ax):
            if g is not None and g in transform:
                t = spec.group(g).act(t, a, transform[g])
        out[key] = t
    return out


def invert_transform(transform: Mapping[str, Any]) -> dict[str, Any]:
    """The transform that undoes ``transform``."""
    return {g: group_of_element(e).inverse(e) for g, e in transform.items()}


def compose_transforms(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, Any]:
    """The transform equal to applying ``first`` and then ``second``."""
    if set(first) != set(second):
        raise ValueError("cannot compose transforms over different groups: "
                         f"{sorted(set(first) ^ set(second))}")
    out = {}
    for g in first:
        kind, other = group_of_element(first[g]), group_of_element(second[g])
        if kind is not other:
            raise ValueError(f"group {g!r}: cannot compose a {kind.kind} element with a {other.kind} element")
        out[g] = kind.compose(first[g], second[g])
    return out


def identity_transform(spec: SymmetrySpec, device: torch.device | str | None = None) -> dict[str, Any]:
    """The transform that changes nothing."""
    return {g: spec.group(g).identity(d, device) for g, d in spec.sizes.items()}


def random_transform(spec: SymmetrySpec, generator: torch.Generator | int | None = None,
                     device: torch.device | str | None = None) -> dict[str, Any]:
    """A uniformly random element of every group (seedable): a permutation, signed permutation or rotation."""
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    return {g: spec.group(g).random(d, generator, device) for g, d in spec.sizes.items()}


def is_identity(transform: Mapping[str, Any], *, atol: float = 1e-6) -> bool:
    """True when every group of ``transform`` is the identity (within ``atol`` for rotations)."""
    return all(group_of_element(e).defect(e) <= atol for e in transform.values())


# the names of the permutation-only API: the same functions
apply_permutation = apply_transform
invert_permutation = invert_transform
compose_permutations = compose_transforms
identity_permutation = identity_transform
random_permutation = random_transform


def pairwise_map(transforms, source: int, target: int) -> dict[str, Any]:
    """The map from model ``source`` to model ``target`` induced by maps into a common space.

    ``apply_transform(sd_source, spec, pairwise_map(ts, source, target))`` is model ``source``
    with its units in the order (basis) of model ``target`` (``P^{target,source}`` of C²M³).
    """
    return compose_transforms(transforms[source], invert_transform(transforms[target]))
