"""Models stacked along a leading axis, and the tensor contractions every matcher needs.

Matching ``n`` models touches the same parameter of all models at once, so each permuted entry is
kept as one ``(n, *shape)`` tensor.  A permutation group acting on axis ``a`` is handled by
*matricising* along that axis: ``(n, d, R)`` with the ``d`` units first and everything else
(including the ``k`` entries of a block-permuted, flattened axis) in ``R``.  Then

* mapping a model into the common space with a (soft) permutation matrix ``P`` (``(n, d, d)``,
  ``P[k, i]`` = mass from model unit ``k`` to universe unit ``i``) is ``P^T @ M``;
* the same with a hard permutation ``perm`` (``perm[i]`` = model unit feeding universe unit ``i``)
  is a gather ``M[:, perm]``;
* the linear part of ``<X ×_a P, S>`` in ``P`` is ``M_X @ M_S^T`` — the gradient used by
  Frank-Wolfe and the cost matrix used by Git Re-Basin.

All tensors stay on the device of the input models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..spec import SymmetrySpec


def matricize(t: torch.Tensor, axis: int, d: int) -> tuple[torch.Tensor, torch.Size]:
    """View ``t`` (``(n, *shape)``) as ``(n, d, R)`` along data axis ``axis``; also return the shape to undo it."""
    moved = t.movedim(axis + 1, 1)
    return moved.reshape(moved.shape[0], d, -1), moved.shape


def unmatricize(m: torch.Tensor, axis: int, moved_shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`matricize`."""
    return m.reshape(moved_shape).movedim(1, axis + 1)


def split_axis(t: torch.Tensor, axis: int, d: int) -> torch.Tensor:
    """View ``t`` (``(n, *shape)``) as ``(n, A, d, B)`` around data axis ``axis``, without moving data.

    ``A`` gathers the axes before ``axis``, ``B`` the ones after it and, for a block-permuted
    (flattened) axis of ``d·k`` entries, each unit's ``k`` consecutive entries.  Same units as
    :func:`matricize` (``(n, d, A·B)`` up to the order of the ``R`` entries), but a contiguous
    ``t`` is only re-viewed, not copied: on the weights of a linear layer's input axis the copy
    that moving the axis makes costs as much as the gather that follows it.
    """
    shape = t.shape[1:]
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1:]) * (shape[axis] // d)
    return t.reshape(t.shape[0], outer, d, inner)


#: Below this fraction of non-zero entries a soft permutation is applied as a sparse gather-add.
SPARSE_DENSITY = 0.02


class SoftPermutation:
    """Doubly-stochastic matrices ``(n, d, d)``, applied sparsely while they are nearly permutations.

    Frank-Wolfe iterates are convex combinations of a few permutation matrices, and in practice
    stay close to one (about one non-zero per column on trained MLPs).  ``P^T M`` then costs a
    gather-add over the non-zeros instead of a dense product.
    """

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix
        n, d, _ = matrix.shape
        self.sparse = None
        if d > 1:
            nz = matrix.nonzero(as_tuple=True)
            if nz[0].numel() <= SPARSE_DENSITY * matrix.numel():
                model, src, dst = nz  # sorted by model
                self.sparse = (model * d + dst, model * d + src, matrix[nz].unsqueeze(1))
                counts = torch.bincount(model, minlength=n).tolist()
                self.per_model = list(zip(dst.split(counts), src.split(counts), matrix[nz].split(counts)))

    def apply(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """Map axis ``axis`` of every model into the universe: ``P^T @ M`` along that axis."""
        n, d, _ = self.matrix.shape
        v = split_axis(t, axis, d)
        if self.sparse is None:
            if v.shape[1] == 1:  # the units lead: one batched product, no copy
                return torch.bmm(self.matrix.transpose(1, 2), v[:, 0]).view(t.shape)
            return torch.einsum("nki,nakb->naib", self.matrix, v).reshape(t.shape)
        dst, src, val = self.sparse
        if v.shape[1] == 1:  # rows are units: gather-add whole rows of the (n·d, B) view
            flat = v.reshape(n * d, -1)
            return torch.zeros_like(flat).index_add_(0, dst, flat.index_select(0, src).mul_(val)).view(t.shape)
        # units in the middle of (n, A, d, B): per model, gather-add along that axis (no transposed copy)
        out = torch.zeros_like(v)
        for p, (dst_p, src_p, val_p) in enumerate(self.per_model):
            out[p].index_add_(1, dst_p, v[p].index_select(1, src_p).mul_(val_p.view(1, -1, 1)))
        return out.view(t.shape)


def contract_hard(t: torch.Tensor, axis: int, perm: torch.Tensor) -> torch.Tensor:
    """Map axis ``axis`` of every model into the universe with index permutations ``perm`` (``(n, d)``)."""
    n, d = perm.shape
    v = split_axis(t, axis, d)
    if v.shape[1] == 1:  # whole rows move: index_select copies rows, cheaper than an element-wise gather
        rows = (perm + torch.arange(n, device=perm.device).unsqueeze(1) * d).reshape(-1)
        return v.reshape(n * d, -1).index_select(0, rows).view(t.shape)
    # units in the middle: one index_select along that axis per model (copies whole (B,) runs), several
    # times faster than an element-wise gather with an expanded index
    out = torch.empty_like(v)
    for p in range(n):
        torch.index_select(v[p], 1, perm[p], out=out[p])
    return out.view(t.shape)


def linear_term(x: torch.Tensor, s: torch.Tensor, axis: int, d: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``G[p, k, i] = <x_p restricted to unit k, s_p restricted to unit i>`` along ``axis``.

    With ``out`` (``(n, d, d)``), ``G`` is added to it in place (no temporary for the product).
    """
    return unit_products(split_axis(x, axis, d), split_axis(s, axis, d), out=out)


def unit_products(xv: torch.Tensor, sv: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``G[p, k, i] = sum_{a,b} xv[p, a, k, b] sv[p, a, i, b]`` for views ``(n, A, d, B)`` and ``(n, A, e, B)``
    (:func:`split_axis`): one batched product where the units lead or come last; added to ``out`` if given."""
    if xv.shape[1] == 1:  # units lead (output axis): (n, d, B) @ (n, B, d)
        a, b = xv[:, 0], sv[:, 0].transpose(1, 2)
    elif xv.shape[3] == 1:  # units last (input axis of a linear layer): (n, d, A) @ (n, A, d)
        a, b = xv[..., 0].transpose(1, 2), sv[..., 0]
    else:
        g = torch.einsum("nakb,naib->nki", xv, sv)
        return g if out is None else out.add_(g)
    return torch.bmm(a, b) if out is None else out.baddbmm_(a, b)


@dataclass
class Stack:
    """The permuted entries of ``n`` state_dicts, stacked, in float32, on one device.

    ``axes[key]`` lists ``(axis, group)`` for the permuted axes of ``key``; entries without a
    permuted axis are not kept (they are the same in every space and add a constant to every
    matching objective).
    """

    spec: SymmetrySpec
    weights: dict[str, torch.Tensor]
    axes: dict[str, list[tuple[int, str]]]
    n: int
    device: torch.device

    @classmethod
    def from_state_dicts(cls, state_dicts: Sequence[Mapping[str, torch.Tensor]],
                         spec: SymmetrySpec) -> "Stack":
        device = state_dicts[0][next(iter(state_dicts[0]))].device
        weights, axes = {}, {}
        for key in spec.permuted_keys:
            if not torch.is_floating_point(state_dicts[0][key]):
                continue
            weights[key] = torch.stack([sd[key].to(device=device, dtype=torch.float32) for sd in state_dicts])
            axes[key] = [(a, g) for a, g in enumerate(spec.axes[key]) if g is not None]
        return cls(spec, weights, axes, len(state_dicts), device)

    def groups(self) -> list[str]:
        return list(self.spec.sizes)

    def to_universe_hard(self, perms: Mapping[str, torch.Tensor], key: str,
                         skip: int | None = None, source: torch.Tensor | None = None) -> torch.Tensor:
        """Entry ``key`` of every model mapped with hard permutations ``perms[g]`` (``(n, d)``).

        ``skip`` leaves that data axis unmapped (what a cost matrix along it needs).
        """
        t = self.weights[key] if source is None else source
        for a, g in self.axes[key]:
            if a != skip:
                t = contract_hard(t, a, perms[g])
        return t


def stack_permutations(perms: Sequence[Mapping[str, torch.Tensor]], device) -> dict[str, torch.Tensor]:
    """``[{g: (d,)}] * n`` -> ``{g: (n, d)}``."""
    return {g: torch.stack([p[g].to(device) for p in perms]) for g in perms[0]}


def unstack_permutations(perms: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """``{g: (n, d)}`` -> ``[{g: (d,)}] * n``."""
    n = next(iter(perms.values())).shape[0]
    return [{g: p[i].clone() for g, p in perms.items()} for i in range(n)]


def pair_objective(stack: Stack, perms: Mapping[str, torch.Tensor]) -> float:
    """``sum_{p<q} sum_key <U_p, U_q>`` for hard permutations, in float64.

    The matching objective of Git Re-Basin (n = 2) and C²M³ (Eq. 4 of the paper, counted once per
    unordered pair), computed as ``(||sum_p U_p||^2 - sum_p ||U_p||^2) / 2`` in O(n) per entry.
    """
    total = 0.0
    for key in stack.weights:
        total += sum_pairs(stack.to_universe_hard(perms, key))
    return total


def sum_pairs(u: torch.Tensor) -> float:
    """``sum_{p<q} <u_p, u_q>`` for ``u`` of shape ``(n, ...)``, as ``(||sum_p u_p||^2 - sum_p ||u_p||^2) / 2``.

    In float64, accumulated model by model: O(n) time and one float64 copy of a single model.
    """
    s = torch.zeros(u[0].numel(), dtype=torch.float64, device=u.device)
    squares = 0.0
    for x in u.reshape(u.shape[0], -1):
        x = x.double()
        squares += float(x @ x)
        s += x
    return float((s @ s - squares) / 2)
