"""Block-coordinate ascent on Eq. 4 over hard permutations: C²M³'s start and its refinement.

One (model, group) block at a time is re-solved by one LAP against the sum of the other models in
the universe, everything else held fixed; a step is kept only if it raises the objective.  Each
block's cost matrix is kept between visits: an accepted step logs its change to the universe once,
and a kept matrix applies the changes logged since it was last brought up to date, as low-rank or
column updates, when its block is next visited (:class:`_ScoreCache`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from ..assignment import solve_lap
from ..warm_lap import WarmStart
from ._stack import Stack, contract_hard, linear_term, matricize, pair_objective, split_axis, unit_products

__all__ = ["BlockAscent"]


#: Visits that apply updates to a cached cost matrix before it is computed again (bounds the float32
#: rounding they add up).
_MAX_UPDATES = 64
#: A cached cost matrix whose owed updates touch more than this fraction of its units is dropped and
#: computed afresh: applying updates on a fraction f of the units costs about f of a fresh product.
_OWED_UNITS = 1.0
#: Entries of one tensor a refinement step maps at once (its float64 temporaries are a few times this).
_STEP_CHUNK = 1 << 24


class _ScoreCache:
    """One group's cost matrices for every model, ``(n, d, d)``, and the updates they still owe.

    ``seen[p]``: the last entry of the change log (:meth:`BlockAscent._log_change`) that model
    ``p``'s matrix reflects; ``moved[p]``: the fraction of its units that the changes since its
    last full product touch (it is dropped past ``_OWED_UNITS``).  Updates are kept as factors and
    applied when the block is next visited, all of them in one product per kind: a block that
    several steps touch between two visits pays one pass over its weights, not one per step.
    """

    def __init__(self, n: int, d: int, device):
        self.matrix = torch.zeros(n, d, d, device=device)
        self.valid = torch.zeros(n, dtype=torch.bool)
        self.moved = torch.zeros(n, dtype=torch.float64)  # fraction of units the owed changes touch
        self.updates = torch.zeros(n, dtype=torch.int64)  # visits that applied updates since the last product
        self.seen = torch.zeros(n, dtype=torch.int64)  # the last change-log entry each matrix reflects
        self.pending: list[list[tuple]] = [[] for _ in range(n)]

    def current(self, p: int, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Model ``p``'s matrix with its pending updates applied (``weights``: the stacked raw weights).

        Two kinds are owed: ``("rank", L, R)``, the matrix changes by ``L R^T``; ``("columns", key,
        axis, d, units, back)``, columns ``units`` change by model ``p``'s raw ``key`` against ``back``
        (``(A, |units|, B)`` around ``axis``), collected per entry into one product.
        """
        owed = self.pending[p]
        if not owed:
            return self.matrix[p]
        self.moved[p] = 0.0
        self.updates[p] += 1
        ranks = [(e[1], e[2]) for e in owed if e[0] == "rank"]
        if ranks:
            left = torch.cat([l for l, _ in ranks], dim=1)
            right = torch.cat([r for _, r in ranks], dim=1)
            self.matrix[p].addmm_(left, right.T)
        columns: dict[tuple[str, int, int], list] = {}
        for e in owed:
            if e[0] == "columns":
                columns.setdefault(e[1:4], []).append((e[4], e[5]))
        for (key, axis, d), parts in columns.items():
            units = torch.cat([u for u, _ in parts])
            back = torch.cat([b for _, b in parts], dim=1)
            delta = unit_products(split_axis(weights[key][p:p + 1], axis, d), back.unsqueeze(0))[0]
            self.matrix[p].index_add_(1, units, delta)
        owed.clear()
        return self.matrix[p]

    def reset(self, p: int, score: torch.Tensor, seen: int) -> None:
        self.matrix[p] = score
        self.valid[p] = True
        self.moved[p] = 0.0
        self.updates[p] = 0
        self.seen[p] = seen
        self.pending[p].clear()

    def drop(self, mask: torch.Tensor) -> None:
        self.valid[mask] = False
        for p in torch.nonzero(mask).flatten().tolist():
            self.pending[p].clear()

    def clear(self) -> None:
        """Every model's matrix invalid (kept allocated: an ``(n, d, d)`` buffer is not reallocated per use)."""
        self.valid.zero_()
        self.moved.zero_()
        self.updates.zero_()
        for owed in self.pending:
            owed.clear()


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse permutations of ``(m, d)``."""
    return torch.argsort(perm, dim=1)


def _select_units(t: torch.Tensor, axis: int, d: int, index: torch.Tensor) -> torch.Tensor:
    """``t`` (``(m, ...)``) restricted along ``axis`` (``d`` units) to units ``index[i]`` (``(m, k)``) of model ``i``."""
    m, k = index.shape
    v = split_axis(t, axis, d)
    if m == 1:
        sub = v.index_select(2, index[0])
    else:
        sub = v.gather(2, index.view(m, 1, k, 1).expand(m, v.shape[1], k, v.shape[3]))
    shape = list(t.shape)
    shape[axis + 1] = k * (t.shape[axis + 1] // d)
    return sub.reshape(shape)


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
    to the sum of the active ones, which is how C²M³'s start places one model after another.
    Memory: the universe images ``U`` (one more copy of the models) and their sum in float64.
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
        # group -> the groups whose cost matrices a step on it changes: every group on its tensors
        self.touched = {g: list(dict.fromkeys(h for key, _ in places for _, h in stack.axes[key]))
                        for g, places in self.places.items()}
        self.total32 = {k: t.float() for k, t in self.total.items()}  # what the cost-matrix products use
        self.laps = 0
        self.gain = 0.0  # objective gained by the accepted steps (each read off its cost matrix, or exact)
        self._norms: dict[str, torch.Tensor] | None = None
        self.versions = {k: 0 for k in stack.weights}  # bumped whenever some model's U[key] changes
        self._clean: dict[tuple[int, str], tuple] = {}  # (model, group) -> versions when last solved unchanged
        self._warm: dict[tuple[int, str], WarmStart] = {}  # (model, group) -> the LAP's state from its last solve
        self._scores: dict[str, _ScoreCache] = {}  # group -> every model's cost matrix, kept between visits
        # key -> the accepted steps' changes to U[key] not yet reflected by every kept matrix on key, in order:
        # (entry, model, axis, units, diff); ``_entries`` numbers them
        self._log: dict[str, list[tuple]] = {k: [] for k in stack.weights}
        self._entries = 0

    def _target(self, key: str, p: int) -> torch.Tensor:
        t = self.total[key]
        return t - self.u[key][p].double() if self.active[p] else t

    def _target32(self, key: str, p: int) -> torch.Tensor:
        t = self.total32[key]
        return t - self.u[key][p] if self.active[p] else t

    def step(self, p: int, g: str) -> bool:
        """Re-solve group ``g`` of model ``p``; True if its permutation changed (and the objective rose).

        The cost matrix is a float32 product against ``T``, kept between visits and updated on the
        units that later steps move (:meth:`_log_change`); the LAP is warm-started from the block's
        last solve.  A new permutation is taken only if its gain, computed exactly (float64) on
        the units it moves, is positive.  A block whose inputs (model ``p``'s other permutations
        on ``g``'s tensors, the other models on them) have not changed since it was last solved
        without change is skipped: its LAP would return the same permutation.
        """
        d = self.stack.spec.sizes[g]
        places = self.places[g]
        if not places:
            return False
        keys = list(dict.fromkeys(k for k, _ in places))
        stamp = tuple(self.versions[k] for k in keys)
        if self._clean.get((p, g)) == stamp:
            return False
        score = self._score(p, g)
        warm = self._warm.get((p, g))
        if warm is None:
            warm = self._warm[(p, g)] = WarmStart(d)
            warm.perm = self.perms[g][p].cpu().numpy().astype(np.int64)
        new = solve_lap(score, warm)
        self.laps += 1
        old = self.perms[g][p].clone()  # (a view would follow the update)
        if torch.equal(new, old):
            self._clean[(p, g)] = stamp
            return False
        scale = abs(float(score[old, torch.arange(d, device=old.device)].double().sum()))
        if len(keys) < len(places):  # g acts on two axes of one tensor: the cost matrix is a linearisation
            accepted = self._full_step(p, g, new, keys)
            if accepted:
                for k in keys:
                    self._forget(k)
        else:
            accepted = self._moved_step(p, g, new, old, scale)
        if accepted:
            for k in keys:
                self.versions[k] += 1
        else:
            self._clean[(p, g)] = stamp
        return accepted

    # ---- cost matrices, kept between visits
    def _score(self, p: int, g: str) -> torch.Tensor:
        """Block ``(p, g)``'s cost matrix: the cached one brought up to date, or a new product against ``T``."""
        cache = self._scores.get(g)
        if cache is not None and cache.valid[p]:
            self._catch_up(p, g)
            return cache.current(p, self.stack.weights)
        d = self.stack.spec.sizes[g]
        one = {h: q[p:p + 1] for h, q in self.perms.items()}
        score = None
        for key, a in self.places[g]:
            x = self.stack.to_universe_hard(one, key, skip=a, source=self.stack.weights[key][p:p + 1])
            s = linear_term(x, self._target32(key, p).unsqueeze(0), a, d)[0]
            score = s if score is None else score.add_(s)
        if cache is None:
            cache = self._scores[g] = _ScoreCache(self.stack.n, d, score.device)
        cache.reset(p, score, self._entries)
        return cache.matrix[p]

    def _forget(self, key: str, model: int | None = None) -> None:
        """Drop the cached cost matrices of every group on ``key`` (of one model, or of all)."""
        for _, g in self.stack.axes[key]:
            cache = self._scores.get(g)
            if cache is not None:
                cache.drop(torch.ones_like(cache.valid) if model is None else torch.arange(self.stack.n) == model)

    def _owe(self, q: int, h: str, fraction: float) -> None:
        """Count a step of model ``q`` on group ``h`` moving ``fraction`` of its units against the kept matrices.

        It changes the target of every other model (when ``q`` is active) on the tensors of ``h``, and
        model ``q``'s own weights mapped on ``h``'s axes: every such kept matrix owes an update touching
        that fraction of the units.  A matrix whose owed updates would touch more than ``_OWED_UNITS`` of
        its units, or that has applied updates at ``_MAX_UPDATES`` visits since its last full product
        (their float32 rounding adds up), is dropped instead and computed afresh when next visited.
        """
        for g in self.touched[h]:
            cache = self._scores.get(g)
            if cache is None:
                continue
            if self.active[q]:
                take = cache.valid.clone()
                if g == h:  # q's own block on h does not change: its weights are mapped on every other axis
                    take[q] = False
            else:
                take = torch.zeros_like(cache.valid)
                take[q] = g != h and bool(cache.valid[q])
            if not bool(take.any()):
                continue
            cache.moved[take] += fraction
            cache.drop(take & ((cache.moved > _OWED_UNITS) | (cache.updates >= _MAX_UPDATES)))

    def _log_change(self, q: int, h: str, key: str, b: int, units: torch.Tensor, diff: torch.Tensor) -> None:
        """Record that model ``q``'s ``U[key]`` changed by ``diff`` on slots ``units`` (axis ``b``, group ``h``).

        ``diff`` (``(1, ...)``, ``key``'s shape with axis ``b`` restricted to ``units``) is in universe
        coordinates on every axis.  For another model ``p`` the target ``T_p`` changed by ``diff``; that
        change is logged once, for the kept matrices of every other model to apply at their next visit
        (:meth:`_catch_up`): a step computes nothing per other model (a sweep stays O(n) in the models),
        and a matrix that is dropped before its visit costs nothing.  For ``q`` itself ``T_q`` did not
        change, but its weights mapped on axis ``b`` did: its blocks on the other groups of ``key`` owe ``diff`` against ``T_q`` on those slots,
        computed now (``T_q`` changes later).
        """
        stack = self.stack
        dh = stack.spec.sizes[h]
        if self.active[q] and any(c is not None and int(c.valid.sum()) > int(c.valid[q])  # another model's is kept
                                  for c in (self._scores.get(g) for _, g in stack.axes[key])):
            self._entries += 1
            self._log[key].append((self._entries, q, b, units, diff))
            self._trim(key)
        for a, g in stack.axes[key]:
            cache = self._scores.get(g)
            if g == h or cache is None or not cache.valid[q]:
                continue
            d = stack.spec.sizes[g]
            # q's weights mapped on b changed by diff; back to q's raw units along a
            change = contract_hard(diff, a, _inverse(self.perms[g][q:q + 1]))
            slots = units.unsqueeze(0)  # T_q on these slots only: no full-size target tensor
            target = _select_units(self.total32[key].unsqueeze(0), b, dh, slots)
            if self.active[q]:
                target = target - _select_units(self.u[key][q:q + 1], b, dh, slots)
            cache.pending[q].append(("rank", matricize(change, a, d)[0][0], matricize(target, a, d)[0][0]))

    def _trim(self, key: str) -> None:
        """Forget the logged changes of ``key`` that every kept matrix on ``key`` already reflects."""
        log = self._log[key]
        oldest = self._entries
        for _, g in self.stack.axes[key]:
            cache = self._scores.get(g)
            if cache is not None and bool(cache.valid.any()):
                oldest = min(oldest, int(cache.seen[cache.valid].min()))
        first = 0
        while first < len(log) and log[first][0] <= oldest:
            first += 1
        del log[:first]

    def _catch_up(self, p: int, g: str) -> None:
        """Owe model ``p``'s kept matrix of ``g`` the changes other models' steps logged since it was last updated.

        Sound because model ``p``'s permutations are those of when the changes were logged: every kept
        matrix of ``p`` that a step of ``p`` changes is caught up before that step (:meth:`_moved_step`).
        On ``g``'s own slots a change moves the columns ``units``: model ``p``'s raw weights against the
        change mapped back to ``p``'s units on the other axes; on a tensor where ``g`` is another axis it
        is a low-rank update, ``p``'s weights on the changed slots against the change.  The changes of one
        tensor and axis are concatenated: one product each.
        """
        cache = self._scores[g]
        seen = int(cache.seen[p])
        cache.seen[p] = self._entries
        if seen == self._entries:
            return
        stack, d = self.stack, self.stack.spec.sizes[g]
        for key, a in self.places[g]:
            by_axis: dict[int, list] = {}
            for entry, q, b, units, diff in reversed(self._log[key]):
                if entry <= seen:
                    break
                if q != p:
                    by_axis.setdefault(b, []).append((units, diff))
            weights = stack.weights[key][p:p + 1]
            for b, parts in by_axis.items():
                units = torch.cat([u for u, _ in parts])
                diff = torch.cat([x for _, x in parts], dim=b + 1)
                h = next(k for c, k in stack.axes[key] if c == b)
                dh = stack.spec.sizes[h]
                if b == a:  # g's own slots: model p's raw weights against diff with p's own units on every other axis
                    back = diff
                    for c, k in stack.axes[key]:
                        if c != b:
                            back = contract_hard(back, c, _inverse(self.perms[k][p:p + 1]))
                    cache.pending[p].append(("columns", key, b, dh, units, split_axis(back, b, units.numel())[0]))
                else:  # model p's weights on its units perm_h[p][units] along b, mapped on the axes but a and b
                    sub = _select_units(weights, b, dh, self.perms[h][p:p + 1, units])
                    for c, k in stack.axes[key]:
                        if c not in (a, b):
                            sub = contract_hard(sub, c, self.perms[k][p:p + 1])
                    cache.pending[p].append(("rank", matricize(sub, a, d)[0][0], matricize(diff, a, d)[0][0]))

    def _moved_step(self, p: int, g: str, new: torch.Tensor, old: torch.Tensor, scale: float) -> bool:
        """Take ``new`` for block ``(p, g)`` if it raises the objective: the exact gain on the moved units.

        The moved units are handled in chunks of at most ``_STEP_CHUNK`` entries per tensor, so a
        step that moves most units of a big layer holds a few float64 temporaries of a chunk, not
        of the layer; with more than one chunk the changes are mapped again to be applied.
        """
        d = new.numel()
        units = torch.nonzero(new != old).flatten()
        one = {h: q[p:p + 1] for h, q in self.perms.items()}
        chunks = [(key, a, chunk) for key, a in self.places[g]
                  for chunk in units.split(max(1, _STEP_CHUNK * d // max(self.stack.weights[key][0].numel(), 1)))]
        keep = len(chunks) == len(self.places[g])
        changes, gain = [], 0.0
        for key, a, chunk in chunks:
            fresh, exact, target = self._change(p, key, a, d, chunk, new, old, one)
            gain += float((target * exact).sum())
            changes.append((key, a, chunk, fresh, exact) if keep else (key, a, chunk, None, None))
            del fresh, exact, target
        if not gain > 1e-12 * max(scale, 1e-300):
            return False
        self.gain += gain
        for h in self.touched[g]:  # p's matrices that the step changes first reflect the log
            cache = self._scores.get(h)
            if h != g and cache is not None and cache.valid[p]:
                self._catch_up(p, h)
        self._owe(p, g, units.numel() / d)
        self.perms[g][p] = new
        for key, a, chunk, fresh, exact in changes:  # U_p, the float64 sum and its float32 copy, on the moved slots
            if fresh is None:
                fresh, exact, _ = self._change(p, key, a, d, chunk, new, old, one, target=False)
            m = chunk.numel()
            split_axis(self.u[key][p:p + 1], a, d)[:, :, chunk] = split_axis(fresh, a, m)
            if self.active[p]:
                total = split_axis(self.total[key].unsqueeze(0), a, d)
                rows = total[:, :, chunk] + split_axis(exact, a, m)
                total[:, :, chunk] = rows
                split_axis(self.total32[key].unsqueeze(0), a, d)[:, :, chunk] = rows.float()
                del rows
            self._log_change(p, g, key, a, chunk, exact.float())
        return True

    def _change(self, p: int, key: str, a: int, d: int, slots: torch.Tensor, new: torch.Tensor, old: torch.Tensor,
                one, target: bool = True):
        """``(fresh, exact, target)`` on universe slots ``slots`` of ``key`` along ``a`` for model ``p``.

        ``fresh``: model ``p``'s units ``new[slots]`` mapped there (float32); ``exact``: ``fresh`` minus
        what ``old`` maps there, in float64 (float32 differences are not exact); ``target``: ``T_p`` on
        those slots in float64 (``None`` with ``target=False``).
        """
        w = self.stack.weights[key][p:p + 1]
        fresh = self._mapped_units(w, key, a, d, new[slots], one)
        stale = self._mapped_units(w, key, a, d, old[slots], one).double()
        exact = fresh.double().sub_(stale)
        t = None
        if target:
            t = _select_units(self.total[key].unsqueeze(0), a, d, slots.unsqueeze(0))
            if self.active[p]:
                t.sub_(stale)  # U_p on these slots is what ``old`` maps there
        return fresh, exact, t

    def _mapped_units(self, w: torch.Tensor, key: str, a: int, d: int, units: torch.Tensor, one) -> torch.Tensor:
        """Model units ``units`` of ``w`` (``(1, ...)``) along axis ``a``, mapped into the universe on every other axis."""
        t = _select_units(w, a, d, units.unsqueeze(0))
        for b, h in self.stack.axes[key]:
            if b != a:
                t = contract_hard(t, b, one[h])
        return t

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
            for cache in self._scores.values():  # every other model's target changed
                cache.clear()
            for log in self._log.values():
                log.clear()

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
