"""C²M³: cycle-consistent n-model matching into a universe by Frank-Wolfe.

Specification: Crisostomi et al., "C²M³: Cycle-Consistent Multi-Model Merging", Section 3 and
Algorithm 1.  Every model ``p`` gets, per permutation group, a matrix ``P^p`` mapping the universe
to the model; pairwise maps are factorised ``P^{pq} = P^p (P^q)^T``, so every cycle of maps composes
to the identity by construction.  The objective (Eq. 4) is

    f(P) = sum_{p<q} sum_layers < U_p, U_q >,   U_p = (P_i^p)^T W_i^p P_{i-1}^p  (model p in the universe)

maximised over all layers at once by Frank-Wolfe on the Birkhoff polytope, starting from identity
matrices: linearise, solve one LAP per model and group, move by the best step on the segment, and
finally project each doubly-stochastic matrix to the nearest permutation.

Two departures from the authors' implementation, neither changing the iterates:

* **O(n) gradient.**  ``∂f/∂P^p`` only involves ``S - U_p`` with ``S = sum_q U_q``, so the sum over
  the other models is formed once per iteration instead of once per pair: the gradient for each
  model costs a constant number of matrix products per layer, not ``n``.
* **Exact line search.**  Along ``P + t(Π - P)`` every ``U_p(t)`` is a polynomial of degree
  (number of permuted axes, ≤ 2) in ``t``, so ``f(t)`` is a polynomial of degree ≤ 4 whose
  coefficients come from Gram matrices of already-computed tensors (the ``Π`` terms are gathers,
  not products).  Its maximum on ``[0, 1]`` is found exactly, where the authors call
  ``scipy.optimize.fminbound`` (``xtol=1e-3``, up to 20 full objective evaluations).

With ``n = 2`` the paper does not factorise (Eq. 1): the first model's matrices are held at the
identity and only the second model's are optimised, so the universe is the first model's space.
"""

from __future__ import annotations

import itertools
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import OptimizeResult

from ..assignment import solve_lap_groups
from ..progress import STOPPED, Callback, report
from ..spec import SymmetrySpec
from ..transforms import compose_transforms, invert_transform
from ._stack import SoftPermutation, Stack, contract_hard, linear_term, pair_objective, unstack_permutations
from .mergemany import mergemany_matching

__all__ = ["c2m3_matching"]


def _best_step(poly: np.ndarray) -> tuple[float, float]:
    """Maximise the polynomial ``sum_m poly[m] t^m`` over ``t in [0, 1]``; return ``(t, gain)``."""
    candidates = [0.0, 1.0]
    deriv = np.polynomial.polynomial.polyder(poly)
    if np.any(deriv != 0):
        for r in np.roots(deriv[::-1]):
            if abs(r.imag) < 1e-9 and 0.0 < r.real < 1.0:
                candidates.append(float(r.real))
    values = np.polynomial.polynomial.polyval(candidates, poly)
    best = int(np.argmax(values))
    return candidates[best], float(values[best] - values[0])


def c2m3_matching(state_dicts: Sequence[Mapping[str, torch.Tensor]], spec: SymmetrySpec, *,
                  max_iter: int = 200, tol: float = 1e-6, patience: int = 5,
                  factorize: bool | None = None, refine: bool | int = False, seed: int | None = 0,
                  callback: Callback | None = None) -> dict:
    """Match ``n >= 2`` models into a common space with C²M³'s Frank-Wolfe (Algorithm 1).

    Parameters
    ----------
    max_iter, tol, patience:
        Stop after ``max_iter`` iterations, or once the objective has improved by less than
        ``tol`` (relative to its magnitude) for ``patience`` iterations in a row, or as soon as
        the best step is zero (no ascent left along the Frank-Wolfe direction).  The defaults
        are those of the authors' implementation (200 iterations, 1e-6, patience 5; theirs is an
        absolute tolerance, ours relative so that rescaling the weights does not change when it
        stops).
    factorize:
        ``None`` (default) follows the paper: pairwise objective with the first model fixed for
        ``n == 2``, universe factorisation for ``n >= 3``.  ``True`` factorises for ``n == 2`` too.
    refine:
        Not in the paper: after rounding, polish the permutations by block-coordinate ascent
        started from them.  A sweep visits the models in random order (``seed``) and, for each,
        every permutation group once, re-solving that group's LAP against the sum of the other
        models with everything else held fixed (MergeMany's update with one pass over the groups
        instead of a full weight matching).  ``True`` sweeps until one changes nothing (a fixed
        point: no single permutation can be improved; at most 1000 sweeps), an integer caps the
        sweeps.  Each step raises the same objective and the maps stay factorised, so cycle
        consistency is kept.  Where it stops depends on where it starts: BENCHMARKS.md (a)
        compares it with the paper's full run.
    callback:
        Called after every Frank-Wolfe iteration (phase ``"frank-wolfe"``, with ``objective``
        and ``step``) and every refinement sweep (phase ``"refinement"``); see
        :mod:`fedmerge.progress`.

    Frank-Wolfe runs over permutation matrices (the Birkhoff polytope), so groups of another
    kind (signed-permutation, orthogonal) are aligned by permutations only — a subgroup of every
    kind, so the result is still exact on permuted copies; the message says so.

    Returns a dict with ``transforms`` (one ``{group: index}`` per model, mapping it into the
    common space), ``objective`` (Eq. 4 at the final permutations, each unordered pair once),
    ``nit``, ``converged``, ``message`` and ``history`` (the relaxed objective after each iteration).
    """
    n = len(state_dicts)
    if n < 2:
        raise ValueError("C²M³ matching needs at least two models")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if factorize is None:
        factorize = n > 2
    restricted = sorted(g for g, k in spec.kinds.items() if k != "permutation")
    given_spec = spec
    if restricted:
        spec = spec.with_kinds({g: "permutation" for g in restricted})
    stack = Stack.from_state_dicts(state_dicts, spec)
    dev = stack.device
    groups = stack.groups()
    sizes = spec.sizes
    # Models whose matrices are optimised; with the pairwise objective the first stays fixed.
    free = torch.arange(n, device=dev) if factorize else torch.arange(1, n, device=dev)

    soft = {g: torch.eye(sizes[g], device=dev).expand(n, -1, -1).clone() for g in groups}
    eye_idx = {g: torch.arange(sizes[g], device=dev).expand(n, -1) for g in groups}

    history: list[float] = []
    obj = None
    slow = 0
    converged = False
    message = f"reached max_iter={max_iter}"

    nit = 0
    for nit in range(1, max_iter + 1):
        # ---- gradient: per entry, the model mapped on all but one axis, against S - U_p
        grads = {g: torch.zeros(n, sizes[g], sizes[g], device=dev) for g in groups}
        apply = {g: SoftPermutation(soft[g]).apply for g in groups}
        partial: dict[str, dict] = {}
        for key, axes in stack.axes.items():
            w = stack.weights[key]
            cache = {frozenset(): w}
            for a, g in axes:  # partial maps: every permuted axis but one
                x = w
                for b, h in axes:
                    if b != a:
                        x = apply[h](x, b)
                cache[frozenset(b for b, _ in axes if b != a)] = x
            a0, g0 = axes[0]
            u = apply[g0](cache[frozenset(b for b, _ in axes if b != a0)], a0)
            cache[frozenset(b for b, _ in axes)] = u
            others = u.sum(0, keepdim=True) - u
            for a, g in axes:
                v = cache[frozenset(b for b, _ in axes if b != a)]
                grads[g] += linear_term(v, others, a, sizes[g])
            partial[key] = cache
        if obj is None:
            obj = _relaxed_objective(stack, partial)
            history.append(obj)

        # ---- linear maximisation oracle: one LAP per free model and group
        solved = solve_lap_groups({g: grads[g][free] for g in groups})
        vertex = {}
        for g in groups:
            idx = eye_idx[g].clone()
            idx[free] = solved[g]
            vertex[g] = idx

        # ---- exact line search on the polynomial f(P + t (Π - P))
        poly = np.zeros(1)
        for key, axes in stack.axes.items():
            poly = _add(poly, _step_polynomial(stack, key, axes, partial[key], vertex, apply))
        step, gain = _best_step(poly)
        del partial
        if step <= 0.0 or gain <= 0.0:
            converged, message = True, "no ascent direction left (step size 0)"
            report(callback, method="c2m3", phase="frank-wolfe", nit=nit, max_iter=max_iter, objective=obj, step=0.0)
            break
        for g in groups:  # P <- (1 - t) P + t Π
            p = soft[g]
            p.mul_(1.0 - step)
            p.scatter_add_(1, vertex[g].unsqueeze(1),
                           torch.full((n, 1, sizes[g]), step, device=dev, dtype=p.dtype))
        new_obj = obj + gain
        history.append(new_obj)
        if gain <= tol * max(abs(obj), 1e-30):
            slow += 1
        else:
            slow = 0
        obj = new_obj
        stop = report(callback, method="c2m3", phase="frank-wolfe", nit=nit, max_iter=max_iter, objective=obj,
                      step=step)
        if slow >= patience:
            converged, message = True, f"objective improved by less than tol={tol:g} for {patience} iterations"
            break
        if stop:
            message = STOPPED
            break

    # ---- project every doubly-stochastic matrix to the nearest permutation
    rounded = solve_lap_groups({g: soft[g][free] for g in groups})
    hard = {}
    for g in groups:
        idx = eye_idx[g].clone()
        idx[free] = rounded[g]
        hard[g] = idx
    perms = unstack_permutations(hard)
    if refine and message != STOPPED:
        sweeps = 1000 if refine is True else int(refine)  # sweeps only ever raise the objective: they end

        def relabel(info):  # the sweeps report as this method's refinement phase
            return callback(OptimizeResult({**info, "method": "c2m3", "phase": "refinement"}))
        # one LAP per model and group per sweep (block-coordinate ascent): a full weight matching per
        # model (MergeMany's inner loop) costs several times more and ended lower (BENCHMARKS.md (a))
        polished = mergemany_matching(state_dicts, spec, init=perms, max_iter=sweeps, inner_max_iter=1,
                                      seed=seed, callback=relabel if callback is not None else None)
        perms = polished["transforms"]
        if not factorize:  # keep the first model's space as the common one
            back = invert_transform(perms[0])
            perms = [compose_transforms(p, back) for p in perms]
        hard = {g: torch.stack([p[g] for p in perms]) for g in groups}
        message += f"; then {polished['nit']} refinement sweep{'' if polished['nit'] == 1 else 's'}: {polished['message']}"
        converged = polished["converged"]  # the returned permutations are MergeMany's fixed point
    if restricted:  # the permutations found, as elements of each group's own kind
        perms = [{g: given_spec.group(g).from_permutation(e) for g, e in p.items()} for p in perms]
        message += (f"; groups {restricted} were aligned by permutations only (C²M³ searches permutations; "
                    f"'mergemany' and 'git-rebasin' search each group's own kind)")
    return {
        "transforms": perms,
        "objective": pair_objective(stack, hard),
        "nit": nit,
        "converged": converged,
        "message": message,
        "history": history,
    }


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros(max(len(a), len(b)))
    out[:len(a)] += a
    out[:len(b)] += b
    return out


def _relaxed_objective(stack: Stack, partial: Mapping[str, dict]) -> float:
    total = 0.0
    for key, axes in stack.axes.items():
        u = partial[key][frozenset(a for a, _ in axes)].reshape(stack.n, -1).double()
        s = u.sum(0)
        total += float((s @ s - (u * u).sum()) / 2)
    return total


def _step_polynomial(stack: Stack, key: str, axes, cache: Mapping[frozenset, torch.Tensor],
                     vertex: Mapping[str, torch.Tensor], apply: Mapping[str, Callable]) -> np.ndarray:
    """Coefficients (in t) of this entry's share of f along ``P + t (Π - P)``.

    With ``D = Π - P`` on each permuted axis, ``U(t) = sum_{T ⊆ A} t^|T| U[D on T, P elsewhere]``,
    and by inclusion-exclusion ``U[D on T, ...] = sum_{R ⊆ T} (-1)^{|T|-|R|} M_R`` where ``M_R``
    has ``Π`` on ``R`` and ``P`` on the rest.  ``M_R`` is a gather (by ``Π``) of a partial map that
    the gradient step already computed, so no new matrix product is needed for ``k <= 2`` axes.
    """
    all_axes = [a for a, _ in axes]
    group_of = dict(axes)
    k = len(all_axes)
    m: dict[frozenset, torch.Tensor] = {}
    for r in range(k + 1):
        for subset in itertools.combinations(all_axes, r):
            rest = frozenset(a for a in all_axes if a not in subset)
            x = cache.get(rest)
            if x is None:  # more than two permuted axes: build the partial map directly
                x = stack.weights[key]
                for b in rest:
                    x = apply[group_of[b]](x, b)
            for a in subset:
                x = contract_hard(x, a, vertex[group_of[a]])
            m[frozenset(subset)] = x
    n = stack.n
    c = torch.empty(n, k + 1, m[frozenset()].numel() // n, device=stack.device)
    u = m[frozenset()].reshape(n, -1)
    c[:, 0] = u
    if k == 1:
        torch.sub(m[frozenset(all_axes)].reshape(n, -1), u, out=c[:, 1])
    elif k == 2:
        a, b = all_axes
        na = m[frozenset([a])].reshape(n, -1).sub_(u)  # D on a, P on b
        nb = m[frozenset([b])].reshape(n, -1).sub_(u)
        torch.add(na, nb, out=c[:, 1])
        # D on both: M_ab - M_a - M_b + U = M_ab - U - (na + nb)
        torch.sub(m[frozenset(all_axes)].reshape(n, -1), u, out=c[:, 2]).sub_(c[:, 1])
    else:  # general inclusion-exclusion
        for r in range(1, k + 1):
            acc = torch.zeros_like(u)
            for subset in itertools.combinations(all_axes, r):
                for q in range(r + 1):
                    for sub in itertools.combinations(subset, q):
                        acc.add_(m[frozenset(sub)].reshape(n, -1), alpha=(-1) ** (r - q))
            c[:, r] = acc
    # Gram matrices with BLAS in float32: the cancellations (M_a - U, ...) happened element-wise above
    per_model = torch.bmm(c, c.transpose(1, 2)).double().sum(0)
    summed = c.sum(0)
    gram = ((summed @ summed.T).double() - per_model).cpu().numpy() / 2
    poly = np.zeros(2 * k + 1)
    for j in range(k + 1):
        for l in range(k + 1):
            poly[j + l] += gram[j, l]
    return poly
