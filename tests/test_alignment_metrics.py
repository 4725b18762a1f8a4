"""fedmerge.alignment_metrics: E_res, sign changes, E_cycle, linear CKA, evaluation, barriers and curves."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fedmerge
from fedmerge import alignment_metrics as am
from fedmerge.models import MLP
from fedmerge.symmetry import group

torch.set_num_threads(1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _blobs(n=600, dim=10, classes=3, seed=0):
    g = _gen(seed)
    centres = 3 * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def _trained(seed, data, widths=(32,)):
    torch.manual_seed(seed)
    model = MLP(input_shape=(data[0].shape[1],), num_classes=3, widths=widths)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.nll_loss(model(data[0]), data[1]).backward()
        opt.step()
    return model


def test_relu_residual_is_zero_for_permutations_and_eq1_for_a_rotation():
    a = torch.randn(50, 8, generator=_gen(0), dtype=torch.float64)
    perm = torch.randperm(8, generator=_gen(1))
    assert am.relu_residual(a, perm) == 0.0
    assert am.relu_residual(a, group("permutation").matrix(perm)) == 0.0
    q = group("orthogonal").random(8, _gen(2)).double()
    raw = am.relu_residual(a, q, relative=False)
    expected = float(torch.linalg.matrix_norm(F.relu(a) @ q - F.relu(a @ q)))  # Eq. 1 by hand
    assert raw == pytest.approx(expected, rel=1e-12) and raw > 1.0
    assert am.relu_residual(a, q) == pytest.approx(raw / float(torch.linalg.matrix_norm(F.relu(a) @ q)), rel=1e-12)
    with pytest.raises(ValueError, match="does not fit"):
        am.relu_residual(a, torch.eye(5))


def test_sign_change_share_counts_the_entries_whose_relu_gate_flips():
    c, s = math.cos(math.pi / 4), math.sin(math.pi / 4)
    q = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    a = torch.tensor([[1.0, -3.0], [2.0, 1.0]], dtype=torch.float64)
    # row 0: A Q = (-2c, -4c) -> off, off; ReLU(A) Q = (c, -c) -> on, off: one change
    # row 1: A Q = (3c, -c) -> on, off; ReLU(A) Q = (3c, -c) -> on, off: none
    assert am.sign_change_share(a, q) == pytest.approx(0.25)
    big = torch.randn(200, 8, generator=_gen(3))
    assert am.sign_change_share(big, torch.randperm(8, generator=_gen(4))) == 0.0
    assert 0.01 < am.sign_change_share(big, group("orthogonal").random(8, _gen(5))) < 1.0


def test_cycle_residual_is_zero_around_loops_of_a_common_space_and_not_for_pairwise_maps():
    data = _blobs()
    models = [_trained(s, data) for s in range(3)]
    spec = fedmerge.relaxed_spec(models[0].permutation_spec())
    sds = [m.state_dict() for m in models]
    result = fedmerge.match(sds, spec, method="orthogonal")
    t = result.transforms[1]
    assert am.cycle_residual(sds[1], spec, [t, fedmerge.invert_transform(t)]) < 1e-4  # Eq. 2
    loop = [result.pairwise(0, 1), result.pairwise(1, 2), result.pairwise(2, 0)]
    assert am.cycle_residual(sds[0], spec, loop, relative=True) < 1e-5
    pair = {(a, b): fedmerge.match([sds[b], sds[a]], spec, method="orthogonal").transforms[1]
            for a, b in ((0, 1), (1, 2), (2, 0))}
    assert am.cycle_residual(sds[0], spec, [pair[(0, 1)], pair[(1, 2)], pair[(2, 0)]], relative=True) > 1e-2


def test_linear_cka_is_rotation_and_scale_invariant_and_matches_the_hsic_form():
    x = torch.randn(100, 6, generator=_gen(6), dtype=torch.float64)
    q = group("orthogonal").random(6, _gen(7)).double()
    assert am.linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-10)
    y = torch.randn(100, 4, generator=_gen(8), dtype=torch.float64)
    h = torch.eye(100, dtype=torch.float64) - 1.0 / 100
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h  # CKA as normalised HSIC of the centred Gram matrices
    hsic = float((k * l_).sum()) / math.sqrt(float((k * k).sum()) * float((l_ * l_).sum()))
    assert am.linear_cka(x, y) == pytest.approx(hsic, rel=1e-9)
    assert am.linear_cka(x, y) < 0.5
    with pytest.raises(ValueError, match="same number of samples"):
        am.linear_cka(x, y[:50])


def test_evaluate_and_features_agree_with_a_plain_forward_pass():
    data = _blobs()
    model = _trained(0, data)
    other = _trained(1, data)
    r = am.evaluate(model, other.state_dict(), data, batch_size=128)
    with torch.no_grad():
        out = other(data[0])
    assert r["loss"] == pytest.approx(float(F.nll_loss(out.double(), data[1])), rel=1e-4, abs=1e-6)
    assert r["accuracy"] == pytest.approx(float((out.argmax(1) == data[1]).float().mean()))
    assert r["accuracy"] > 0.9
    feats = am.features(model, other.state_dict(), data[0], ["layers.0"], batch_size=100)
    assert torch.allclose(feats["layers.0"], other.layers[0](data[0]).detach(), atol=1e-6)
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        am.features(model, model.state_dict(), data[0], ["nope"])
    with pytest.raises(ValueError, match="pair"):
        am.evaluate(model, model.state_dict(), data[0])


def test_interpolation_curves_and_barriers_show_what_alignment_removes():
    data = _blobs(seed=1)
    a, b = _trained(0, data, widths=(48, 48)), _trained(1, data, widths=(48, 48))
    sa, sb = a.state_dict(), b.state_dict()
    lerp = am.interpolation_curve(a, sa, sb, data, alphas=5)
    assert lerp["alpha"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lerp["loss"][0] == pytest.approx(am.evaluate(a, sa, data)["loss"])
    assert lerp["loss"][-1] == pytest.approx(am.evaluate(a, sb, data)["loss"])
    slerp = am.interpolation_curve(a, sa, sb, data, alphas=5, method="slerp")
    assert slerp["loss"][0] == pytest.approx(lerp["loss"][0]) and slerp["loss"][2] != pytest.approx(lerp["loss"][2])
    naive = am.loss_barrier(a, sa, sb, data, alphas=5)
    excess_by_hand = max(l - ((1 - t) * lerp["loss"][0] + t * lerp["loss"][-1])
                         for t, l in zip(lerp["alpha"], lerp["loss"]))
    assert naive == pytest.approx(excess_by_hand)
    assert am.loss_barrier(a, sa, sb, data, alphas=5, definition="max") == pytest.approx(max(lerp["loss"]))
    with pytest.raises(ValueError, match="unknown method"):
        am.interpolation_curve(a, sa, sb, data, method="cubic")
    with pytest.raises(ValueError, match="definition"):
        am.loss_barrier(a, sa, sb, data, definition="mean")


def test_a_hidden_permutation_has_a_barrier_before_alignment_and_none_after(trained_mlp, mnist_subset):
    model, data = trained_mlp, (mnist_subset[0][:1000], mnist_subset[1][:1000])
    spec = model.permutation_spec()
    sa = model.state_dict()
    copy = fedmerge.apply_transform(sa, spec, fedmerge.random_transform(spec, 3))
    before = am.loss_barrier(model, sa, copy, data, alphas=3)
    result = fedmerge.match([sa, copy], spec, method="orthogonal", relax=True)
    after = am.loss_barrier(model, sa, fedmerge.apply_transform(copy, spec, result.pairwise(1, 0)), data, alphas=3)
    assert before > 0.1 and abs(after) < 1e-5
