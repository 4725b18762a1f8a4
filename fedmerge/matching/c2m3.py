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

Around Algorithm 1, not in the paper and on by default (``paper=True`` turns both off): a start
that recognises permuted copies of one model and certifies them optimal (``init="auto"``), and
block-coordinate refinement of the rounded permutations to a fixed point (``refine=True``), before
which Frank-Wolfe stops by a looser rule (:data:`START_STOP`: its rounding is only refinement's start);
:func:`c2m3_matching` says why the paper's Frank-Wolfe alone stalls on permuted copies.  Off by
default: pairwise Frank-Wolfe steps (``frank_wolfe="pairwise"``), a tolerance on the refinement's
sweeps (``refine_tol``) and rounds of iterated local search after it (``perturbations``).
"""

from __future__ import annotations

import itertools
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..assignment import solve_lap_groups
from ..warm_lap import WarmStart
from ..progress import STOPPED, Callback, report
from ..spec import SymmetrySpec
from .block_ascent import BlockAscent
from ._stack import (SoftPermutation, Stack, contract_hard, linear_term, pair_objective,
                     sum_pairs, unstack_permutations)

__all__ = ["c2m3_matching"]


#: Most passes over a model's groups that the start spends placing it (it stops at a pass that changes nothing).
_START_SWEEPS = 100
#: Relative gap to the Cauchy-Schwarz bound under which a model counts as coinciding with the placed ones.
_CERTIFICATE_RTOL = 1e-7
#: Frank-Wolfe's stopping rule (``tol``, ``patience``) where its rounding is the result, or is refined by a capped
#: number of sweeps: the authors' implementation's (a gain under 1e-6 for 5 iterations; theirs absolute, ours relative).
PAPER_STOP = MappingProxyType({"tol": 1e-6, "patience": 5})
#: Frank-Wolfe's stopping rule where its rounding only starts a refinement to a fixed point (``refine=True``): the
#: refined objective stops rising long before the relaxed one, and this rule stops about there (BENCHMARKS.md (a),
#: "The default's stopping rule", has the measurements it was set from).
START_STOP = MappingProxyType({"tol": 3e-4, "patience": 3})


def _best_step(poly: np.ndarray) -> tuple[float, float]:
    """Maximise the polynomial ``sum_m poly[m] t^m`` over ``t in [0, 1]``; return ``(t, gain)``."""
    if not np.isfinite(poly).all():
        raise FloatingPointError("the Frank-Wolfe line search overflowed float32: the models' weights are too large "
                                 "to be compared in float32 (rescale them, or check whether their training diverged)")
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
                  max_iter: int = 200, tol: float | None = None, patience: int | None = None,
                  factorize: bool | None = None, init: str | None = None, refine: bool | int | None = None,
                  refine_tol: float = 0.0, perturbations: int = 0, paper: bool = False, confirm: bool = False,
                  frank_wolfe: str | None = None, seed: int | None = 0, callback: Callback | None = None) -> dict:
    """Match ``n >= 2`` models into a common space by maximising C²M³'s objective (Eq. 4).

    By default: a sequential match that certifies permuted copies (see ``init``), otherwise C²M³'s
    Frank-Wolfe (Algorithm 1), block-coordinate refinement of its rounding to a fixed point, and
    the sequential match refined instead where it scores higher.  ``paper=True`` runs
    the paper's Algorithm 1 alone (Frank-Wolfe from identity matrices, then rounding), for
    reproduction.

    Why the paper's algorithm alone is not the default: Eq. 4 does not change when every model's
    matrices are multiplied by one permutation of the universe (``P^p -> P^p R``), so each optimum
    comes with ``d!`` relabelled copies, and midpoints between them are stationary points of the
    relaxation.  From identity matrices, every model's first linear-oracle step aligns it to the
    sum of the others, all models at once: two permuted copies swap orders, and the line search
    stops half-way, on the midpoint of two labellings.  Frank-Wolfe stalls on such points (the
    oracle's ties break differently per model), and rounding them mixes labellings; this happens
    for 2 factorised copies and often for 3, 4, 6 or more.  Refinement re-solves one model at a
    time against the others' hard permutations, which breaks those ties.

    Parameters
    ----------
    max_iter, tol, patience:
        Frank-Wolfe stops after ``max_iter`` iterations (``0``: none, start and refinement only),
        or once the objective has improved by less than ``tol`` (relative to its magnitude) for
        ``patience`` iterations in a row, or as soon as the best step is zero.  ``max_iter=200``
        is the authors'.  ``tol`` and ``patience`` default to the authors' rule, 1e-6 for 5
        iterations (theirs is an absolute tolerance, ours relative so that rescaling the weights
        does not change when it stops), where the rounding is the result or is refined by a
        capped number of sweeps (``paper=True``, ``refine=0`` or ``refine=k``); and to 3e-4 for 3
        iterations where the rounding only starts a refinement to a fixed point (``refine=True``,
        the default).  There the refined objective stops rising long before the relaxed one: on
        trained MNIST MLPs, roundings after a few tens of iterations and after the paper's rule
        refine to objectives as high as each other, so running Frank-Wolfe on would only cost
        time (BENCHMARKS.md (a), "The default's stopping rule").
    factorize:
        ``None`` (default) follows the paper: pairwise objective with the first model fixed for
        ``n == 2``, universe factorisation for ``n >= 3``.  ``True`` factorises for ``n == 2`` too.
    init:
        Where Frank-Wolfe starts.  ``"auto"`` (default): first a *sequential match* — model 0 fixes
        the universe's labelling, models ``1, 2, ...`` in turn are block-coordinate matched (each
        group re-solved by one LAP against the sum of the models already placed, in passes over the
        groups in the spec's order until one changes nothing) and added to that sum; it costs about
        what Git Re-Basin's matching of every model to model 0 costs.  If every model then coincides
        with the placed ones in the universe, Eq. 4 equals its Cauchy-Schwarz bound
        ``sum_{p<q} ||U_p|| ||U_q||`` (norms do not depend on the permutations): a certified global
        optimum, returned as it is (permuted copies of one model end here; see ``confirm``).
        Otherwise Frank-Wolfe starts from identity matrices, as in the paper; its rounding is
        refined first (far from a fixed point, it gains the most by refinement), and if the
        sequential match still scores higher, the sequential match is refined and returned instead
        (without refinement, the higher of the rounding and the sequential match is returned).
        Neither search dominates: on trained networks Frank-Wolfe's rounding scores higher; on
        weakly aligned ones, such as random initialisations of wide layers, the sequential match
        does, and there the paper's algorithm ends well below it (BENCHMARKS.md (a) has the
        figures).  The spec's group order runs from the input side (zoo models, traced
        specs): a permuted copy's first group is then fixed by its unpermuted inputs and each pass
        carries that through the network; in random orders a deep chain needs up to a pass per
        layer.  With ``max_iter=0`` the sequential match is refined without Frank-Wolfe: on random
        initialisations the faster and the better choice, but not on models trained briefly from
        independent inits (federated first rounds), which look as weakly aligned and where
        Frank-Wolfe's result merges far better (BENCHMARKS.md (a)).  ``"identity"``: the paper's
        start, always.
        ``"sequential"``: the sequential match as Frank-Wolfe's start, compared with the rounding as
        under ``"auto"``; the match is near a refinement fixed point, which Frank-Wolfe cannot leave
        (every block's oracle returns its own permutation there), so Frank-Wolfe rarely moves far
        from it.  The starts are not in the paper.
    refine:
        After rounding, block-coordinate ascent: sweeps visit the models in random order
        (``seed``) and, for each, every permutation group once, re-solving that group's LAP
        against the sum of the other models with everything else held fixed; a new permutation is
        kept only if it raises the objective.  ``True`` (default) sweeps until one changes
        nothing — a fixed point: no single permutation can be improved (at most 1000 sweeps); an
        integer caps the sweeps, ``0``/``False`` turns it off.  Maps stay factorised, so cycle
        consistency is kept.  Not in the paper.
    refine_tol:
        Also stop the refinement after a sweep that raised the objective by no more than
        ``refine_tol`` times its magnitude (default ``0``: only a sweep that changes nothing, or the
        cap, stops it).  Late sweeps each move a few units for a small gain; a tolerance trades that
        tail for time, and the result is then not a fixed point (``converged`` is False).
    perturbations:
        Rounds of iterated local search after the refinement (default ``0``: none; not in the
        paper).  Each round draws one free model (``seed``), replaces all its permutations by
        random ones — its alignment forgotten, its weights then noise in the others' targets — and
        refines every model again (``refine`` and ``refine_tol`` apply); the result is kept where
        its objective is higher than the best so far, so the objective returned never drops.  A
        fixed point is only the best that single blocks can reach; re-placing a model while the
        others adapt to it moves the whole set to another fixed point, on trained MLPs often a
        higher one (BENCHMARKS.md (a) has the gains, and the merged accuracy beside them).  Each
        round costs about one refinement.  Skipped after a certified start (a global optimum).
        Every sweep of a round's refinement is reported to the callback (phase
        ``"perturbation"``, ``nit`` the round, ``sweep``, and the round's own ``objective``).
    confirm:
        After a certified start, also run one Frank-Wolfe iteration as a self-check (default
        ``False``).  It must find step size 0: the certificate also bounds the relaxation
        (doubly-stochastic maps do not increase norms), so there is no ascent to find, and the
        certificate alone is already a proof of optimality.  The iteration costs one gradient, about
        one weight-matching sweep of every model (dominated by the largest layers, such as VGG's
        25088×4096 classifier) and three more copies of the models in memory, a large share of the
        time on permuted copies (BENCHMARKS.md (a)).  ``True`` runs it (``nit == 1``).
    frank_wolfe:
        ``"classic"`` (default): the paper's steps ``P <- P + t (Π - P)``.  ``"pairwise"``: pairwise
        Frank-Wolfe (not in the paper): every (model, group) block keeps its matrix as a convex
        combination of the vertices it has visited and moves mass from its *away* vertex (the active
        one the gradient rates lowest) to the oracle's vertex, with the same exact line search; the
        paper's steps shrink all vertices at once and zig-zag among the few a block alternates
        between.  Same oracle calls per iteration, a few more gathers in the line search; the first
        step is the paper's.  Experimental: BENCHMARKS.md (a) compares the two.
    paper:
        ``True``: the paper's algorithm, i.e. ``init="identity", refine=0``, classic steps; giving
        another ``init``, ``refine``, ``frank_wolfe`` or ``perturbations`` with it is an error.
    callback:
        Called after every model the start places (phase ``"start"``), every Frank-Wolfe
        iteration (phase ``"frank-wolfe"``, with ``objective`` and ``step``) and every refinement
        sweep (phase ``"refinement"``, with ``changed`` and ``objective``, the gains of its accepted
        steps as read off their float32 cost matrices added to the rounded objective), and every
        sweep of a perturbation round (phase ``"perturbation"``, above); see :mod:`fedmerge.progress`.

    Frank-Wolfe runs over permutation matrices (the Birkhoff polytope), so groups of another
    kind (signed-permutation, orthogonal) are aligned by permutations only — a subgroup of every
    kind, so the result is still exact on permuted copies; the message says so.

    Returns a dict with ``transforms`` (one ``{group: index}`` per model, mapping it into the
    common space), ``objective`` (Eq. 4 at the final permutations, each unordered pair once),
    ``nit`` (Frank-Wolfe iterations), ``converged`` (with refinement: a sweep changed nothing,
    i.e. the result is a fixed point; without: Frank-Wolfe's stopping rule was met), ``message``
    (what each phase did), ``history`` (the relaxed objective after each Frank-Wolfe iteration),
    ``sweeps`` (refinement sweeps) and ``laps`` (assignment problems solved, all phases).
    """
    n = len(state_dicts)
    if n < 2:
        raise ValueError("C²M³ matching needs at least two models")
    if paper:
        if init not in (None, "identity") or refine not in (None, 0, False) or perturbations:
            raise ValueError("paper=True runs the paper's algorithm (init='identity', no refinement); do not combine "
                             f"it with init={init!r}, refine={refine!r}, perturbations={perturbations!r}")
        init, refine = "identity", 0
    if paper and frank_wolfe not in (None, "classic"):
        raise ValueError(f"paper=True runs the paper's Frank-Wolfe; do not combine it with frank_wolfe={frank_wolfe!r}")
    init = "auto" if init is None else init
    refine = True if refine is None else refine
    frank_wolfe = "classic" if frank_wolfe is None else frank_wolfe
    if frank_wolfe not in ("classic", "pairwise"):
        raise ValueError(f"frank_wolfe must be 'classic' or 'pairwise', got {frank_wolfe!r}")
    if init not in ("auto", "sequential", "identity"):
        raise ValueError(f"init must be 'auto', 'sequential' or 'identity', got {init!r}")
    if isinstance(refine, bool):
        sweeps_cap = 1000 if refine else 0
    elif isinstance(refine, int) and refine >= 0:
        sweeps_cap = refine
    else:
        raise ValueError(f"refine must be True, False or a number of sweeps >= 0, got {refine!r}")
    if isinstance(perturbations, bool) or not isinstance(perturbations, (int, np.integer)) or perturbations < 0:
        raise ValueError(f"perturbations must be a number of rounds >= 0, got {perturbations!r}")
    if perturbations and not sweeps_cap:
        raise ValueError(f"perturbations={perturbations} re-runs the refinement after each perturbation; "
                         "it needs refine=True or a number of sweeps >= 1, not refine=0")
    if not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if max_iter == 0 and init == "identity" and sweeps_cap == 0:
        raise ValueError("max_iter=0 with init='identity' and no refinement does nothing; give max_iter >= 1")
    rule = START_STOP if refine is True else PAPER_STOP
    tol = rule["tol"] if tol is None else tol
    patience = rule["patience"] if patience is None else patience
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if not (isinstance(refine_tol, (int, float)) and refine_tol >= 0 and np.isfinite(refine_tol)):
        raise ValueError(f"refine_tol must be a finite number >= 0, got {refine_tol!r}")
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
    rng = np.random.default_rng(seed)
    # Models whose matrices are optimised; with the pairwise objective the first stays fixed.
    free = torch.arange(n, device=dev) if factorize else torch.arange(1, n, device=dev)
    eye_idx = {g: torch.arange(sizes[g], device=dev).expand(n, -1) for g in groups}
    messages, laps, stopped = [], 0, False

    # ---- start
    start = {g: eye_idx[g].clone() for g in groups}
    certified = False
    # what Frank-Wolfe's rounding has to beat (None: nothing): the sequential match, i.e. the start itself for
    # init="sequential" or a certified start, and for "auto" on models that are not copies the match it ran
    incumbent = incumbent_objective = None
    if init in ("auto", "sequential"):
        # models 1, 2, ... matched in turn to the sum of those already placed (model 0 fixes the labelling)
        placer = BlockAscent(stack, start, active=torch.arange(n) == 0)
        certified = init == "auto"
        for p in range(1, n):
            # the spec's order, input side first: a copy's first group is fixed by its unpermuted inputs and
            # each pass carries that forward (random orders need up to a pass per layer on deep chains)
            placer.match_model(p, list(groups), max_sweeps=_START_SWEEPS)
            if certified:  # still a copy of the placed ones? (the Cauchy-Schwarz bound; once not, never again)
                share, bound = placer.alignment_with_active(p)
                certified = share >= (1.0 - _CERTIFICATE_RTOL) * bound
            placer.activate(p)
            if report(callback, method="c2m3", phase="start", nit=p, max_iter=n - 1):
                stopped, certified, start = True, False, placer.perms
                break
        laps = placer.laps
        if not stopped:
            incumbent = placer.perms
            incumbent_objective = pair_objective(stack, incumbent)
            if init == "sequential" or certified or max_iter == 0:
                start = incumbent
        # its universe images, sums and cost matrices (≈ 2 more copies of the models) are not needed from here
        del placer
    if certified:
        messages.append(f"sequential start ({laps} LAPs); every model coincides with model 0 in the universe: Eq. 4 "
                        "equals its Cauchy-Schwarz bound sum_{p<q} ||U_p|| ||U_q||, a global optimum (permuted copies)")
        # nothing can improve a global optimum: no refinement, and Frank-Wolfe only to confirm it if asked (step 0)
        max_iter, sweeps_cap = (min(max_iter, 1) if confirm else 0), 0
    elif incumbent is not None:
        then = ("kept (max_iter=0)" if max_iter == 0 else "Frank-Wolfe's start" if init == "sequential" else
                "Frank-Wolfe from identity matrices")
        copies = "" if init == "sequential" else "; not copies"
        messages.append(f"sequential match ({laps} LAPs, objective {incumbent_objective:.6g}{copies}): {then}")

    # ---- Frank-Wolfe (Algorithm 1) from the start
    history: list[float] = []
    nit, fw_converged = 0, False
    hard = start
    objective = None  # Eq. 4 at ``hard`` where a phase already computed it exactly
    if max_iter > 0 and not stopped:
        soft = {g: torch.zeros(n, sizes[g], sizes[g], device=dev).scatter_(1, start[g].unsqueeze(1), 1.0)
                for g in groups}
        nit, fw_converged, fw_message, stopped, history = _frank_wolfe(
            stack, soft, free, eye_idx, max_iter=max_iter, tol=tol, patience=patience, callback=callback,
            pairwise=frank_wolfe == "pairwise", start=start)
        laps += nit * len(free) * len(groups)
        # ---- project every doubly-stochastic matrix to the nearest permutation
        rounded = solve_lap_groups({g: soft[g][free] for g in groups})
        laps += len(free) * len(groups)
        hard = {}
        for g in groups:
            idx = eye_idx[g].clone()
            idx[free] = rounded[g]
            hard[g] = idx
        if incumbent is not None and not sweeps_cap:  # with refinement: compared once the rounding is refined
            rounded_objective = pair_objective(stack, hard)
            if rounded_objective < incumbent_objective:
                hard = incumbent
                fw_message += (f"; its rounding ({rounded_objective:.6g}) scored below the sequential match, "
                               "which is kept")
            else:
                fw_message += f"; its rounding ({rounded_objective:.6g}) is kept"
        messages.append(f"Frank-Wolfe: {fw_message}")
    converged = fw_converged or certified

    # ---- block-coordinate refinement
    sweeps = 0
    if sweeps_cap and not stopped:
        refined, sweeps, what, stopped, converged, count = _refine(
            stack, hard, free, rng, cap=sweeps_cap, tol=refine_tol, callback=callback)
        laps += count
        messages.append(f"{sweeps} refinement sweep{'' if sweeps == 1 else 's'}: {what}")
        if incumbent is not None and hard is not incumbent and not stopped:
            # Frank-Wolfe's rounding is far from a fixed point and gains much by refinement, the sequential match
            # little: the two are compared once the rounding is refined, and the sequential match is refined only
            # where it is still ahead (weakly aligned models)
            refined_objective = pair_objective(stack, refined)
            if incumbent_objective > refined_objective:
                messages.append(f"the sequential match ({incumbent_objective:.6g}) scored higher than the refined "
                                f"rounding ({refined_objective:.6g}) and is refined instead")
                refined, more, what, stopped, converged, count = _refine(
                    stack, incumbent, free, rng, cap=sweeps_cap, tol=refine_tol, callback=callback, offset=sweeps)
                laps += count
                sweeps += more
                messages.append(f"{more} refinement sweep{'' if more == 1 else 's'}: {what}")
            else:
                objective = refined_objective
                messages.append(f"the refined rounding ({refined_objective:.6g}) scored at least as high as the "
                                f"sequential match ({incumbent_objective:.6g}) and is kept")
        hard = refined
        if perturbations and not stopped:
            hard, objective, kept, more, count, stopped, fixed = _perturb(
                stack, hard, free, rng, rounds=int(perturbations), cap=sweeps_cap, tol=refine_tol, callback=callback,
                objective=objective)
            laps += count
            sweeps += more
            converged = fixed if kept else converged
            messages.append(f"{perturbations} perturbation round{'' if perturbations == 1 else 's'} (one model's "
                            f"permutations drawn at random, every model refined again; {more} sweeps): " +
                            (f"{kept} raised the objective, the highest is kept" if kept else
                             "none raised the objective, the refined result is kept"))
    message = STOPPED if stopped else "; ".join(messages)
    converged = converged and not stopped
    perms = unstack_permutations(hard)
    if restricted:  # the permutations found, as elements of each group's own kind
        perms = [{g: given_spec.group(g).from_permutation(e) for g, e in p.items()} for p in perms]
        message += (f"; groups {restricted} were aligned by permutations only (C²M³ searches permutations; "
                    f"'mergemany' and 'git-rebasin' search each group's own kind)")
    return {
        "transforms": perms,
        "objective": (objective if objective is not None else incumbent_objective if hard is incumbent else
                      pair_objective(stack, hard)),
        "nit": nit,
        "converged": converged,
        "message": message,
        "history": history,
        "sweeps": sweeps,
        "laps": laps,
    }


def _refine(stack: Stack, perms: Mapping[str, torch.Tensor], free: torch.Tensor, rng: np.random.Generator, *,
            cap: int, tol: float, callback: Callback | None, offset: int = 0,
            position: tuple[int, int] | None = None):
    """Block-coordinate ascent from ``perms``: sweeps over the free models in random order, each model's groups in
    random order, one LAP per block against the sum of the others, until a sweep changes nothing, ``cap`` sweeps,
    a sweep gaining no more than ``tol`` (relative), or the callback stops it.  Sweeps are reported to the callback
    as ``offset + 1, offset + 2, ...`` (phase ``"refinement"``), or, with ``position = (round, rounds)``, as that
    perturbation round (phase ``"perturbation"``).  Returns ``(perms, sweeps, why, stopped, converged, laps)``."""
    groups = stack.groups()
    ascent = BlockAscent(stack, perms)
    # the sweeps' objective (starting objective + the accepted gains), where something reads it
    base = pair_objective(stack, perms) if callback is not None or tol > 0 else None
    converged = stopped = slow = False
    order = free.cpu().numpy()
    sweeps = 0
    for sweeps in range(1, cap + 1):
        changed, before = 0, ascent.gain
        for p in rng.permutation(order):
            changed += sum(ascent.step(int(p), groups[i]) for i in rng.permutation(len(groups)))
        where = (dict(phase="refinement", nit=offset + sweeps, max_iter=offset + cap) if position is None else
                 dict(phase="perturbation", nit=position[0], max_iter=position[1], sweep=sweeps))
        stop = report(callback, method="c2m3", **where, changed=changed,
                      objective=None if base is None else base + ascent.gain)
        if changed == 0:
            converged = True
            break
        if stop:
            stopped = True
            break
        if tol > 0 and ascent.gain - before <= tol * abs(base + ascent.gain):
            slow = True
            break
    why = ("a whole sweep changed nothing" if converged else STOPPED if stopped else
           f"a sweep raised the objective by less than refine_tol={tol:g}" if slow else f"reached {cap}")
    return ascent.perms, sweeps, why, stopped, converged, ascent.laps


def _perturb(stack: Stack, perms: dict[str, torch.Tensor], free: torch.Tensor, rng: np.random.Generator, *,
             rounds: int, cap: int, tol: float, callback: Callback | None, objective: float | None = None):
    """Iterated local search from the refined ``perms`` (see ``perturbations`` in :func:`c2m3_matching`), whose
    Eq. 4 is ``objective`` where the caller already computed it.

    Returns ``(perms, objective, kept, sweeps, laps, stopped, converged)``: the best permutations found and their
    Eq. 4, how many rounds raised the objective, the refinement sweeps and LAPs spent, whether the callback stopped it, and whether the kept
    result's refinement reached a fixed point (``converged`` is meaningful only where ``kept > 0``).
    """
    best, best_objective = perms, pair_objective(stack, perms) if objective is None else objective
    kept = sweeps = laps = 0
    stopped = converged = False
    choices = free.cpu().numpy()
    for r in range(1, rounds + 1):
        p = int(rng.choice(choices))
        candidate = {g: q.clone() for g, q in best.items()}
        for g, q in candidate.items():
            q[p] = torch.as_tensor(rng.permutation(q.shape[1]), device=q.device)
        refined, more, _, stopped, fixed, count = _refine(stack, candidate, free, rng, cap=cap, tol=tol,
                                                          callback=callback, position=(r, rounds))
        sweeps += more
        laps += count
        objective = pair_objective(stack, refined)
        if objective > best_objective:  # a round stopped half-way still counts where it is higher
            best, best_objective, kept, converged = refined, objective, kept + 1, fixed and not stopped
        if stopped:
            break
    return best, best_objective, kept, sweeps, laps, stopped, converged


def _frank_wolfe(stack: Stack, soft: dict[str, torch.Tensor], free: torch.Tensor, eye_idx: Mapping[str, torch.Tensor],
                 *, max_iter: int, tol: float, patience: int, callback: Callback | None, pairwise: bool = False,
                 start: Mapping[str, torch.Tensor] | None = None):
    """Algorithm 1's iterations on ``soft`` (updated in place); ``(nit, converged, message, stopped, history)``.

    ``pairwise``: pairwise Frank-Wolfe instead of the paper's steps.  Every block's (model, group)
    soft matrix is kept as a convex combination of the vertices it has visited (``start``, the
    vertex the iterates begin at, then the oracle's answers); the direction moves mass from the
    block's *away* vertex (the active vertex worst for the gradient) to the oracle's vertex, scaled
    by the away vertex's weight so that ``t = 1`` empties it, and one exact line search over ``t``
    serves all blocks.  The paper's steps shrink every vertex's weight at once and zig-zag between
    the few vertices a block alternates among; the pairwise steps drop a vertex once it stops
    helping.
    """
    n, dev, sizes = stack.n, stack.device, stack.spec.sizes
    groups = stack.groups()
    history: list[float] = []
    obj = None
    slow = 0
    converged, stopped = False, False
    message = f"reached max_iter={max_iter}"
    nit = 0
    grads = {g: torch.empty(n, sizes[g], sizes[g], device=dev) for g in groups}  # reused: no new pages per iteration
    every = len(free) == n
    # one warm-started LAP state per (group, free model): the oracle's matrices change little between iterations
    warm = {g: [WarmStart(sizes[g]) for _ in range(len(free))] for g in groups}
    if pairwise:
        active = {g: _ActiveSet((eye_idx[g] if start is None else start[g]).clone()) for g in groups}
    # per entry, the weights mapped by the soft matrices on every permuted axis but one, and on all (U);
    # built by products once, then moved with each step by gathers (_advance)
    partial: dict[str, dict] = {}
    apply = None
    wide = any(len(axes) > 2 for axes in stack.axes.values())  # such entries rebuild their maps every iteration
    for nit in range(1, max_iter + 1):
        # ---- gradient: per entry, the model mapped on all but one axis, against S - U_p
        for g in groups:
            grads[g].zero_()
        if wide or not partial:
            apply = {g: SoftPermutation(soft[g]).apply for g in groups}
        for key, axes in stack.axes.items():
            cache = partial.get(key)
            if cache is None:
                cache = _partial_maps(stack, key, axes, apply)
            u = cache[frozenset(b for b, _ in axes)]
            total = u.sum(0, keepdim=True)
            size = max(1, min(n, _chunk(dev) // max(u[0].numel(), 1)))
            for lo in range(0, n, size):  # the sum of the other models, a chunk of models at a time
                hi = min(n, lo + size)
                others = total - u[lo:hi]
                for a, g in axes:
                    v = cache[frozenset(b for b, _ in axes if b != a)][lo:hi]
                    linear_term(v, others, a, sizes[g], out=grads[g][lo:hi])
                del others
            partial[key] = cache
        if obj is None:
            obj = _relaxed_objective(stack, partial)
            history.append(obj)

        # ---- linear maximisation oracle: one LAP per free model and group
        solved = solve_lap_groups({g: grads[g] if every else grads[g][free] for g in groups}, warm)
        vertex = {}
        for g in groups:
            idx = eye_idx[g].clone()
            idx[free] = solved[g]
            vertex[g] = idx

        away = scale = None
        if pairwise:  # D = scale * (Π - away vertex) per block; scale 0 where they coincide
            fw_slot = {g: active[g].add(vertex[g]) for g in groups}
            away, scale, aw_slot = {}, {}, {}
            for g in groups:
                aw_slot[g], away[g], scale[g] = active[g].away(grads[g], fw_slot[g])

        # ---- exact line search on the polynomial f(P + t (Π - P)) (pairwise: f(P + t D))
        poly = np.zeros(1)
        for key, axes in stack.axes.items():
            poly = _add(poly, _step_polynomial(stack, key, axes, partial[key], vertex, apply, away, scale))
        step, gain = _best_step(poly)
        if step <= 0.0 or gain <= 0.0:
            converged, message = True, "no ascent direction left (step size 0)"
            stopped = report(callback, method="c2m3", phase="frank-wolfe", nit=nit, max_iter=max_iter,
                             objective=obj, step=0.0)
            break
        for key, axes in stack.axes.items():  # the partial maps at the new P, by gathers
            if not _advance(stack, key, axes, partial[key], vertex, step, away, scale):
                del partial[key]  # more than two permuted axes: rebuilt from the soft matrices
        for g in groups:  # P <- (1 - t) P + t Π, or P + t D from the blocks' active sets
            p = soft[g]
            if pairwise:
                active[g].move(fw_slot[g], aw_slot[g], scale[g], step)
                active[g].matrix(out=p)
                continue
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
            stopped = stop
            break
        if stop:
            stopped = True
            break
    return nit, converged, message, stopped, history


def _partial_maps(stack: Stack, key: str, axes, apply: Mapping[str, Callable]) -> dict[frozenset, torch.Tensor]:
    """Entry ``key`` of every model mapped by the soft matrices on every permuted axis but one, on none
    (the weights) and on all (``U``), keyed by the set of mapped axes."""
    w = stack.weights[key]
    cache = {frozenset(): w}
    for a, g in axes:  # partial maps: every permuted axis but one
        x = w
        for b, h in axes:
            if b != a:
                x = apply[h](x, b)
        cache[frozenset(b for b, _ in axes if b != a)] = x
    a0, g0 = axes[0]
    cache[frozenset(b for b, _ in axes)] = apply[g0](cache[frozenset(b for b, _ in axes if b != a0)], a0)
    return cache


def _advance(stack: Stack, key: str, axes, cache: dict, vertex: Mapping[str, torch.Tensor], step: float,
             away: Mapping[str, torch.Tensor] | None = None, scale: Mapping[str, torch.Tensor] | None = None) -> bool:
    """Move entry ``key``'s partial maps (``cache``, from :func:`_partial_maps`) to the soft matrices
    after the step, in place: ``P <- (1 - t) P + t Π`` (or ``P + t s (Π - A)`` with ``away``).

    The maps are bilinear in the matrices of their axes, and every new term has a vertex ``Π`` or
    ``A`` on the moved axis: a gather of a map already held, so no matrix product is needed.  The
    paper's step is applied as a convex combination of the old maps and the gathers (its rounding
    errors do not grow over iterations).  Returns False, leaving ``cache`` alone, for an entry with
    more than two permuted axes.
    """
    k = len(axes)
    if k > 2:
        return False
    w = stack.weights[key]
    n, numel = stack.n, w[0].numel()
    t = float(step)
    size = max(1, min(n, _chunk(stack.device) // max(numel * 2, 1)))
    for lo in range(0, n, size):
        sl = slice(lo, min(n, lo + size))
        wc = w[sl]
        pi = {g: vertex[g][sl] for _, g in axes}

        def moved(x, a, g):  # D x along axis a, the step's direction on that axis (times s for pairwise)
            y = contract_hard(x, a, pi[g])
            if away is not None:
                y.sub_(contract_hard(x, a, away[g][sl])).mul_(scale[g][sl].view(-1, *[1] * (y.dim() - 1)))
            return y

        if k == 1:
            (a, g), = axes
            u = cache[frozenset([a])][sl]
            if away is None:
                u.mul_(1.0 - t).add_(contract_hard(wc, a, pi[g]), alpha=t)
            else:
                u.add_(moved(wc, a, g), alpha=t)
            continue
        (a, g), (b, h) = axes
        xa, xb, u = cache[frozenset([a])][sl], cache[frozenset([b])][sl], cache[frozenset([a, b])][sl]
        if away is None:  # U' = (1-t)^2 U + t(1-t) (Π_a X_b + Π_b X_a) + t^2 Π_a Π_b W
            wa, wb = contract_hard(wc, a, pi[g]), contract_hard(wc, b, pi[h])
            mixed = contract_hard(xb, a, pi[g]).add_(contract_hard(xa, b, pi[h])).mul_(t * (1.0 - t))
            u.mul_((1.0 - t) ** 2).add_(mixed).add_(contract_hard(wa, b, pi[h]), alpha=t * t)
            xa.mul_(1.0 - t).add_(wa, alpha=t)
            xb.mul_(1.0 - t).add_(wb, alpha=t)
        else:  # U' = U + t (D_a X_b + D_b X_a) + t^2 D_a D_b W
            wa, wb = moved(wc, a, g), moved(wc, b, h)
            u.add_(moved(xb, a, g).add_(moved(xa, b, h)), alpha=t).add_(moved(wa, b, h), alpha=t * t)
            xa.add_(wa, alpha=t)
            xb.add_(wb, alpha=t)
    return True


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros(max(len(a), len(b)))
    out[:len(a)] += a
    out[:len(b)] += b
    return out


def _relaxed_objective(stack: Stack, partial: Mapping[str, dict]) -> float:
    return sum(sum_pairs(partial[key][frozenset(a for a, _ in axes)]) for key, axes in stack.axes.items())


def _step_polynomial(stack: Stack, key: str, axes, cache: Mapping[frozenset, torch.Tensor],
                     vertex: Mapping[str, torch.Tensor], apply: Mapping[str, Callable],
                     away: Mapping[str, torch.Tensor] | None = None,
                     scale: Mapping[str, torch.Tensor] | None = None) -> np.ndarray:
    """Coefficients (in t) of this entry's share of f along ``P + t (Π - P)``.

    With ``D = Π - P`` on each permuted axis, ``U(t) = sum_{T ⊆ A} t^|T| U[D on T, P elsewhere]``,
    and by inclusion-exclusion ``U[D on T, ...] = sum_{R ⊆ T} (-1)^{|T|-|R|} M_R`` where ``M_R``
    has ``Π`` on ``R`` and ``P`` on the rest.  ``M_R`` is a gather (by ``Π``) of a partial map that
    the gradient step already computed, so no new matrix product is needed for ``k <= 2`` axes.
    """
    all_axes = [a for a, _ in axes]
    group_of = dict(axes)
    k = len(all_axes)
    n = stack.n
    numel = stack.weights[key][0].numel()
    # models in chunks of about _chunk() entries (all at once beyond two axes): the (k+1) coefficient
    # tensors of a chunk are what is held at once, not (k+1) more copies of all n models
    size = n if k > 2 else max(1, min(n, _chunk(stack.device) // max(numel * (k + 1), 1)))
    per_model = torch.zeros(k + 1, k + 1, dtype=torch.float64, device=stack.device)
    summed = torch.zeros(k + 1, numel, device=stack.device)
    for lo in range(0, n, size):
        hi = min(n, lo + size)
        if away is None:
            c = _coefficients(stack, key, all_axes, group_of, cache, vertex, apply, lo, hi)
        else:
            c = _pairwise_coefficients(stack, key, all_axes, group_of, cache, vertex, away, scale, apply, lo, hi)
        # Gram matrices with BLAS in float32: the cancellations (M_a - U, ...) happened element-wise
        per_model += torch.bmm(c, c.transpose(1, 2)).double().sum(0)
        summed += c.sum(0)
        del c
    gram = ((summed @ summed.T).double() - per_model).cpu().numpy() / 2
    poly = np.zeros(2 * k + 1)
    for j in range(k + 1):
        for l in range(k + 1):
            poly[j + l] += gram[j, l]
    return poly


#: Entries per chunk of models in the gradient, the line search and the step's updates.  On a CPU, small enough
#: that a chunk's few float32 arrays (4 MiB each) stay in the last-level cache while they are read several
#: times: with chunks of all models, the cost per model of an iteration jumped once the n models of one layer
#: outgrew that cache.  On an accelerator, large: fewer kernel launches.
_CHUNK_CPU = 1 << 20
_CHUNK_ACCELERATOR = 1 << 26


def _chunk(device) -> int:
    return _CHUNK_CPU if torch.device(device).type == "cpu" else _CHUNK_ACCELERATOR


def _partial_map(stack: Stack, key: str, all_axes, subset, group_of, cache, apply, lo: int, hi: int) -> torch.Tensor:
    """Models ``lo..hi-1`` of ``key`` with the soft maps applied on every axis outside ``subset``
    (the gradient's cached partial map; built here for more than two permuted axes)."""
    rest = frozenset(a for a in all_axes if a not in subset)
    x = cache.get(rest)
    if x is None:  # more than two permuted axes: build the partial map directly (all models)
        x = stack.weights[key]
        for b in rest:
            x = apply[group_of[b]](x, b)
    return x if lo == 0 and hi == stack.n else x[lo:hi]


def _coefficients(stack: Stack, key: str, all_axes, group_of, cache, vertex, apply, lo: int, hi: int) -> torch.Tensor:
    """``c[p, j]`` (models ``lo..hi-1``): the coefficient of ``t^j`` in ``U_p(t)``, flattened."""
    k = len(all_axes)
    m: dict[frozenset, torch.Tensor] = {}
    for r in range(k + 1):
        for subset in itertools.combinations(all_axes, r):
            x = _partial_map(stack, key, all_axes, subset, group_of, cache, apply, lo, hi)
            for a in subset:
                x = contract_hard(x, a, vertex[group_of[a]][lo:hi])
            m[frozenset(subset)] = x
    count = hi - lo
    u = m[frozenset()].reshape(count, -1)
    c = torch.empty(count, k + 1, u.shape[1], device=stack.device)
    c[:, 0] = u
    if k == 1:
        torch.sub(m[frozenset(all_axes)].reshape(count, -1), u, out=c[:, 1])
    elif k == 2:
        a, b = all_axes
        na = m[frozenset([a])].reshape(count, -1).sub_(u)  # D on a, P on b (fresh gathers: in place)
        nb = m[frozenset([b])].reshape(count, -1).sub_(u)
        torch.add(na, nb, out=c[:, 1])
        # D on both: M_ab - M_a - M_b + U = M_ab - U - (na + nb)
        torch.sub(m[frozenset(all_axes)].reshape(count, -1), u, out=c[:, 2]).sub_(c[:, 1])
    else:  # general inclusion-exclusion
        for r in range(1, k + 1):
            acc = torch.zeros_like(u)
            for subset in itertools.combinations(all_axes, r):
                for q in range(r + 1):
                    for sub in itertools.combinations(subset, q):
                        acc.add_(m[frozenset(sub)].reshape(count, -1), alpha=(-1) ** (r - q))
            c[:, r] = acc
    return c


def _pairwise_coefficients(stack: Stack, key: str, all_axes, group_of, cache, vertex, away, scale, apply,
                           lo: int, hi: int) -> torch.Tensor:
    """``c[p, j]``: the coefficient of ``t^j`` in ``U_p(t)`` along ``P + t D``, ``D = s (Π - A)`` per axis.

    ``U(t) = sum_{T ⊆ axes} t^|T| prod_{a in T} s_a  M[Π - A on T, P elsewhere]``: the partial map
    with ``P`` off ``T`` (computed by the gradient; the weights themselves for ``T`` = every axis),
    then on each axis of ``T`` the difference of its gathers by ``Π`` and by the away vertex ``A``.
    """
    k = len(all_axes)
    count = hi - lo
    numel = stack.weights[key][0].numel()
    c = torch.zeros(count, k + 1, numel, device=stack.device)
    for r in range(k + 1):
        for subset in itertools.combinations(all_axes, r):
            base = _partial_map(stack, key, all_axes, subset, group_of, cache, apply, lo, hi)
            if r == 0:
                c[:, 0] = base.reshape(count, -1)
                continue
            factor = torch.ones(count, 1, device=stack.device)
            for a in subset:
                factor = factor * scale[group_of[a]][lo:hi].view(count, 1)
            if not bool(factor.any()):
                continue
            x = base
            for a in subset:  # the difference of the two gathers, one axis after the other
                x = contract_hard(x, a, vertex[group_of[a]][lo:hi]).sub_(
                    contract_hard(x, a, away[group_of[a]][lo:hi]))
            c[:, r].addcmul_(x.reshape(count, -1), factor)
    return c


class _ActiveSet:
    """One group's vertices (index permutations ``(n, d)``) and every model's weights on them."""

    def __init__(self, start: torch.Tensor):
        self.n, self.d = start.shape
        self.vertices = start.unsqueeze(0).clone()  # (m, n, d)
        self.weights = torch.ones(1, self.n, dtype=torch.float64, device=start.device)  # (m, n)

    def add(self, vertex: torch.Tensor) -> torch.Tensor:
        """Slot of ``vertex[p]`` among model ``p``'s vertices (a new slot, weight 0, where it is new)."""
        same = (self.vertices == vertex.unsqueeze(0)).all(-1)  # (m, n)
        found = same.any(0)
        slot = same.to(torch.int8).argmax(0)
        if not bool(found.all()):
            self.vertices = torch.cat([self.vertices, vertex.unsqueeze(0)])
            self.weights = torch.cat([self.weights, self.weights.new_zeros(1, self.n)])
            slot = torch.where(found, slot, torch.full_like(slot, self.vertices.shape[0] - 1))
        return slot

    def away(self, grad: torch.Tensor, fw_slot: torch.Tensor):
        """``(slot, vertex, scale)``: per model the active vertex with the lowest linear score, and its weight
        (0 where it is the oracle's own vertex: no pairwise move there)."""
        m = self.vertices.shape[0]
        scores = torch.stack([grad.gather(1, self.vertices[k].unsqueeze(1)).sum((1, 2)) for k in range(m)]).double()
        scores[self.weights <= 0] = float("inf")
        slot = scores.argmin(0)
        cols = torch.arange(self.n, device=slot.device)
        weight = self.weights[slot, cols]
        weight = torch.where(slot == fw_slot, torch.zeros_like(weight), weight)
        return slot, self.vertices[slot, cols], weight.float()

    def move(self, fw_slot: torch.Tensor, aw_slot: torch.Tensor, scale: torch.Tensor, step: float) -> None:
        cols = torch.arange(self.n, device=fw_slot.device)
        moved = step * scale.double()
        if step >= 1.0:  # the away vertices empty exactly
            moved = self.weights[aw_slot, cols] * (scale > 0)
        self.weights[aw_slot, cols] -= moved
        self.weights[fw_slot, cols] += moved
        self.weights.clamp_(min=0.0)
        keep = (self.weights > 0).any(1)
        if not bool(keep.all()):  # no model uses these vertices any more
            self.vertices, self.weights = self.vertices[keep], self.weights[keep]

    def matrix(self, out: torch.Tensor) -> torch.Tensor:
        """``out[p] = sum_k weights[k, p] Π_k^p`` as ``(n, d, d)`` doubly-stochastic matrices."""
        out.zero_()
        for k in range(self.vertices.shape[0]):
            w = self.weights[k].to(out.dtype).view(self.n, 1, 1).expand(self.n, 1, self.d)
            out.scatter_add_(1, self.vertices[k].unsqueeze(1), w)
        return out
