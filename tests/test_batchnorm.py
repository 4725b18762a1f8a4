"""BatchNorm folding (fedmerge.batchnorm): the same function without BatchNorm, and orthogonal alignment through it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fedmerge
from fedmerge.batchnorm import fold_batchnorm, merge as merge_folded
from fedmerge.models import MLP, ResNet20

torch.set_num_threads(1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randomise_batchnorm(model, seed=0):
    g = _gen(seed)
    for mod in model.modules():  # non-trivial statistics and affine parameters (some negative scales)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.normal_(0, 0.3, generator=g)
            mod.running_var.uniform_(0.3, 2.0, generator=g)
            mod.weight.data.uniform_(-1.5, 1.5, generator=g)
            mod.bias.data.normal_(0, 0.3, generator=g)
    return model


def _bn_resnet():
    torch.manual_seed(0)
    return _randomise_batchnorm(ResNet20(input_shape=(1, 12, 12), num_classes=5, width=0.5, norm="batchnorm"))


def _bn_linear_net():
    """Linear -> BN -> Linear (no activation: orthogonal once folded) -> BN -> ReLU -> Linear."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(),
                        nn.Linear(6, 3))
    net.input_shape = (10,)
    return _randomise_batchnorm(net, 1)


def _out(model, sd, x, train=False):
    model.train(train)
    try:
        return torch.func.functional_call(model, {k: v.clone() for k, v in sd.items()}, (x,))
    finally:
        model.eval()


def test_folded_batchnorm_resnet20_computes_the_same_function_and_unfolds_back():
    model = _bn_resnet()
    folding = fold_batchnorm(model)
    assert len(folding.pairs) == 21  # stem, 2 per block, 2 downsampling shortcuts
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folding.model.modules())
    sd = model.state_dict()
    folded = folding.fold(sd)
    assert set(folded) == set(folding.model.state_dict())
    x = torch.randn(16, 1, 12, 12, generator=_gen(2))
    ref = _out(model, sd, x)
    assert torch.allclose(_out(folding.model, folded, x), ref, atol=1e-5)
    back = folding.unfold(folded)
    assert set(back) == set(sd)
    assert torch.allclose(_out(model, back, x), ref, atol=1e-5)
    # with calibration inputs the running statistics are re-estimated: same eval function, and train mode
    # on those inputs normalises with (the same) batch statistics, so it computes that function too
    reset = folding.unfold(folded, x)
    assert torch.allclose(_out(model, reset, x), ref, atol=1e-5)
    assert torch.allclose(_out(model, reset, x, train=True), ref, atol=1e-4)
    assert not torch.allclose(_out(model, back, x, train=True), ref, atol=1e-2)
    assert all(float(v.min()) > 0 for k, v in reset.items() if k.endswith("running_var"))


def test_the_carried_spec_is_the_spec_traced_from_the_folded_model():
    folding = fold_batchnorm(_bn_resnet())
    assert folding.spec == fedmerge.spec_from_module(folding.model)
    assert fedmerge.spec_for(folding.model) is folding.spec
    assert not any("norm" in k for k in folding.spec.axes)


def test_permuted_batchnorm_copies_merged_orthogonally_through_folding_compute_the_same_function():
    model = _bn_resnet()
    spec = model.permutation_spec()
    sd = model.state_dict()
    copies = [fedmerge.apply_transform(sd, spec, fedmerge.random_transform(spec, 10 + s)) for s in range(3)]
    x = torch.randn(8, 1, 12, 12, generator=_gen(3))
    merged = merge_folded(copies, model=model, align="orthogonal", relax=True)
    assert set(merged) == set(sd)
    assert torch.allclose(_out(model, merged, x), _out(model, sd, x), atol=1e-5)


def test_folding_lets_orthogonal_alignment_rotate_what_was_batchnorm_and_undoes_a_hidden_rotation():
    net = _bn_linear_net()
    sd = net.state_dict()
    # on the BatchNorm model the group between the first two Linears may not rotate
    with pytest.raises(ValueError, match="carries BatchNorm statistics"):
        fedmerge.match([sd, sd], fedmerge.relaxed_spec(fedmerge.spec_for(net)), method="orthogonal")
    folding = fold_batchnorm(net)
    assert folding.spec.kinds == {"0": "orthogonal", "2": "permutation"}  # traced from the folded model
    folded = folding.fold(sd)
    hidden = fedmerge.random_transform(folding.spec, 4)  # a dense rotation of group "0", a permutation of "2"
    rotated = fedmerge.apply_transform(folded, folding.spec, hidden)
    x = torch.randn(32, 10, generator=_gen(4))
    ref = _out(net, sd, x)
    assert torch.allclose(_out(folding.model, rotated, x), ref, atol=1e-5)
    rotated_bn = folding.unfold(rotated)  # a BatchNorm model computing the same function in another basis
    assert torch.allclose(_out(net, rotated_bn, x), ref, atol=1e-5)
    assert float((rotated_bn["0.weight"] - sd["0.weight"]).abs().max()) > 0.1
    merged, result, _ = merge_folded([sd, rotated_bn], model=net, align="orthogonal", full_output=True)
    q = result.transforms[1]["0"]
    assert float((q.double().T @ q.double() - torch.eye(8, dtype=torch.float64)).abs().max()) < 1e-6
    assert float((q.abs() - q.abs().round()).abs().max()) > 0.1  # the map found is a dense rotation
    assert torch.allclose(_out(net, merged, x), ref, atol=1e-4)


def test_merge_through_folding_with_repair_repairs_the_folded_model_and_re_estimates_statistics():
    model = _bn_resnet()
    spec = model.permutation_spec()
    sds = [model.state_dict(), _randomise_batchnorm(_bn_resnet(), 5).state_dict()]
    x = torch.randn(32, 1, 12, 12, generator=_gen(6))
    merged, _, folding = merge_folded(sds, model=model, spec=spec, align="orthogonal", relax=True, repair=x,
                                      full_output=True)
    plain = fedmerge.merge([folding.fold(sd) for sd in sds], model=folding.model, align="orthogonal", relax=True,
                           repair=x)
    assert torch.allclose(_out(model, merged, x), _out(folding.model, plain, x), atol=1e-4)
    # the running statistics are those of the merged model on the calibration inputs, not the identity
    assert float(merged["norm1.running_var"].sub(1).abs().max()) > 1e-3
    assert torch.allclose(_out(model, merged, x, train=True), _out(model, merged, x), atol=1e-3)


def test_data_free_statistics_of_a_merge_are_the_models_own_moved_by_their_maps():
    """Without calibration inputs the merge is unfolded with the models' running statistics, mapped and
    averaged: for permuted copies those are the original's exactly, so train mode computes what it computes."""
    model = _bn_resnet()
    spec = model.permutation_spec()
    sd = model.state_dict()
    hidden = [fedmerge.random_transform(spec, 20 + s) for s in range(2)]
    copies = [sd] + [fedmerge.apply_transform(sd, spec, h) for h in hidden]
    merged, result, folding = merge_folded(copies, model=model, align="orthogonal", relax=True, full_output=True)
    x = torch.randn(16, 1, 12, 12, generator=_gen(7))
    assert torch.allclose(_out(model, merged, x), _out(model, sd, x), atol=1e-5)
    # (to ε: BatchNorm's ε acts on the folded units' scale; the identity statistics are off by O(1) here)
    assert torch.allclose(_out(model, merged, x, train=True), _out(model, sd, x, train=True), atol=1e-2)
    identity = folding.unfold(folding.fold(sd))
    assert not torch.allclose(_out(model, identity, x, train=True), _out(model, sd, x, train=True), atol=0.1)
    # what merged_statistics computes: each copy's statistics (s (μ - b), s² σ²) moved into the common space
    own = folding.statistics(sd)
    mean, var = own["conv1"]
    s = sd["norm1.weight"].double() / (sd["norm1.running_var"].double() + 1e-5).sqrt()
    assert torch.allclose(mean, s * sd["norm1.running_mean"].double()) and torch.allclose(
        var, s * s * sd["norm1.running_var"].double())
    mapped = folding.merged_statistics(copies, result.transforms)
    for prod, (m, v) in own.items():
        assert torch.allclose(mapped[prod][0], m, atol=1e-6) and torch.allclose(mapped[prod][1], v, atol=1e-6)
    unmapped = folding.merged_statistics(copies)  # in the copies' own (permuted) bases: another average
    assert not torch.allclose(unmapped["conv1"][1], own["conv1"][1], atol=1e-3)
    # a rotation moves the means exactly and the variances as for uncorrelated units: (M ∘ M)ᵀ σ²
    net = _bn_linear_net()
    lin = fold_batchnorm(net)
    q = fedmerge.random_transform(lin.spec, 8)
    m = lin.spec.group("0").matrix(q["0"]).double()
    (m0, v0), = [lin.statistics(net.state_dict())["0"]]
    m1, v1 = lin.merged_statistics([net.state_dict()], [q])["0"]
    assert torch.allclose(m1, m.T @ m0) and torch.allclose(v1, (m * m).T @ v0)


def test_unfold_with_statistics_checks_them():
    model = _bn_resnet()
    folding = fold_batchnorm(model)
    folded = folding.fold(model.state_dict())
    stats = folding.statistics(model.state_dict())
    x = torch.randn(4, 1, 12, 12, generator=_gen(8))
    back = folding.unfold(folded, statistics=stats)  # the statistics it was folded with: the model back
    for k, v in model.state_dict().items():
        if k.endswith("running_var") or k.endswith("running_mean"):
            assert not torch.allclose(back[k], v)  # expressed in the folded units, not the original ones
    assert torch.allclose(_out(model, back, x), _out(model, model.state_dict(), x), atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        folding.unfold(folded, x, statistics=stats)
    with pytest.raises(ValueError, match="'nope' is not a folded producer"):
        folding.unfold(folded, statistics={"nope": stats["conv1"]})
    with pytest.raises(ValueError, match="must be a pair"):
        folding.unfold(folded, statistics={"conv1": stats["conv1"][0]})
    with pytest.raises(ValueError, match=r"expected mean and var of shape \(8,\)"):
        folding.unfold(folded, statistics={"conv1": (torch.zeros(3), torch.ones(3))})
    with pytest.raises(ValueError, match="finite and >= 0"):
        folding.unfold(folded, statistics={"conv1": (torch.zeros(8), -torch.ones(8))})
    with pytest.raises(TypeError, match="must be a mapping"):
        folding.unfold(folded, statistics=[stats["conv1"]])
    with pytest.raises(ValueError, match="2 transforms for 1 state_dicts"):
        folding.merged_statistics([model.state_dict()], [{}, {}])
    with pytest.raises(ValueError, match="statistics: the state_dict has no 'norm1.running_mean'"):
        folding.merged_statistics([folded])


def test_bad_input_raises_clear_errors():
    with pytest.raises(TypeError, match="must be an nn.Module"):
        fold_batchnorm({"weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no BatchNorm layer directly after"):
        fold_batchnorm(MLP(input_shape=(4,), widths=(3,)))
    model = _bn_resnet()
    with pytest.raises(ValueError, match="no BatchNorm statistics to reset"):
        merge_folded([model.state_dict()] * 2, model=model, align="orthogonal", repair="reset")
    folding = fold_batchnorm(model)
    with pytest.raises(ValueError, match="fold: the state_dict has no 'norm1.running_mean'"):
        folding.fold(folding.model.state_dict())
    with pytest.raises(ValueError, match="unfold: the state_dict has no 'conv1.bias'"):
        folding.unfold(folding.original.state_dict())
