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
    xv, sv = split_axis(x, axis, d), split_axis(s, axis, d)
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
        for k, u in self.u.items():  # model by model: no float64 copy of all n models at once
            total = torch.zeros(u.shape[1:], dtype=torch.float64, device=u.device)
            for i in torch.nonzero(self.active).flatten().tolist():
                total += u[i]
            self.total[k] = total
        self.places: dict[str, list[tuple[str, int]]] = {g: [] for g in stack.groups()}
        for key, axes in stack.axes.items():
            for a, g in axes:
                self.places[g].append((key, a))
        self.total32 = {k: t.float() for k, t in self.total.items()}  # what the cost-matrix products use
        self.laps = 0
        self.gain = 0.0  # objective gained by the accepted steps (each read off its cost matrix, or exact)
        self._norms: dict[str, torch.Tensor] | None = None
        self.versions = {k: 0 for k in stack.weights}  # bumped whenever some model's U[key] changes
        self._clean: dict[tuple[int, str], tuple] = {}  # (model, group) -> versions when last solved unchanged

    def _target(self, key: str, p: int) -> torch.Tensor:
        t = self.total[key]
        return t - self.u[key][p].double() if self.active[p] else t

    def _target32(self, key: str, p: int) -> torch.Tensor:
        t = self.total32[key]
        return t - self.u[key][p] if self.active[p] else t

    def step(self, p: int, g: str) -> bool:
        """Re-solve group ``g`` of model ``p``; True if its permutation changed (and the objective rose).

        The cost matrix is a float32 product against ``T``; the gain of a new permutation is computed
        exactly (float64) on the units it moves, which is all that changes where ``g`` acts on one
        axis of each tensor.  A block whose inputs (model ``p``'s other permutations on ``g``'s
        tensors, the other models on them) have not changed since it was last solved without
        change is skipped: its LAP would return the same permutation.
        """
        stack, d = self.stack, self.stack.spec.sizes[g]
        places = self.places[g]
        if not places:
            return False
        keys = list(dict.fromkeys(k for k, _ in places))
        stamp = tuple(self.versions[k] for k in keys)
        if self._clean.get((p, g)) == stamp:
            return False
        one = {h: q[p:p + 1] for h, q in self.perms.items()}
        score, parts = None, []
        for key, a in places:
            x = stack.to_universe_hard(one, key, skip=a, source=stack.weights[key][p:p + 1])
            target = self._target32(key, p).unsqueeze(0)
            s = linear_term(x, target, a, d)[0]
            score = s if score is None else score + s
            parts.append((key, a, x, target, s))
        from ..assignment import solve_lap
        new = solve_lap(score)
        self.laps += 1
        old = self.perms[g][p]
        if torch.equal(new, old):
            self._clean[(p, g)] = stamp
            return False
        if len(keys) < len(places):  # g acts on two axes of one tensor: the cost matrix is a linearisation
            accepted = self._full_step(p, g, new, keys)
        else:
            accepted = self._moved_step(p, g, new, old, parts)
        if accepted:
            for k in keys:
                self.versions[k] += 1
        else:
            self._clean[(p, g)] = stamp
        return accepted

    def _moved_step(self, p: int, g: str, new: torch.Tensor, old: torch.Tensor, parts) -> bool:
        d = new.numel()
        units = torch.nonzero(new != old).flatten()
        to, frm = new[units], old[units]
        cols = torch.arange(d, device=new.device)
        # The gain read off the float32 cost matrix, and a bound on its rounding error: a dot product
        # of length K is within gamma_K ||x|| ||T|| of the exact one, gamma_K = K u / (1 - K u) (plus
        # the rounding of T to float32, relative to |total| + |U_p|); summed over the moved units,
        # Cauchy-Schwarz bounds it by gamma ||x||_F ||T||_F, and the triangle inequality ||T||_F by
        # the other models' norms (permutations do not change norms: no pass over any tensor).
        # A gain larger than its error bound is a true ascent step.
        unit = 2.0 ** -24
        norms = self.norms()
        others = self.active.clone()
        others[p] = False
        estimate, error, scale = 0.0, 0.0, 0.0
        for key, a, x, target, s in parts:
            length = x[0].numel() // d
            gamma = length * unit / max(1.0 - length * unit, 1e-3) + 3 * unit
            mine = float(norms[key][p])
            reach = float(norms[key][others.to(norms[key].device)].sum()) + (2 * mine if self.active[p] else 0.0)
            estimate += float(s[to, units].double().sum() - s[frm, units].double().sum())
            error += gamma * 2 * mine * reach
            scale += abs(float(s[old, cols].double().sum()))
        sure = estimate - error > 1e-12 * max(scale, 1e-300)
        if not sure:  # too close to call in float32: the exact gain, in float64, on the moved units
            gain = 0.0
            for key, a, x, target, s in parts:
                xv = split_axis(x, a, d)[0]  # (A, d, B): model p mapped on every axis but a
                exact = split_axis(self.total[key].unsqueeze(0), a, d)[0][:, units]
                if self.active[p]:
                    exact = exact - split_axis(self.u[key][p:p + 1], a, d)[0][:, units].double()
                gain += float((exact * xv[:, to]).sum() - (exact * xv[:, frm]).sum())
            if not gain > 1e-12 * max(scale, 1e-300):
                return False
            estimate = gain
        self.gain += estimate
        self.perms[g][p] = new
        whole = 2 * units.numel() > d
        for key, a, x, target, s in parts:  # U_p, the float64 sum and its float32 copy, in place
            u = self.u[key][p]
            if whole:  # most units move: whole tensors, mixed-precision in-place adds (no float64 temporaries)
                fresh = contract_hard(x, a, new.unsqueeze(0))[0]
                if self.active[p]:
                    self.total[key].add_(fresh).sub_(u)
                    self.total32[key].copy_(self.total[key])
                u.copy_(fresh)
                continue
            xv = split_axis(x, a, d)[0]
            fresh = xv[:, to]
            if self.active[p]:
                total = split_axis(self.total[key].unsqueeze(0), a, d)[0]
                rows = total[:, units]
                rows += fresh
                rows -= xv[:, frm]
                total[:, units] = rows
                split_axis(self.total32[key].unsqueeze(0), a, d)[0][:, units] = rows.float()
            split_axis(u.unsqueeze(0), a, d)[0][:, units] = fresh
        return True

    def _full_step(self, p: int, g: str, new: torch.Tensor, keys) -> bool:
        stack = self.stack
        one = {h: q[p:p + 1] for h, q in self.perms.items()}
        one[g] = new.unsqueeze(0)
        moved, gain, scale = {}, 0.0, 0.0
        for key in keys:
            target = self._target(key, p)
            u_new = stack.to_universe_hard(one, key, source=stack.weights[key][p:p + 1])[0]
            u_old = self.u[key][p]
            gain += float(((u_new.double() - u_old.double()) * target).sum())
            scale += abs(float((u_old.double() * target).sum()))
            moved[key] = u_new
        if not gain > 1e-12 * max(scale, 1e-300):
            return False
        self.gain += gain
        self.perms[g][p] = new
        for key, u_new in moved.items():
            if self.active[p]:
                self.total[key] += u_new.double() - self.u[key][p].double()
                self.total32[key] = self.total[key].float()
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
                self.total32[k] = self.total[k].float()
                self.versions[k] += 1

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
        norms = self.norms()
        for key, u in self.u.items():
            share += float(u[p].double().reshape(-1) @ self._target(key, p).reshape(-1))
            bound += float(norms[key][p] * norms[key][others.to(norms[key].device)].sum())
        return share, bound

    def norms(self) -> dict[str, torch.Tensor]:
        """``{key: (n,)}`` Frobenius norms of every model's entry, in float64 (permutations do not change them)."""
        if self._norms is None:
            self._norms = {k: torch.stack([w[i].double().norm() for i in range(self.stack.n)])
                           for k, w in self.stack.weights.items()}
        return self._norms

    def objective(self) -> float:
        return pair_objective(self.stack, self.perms)
