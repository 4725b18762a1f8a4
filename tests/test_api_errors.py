"""Bad input to the public API raises ValueError naming the model index and the key."""

from __future__ import annotations

import math

import pytest
import torch

import fedmerge
from fedmerge import apply_permutation, compose_permutations, invert_permutation, random_permutation
from fedmerge.models import MLP


@pytest.fixture()
def models():
    out = []
    for s in range(3):
        torch.manual_seed(s)
        out.append(MLP(widths=(8, 16)).state_dict())
    return out


@pytest.fixture()
def spec():
    return MLP(widths=(8, 16)).permutation_spec()


def _merge_all(state_dicts, spec, **kw):
    """Every entry point must reject the input, not only one of them."""
    for align in (None, "git-rebasin", "mergemany", "c2m3"):
        fedmerge.merge(state_dicts, align=align, spec=spec, **kw)


def test_empty_list(spec):
    with pytest.raises(ValueError, match="no state_dicts"):
        fedmerge.merge([], spec=spec)
    with pytest.raises(ValueError, match="no state_dicts"):
        fedmerge.match([], spec)


def test_missing_and_extra_keys(models, spec):
    key = next(iter(models[0]))
    del models[2][key]
    with pytest.raises(ValueError, match=rf"model 2: key '{key}' is missing"):
        _merge_all(models, spec)
    models[2][key] = models[0][key].clone()
    models[1]["extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"model 1: unexpected key 'extra.weight'"):
        _merge_all(models, spec)


def test_different_architecture(models, spec):
    torch.manual_seed(0)
    models[1] = MLP(widths=(8, 17)).state_dict()
    with pytest.raises(ValueError, match=r"model 1: key '.*' has shape"):
        _merge_all(models, spec)


def test_spec_that_does_not_fit(models):
    wrong = MLP(widths=(8, 16, 4)).permutation_spec()
    with pytest.raises(ValueError, match="model 0"):
        fedmerge.match(models, wrong)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights(models, spec, bad):
    key = list(models[0])[2]
    models[1][key][0] = bad
    with pytest.raises(ValueError, match=rf"model 1: key '{key}' contains (NaN|Inf)"):
        _merge_all(models, spec)


@pytest.mark.parametrize("weights, message", [
    ([1, -1, 1], "model 1: weight -1.0 is negative"),
    ([0, 0, 0], "all weights are zero"),
    ([1, 2], "got 2 weights for 3 models"),
    ([1, math.nan, 1], "model 1: weight nan is not finite"),
    ([1, "x", 1], "model 1: weight 'x' is not a number"),
])
def test_bad_weights(models, spec, weights, message):
    with pytest.raises(ValueError, match=message):
        _merge_all(models, spec, weights=weights)


def test_unknown_method_and_missing_spec(models, spec):
    with pytest.raises(ValueError, match="unknown method 'sinkhorn'"):
        fedmerge.match(models, spec, method="sinkhorn")
    with pytest.raises(ValueError, match="spec"):
        fedmerge.merge(models, align="c2m3")


def test_single_mapping_instead_of_list(models, spec):
    with pytest.raises(ValueError, match="single mapping"):
        fedmerge.merge(models[0], spec=spec)


def test_permutation_algebra(spec, models):
    p, q = random_permutation(spec, 1), random_permutation(spec, 2)
    sd = models[0]
    twice = apply_permutation(apply_permutation(sd, spec, p), spec, q)
    once = apply_permutation(sd, spec, compose_permutations(p, q))
    back = apply_permutation(apply_permutation(sd, spec, p), spec, invert_permutation(p))
    for k in sd:
        assert torch.equal(twice[k], once[k])
        assert torch.equal(back[k], sd[k])
    with pytest.raises(ValueError, match="groups"):
        apply_permutation(sd, spec, {"nope": torch.arange(3)})
