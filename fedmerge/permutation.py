"""Permutations of hidden units: index vectors, and the names of the permutation-only API.

A *permutation* of a model is a ``{group: LongTensor[d]}`` dict, one index vector per group of a
permutation-only :class:`~fedmerge.spec.SymmetrySpec`; unit ``i`` of the result is unit
``perm[g][i]`` of the input (``index_select`` semantics), so

* ``apply(apply(sd, p), q) == apply(sd, compose(p, q))`` with ``compose(p, q)[g] = p[g][q[g]]``;
* ``apply(apply(sd, p), invert(p)) == sd``.

The functions are those of :mod:`fedmerge.transforms`, which serve every kind of group.
"""

from __future__ import annotations

import torch

from .symmetry import KINDS
from .transforms import (apply_permutation, compose_permutations, identity_permutation, invert_permutation,
                         is_identity, random_permutation)

__all__ = ["Permutation", "permute_axis", "apply_permutation", "invert_permutation", "compose_permutations",
           "identity_permutation", "random_permutation", "is_identity"]

Permutation = dict  # dict[str, torch.LongTensor]


def permute_axis(t: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """Reorder ``t`` along ``axis`` by ``index``, reading the axis as ``len(index)`` blocks.

    An axis of length ``k * d`` (a flattened ``(d, k)`` pair, as after ``flatten`` of a feature
    map) is permuted block-wise, which is how a channel permutation acts on the input of the first
    linear layer of a CNN.
    """
    return KINDS["permutation"].act(t, axis, index)
