"""REPAIR and RESET (fedmerge.repair): statistics, targets, folding, pooling, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fedmerge
from fedmerge.models import MLP, SmallCNN, resnet20, vgg11
from fedmerge.repair import (UnitStatistics, find_repair_points, map_statistics, repair, repair_targets,
                             reset_batchnorm, unit_statistics)


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def _mlps(n: int, seed: int = 0):
    out = []
    for i in range(n):
        torch.manual_seed(seed + i)
        out.append(MLP(input_shape=(1, 8, 8), widths=(32, 24, 16)))
    return out


@pytest.fixture(scope="module")
def calib():
    return torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_repair_points_of_the_zoo():
    assert [p.name for p in find_repair_points(MLP(widths=(8, 8)))] == ["layers.0", "layers.1"]
    assert [p.name for p in find_repair_points(MLP(widths=(8, 8)), modules="all")] == ["layers.0", "layers.1", "head"]
    cnn = SmallCNN(input_shape=(1, 8, 8), channels=(4, 6), hidden=5)
    points = find_repair_points(cnn)
    assert [(p.name, p.channel_dim) for p in points] == [("convs.0", 1), ("convs.1", 1), ("fc1", -1)]
    # a conv that feeds a norm is repaired at the norm's output (its pre-activation)
    bn = vgg11(input_shape=(3, 32, 32), norm="batchnorm", width=0.125, hidden=16)
    assert all(isinstance(dict(bn.named_modules())[p.name], nn.BatchNorm2d) for p in find_repair_points(bn)[:8])
    res = resnet20(width=1, norm="layernorm")
    names = [p.name for p in find_repair_points(res)]
    assert "norm1" in names and "stage2.0.shortcut.1" in names and "stage1.0.conv1" not in names
    assert "fc" not in names and len(names) == 1 + 9 * 2 + 2


def test_repair_points_reject_modules_that_cannot_take_a_fold():
    m = MLP(widths=(8, 8))
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        find_repair_points(m, modules=["nope"])
    with pytest.raises(ValueError, match="cannot be repaired"):
        find_repair_points(m, modules=["flatten"])
    with pytest.raises(ValueError, match="empty list"):
        find_repair_points(m, modules=[])
    with pytest.raises(ValueError, match="'hidden', 'all'"):
        find_repair_points(m, modules="every")


def test_after_repair_the_merged_statistics_equal_the_targets(calib):
    models = _mlps(3)
    template = models[0]
    sds = [m.state_dict() for m in models]
    merged = fedmerge.merge(sds, align=None)
    points = find_repair_points(template)
    targets = repair_targets([unit_statistics(template, sd, calib, points) for sd in sds])
    before = unit_statistics(template, merged, calib, points)
    assert (before["layers.1"].std - targets["layers.1"][1]).abs().max() > 1e-2  # averaging shrank them
    repaired = repair(merged, sds, model=template, inputs=calib)
    after = unit_statistics(template, repaired, calib, points)
    for name, (mean, std) in targets.items():
        torch.testing.assert_close(after[name].mean, mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(after[name].std, std, atol=1e-5, rtol=1e-5)


def test_single_pass_on_one_batch_equals_the_sequential_schedule(calib):
    sds = [m.state_dict() for m in _mlps(3, seed=5)]
    template = MLP(input_shape=(1, 8, 8), widths=(32, 24, 16))
    merged = fedmerge.merge(sds, align=None)
    seq = repair(merged, sds, model=template, inputs=calib)
    one = repair(merged, sds, model=template, inputs=[calib], passes="single")
    many = repair(merged, sds, model=template, inputs=calib.split(50), passes="single")
    for k in seq:
        torch.testing.assert_close(one[k], seq[k], atol=1e-5, rtol=1e-5)
    assert max((many[k] - seq[k]).abs().max().item() for k in seq) > 1e-6  # batch statistics differ


def test_repair_of_identical_models_leaves_the_function_unchanged(calib):
    model = _mlps(1, seed=3)[0]
    sd = model.state_dict()
    for align in (None, "c2m3"):
        merged = fedmerge.merge([sd, sd, sd], align=align, model=model, repair=calib)
        out = torch.func.functional_call(model, merged, (calib,))
        torch.testing.assert_close(out, model(calib), atol=1e-5, rtol=0)


def test_repair_of_permuted_copies_of_a_bn_resnet_leaves_the_function_unchanged():
    torch.manual_seed(0)
    model = _randomise_bn(resnet20(input_shape=(3, 16, 16), width=0.5, norm="batchnorm"), 0).eval()
    spec = model.permutation_spec()
    sd = model.state_dict()
    g = torch.Generator().manual_seed(2)
    copies = [sd] + [fedmerge.apply_transform(sd, spec, fedmerge.random_transform(spec, generator=g))
                     for _ in range(2)]
    x = torch.randn(64, 3, 16, 16, generator=g)
    merged = fedmerge.merge(copies, align="git-rebasin", model=model, repair=x)
    torch.testing.assert_close(torch.func.functional_call(model, merged, (x,)), model(x), atol=1e-4, rtol=1e-4)


def test_repair_corrects_batchnorm_outputs_in_eval_mode():
    models = [_randomise_bn(resnet20(input_shape=(3, 8, 8), width=0.5, norm="batchnorm"), s) for s in range(2)]
    template = models[0]
    x = torch.randn(128, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sds = [m.state_dict() for m in models]
    merged = fedmerge.merge(sds, align=None)
    repaired = repair(merged, sds, model=template, inputs=x, target="variance")
    points = find_repair_points(template)
    targets = repair_targets([unit_statistics(template, sd, x, points) for sd in sds], target="variance")
    after = unit_statistics(template, repaired, x, points)
    for p in points:
        torch.testing.assert_close(after[p.name].std, targets[p.name][1], atol=1e-4, rtol=1e-4)


def test_target_rules():
    a = UnitStatistics(4.0, torch.tensor([4.0, 0.0], dtype=torch.float64), torch.tensor([8.0, 4.0], dtype=torch.float64))
    b = UnitStatistics(4.0, torch.tensor([12.0, 0.0], dtype=torch.float64), torch.tensor([40.0, 16.0], dtype=torch.float64))
    # a: mean (1, 0), var (1, 1); b: mean (3, 0), var (1, 4)
    std = repair_targets([{"p": a}, {"p": b}], target="std")["p"]
    torch.testing.assert_close(std[0], torch.tensor([2.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(std[1], torch.tensor([1.0, 1.5], dtype=torch.float64))
    var = repair_targets([{"p": a}, {"p": b}], target="variance")["p"][1]
    torch.testing.assert_close(var, torch.tensor([1.0, 2.5], dtype=torch.float64).sqrt())
    pooled = repair_targets([{"p": a}, {"p": b}], target="pooled")["p"]
    both = a + b  # the union of the two sets of values
    torch.testing.assert_close(pooled[1], both.std)
    torch.testing.assert_close(pooled[1], torch.tensor([2.0, 2.5], dtype=torch.float64).sqrt())
    weighted = repair_targets([{"p": a}, {"p": b}], [3, 1], target="std")["p"]
    torch.testing.assert_close(weighted[0], torch.tensor([1.5, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown target 'median'"):
        repair_targets([{"p": a}], target="median")
    with pytest.raises(ValueError, match="endpoint 1 has statistics"):
        repair_targets([{"p": a}, {"q": b}])


def test_pooled_client_statistics_mapped_into_the_common_space_equal_the_central_ones():
    """Clients hold permuted copies and disjoint data; mapped with their transforms and pooled,
    their sums equal the statistics of the original model on the union of their data."""
    model = _mlps(1, seed=7)[0].double()  # float64 forward: the sums agree to rounding
    spec = model.permutation_spec()
    points = find_repair_points(model)
    g = torch.Generator().manual_seed(3)
    data = torch.randn(90, 1, 8, 8, generator=g, dtype=torch.float64)
    parts = data.split([20, 30, 40])
    pooled = None
    for part in parts:
        hidden = fedmerge.random_transform(spec, generator=g)
        client = fedmerge.apply_transform(model.state_dict(), spec, hidden)  # the client's own unit order
        stats = unit_statistics(model, client, part, points)
        back = fedmerge.invert_transform(hidden)  # the alignment that maps the client to the original order
        mapped = map_statistics(stats, points, spec, back)
        pooled = mapped if pooled is None else {k: pooled[k] + mapped[k] for k in pooled}
    central = unit_statistics(model, model.state_dict(), data, points)
    for name in central:
        assert pooled[name].count == central[name].count == 90
        torch.testing.assert_close(pooled[name].sum, central[name].sum, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(pooled[name].sum_sq, central[name].sum_sq, atol=1e-8, rtol=1e-8)


def test_statistics_do_not_map_through_a_rotation_that_mixes_units():
    model = _mlps(1)[0]
    spec = model.permutation_spec().with_kinds({"layers.0": "orthogonal"})
    points = find_repair_points(model, spec)
    stats = unit_statistics(model, model.state_dict(), torch.randn(10, 1, 8, 8), points)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="rotation that mixes units"):
        map_statistics(stats, points, spec, {"layers.0": q})
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    as_matrix = torch.eye(32)[:, perm]  # act(t, 0, Q) = Qᵀt picks unit perm[i]
    by_matrix = map_statistics(stats, points, spec, {"layers.0": as_matrix})["layers.0"]
    torch.testing.assert_close(by_matrix.sum, stats["layers.0"].sum[perm])


def test_reset_equals_a_fresh_statistics_pass_in_torch():
    model = _randomise_bn(vgg11(input_shape=(3, 16, 16), norm="batchnorm", width=0.125, hidden=16), 4)
    x = torch.randn(96, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before = copy.deepcopy(model.state_dict())
    was_training = model.training
    out = reset_batchnorm(model, model.state_dict(), DataLoader(TensorDataset(x, torch.zeros(96)), batch_size=32))

    fresh = copy.deepcopy(model)
    for m in fresh.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    fresh.train()
    with torch.no_grad():
        for batch in x.split(32):
            fresh(batch)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(out[k], v, atol=1e-6, rtol=1e-6)
    assert any(not torch.allclose(out[k], before[k]) for k in before if "running" in k)
    # the template is untouched: weights, buffers, momentum, mode
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.training == was_training
    with pytest.raises(ValueError, match="no BatchNorm"):
        reset_batchnorm(MLP(widths=(4,)), MLP(widths=(4,)).state_dict(), torch.randn(4, 1, 28, 28))


def test_merge_takes_reset_and_repair_by_name_and_a_dataloader(calib):
    sds = [m.state_dict() for m in _mlps(2)]
    template = MLP(input_shape=(1, 8, 8), widths=(32, 24, 16))
    by_tensor = fedmerge.merge(sds, align=None, model=template, repair=calib)
    loader = DataLoader(TensorDataset(calib, torch.zeros(len(calib))), batch_size=500)
    by_loader = fedmerge.merge(sds, align=None, model=template, repair="repair", repair_options={"inputs": loader})
    for k in by_tensor:
        torch.testing.assert_close(by_loader[k], by_tensor[k])
    merged, result = fedmerge.merge(sds, align=None, model=template, repair=calib, full_output=True)
    assert result.repair == "repair" and "repair" in result.stage_seconds
    bn = [_randomise_bn(vgg11(input_shape=(3, 8, 8), norm="batchnorm", width=0.125, hidden=8), s).state_dict()
          for s in range(2)]
    tbn = vgg11(input_shape=(3, 8, 8), norm="batchnorm", width=0.125, hidden=8)
    x = torch.randn(40, 3, 8, 8)
    reset_merge = fedmerge.merge(bn, align=None, model=tbn, repair="reset", repair_options={"inputs": x})
    torch.testing.assert_close(reset_merge, reset_batchnorm(tbn, fedmerge.merge(bn, align=None), x))


def test_repair_errors_are_clear(calib):
    sds = [m.state_dict() for m in _mlps(2)]
    template = MLP(input_shape=(1, 8, 8), widths=(32, 24, 16))
    merged = fedmerge.merge(sds, align=None)
    with pytest.raises(ValueError, match="needs model="):
        fedmerge.merge(sds, align=None, repair=calib)
    with pytest.raises(ValueError, match="calibration inputs"):
        fedmerge.merge(sds, align=None, model=template, repair="repair")
    with pytest.raises(TypeError, match="given twice"):
        fedmerge.merge(sds, align=None, model=template, repair=calib, repair_options={"inputs": calib})
    with pytest.raises(ValueError, match="non-empty batch"):
        repair(merged, sds, model=template, inputs=calib[:0])
    with pytest.raises(TypeError, match="calibration batch 1 is a str"):
        repair(merged, sds, model=template, inputs=[calib, "x"])
    with pytest.raises(ValueError, match="unknown passes 'two'"):
        repair(merged, sds, model=template, inputs=calib, passes="two")
    with pytest.raises(ValueError, match="unknown target"):
        repair(merged, sds, model=template, inputs=calib, target="mean")
    with pytest.raises(ValueError, match=r"layers.2.weight has shape \(16, 24\), the model's \(15, 24\)"):
        repair(merged, sds, model=MLP(input_shape=(1, 8, 8), widths=(32, 24, 15)), inputs=calib)
