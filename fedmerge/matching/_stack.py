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
                model, src, dst = nz
                self.sparse = (model * d + dst, model * d + src, matrix[nz].unsqueeze(1))

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
        m, shape = matricize(t, axis, d)
        flat = m.reshape(n * d, -1)
        out = torch.zeros_like(flat).index_add_(0, dst, flat.index_select(0, src).mul_(val)).view(n, d, -1)
        return unmatricize(out, axis, shape)


def contract_hard(t: torch.Tensor, axis: int, perm: torch.Tensor) -> torch.Tensor:
    """Map axis ``axis`` of every model into the universe with index permutations ``perm`` (``(n, d)``)."""
    n, d = perm.shape
    v = split_axis(t, axis, d)
    if v.shape[1] == 1:  # whole rows move: index_select copies rows, cheaper than an element-wise gather
        rows = (perm + torch.arange(n, device=perm.device).unsqueeze(1) * d).reshape(-1)
        return v.reshape(n * d, -1).index_select(0, rows).view(t.shape)
    idx = perm.view(n, 1, d, 1).expand(-1, v.shape[1], -1, v.shape[3])
    return torch.gather(v, 2, idx).view(t.shape)


def linear_term(x: torch.Tensor, s: torch.Tensor, axis: int, d: int) -> torch.Tensor:
    """``G[p, k, i] = <x_p restricted to unit k, s_p restricted to unit i>`` along ``axis``."""
    xv, sv = split_axis(x, axis, d), split_axis(s, axis, d)
    if xv.shape[1] == 1:  # units lead (output axis): (n, d, B) @ (n, B, d)
        return torch.bmm(xv[:, 0], sv[:, 0].transpose(1, 2))
    if xv.shape[3] == 1:  # units last (input axis of a linear layer): (n, d, A) @ (n, A, d)
        return torch.bmm(xv[..., 0].transpose(1, 2), sv[..., 0])
    return torch.einsum("nakb,naib->nki", xv, sv)


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
        u = stack.to_universe_hard(perms, key).reshape(stack.n, -1).double()
        s = u.sum(0)
        total += float((s @ s - (u * u).sum()) / 2)
    return total


class BlockAscent:
    """Hard permutations of ``n`` stacked models, improved one (model, group) block at a time.

    Holding every permutation but that of group ``g`` in model ``p`` fixed, Eq. 4 is
    ``<U_p, T> + const`` with ``T`` the sum of the other models in the universe (``||U_p||`` does
    not depend on the permutations), so the best ``P_g^p`` is one LAP on the cost matrix
    ``linear_term(model p mapped on every other axis, T)`` — exact where ``g`` acts on one axis of
    each tensor, a linearisation otherwise.  A new permutation is kept only if it raises the
    objective (computed exactly, in float64), so every accepted step is an ascent step and the
    sweeps end.

    ``active`` marks the models counted in ``T`` (all by default); a model outside it is matched
    to the sum of the active ones, which is how :meth:`sequential` builds a start.  Memory: the
    universe images ``U`` (one more copy of the models) and their sum in float64.
    """

    def __init__(self, stack: Stack, perms: Mapping[str, torch.Tensor], active: torch.Tensor | None = None):
        self.stack = stack
        self.perms = {g: p.clone() for g, p in perms.items()}
        n = stack.n
        self.active = torch.ones(n, dtype=torch.bool) if active is None else active.clone().cpu()
        self.u = {k: stack.to_universe_hard(self.perms, k) for k in stack.weights}
        self.total = {}
        for k, u in self.u.items():
            mask = self.active.to(u.device).view(-1, *([1] * (u.dim() - 1)))
            self.total[k] = (u.double() * mask).sum(0)
        self.places: dict[str, list[tuple[str, int]]] = {g: [] for g in stack.groups()}
        for key, axes in stack.axes.items():
            for a, g in axes:
                self.places[g].append((key, a))
        self.laps = 0

    def _target(self, key: str, p: int) -> torch.Tensor:
        t = self.total[key]
        return t - self.u[key][p].double() if self.active[p] else t

    def step(self, p: int, g: str) -> bool:
        """Re-solve group ``g`` of model ``p``; True if its permutation changed (and the objective rose)."""
        stack, d = self.stack, self.stack.spec.sizes[g]
        places = self.places[g]
        if not places:
            return False
        one = {h: q[p:p + 1] for h, q in self.perms.items()}
        targets = {key: self._target(key, p) for key in {k for k, _ in places}}
        score = None
        for key, a in places:
            x = stack.to_universe_hard(one, key, skip=a, source=stack.weights[key][p:p + 1])
            s = linear_term(x, targets[key].to(x.dtype).unsqueeze(0), a, d)[0]
            score = s if score is None else score + s
        from ..assignment import solve_lap
        new = solve_lap(score)
        self.laps += 1
        old = self.perms[g][p]
        if torch.equal(new, old):
            return False
        one[g] = new.unsqueeze(0)
        moved, gain, scale = {}, 0.0, 0.0
        for key in targets:
            u_new = stack.to_universe_hard(one, key, source=stack.weights[key][p:p + 1])[0]
            u_old = self.u[key][p]
            gain += float(((u_new.double() - u_old.double()) * targets[key]).sum())
            scale += abs(float((u_old.double() * targets[key]).sum()))
            moved[key] = u_new
        if not gain > 1e-12 * max(scale, 1e-300):
            return False
        self.perms[g][p] = new
        for key, u_new in moved.items():
            if self.active[p]:
                self.total[key] += u_new.double() - self.u[key][p].double()
            self.u[key][p] = u_new
        return True

    def match_model(self, p: int, groups: Sequence[str], max_sweeps: int) -> int:
        """Sweeps over model ``p``'s groups until one changes nothing (at most ``max_sweeps``); returns sweeps."""
        for sweep in range(1, max_sweeps + 1):
            if not sum(self.step(p, g) for g in groups):
                return sweep
        return max_sweeps

    def activate(self, p: int) -> None:
        """Count model ``p`` in the targets of the others from now on."""
        if not self.active[p]:
            self.active[p] = True
            for k in self.total:
                self.total[k] += self.u[k][p].double()

    def alignment_with_active(self, p: int) -> tuple[float, float]:
        """``(<U_p, T>, sum_key ||U_p|| ||T_key||-style bound)`` against the active models other than ``p``.

        The first number is model ``p``'s share of Eq. 4 against the active models; the second is
        its Cauchy-Schwarz bound ``sum_key sum_q ||W_p^key|| ||W_q^key||`` (norms do not depend on
        the permutations).  They are equal exactly when ``p`` coincides with every active model in
        the universe, up to positive scale.
        """
        share, bound = 0.0, 0.0
        others = self.active.clone()
        others[p] = False
        for key, u in self.u.items():
            w = u.reshape(self.stack.n, -1).double()
            norms = w.norm(dim=1)
            share += float(w[p] @ self._target(key, p).reshape(-1))
            bound += float(norms[p] * norms[others.to(norms.device)].sum())
        return share, bound

    def objective(self) -> float:
        return pair_objective(self.stack, self.perms)
