"""Bad input to the public API raises ValueError naming the model index and the key.

Every check is run once per entry point (``merge`` with each ``align``, ``match`` with each
method), each in its own ``pytest.raises``: a check that only the first entry point makes would
otherwise hide behind it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fedmerge
from fedmerge import apply_permutation, compose_permutations, invert_permutation, random_permutation
from fedmerge.models import MLP

ALIGNS = [None, "git-rebasin", "mergemany", "c2m3"]
MATCH_METHODS = ["identity", "git-rebasin", "mergemany", "c2m3"]


def _merge(align):
    def call(state_dicts, spec, **kw):
        return fedmerge.merge(state_dicts, align=align, spec=spec, **kw)
    return call


def _match(method):
    def call(state_dicts, spec, **kw):
        return fedmerge.match(state_dicts, spec, method=method, **kw)
    return call


MERGES = [pytest.param(_merge(a), id=f"merge-{a or 'mean'}") for a in ALIGNS]
MATCHES = [pytest.param(_match(m), id=f"match-{m}") for m in MATCH_METHODS]


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


@pytest.mark.parametrize("entry", MERGES + MATCHES)
def test_empty_list(spec, entry):
    with pytest.raises(ValueError, match="no state_dicts"):
        entry([], spec)


@pytest.mark.parametrize("entry", MERGES + MATCHES)
def test_missing_key(models, spec, entry):
    key = next(iter(models[0]))
    del models[2][key]
    with pytest.raises(ValueError, match=rf"model 2: key '{key}' is missing"):
        entry(models, spec)


@pytest.mark.parametrize("entry", MERGES + MATCHES)
def test_extra_key(models, spec, entry):
    models[1]["extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"model 1: unexpected key 'extra.weight'"):
        entry(models, spec)


@pytest.mark.parametrize("entry", MERGES + MATCHES)
def test_different_architecture(models, spec, entry):
    torch.manual_seed(0)
    models[1] = MLP(widths=(8, 17)).state_dict()
    with pytest.raises(ValueError, match=r"model 1: key '.*' has shape"):
        entry(models, spec)


@pytest.mark.parametrize("entry", [p for p in MERGES if p.id != "merge-mean"] + MATCHES)
def test_spec_that_does_not_fit(models, entry):
    wrong = MLP(widths=(8, 16, 4)).permutation_spec()
    with pytest.raises(ValueError, match="model 0"):
        entry(models, wrong)


@pytest.mark.parametrize("entry", MERGES + MATCHES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights(models, spec, bad, entry):
    key = list(models[0])[2]
    models[1][key][0] = bad
    with pytest.raises(ValueError, match=rf"model 1: key '{key}' contains (NaN|Inf)"):
        entry(models, spec)


@pytest.mark.parametrize("entry", MERGES + MATCHES)
def test_weights_too_large_for_float32_arithmetic(models, spec, entry):
    # finite, but a diverged model's squared norm overflows float32, in which every aligner compares models
    key = list(models[0])[2]
    models[1][key][0] = 1e30
    with pytest.raises(ValueError, match=rf"model 1: key '{key}' has values too large for float32 arithmetic "
                                         r"\(largest \|value\| 1e\+30"):
        entry(models, spec)


def test_the_line_search_refuses_a_polynomial_that_overflowed():
    from fedmerge.matching import c2m3
    assert c2m3._best_step(np.array([0.0, 2.0, -1.0]))[0] == pytest.approx(1.0)  # -t² + 2t on [0, 1]: t = 1
    with pytest.raises(FloatingPointError, match="overflowed float32"):
        c2m3._best_step(np.array([0.0, np.inf, -1.0]))


@pytest.mark.parametrize("entry", MERGES)
@pytest.mark.parametrize("weights, message", [
    ([1, -1, 1], "model 1: weight -1.0 is negative"),
    ([0, 0, 0], "all weights are zero"),
    ([1, 2], "got 2 weights for 3 models"),
    ([1, math.nan, 1], "model 1: weight nan is not finite"),
    ([1, "x", 1], "model 1: weight 'x' is not a number"),
])
def test_bad_weights(models, spec, weights, message, entry):
    with pytest.raises(ValueError, match=message):
        entry(models, spec, weights=weights)


def test_unknown_method(models, spec):
    with pytest.raises(ValueError, match="unknown method 'sinkhorn'"):
        fedmerge.match(models, spec, method="sinkhorn")
    with pytest.raises(ValueError, match="unknown method 'sinkhorn'"):
        fedmerge.merge(models, align="sinkhorn", spec=spec)


@pytest.mark.parametrize("align", ALIGNS[1:])
def test_missing_spec(models, align):
    with pytest.raises(ValueError, match="spec"):
        fedmerge.merge(models, align=align)
    with pytest.raises(ValueError, match="spec"):
        fedmerge.match(models, method=align)


@pytest.mark.parametrize("entry", MERGES + MATCHES)
def test_single_mapping_instead_of_list(models, spec, entry):
    with pytest.raises(ValueError, match="single mapping"):
        entry(models[0], spec)


def test_permutation_algebra(spec, models):
    p, q = random_permutation(spec, 1), random_permutation(spec, 2)
    for g in spec.sizes:  # non-trivial and non-commuting, or the identities below prove nothing
        assert not torch.equal(p[g], torch.arange(spec.sizes[g])), g
        assert not torch.equal(compose_permutations(p, q)[g], compose_permutations(q, p)[g]), g
    sd = models[0]
    permuted = apply_permutation(sd, spec, p)
    assert any(not torch.equal(permuted[k], sd[k]) for k in sd)
    twice = apply_permutation(permuted, spec, q)
    once = apply_permutation(sd, spec, compose_permutations(p, q))
    back = apply_permutation(permuted, spec, invert_permutation(p))
    for k in sd:
        assert torch.equal(twice[k], once[k]), k
        assert torch.equal(back[k], sd[k]), k
    # the permuted network computes the same function
    model = MLP(widths=(8, 16)).eval()
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.load_state_dict(sd)
        expected = model(x)
        model.load_state_dict(twice)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="groups"):
        apply_permutation(sd, spec, {"nope": torch.arange(3)})
