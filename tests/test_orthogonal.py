"""align="orthogonal": generalised Procrustes into a common space (fedmerge.matching.orthogonal)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import fedmerge
from fedmerge.alignment_metrics import cycle_residual
from fedmerge.matching.orthogonal import orthogonal_matching, relaxed_spec
from fedmerge.models import MLP

torch.set_num_threads(1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _linear_net(seed=0, widths=(12, 10, 8)):
    """A deep linear network: every hidden group is orthogonal (nothing elementwise between layers)."""
    torch.manual_seed(seed)
    layers, d = [], 20
    for w in widths:
        layers += [nn.Linear(d, w), nn.Identity()]
        d = w
    return nn.Sequential(*layers, nn.Linear(d, 4))


def _outputs(model, sd, x):
    model.eval()
    return torch.func.functional_call(model, sd, (x,))


def _max_diff(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _orthogonality_defect(q):
    q = q.double()
    return float((q.T @ q - torch.eye(q.shape[0], dtype=torch.float64)).abs().max())


def test_scenario_b_a_hidden_dense_rotation_is_undone_where_permutations_cannot():
    net = _linear_net()
    spec = fedmerge.spec_for(net)
    assert set(spec.kinds.values()) == {"orthogonal"} and len(spec.sizes) == 3
    sd = net.state_dict()
    hidden = fedmerge.random_transform(spec, 7)  # a dense Haar rotation of every hidden layer
    rotated = fedmerge.apply_transform(sd, spec, hidden)
    x = torch.randn(64, 20, generator=_gen(1))
    assert torch.allclose(_outputs(net, rotated, x), _outputs(net, sd, x), atol=1e-5)  # a true symmetry
    assert _max_diff(rotated, sd) > 0.1

    result = fedmerge.match([sd, rotated], spec, method="orthogonal")
    assert result.converged
    assert _max_diff(fedmerge.apply_transform(rotated, spec, result.pairwise(1, 0)), sd) < 1e-5
    merged = fedmerge.merge([sd, rotated], spec=spec, align="orthogonal")
    assert _max_diff(merged, sd) < 1e-5

    # the permutation subgroup cannot undo a dense rotation: its merge is a different network
    perm_spec = spec.with_kinds({g: "permutation" for g in spec.sizes})
    for method in ("git-rebasin", "c2m3"):
        merged_p = fedmerge.merge([sd, rotated], spec=perm_spec, align=method)
        assert _max_diff(merged_p, sd) > 0.05, method
        assert not torch.allclose(_outputs(net, merged_p, x), _outputs(net, sd, x), atol=1e-2), method


def test_layer_to_layer_propagation_beats_plain_coordinate_ascent_on_coupled_rotations():
    """MergeMany's coordinate ascent from the identity stalls on coupled orthogonal groups; the forward pass
    of Procrustes (each layer from its producing weights, inputs already aligned) does not."""
    net = _linear_net(seed=3)
    spec = fedmerge.spec_for(net)
    sd = net.state_dict()
    rotated = fedmerge.apply_transform(sd, spec, fedmerge.random_transform(spec, 11))
    ours = fedmerge.match([sd, rotated], spec, method="orthogonal")
    plain = fedmerge.match([sd, rotated], spec, method="mergemany")
    assert ours.objective > plain.objective + 1e-3 * abs(ours.objective)
    assert _max_diff(fedmerge.apply_transform(rotated, spec, ours.pairwise(1, 0)), sd) < 1e-5


@pytest.mark.parametrize("n", [3, 4])
def test_maps_are_orthogonal_and_cycle_consistent_unlike_independent_pairwise_procrustes(n):
    nets = [_linear_net(seed=s) for s in range(n)]  # independent models: no exact alignment exists
    spec = fedmerge.spec_for(nets[0])
    sds = [m.state_dict() for m in nets]
    result = fedmerge.match(sds, spec, method="orthogonal")
    for t in result.transforms:
        for q in t.values():
            assert _orthogonality_defect(q) < 1e-6
    assert result.cycle_error < 1e-6
    for a, b, c in itertools.combinations(range(n), 3):
        loop = [result.pairwise(a, b), result.pairwise(b, c), result.pairwise(c, a)]
        assert cycle_residual(sds[a], spec, loop, relative=True) < 1e-5
    # each pair aligned on its own: the loops do not close
    pair = {(a, b): orthogonal_matching([sds[b], sds[a]], spec)["transforms"][1]
            for a, b in itertools.permutations(range(n), 2)}
    assert fedmerge.cycle_error(pair, n) > 1e-2
    assert cycle_residual(sds[0], spec, [pair[(0, 1)], pair[(1, 2)], pair[(2, 0)]], relative=True) > 1e-2


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_relaxed_merge_undoes_hidden_permutations_of_relu_units(n):
    model = MLP(input_shape=(1, 6, 6), widths=(24, 16))
    spec = model.permutation_spec()
    sd = model.state_dict()
    copies = [fedmerge.apply_transform(sd, spec, fedmerge.random_transform(spec, 100 + s)) for s in range(n)]
    assert all(_max_diff(c, sd) > 0.01 for c in copies)
    merged, result = fedmerge.merge(copies, align="orthogonal", model=model, relax=True, full_output=True)
    x = torch.randn(32, 1, 6, 6, generator=_gen(n))
    assert torch.allclose(_outputs(model, merged, x), _outputs(model, sd, x), atol=1e-5)
    for t in result.transforms:  # projected: elements of the spec's kind, a permutation per ReLU group
        assert all(e.dtype == torch.int64 and e.dim() == 1 for e in t.values())
    for rotations in result.rotations:  # the searched maps were rotations, here exact permutation matrices
        for q in rotations.values():
            assert _orthogonality_defect(q) < 1e-6
            assert float((q.abs() - q.abs().round()).abs().max()) < 1e-4


def test_relaxed_rotations_can_be_kept_by_declaring_the_groups_orthogonal():
    """relaxed_spec keeps the rotations on ReLU units: not a symmetry, so the aligned model changes function."""
    torch.manual_seed(0)
    a, b = MLP(input_shape=(12,), widths=(16,)), MLP(input_shape=(12,), widths=(16,))
    spec = relaxed_spec(a.permutation_spec())
    result = fedmerge.match([a.state_dict(), b.state_dict()], spec, method="orthogonal")
    q = result.transforms[1]["layers.0"]
    assert _orthogonality_defect(q) < 1e-6
    assert float((q.abs() - q.abs().round()).abs().max()) > 0.1  # a dense rotation, not a permutation
    x = torch.randn(16, 12, generator=_gen(0))
    moved = fedmerge.apply_transform(b.state_dict(), spec, result.transforms[1])
    assert not torch.allclose(_outputs(b, moved, x), _outputs(b, b.state_dict(), x), atol=1e-3)


def test_exact_kinds_by_default_rotation_on_the_linear_group_permutation_on_the_relu_group():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 6), nn.Identity(), nn.Linear(6, 3))
    spec = fedmerge.spec_for(net)
    assert sorted(spec.kinds.values()) == ["orthogonal", "permutation"]
    sd = net.state_dict()
    hidden = fedmerge.random_transform(spec, 5)
    moved = fedmerge.apply_transform(sd, spec, hidden)
    result = fedmerge.match([sd, moved], spec, method="orthogonal")
    kinds = {g: fedmerge.symmetry.group_of_element(e).kind for g, e in result.transforms[1].items()}
    assert kinds == spec.kinds
    assert _max_diff(fedmerge.apply_transform(moved, spec, result.pairwise(1, 0)), sd) < 1e-5


def test_batchnorm_resnet20_aligned_orthogonally_with_an_exact_map_computes_the_same_function(bn_resnet):
    model = bn_resnet()
    spec = model.permutation_spec()
    sd = model.state_dict()
    copies = [fedmerge.apply_transform(sd, spec, fedmerge.random_transform(spec, s)) for s in range(3)]
    merged, result = fedmerge.merge(copies, align="orthogonal", model=model, relax=True, full_output=True)
    x = torch.randn(8, 1, 12, 12, generator=_gen(2))
    assert torch.allclose(_outputs(model, merged, x), _outputs(model, sd, x), atol=1e-5)
    for c, t in zip(copies, result.transforms):
        aligned = fedmerge.apply_transform(c, spec, t)
        assert torch.allclose(_outputs(model, aligned, x), _outputs(model, sd, x), atol=1e-5)


def test_rotating_batchnorm_channels_is_refused_and_would_indeed_break_the_network(bn_resnet):
    model = bn_resnet()
    spec = relaxed_spec(model.permutation_spec())
    sd = model.state_dict()
    x = torch.randn(8, 1, 12, 12, generator=_gen(3))
    rotated = fedmerge.apply_transform(sd, spec, fedmerge.random_transform(spec, 1))
    assert not torch.allclose(_outputs(model, rotated, x), _outputs(model, sd, x), atol=1e-2)
    with pytest.raises(ValueError, match="BatchNorm statistics .*not a symmetry"):
        fedmerge.match([sd, sd], spec, method="orthogonal")
    # projected to permutations it is allowed again
    result = fedmerge.match([sd, sd], spec, method="orthogonal", project="permutation")
    q = result.transforms[1]["stage1.residual"]
    assert torch.equal(q, torch.eye(q.shape[0]))


def test_activation_based_procrustes_undoes_a_hidden_rotation_from_calibration_inputs():
    net = _linear_net(seed=5)
    spec = fedmerge.spec_for(net)
    sd = net.state_dict()
    rotated = fedmerge.apply_transform(sd, spec, fedmerge.random_transform(spec, 2))
    x = torch.randn(200, 20, generator=_gen(4))
    # merge()/match() hand their model= to an aligner that takes one
    merged = fedmerge.merge([sd, rotated], model=net, align="orthogonal", align_options={"inputs": x})
    assert _max_diff(merged, sd) < 1e-4
    matched = fedmerge.match([sd, rotated], model=net, method="orthogonal", inputs=x)
    assert _max_diff(fedmerge.apply_transform(rotated, spec, matched.transforms[1]), sd) < 1e-4
    result = orthogonal_matching([sd, rotated], spec, inputs=x, model=net)
    # the same from an iterable of (inputs, targets) batches
    batches = [(x[i:i + 64], torch.zeros(len(x[i:i + 64]))) for i in range(0, 200, 64)]
    again = orthogonal_matching([sd, rotated], spec, inputs=batches, model=net)
    for g in spec.sizes:
        assert torch.allclose(again["transforms"][1][g], result["transforms"][1][g], atol=1e-5)


def test_activation_based_alignment_of_permuted_relu_copies_with_relax():
    model = MLP(input_shape=(10,), widths=(16, 12))
    spec = model.permutation_spec()
    sd = model.state_dict()
    copies = [fedmerge.apply_transform(sd, spec, fedmerge.random_transform(spec, s)) for s in range(3)]
    x = torch.randn(128, 10, generator=_gen(5))
    merged = fedmerge.merge(copies, spec=spec, align="orthogonal",
                            align_options={"inputs": x, "model": model, "relax": True})
    assert torch.allclose(_outputs(model, merged, x), _outputs(model, sd, x), atol=1e-5)


def _correlation_sums(model, spec, sd_a, sd_b, x):
    """Per group, the sum over units i of corr(unit i of a, unit i of b) of the producing layers' outputs."""
    from fedmerge.matching.orthogonal import group_features
    feats = next(iter(group_features(model, [sd_a, sd_b], spec, x, batch_size=len(x))))
    out = {}
    for g, f in feats.items():
        a, b = f[0].double(), f[1].double()
        a, b = (a - a.mean(0)) / a.std(0), (b - b.mean(0)) / b.std(0)
        out[g] = a.T @ b / (len(x) - 1)  # (d, d) cross-correlations
    return out


def test_standardized_activation_matching_maximises_the_units_cross_correlation():
    from scipy.optimize import linear_sum_assignment

    model = MLP(input_shape=(10,), widths=(8, 6))
    spec = model.permutation_spec()
    sd_a = model.state_dict()
    torch.manual_seed(7)
    sd_b = MLP(input_shape=(10,), widths=(8, 6)).state_dict()
    x = torch.randn(300, 10, generator=_gen(9))
    result = fedmerge.match([sd_a, sd_b], spec, method="orthogonal", model=model, inputs=x, standardize=True)
    aligned = fedmerge.apply_transform(sd_b, spec, result.pairwise(1, 0))
    best = {g: c.numpy()[linear_sum_assignment(-c.numpy())].sum()
            for g, c in _correlation_sums(model, spec, sd_a, sd_b, x).items()}
    got = {g: float(c.diagonal().sum()) for g, c in _correlation_sums(model, spec, sd_a, aligned, x).items()}
    for g in spec.sizes:
        assert got[g] == pytest.approx(best[g], abs=1e-6), g  # float32 features
    # a ReLU unit scaled by c > 0 (its consumers by 1 / c) computes the same function: correlations do not
    # see the scale, so the maps stay, while the raw cross-products it scales may pick others
    scaled = {k: v.clone() for k, v in sd_b.items()}
    c = torch.logspace(-2, 2, 8)
    scaled["layers.0.weight"] *= c[:, None]
    scaled["layers.0.bias"] *= c
    scaled["layers.1.weight"] /= c[None, :]
    assert torch.allclose(_outputs(model, scaled, x), _outputs(model, sd_b, x), atol=1e-4)
    again = fedmerge.match([sd_a, scaled], spec, method="orthogonal", model=model, inputs=x, standardize=True)
    assert all(torch.equal(again.pairwise(1, 0)[g], result.pairwise(1, 0)[g]) for g in spec.sizes)
    with pytest.raises(ValueError, match="standardize=True scores activations: it needs inputs="):
        fedmerge.match([sd_a, sd_b], spec, method="orthogonal", standardize=True)
    with pytest.raises(ValueError, match="standardize must be True or False"):
        fedmerge.match([sd_a, sd_b], spec, method="orthogonal", model=model, inputs=x, standardize=1)


def _proper(t):
    """The same rotations made proper (det +1), so that they lie on the identity's component."""
    out = {}
    for g, q in t.items():
        q = q.clone()
        if torch.det(q.double()) < 0:
            q[:, 0] = -q[:, 0]
        out[g] = q
    return out


def test_stiefel_solver_reaches_proper_rotations_but_not_reflections():
    pytest.importorskip("pymanopt")
    net = _linear_net(seed=6, widths=(6, 5))
    spec = fedmerge.spec_for(net)
    sd = net.state_dict()
    hidden = fedmerge.random_transform(spec, 9)
    proper = fedmerge.apply_transform(sd, spec, _proper(hidden))
    result = fedmerge.match([sd, proper], spec, method="orthogonal", solver="stiefel")
    assert _max_diff(fedmerge.apply_transform(proper, spec, result.pairwise(1, 0)), sd) < 1e-3
    # a reflection is on the other component of O(d): gradient steps from the identity cannot reach it
    reflection = {g: q.clone() for g, q in _proper(hidden).items()}
    reflection["0"][:, 0] = -reflection["0"][:, 0]
    reflected = fedmerge.apply_transform(sd, spec, reflection)
    svd = fedmerge.match([sd, reflected], spec, method="orthogonal")
    stiefel = fedmerge.match([sd, reflected], spec, method="orthogonal", solver="stiefel")
    assert _max_diff(fedmerge.apply_transform(reflected, spec, svd.pairwise(1, 0)), sd) < 1e-5
    assert stiefel.objective < svd.objective - 1e-3 * abs(svd.objective)


def test_bad_input_raises_clear_errors():
    net = _linear_net()
    spec = fedmerge.spec_for(net)
    sd = net.state_dict()
    with pytest.raises(ValueError, match="at least two models"):
        orthogonal_matching([sd], spec)
    with pytest.raises(ValueError, match="unknown solver 'newton'"):
        fedmerge.match([sd, sd], spec, method="orthogonal", solver="newton")
    with pytest.raises(ValueError, match="project='nearest'"):
        fedmerge.match([sd, sd], spec, method="orthogonal", project="nearest")
    with pytest.raises(ValueError, match="needs model="):
        fedmerge.match([sd, sd], spec, method="orthogonal", inputs=torch.randn(4, 20))
    with pytest.raises(ValueError, match="max_iter must be an integer >= 1"):
        fedmerge.match([sd, sd], spec, method="orthogonal", max_iter=0)
    with pytest.raises(ValueError, match="relax must be True or False"):
        fedmerge.match([sd, sd], spec, method="orthogonal", relax="yes")
    with pytest.raises(ValueError, match="stiefel_options= is only used"):
        fedmerge.match([sd, sd], spec, method="orthogonal", stiefel_options={"max_iterations": 3})
    with pytest.raises(ValueError, match="non-empty batch"):
        orthogonal_matching([sd, sd], spec, inputs=torch.randn(0, 20), model=net)
    with pytest.raises(ValueError, match="has no groups"):
        relaxed_spec(spec, ["nope"])


@pytest.mark.parametrize("relax", [False, True])
def test_tanh_units_get_signed_permutations_with_and_without_relax(relax):
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))
    spec = fedmerge.spec_for(net)
    assert set(spec.kinds.values()) == {"signed-permutation"}
    sd = net.state_dict()
    hidden = fedmerge.random_transform(spec, 4)
    assert float(hidden["0"].signs.min()) < 0  # some units flipped
    moved = fedmerge.apply_transform(sd, spec, hidden)
    result = fedmerge.match([sd, moved], spec, method="orthogonal", relax=relax)
    assert isinstance(result.transforms[1]["0"], fedmerge.SignedPermutation)
    assert _max_diff(fedmerge.apply_transform(moved, spec, result.pairwise(1, 0)), sd) < 1e-6
