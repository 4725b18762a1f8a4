"""average="spherical": SLERP and the weighted Karcher mean on the hypersphere (fedmerge.spherical)."""

from __future__ import annotations

import math

import pytest
import torch

import fedmerge
from fedmerge.models import MLP
from fedmerge.spherical import karcher_mean, nlerp, slerp, spherical_average

torch.set_num_threads(1)


def _points(n, dim=30, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(dim, generator=g, dtype=torch.float64)
    return [base + spread * torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(n)]


def _angle(a, b):
    a, b = a / a.norm(), b / b.norm()
    return float(torch.atan2((a - (a @ b) * b).norm(), a @ b))


def test_slerp_interpolates_the_angle_and_the_norm_linearly():
    a, b = _points(2, seed=1)
    omega = _angle(a, b)
    assert 0.3 < omega < 2.5
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b)
    for t in (0.1, 0.35, 0.5, 0.8):
        s = slerp(a, b, t)
        assert _angle(a, s) == pytest.approx(t * omega, abs=1e-9)
        assert _angle(s, b) == pytest.approx((1 - t) * omega, abs=1e-9)
        assert float(s.norm()) == pytest.approx((1 - t) * float(a.norm()) + t * float(b.norm()), rel=1e-12)
        lerp = (1 - t) * a + t * b  # the straight line: the angle is not interpolated
        assert abs(_angle(a, lerp) - t * omega) > 1e-4 or t == 0.5


def test_karcher_mean_of_two_points_is_slerp_at_the_weight_and_differs_from_nlerp():
    a, b = _points(2, seed=2)
    for w in (0.3, 0.5, 0.9):
        k = karcher_mean([a, b], [1 - w, w])
        assert torch.allclose(k, slerp(a, b, w), atol=1e-6)
    # unequal weights: NLERP (normalised weighted mean) is not on the geodesic at the weight
    assert float((karcher_mean([a, b], [0.7, 0.3]) - nlerp([a, b], [0.7, 0.3])).norm()) > 1e-2
    # equal weights: the two directions are symmetric about NLERP, so they agree
    assert torch.allclose(karcher_mean([a, b]), nlerp([a, b]), atol=1e-9)


def test_karcher_mean_is_the_stationary_point_of_the_weighted_squared_geodesic_distances():
    xs = _points(5, seed=3, spread=1.5)
    w = torch.tensor([0.05, 0.15, 0.2, 0.25, 0.35], dtype=torch.float64)
    k = karcher_mean(xs, w)
    n = nlerp(xs, w)

    def cost(p):
        return sum(float(wi) * _angle(p, x) ** 2 for wi, x in zip(w, xs))

    assert float((k / k.norm() - n / n.norm()).norm()) > 1e-3  # it differs from NLERP here
    assert cost(k) < cost(n) - 1e-6
    g = torch.Generator().manual_seed(9)
    for _ in range(20):  # a local minimum on the sphere: every nearby direction costs more
        p = k / k.norm() + 1e-3 * torch.randn(k.numel(), generator=g, dtype=torch.float64)
        assert cost(p) > cost(k)
    assert float(k.norm()) == pytest.approx(float(w @ torch.stack([x.norm() for x in xs])), rel=1e-12)


def test_karcher_mean_of_identical_points_is_that_point():
    (a,) = _points(1, seed=4)
    for w in ([1, 1, 1], [0.2, 0.5, 0.3]):
        assert torch.allclose(karcher_mean([a, a, a], w), a, atol=1e-12)
    assert torch.allclose(karcher_mean([a, 2 * a], [0.5, 0.5]), 1.5 * a, atol=1e-12)  # same direction, norms mean


def test_karcher_mean_is_order_independent():
    xs = _points(4, seed=5, spread=2.0)
    w = [0.1, 0.2, 0.3, 0.4]
    k = karcher_mean(xs, w)
    for order in ([3, 1, 0, 2], [2, 3, 1, 0], [1, 0, 3, 2]):
        again = karcher_mean([xs[i] for i in order], [w[i] for i in order])
        assert float((again - k).abs().max()) < 1e-6


def test_trust_region_solver_finds_the_same_mean():
    pytest.importorskip("pymanopt")
    xs = _points(4, seed=6, spread=1.5)
    w = [0.4, 0.3, 0.2, 0.1]
    assert torch.allclose(karcher_mean(xs, w, solver="trust-regions", tol=1e-10), karcher_mean(xs, w), atol=1e-7)


def test_spherical_average_of_state_dicts_per_tensor_and_per_model():
    torch.manual_seed(0)
    models = [MLP(input_shape=(8,), widths=(6,)) for _ in range(3)]
    sds = [m.state_dict() for m in models]
    w = [0.5, 0.3, 0.2]
    merged = fedmerge.merge(sds, align=None, average="spherical", weights=w)
    for k in sds[0]:
        assert torch.allclose(merged[k], karcher_mean([sd[k] for sd in sds], w), atol=1e-6)
    # two models: SLERP of every tensor at the second model's weight
    two = spherical_average(sds[:2], [0.75, 0.25])
    for k in sds[0]:
        assert torch.allclose(two[k], slerp(sds[0][k], sds[1][k], 0.25), atol=1e-6)
    # the paper's granularity: one sphere for the flattened model, one norm for all of it
    whole = spherical_average(sds, w, granularity="model")
    flat = karcher_mean([torch.cat([v.reshape(-1) for v in sd.values()]) for sd in sds], w)
    assert torch.allclose(torch.cat([v.reshape(-1) for v in whole.values()]), flat, atol=1e-6)
    assert any(not torch.allclose(whole[k], merged[k], atol=1e-4) for k in merged)
    # the paper's recipe as written: the unit-norm barycenter itself, the same direction
    unit = spherical_average(sds, w, granularity="model", restore_norm=False)
    flat_unit = torch.cat([v.reshape(-1) for v in unit.values()])
    assert float(flat_unit.norm()) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(flat_unit * flat.norm(), flat, atol=1e-5)


def test_spherical_average_keeps_integer_buffers_and_combines_with_alignment():
    from torch import nn
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    spec = fedmerge.spec_from_module(net, example_input=torch.randn(2, 5))
    sd = net.state_dict()
    sd["1.num_batches_tracked"] = torch.tensor(7)
    copies = [fedmerge.apply_transform(sd, spec, fedmerge.random_transform(spec, s)) for s in range(3)]
    merged = fedmerge.merge(copies, spec=spec, align="orthogonal", average="spherical")
    net.eval()
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    out = torch.func.functional_call(net, merged, (x,))
    assert torch.allclose(out, torch.func.functional_call(net, sd, (x,)), atol=1e-5)
    unaligned = fedmerge.merge(copies, align=None, average="spherical")
    assert not torch.allclose(torch.func.functional_call(net, unaligned, (x,)), out, atol=1e-2)
    assert merged["1.num_batches_tracked"].dtype == torch.int64


def test_undefined_spherical_means_are_refused_with_the_entry_named():
    a = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match="antipodal"):
        slerp(a, -a, 0.5)
    three = [torch.tensor([math.cos(t), math.sin(t)]) for t in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    with pytest.raises(ValueError, match="cancel"):
        karcher_mean(three)
    sds = [{"w": x.reshape(1, 2)} for x in three]
    with pytest.raises(ValueError, match="'w'.*cancel"):
        spherical_average(sds)
    with pytest.raises(ValueError, match="unknown granularity"):
        spherical_average(sds, granularity="layer")
    with pytest.raises(ValueError, match="unknown solver"):
        karcher_mean(three, solver="newton")
    with pytest.raises(ValueError, match="outside"):
        slerp(a, a, 1.5)
    with pytest.raises(ValueError, match="shape"):
        karcher_mean([a, torch.ones(3)])
    # a one-entry tensor or a zero tensor has no direction: the linear mean
    assert torch.allclose(karcher_mean([torch.tensor([2.0]), torch.tensor([-1.0])]), torch.tensor([0.5]))
    assert torch.allclose(karcher_mean([torch.zeros(2), torch.tensor([2.0, 2.0])]), torch.tensor([1.0, 1.0]))


def test_projection_norm_is_the_models_mean_length_along_the_barycenter_and_shrinks_with_spread():
    xs = _points(5, dim=40, seed=11, spread=2.0)
    w = [0.1, 0.15, 0.2, 0.25, 0.3]
    sds = [{"x": x} for x in xs]
    restored = spherical_average(sds, w)["x"]
    projected = spherical_average(sds, w, restore_norm="projection")["x"]
    p = restored / restored.norm()
    assert torch.allclose(projected / projected.norm(), p, atol=1e-12)  # the same direction
    along = sum(wi * float(x @ p) for wi, x in zip(w, xs))
    assert float(projected.norm()) == pytest.approx(along, rel=1e-10)
    # spread directions: shorter than the mean of the norms (Cauchy-Schwarz), near the linear mean's norm
    mean_norm = sum(wi * float(x.norm()) for wi, x in zip(w, xs))
    linear = sum(wi * x for wi, x in zip(w, xs))
    assert float(projected.norm()) < 0.9 * mean_norm
    assert float(projected.norm()) == pytest.approx(float(linear.norm()), rel=0.05)
    # two models of one norm, equal weights: the bisector at the linear mean's length, i.e. the linear mean
    a, b = _points(2, seed=12)
    b = b / b.norm() * a.norm()
    two = spherical_average([{"x": a}, {"x": b}], restore_norm="projection")["x"]
    assert torch.allclose(two, (a + b) / 2, atol=1e-10)
    # identical directions: nothing to shrink
    same = spherical_average([{"x": a}, {"x": 3 * a}], [0.5, 0.5], restore_norm="projection")["x"]
    assert torch.allclose(same, 2 * a, atol=1e-10)


def test_spherical_projection_averager_by_name():
    torch.manual_seed(2)
    sds = [MLP(input_shape=(8,), widths=(6,)).state_dict() for _ in range(3)]
    merged = fedmerge.merge(sds, align=None, average="spherical-projection", weights=[0.2, 0.3, 0.5])
    direct = spherical_average(sds, [0.2, 0.3, 0.5], restore_norm="projection")
    assert all(torch.equal(merged[k], direct[k]) for k in direct)
    with pytest.raises(ValueError, match="restore_norm='unit'"):
        spherical_average(sds, restore_norm="unit")
    with pytest.raises(TypeError, match="fixes restore_norm"):
        fedmerge.merge(sds, align=None, average="spherical-projection", average_options={"restore_norm": True})
