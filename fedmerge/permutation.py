"""Pure functions over permutations and state_dicts.

A *permutation* of a model is a ``{group: LongTensor[d]}`` dict, one index vector per group of a
:class:`~fedmerge.spec.PermutationSpec`.  Applying ``perm`` reorders every axis a group acts on so
that unit ``i`` of the result is unit ``perm[g][i]`` of the input (``index_select`` semantics).
Under that convention

* ``apply(apply(sd, p), q) == apply(sd, compose(p, q))`` with ``compose(p, q)[g] = p[g][q[g]]``;
* ``apply(apply(sd, p), invert(p)) == sd``.

No module instance is needed anywhere here: everything is an operation on tensors.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .spec import PermutationSpec

__all__ = [
    "Permutation",
    "permute_axis",
    "apply_permutation",
    "invert_permutation",
    "compose_permutations",
    "identity_permutation",
    "random_permutation",
    "is_identity",
]

Permutation = dict  # dict[str, torch.LongTensor]


def permute_axis(t: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """Reorder ``t`` along ``axis`` by ``index``, reading the axis as ``len(index)`` blocks.

    An axis of length ``k * d`` (a flattened ``(d, k)`` pair, as after ``flatten`` of a feature
    map) is permuted block-wise, which is how a channel permutation acts on the input of the first
    linear layer of a CNN.
    """
    d = index.numel()
    n = t.shape[axis]
    index = index.to(t.device)
    if n == d:
        return t.index_select(axis, index)
    if n % d:
        raise ValueError(f"axis {axis} of length {n} cannot be permuted in blocks of a group of size {d}")
    k = n // d
    shape = t.shape
    blocked = t.reshape(*shape[:axis], d, k, *shape[axis + 1:])
    return blocked.index_select(axis, index).reshape(shape)


def apply_permutation(state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec,
                      perm: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a new state_dict with every permuted axis reordered by ``perm``.

    Groups missing from ``perm`` are left as they are (identity).  Tensors with no permuted axis
    are returned as they are, not copied.
    """
    unknown = set(perm) - set(spec.sizes)
    if unknown:
        raise ValueError(f"permutation names groups {sorted(unknown)} that the spec does not have")
    out = {}
    for key, t in state_dict.items():
        ax = spec.axes.get(key)
        if ax is None:
            raise ValueError(f"key {key!r} is not in the spec")
        for a, g in enumerate(ax):
            if g is not None and g in perm:
                t = permute_axis(t, a, perm[g])
        out[key] = t
    return out


def invert_permutation(perm: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The permutation that undoes ``perm``."""
    return {g: torch.argsort(p) for g, p in perm.items()}


def compose_permutations(first: Mapping[str, torch.Tensor],
                         second: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The permutation equal to applying ``first`` and then ``second``."""
    if set(first) != set(second):
        raise ValueError("cannot compose permutations over different groups: "
                         f"{sorted(set(first) ^ set(second))}")
    return {g: first[g][second[g].to(first[g].device)] for g in first}


def identity_permutation(spec: PermutationSpec, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The permutation that changes nothing."""
    return {g: torch.arange(d, device=device) for g, d in spec.sizes.items()}


def random_permutation(spec: PermutationSpec, generator: torch.Generator | int | None = None,
                       device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """A uniformly random permutation of every group (seedable)."""
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    return {g: torch.randperm(d, generator=generator).to(device) for g, d in spec.sizes.items()}


def is_identity(perm: Mapping[str, torch.Tensor]) -> bool:
    """True when every group of ``perm`` is the identity."""
    return all(torch.equal(p.cpu(), torch.arange(p.numel())) for p in perm.values())
