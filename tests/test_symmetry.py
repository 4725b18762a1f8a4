"""The group protocol: every kind's operations agree with its matrix form, and best responses are optimal."""

import itertools

import pytest
import torch

import fedmerge
from fedmerge.symmetry import KINDS, SignedPermutation, group, group_of_element

ALL_KINDS = sorted(KINDS)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _act_by_matrix(t, axis, m):
    """``Mᵀ x`` along ``axis``, reading an axis of length k·d as d blocks of k, written out with einsum."""
    d = m.shape[0]
    n = t.shape[axis]
    v = t.reshape(*t.shape[:axis], d, n // d, *t.shape[axis + 1:]).double()
    moved = v.movedim(axis, -1)
    return torch.einsum("...k,ki->...i", moved, m.double()).movedim(-1, axis).reshape(t.shape)


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("axis,shape", [(0, (5, 3)), (1, (4, 5)), (1, (2, 15, 3))])  # last: blocks of 3
def test_act_is_the_matrix_form(kind, axis, shape):
    g = group(kind)
    t = torch.randn(*shape, generator=_gen(1), dtype=torch.float64)
    e = g.random(5, _gen(2))
    assert torch.allclose(g.act(t, axis, e).double(), _act_by_matrix(t, axis, g.matrix(e)), atol=1e-6)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_compose_inverse_identity_agree_with_matrices(kind):
    g = group(kind)
    a, b = g.random(6, _gen(3)), g.random(6, _gen(4))
    ma, mb = g.matrix(a).double(), g.matrix(b).double()
    assert torch.allclose(g.matrix(g.compose(a, b)).double(), ma @ mb, atol=1e-6)
    assert torch.allclose(g.matrix(g.inverse(a)).double(), ma.T, atol=1e-6)
    assert torch.allclose(g.matrix(g.identity(6)).double(), torch.eye(6, dtype=torch.float64))
    t = torch.randn(6, 4, generator=_gen(5))
    assert torch.allclose(g.act(g.act(t, 0, a), 0, b), g.act(t, 0, g.compose(a, b)), atol=1e-5)
    assert torch.allclose(g.act(g.act(t, 0, a), 0, g.inverse(a)), t, atol=1e-5)
    assert g.defect(g.identity(6)) == pytest.approx(0.0, abs=1e-9)
    score = torch.randn(6, 6, generator=_gen(6), dtype=torch.float64)
    assert g.score(score, a) == pytest.approx(float((score * ma).sum()), abs=1e-6)
    assert g.equal(a, a) and not g.equal(a, b)
    assert g.defect(a) > 0.5  # a random element of size 6 is not the identity (seeded)


def test_random_elements_are_in_their_groups():
    assert sorted(group("permutation").random(7, _gen(0)).tolist()) == list(range(7))
    s = group("signed-permutation").random(50, _gen(0))
    assert set(s.signs.tolist()) == {-1.0, 1.0}
    q = group("orthogonal").random(9, _gen(0)).double()
    assert torch.allclose(q.T @ q, torch.eye(9, dtype=torch.float64), atol=1e-6)
    assert not torch.allclose(q.abs(), torch.eye(9, dtype=torch.float64), atol=0.1)  # a real rotation


def _all_elements(kind, d):
    for p in itertools.permutations(range(d)):
        idx = torch.tensor(p)
        if kind == "permutation":
            yield idx
        else:
            for signs in itertools.product((-1.0, 1.0), repeat=d):
                yield SignedPermutation(idx, torch.tensor(signs))


@pytest.mark.parametrize("kind", ["permutation", "signed-permutation"])
def test_discrete_best_response_is_the_brute_force_optimum(kind):
    g = group(kind)
    for seed in range(5):
        score = torch.randn(4, 4, generator=_gen(seed), dtype=torch.float64)
        best = max(float((score * g.matrix(e).double()).sum()) for e in _all_elements(kind, 4))
        got = float((score * g.matrix(g.best_response(score)).double()).sum())
        assert got == pytest.approx(best, abs=1e-9)


def test_orthogonal_best_response_is_procrustes():
    g = group("orthogonal")
    q = g.random(8, _gen(7)).double()
    # a score that is a rotation plus noise: the best response recovers the rotation
    score = q * 10 + 0.01 * torch.randn(8, 8, generator=_gen(8), dtype=torch.float64)
    r = g.best_response(score).double()
    assert torch.allclose(r, q, atol=1e-2)
    value = float((score * r).sum())
    for seed in range(20):  # no random rotation does better
        assert value >= float((score * g.random(8, _gen(100 + seed)).double()).sum())


def test_group_of_element_and_validation_errors():
    assert group_of_element(torch.arange(3)).kind == "permutation"
    assert group_of_element(torch.eye(3)).kind == "orthogonal"
    assert group_of_element(SignedPermutation(torch.arange(3), torch.ones(3))).kind == "signed-permutation"
    with pytest.raises(ValueError, match="not a group element"):
        group_of_element(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="not a permutation"):
        group("permutation").validate(torch.tensor([0, 0, 1]), 3, "g")
    with pytest.raises(ValueError, match="not orthogonal"):
        group("orthogonal").validate(torch.ones(3, 3), 3, "g")
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        group("signed-permutation").validate(SignedPermutation(torch.arange(3), torch.tensor([1.0, 0.5, 1.0])), 3, "g")
    with pytest.raises(ValueError, match="unknown symmetry kind"):
        group("rotation")


def _tiny_spec(kind):
    return fedmerge.SymmetrySpec({"w1": ("h", None), "b1": ("h",), "w2": (None, "h")}, {"h": 4}, {"h": kind})


def test_spec_kinds_default_compare_and_refuse_bad_input():
    spec = fedmerge.PermutationSpec({"w1": ("h", None), "b1": ("h",), "w2": (None, "h")}, {"h": 4})
    assert spec.kinds == {"h": "permutation"} and spec.is_permutation_only
    assert spec == _tiny_spec("permutation")
    assert spec != _tiny_spec("orthogonal")
    assert spec.difference(_tiny_spec("orthogonal")) == "the group kinds differ"
    assert spec.with_kinds({"h": "orthogonal"}) == _tiny_spec("orthogonal")
    with pytest.raises(ValueError, match="kind 'rotation'"):
        _tiny_spec("rotation")
    with pytest.raises(ValueError, match="does not have"):
        fedmerge.SymmetrySpec({"w": ("h",)}, {"h": 2}, {"other": "orthogonal"})


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_apply_transform_round_trips_and_checks_elements(kind):
    spec = _tiny_spec(kind)
    sd = {"w1": torch.randn(4, 3, generator=_gen(0)), "b1": torch.randn(4, generator=_gen(1)),
          "w2": torch.randn(2, 4, generator=_gen(2))}
    t = fedmerge.random_transform(spec, 3)
    moved = fedmerge.apply_transform(sd, spec, t)
    assert not torch.allclose(moved["w1"], sd["w1"])
    back = fedmerge.apply_transform(moved, spec, fedmerge.invert_transform(t))
    assert all(torch.allclose(back[k], sd[k], atol=1e-5) for k in sd)
    # the function x -> w2 (w1 x + b1) is unchanged: that is what makes it a symmetry of a linear net
    x = torch.randn(3, 5, generator=_gen(4))
    assert torch.allclose(moved["w2"] @ (moved["w1"] @ x + moved["b1"][:, None]),
                          sd["w2"] @ (sd["w1"] @ x + sd["b1"][:, None]), atol=1e-5)
    wrong = {"h": torch.eye(4)} if kind != "orthogonal" else {"h": torch.arange(4)}
    with pytest.raises(ValueError, match="group 'h'"):
        fedmerge.apply_transform(sd, spec, wrong)
    with pytest.raises(ValueError, match="does not have"):
        fedmerge.apply_transform(sd, spec, {"nope": torch.arange(4)})
