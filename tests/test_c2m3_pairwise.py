"""Pairwise Frank-Wolfe for C²M³ (``frank_wolfe="pairwise"``): exact line search, feasible iterates, ascent.

The pairwise step moves, per (model, group) block, mass from the block's away vertex to the
oracle's vertex; the line search maximises Eq. 4's relaxation along that direction exactly, as a
polynomial whose coefficients are gathers of the partial maps.  These tests check the polynomial
against the relaxed objective evaluated directly with dense soft matrices, and the iterates.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import fedmerge
from fedmerge import apply_permutation, random_permutation
from fedmerge.matching import c2m3
from fedmerge.matching._stack import SoftPermutation, Stack
from fedmerge.models import MLP, SmallCNN


def _relaxed(stack, soft):
    """Eq. 4's relaxation at dense soft matrices, straight from its definition (one pair at a time)."""
    total = 0.0
    for key, axes in stack.axes.items():
        u = stack.weights[key]
        for a, g in axes:  # P^T along each permuted axis (units of a flattened axis in blocks), a dense product
            d = soft[g].shape[1]
            shape = u.shape
            outer = int(np.prod(shape[1:a + 1]))
            v = u.reshape(stack.n, outer, d, -1)
            u = torch.einsum("nki,nakb->naib", soft[g], v).reshape(shape)
        u = u.double()
        total += sum(float((u[p] * u[q]).sum()) for p, q in itertools.combinations(range(stack.n), 2))
    return total


def _setup(make, n, random_models, seed):
    """``n`` random models of ``make``: their spec and stack, a seeded generator, ``perms(d)`` (``n`` random
    index permutations from it) and ``dense(idx, d)`` (their ``(n, d, d)`` matrices)."""
    spec = make().permutation_spec()
    stack = Stack.from_state_dicts(random_models(make, n), spec)
    gen = torch.Generator().manual_seed(seed)

    def perms(d):
        return torch.stack([torch.randperm(d, generator=gen) for _ in range(n)])

    def dense(idx, d):
        return torch.zeros(n, d, d).scatter_(1, idx.unsqueeze(1), 1.0)

    return spec, stack, gen, perms, dense


@pytest.mark.parametrize("make", [lambda: MLP((16,), 5, widths=(7, 6)),
                                  lambda: SmallCNN((1, 8, 8), 5, channels=(3, 4), hidden=6)],
                         ids=["mlp", "cnn"])
def test_pairwise_line_search_polynomial_is_the_relaxed_objective_along_the_direction(make, random_models):
    n = 4
    spec, stack, gen, perms, dense = _setup(make, n, random_models, seed=0)

    soft, vertex, away, scale = {}, {}, {}, {}
    for g, d in spec.sizes.items():  # every block a mixture of two vertices; the away vertex is one of them
        first, second, fw = perms(d), perms(d), perms(d)
        w = torch.rand(n, generator=gen)
        soft[g] = w.view(n, 1, 1) * dense(first, d) + (1 - w).view(n, 1, 1) * dense(second, d)
        vertex[g], away[g], scale[g] = fw, second, 1 - w
    apply = {g: SoftPermutation(soft[g]).apply for g in spec.sizes}
    poly = np.zeros(1)
    for key, axes in stack.axes.items():
        cache = c2m3._partial_maps(stack, key, axes, apply)
        poly = c2m3._add(poly, c2m3._step_polynomial(stack, key, axes, cache, vertex, apply, away, scale))
    for t in (0.0, 0.3, 0.8, 1.0):
        moved = {g: soft[g] + t * scale[g].view(n, 1, 1) * (dense(vertex[g], d) - dense(away[g], d))
                 for g, d in spec.sizes.items()}
        assert (moved[next(iter(moved))] >= -1e-6).all()  # still doubly stochastic (scale = the away weight)
        expected = _relaxed(stack, moved)
        got = float(np.polynomial.polynomial.polyval(t, poly))
        # float32 products whose pair terms cancel: the error scales with the terms, not with their sum
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6 + 1e-5 * abs(expected))


def test_pairwise_frank_wolfe_ascends_and_its_iterates_stay_doubly_stochastic(monkeypatch, random_models):
    make = lambda: MLP((32,), 10, widths=(24, 16))  # noqa: E731
    models = random_models(make, 4)
    spec = make().permutation_spec()
    seen = []
    original = c2m3._ActiveSet.matrix

    def matrix(self, out):
        m = original(self, out)
        seen.append((self.weights.sum(0).clone(), bool((self.weights >= 0).all()), m.sum(1).clone(), m.sum(2).clone()))
        return m
    monkeypatch.setattr(c2m3._ActiveSet, "matrix", matrix)
    result = fedmerge.match(models, spec, method="c2m3", frank_wolfe="pairwise", init="identity", refine=0,
                            max_iter=15)
    assert seen and result.nit >= 2
    for weights, nonnegative, cols, rows in seen:  # convex combinations of permutations
        assert nonnegative
        torch.testing.assert_close(weights, torch.ones_like(weights), rtol=0, atol=1e-9)
        torch.testing.assert_close(cols, torch.ones_like(cols), rtol=0, atol=1e-5)
        torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-5)
    history = result.history
    assert all(b >= a for a, b in zip(history, history[1:]))  # every step an ascent step
    identity = fedmerge.match(models, spec, method="identity").objective
    assert history[0] == pytest.approx(identity, rel=1e-6) and history[-1] > identity
    # the first pairwise step is the paper's (one vertex, weight 1: the same direction and line search)
    paper = fedmerge.match(models, spec, method="c2m3", paper=True, max_iter=1)
    assert history[1] == pytest.approx(paper.history[1], rel=1e-6)


def test_pairwise_frank_wolfe_with_refinement_recovers_permuted_copies():
    make = lambda: MLP((64,), 10, widths=(37, 23))  # noqa: E731
    torch.manual_seed(1)
    model = make()
    spec = model.permutation_spec()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    copies = [apply_permutation(base, spec, random_permutation(spec, 100 + i)) for i in range(4)]
    best = fedmerge.match([base] * 4, spec, method="identity").objective
    for init in ("auto", "identity"):
        result = fedmerge.match(copies, spec, method="c2m3", frank_wolfe="pairwise", init=init, max_iter=20)
        assert result.objective == pytest.approx(best, rel=1e-6), init
        assert result.cycle_error == 0.0 and result.converged


def test_frank_wolfe_option_is_checked(random_models):
    make = lambda: MLP((16,), 5, widths=(7, 6))  # noqa: E731
    models = random_models(make, 3)
    spec = make().permutation_spec()
    with pytest.raises(ValueError, match="frank_wolfe"):
        fedmerge.match(models, spec, method="c2m3", frank_wolfe="away")
    with pytest.raises(ValueError, match="paper=True"):
        fedmerge.match(models, spec, method="c2m3", paper=True, frank_wolfe="pairwise")


def test_refinement_reports_its_objective_and_refine_tol_stops_it_early(random_models):
    """The objective each refinement sweep reports (the rounded objective plus every accepted step's
    gain) is the objective of the permutations returned; a tolerance stops the sweeps before the
    fixed point, and that result is not called converged."""
    make = lambda: MLP((32,), 10, widths=(24, 16))  # noqa: E731
    models = random_models(make, 5)
    spec = make().permutation_spec()
    seen = []
    full = fedmerge.match(models, spec, method="c2m3", init="identity", max_iter=3,
                          callback=lambda info: seen.append(info.objective) if info.phase == "refinement" else None)
    assert full.converged and full.sweeps >= 3 and len(seen) == full.sweeps
    assert seen[-1] == pytest.approx(full.objective, rel=1e-6)  # gains read off float32 cost matrices
    assert all(b >= a for a, b in zip(seen, seen[1:]))
    early = fedmerge.match(models, spec, method="c2m3", init="identity", max_iter=3, refine_tol=1.0)
    assert early.sweeps == 1 and not early.converged and "refine_tol=1" in early.message
    assert early.objective == pytest.approx(seen[0], rel=1e-6)
    with pytest.raises(ValueError, match="refine_tol"):
        fedmerge.match(models, spec, method="c2m3", refine_tol=-1e-3)


@pytest.mark.parametrize("pairwise", [False, True], ids=["classic", "pairwise"])
@pytest.mark.parametrize("make", [lambda: MLP((16,), 5, widths=(7, 6)),
                                  lambda: SmallCNN((1, 8, 8), 5, channels=(3, 4), hidden=6)],
                         ids=["mlp", "cnn"])
def test_partial_maps_moved_by_gathers_equal_fresh_products(make, pairwise, random_models):
    """Frank-Wolfe keeps each entry's partial maps between iterations and moves them with the step by
    gathers (``_advance``); after several steps they must equal the maps built afresh, by dense
    products, from the moved soft matrices."""
    n = 4
    spec, stack, gen, perms, dense = _setup(make, n, random_models, seed=1)

    soft = {g: dense(perms(d), d) for g, d in spec.sizes.items()}
    apply = {g: SoftPermutation(soft[g]).apply for g in spec.sizes}
    caches = {key: c2m3._partial_maps(stack, key, axes, apply) for key, axes in stack.axes.items()}
    for step in (0.5, 0.3, 0.7, 0.25):
        vertex = {g: perms(d) for g, d in spec.sizes.items()}
        away = scale = None
        if pairwise:  # any away vertex and scale: the maps are bilinear whatever the direction
            away = {g: perms(d) for g, d in spec.sizes.items()}
            scale = {g: torch.rand(n, generator=gen) * 0.5 for g in spec.sizes}
        for key, axes in stack.axes.items():
            assert c2m3._advance(stack, key, axes, caches[key], vertex, step, away, scale)
        for g, d in spec.sizes.items():
            if pairwise:
                soft[g] = soft[g] + step * scale[g].view(n, 1, 1) * (dense(vertex[g], d) - dense(away[g], d))
            else:
                soft[g] = (1 - step) * soft[g] + step * dense(vertex[g], d)
    dense_apply = {g: SoftPermutation(soft[g].clone()).apply for g in spec.sizes}
    for key, axes in stack.axes.items():
        fresh = c2m3._partial_maps(stack, key, axes, dense_apply)
        assert set(fresh) == set(caches[key])
        for subset, value in fresh.items():
            torch.testing.assert_close(caches[key][subset], value, rtol=1e-5, atol=1e-5)
