"""``fedmerge.cycle_error`` on many models: every triple, or an unbiased sample of them."""

from __future__ import annotations

import itertools

import pytest
import torch

import fedmerge
from fedmerge.diagnostics import MATCH_CYCLE_TRIPLES


def _maps(n: int, d: int, broken: set[int], seed: int = 0) -> dict:
    """Pairwise maps through a common space, except that every map touching a model in ``broken`` is
    replaced by an independent random permutation (so only triples with such a model have defects)."""
    gen = torch.Generator().manual_seed(seed)
    transforms = [{"g": torch.randperm(d, generator=gen)} for _ in range(n)]
    maps = {}
    for a, b in itertools.combinations(range(n), 2):
        if a in broken or b in broken:
            maps[(a, b)] = {"g": torch.randperm(d, generator=gen)}
        else:
            maps[(a, b)] = fedmerge.pairwise_map(transforms, a, b)
    return maps


def test_sampled_equals_exact_when_all_triples_fit():
    maps = _maps(6, 16, broken={2})
    exact = fedmerge.cycle_error(maps, 6)
    assert exact > 0.1  # the 10 triples through model 2 of 20 have defects
    assert fedmerge.cycle_error(maps, 6, max_triples=20) == exact
    assert fedmerge.cycle_error(maps, 6, max_triples=1000, seed=3) == exact


def test_sampled_estimate_is_close_and_reproducible():
    n = 30
    maps = _maps(n, 8, broken=set(range(10)))
    exact = fedmerge.cycle_error(maps, n)
    # the share of triples with a broken model: 1 - C(20,3)/C(30,3) ≈ 0.72; each has most units moved
    assert 0.4 < exact < 0.8
    estimate = fedmerge.cycle_error(maps, n, max_triples=2000, seed=1)
    assert estimate == fedmerge.cycle_error(maps, n, max_triples=2000, seed=1)
    assert estimate != fedmerge.cycle_error(maps, n, max_triples=2000, seed=2)
    assert abs(estimate - exact) < 0.03


def test_sample_costs_maps_of_the_sampled_triples_only():
    n, calls = 200, []
    identity = {"g": torch.arange(4)}

    def get(a, b):
        calls.append((a, b))
        return identity

    assert fedmerge.cycle_error(get, n, max_triples=50) == 0.0
    assert 3 <= len(set(calls)) == len(calls) <= 150  # each needed map once, never all n(n-1)


def test_bad_max_triples():
    with pytest.raises(ValueError, match="max_triples must be a positive"):
        fedmerge.cycle_error(_maps(4, 4, set()), 4, max_triples=0)


def test_match_reports_zero_on_many_permuted_copies():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    spec = fedmerge.spec_for(model)
    base = model.state_dict()
    n = 22  # 1540 triples: more than MATCH_CYCLE_TRIPLES, so match() samples
    assert n * (n - 1) * (n - 2) // 6 > MATCH_CYCLE_TRIPLES
    copies = [fedmerge.apply_transform(base, spec, fedmerge.random_transform(spec, i)) for i in range(n)]
    result = fedmerge.match(copies, spec=spec, method="git-rebasin")
    assert result.cycle_error == 0.0
