"""RegMean (fedmerge.regmean): the least-squares property, Gram matrices through alignments, merges, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fedmerge
from fedmerge.models import MLP, SmallCNN, resnet20
from fedmerge.regmean import InputGram, input_grams, map_grams, regmean_average, regmean_layers


def _cnn(seed: int) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(input_shape=(1, 8, 8), channels=(6, 8), hidden=12)


@pytest.fixture(scope="module")
def images():
    return torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def _out(model, sd, x):
    return torch.func.functional_call(model, sd, (x,))


def test_layers_are_linear_and_conv_in_module_order():
    assert regmean_layers(_cnn(0)) == ["convs.0", "convs.1", "fc1", "fc2"]
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    assert regmean_layers(grouped) == ["2"]  # a grouped convolution is averaged, not fitted


def test_linear_layer_is_the_weighted_least_squares_fit():
    """alpha=1, ridge=0: the merged layer solves the stacked weighted regression on both models' inputs."""
    g = torch.Generator().manual_seed(0)
    template = nn.Sequential(nn.Linear(5, 3))
    sds = [{"0.weight": torch.randn(3, 5, generator=g), "0.bias": torch.randn(3, generator=g)} for _ in range(2)]
    xs = [torch.randn(40, 5, generator=g) * torch.tensor([1, 2, 3, 0.5, 1.5]), torch.randn(60, 5, generator=g) + 1]
    weights = [0.3, 0.7]
    merged = regmean_average(sds, weights, model=template, model_inputs=xs, alpha=1.0, ridge=0.0)
    rows, targets = [], []
    for sd, x, w in zip(sds, xs, weights):
        scale = (w / x.shape[0]) ** 0.5  # E over each model's inputs, weighted by w
        rows.append(scale * torch.cat([x, torch.ones(len(x), 1)], 1).double())
        targets.append(scale * (x @ sd["0.weight"].T + sd["0.bias"]).double())
    solution = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T
    torch.testing.assert_close(merged["0.weight"].double(), solution[:, :-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged["0.bias"].double(), solution[:, -1], atol=1e-5, rtol=1e-5)
    mean = fedmerge.merge(sds, align=None, weights=weights)
    assert not torch.allclose(merged["0.weight"], mean["0.weight"], atol=1e-3)  # it is not the plain mean


def test_conv_layer_minimises_the_output_error():
    """The gradient of Σ w_i E||conv(x_i; W) - conv_i(x_i)||² vanishes at RegMean's convolution (alpha=1)."""
    g = torch.Generator().manual_seed(1)
    template = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, stride=2)).double()
    sds = [{"0.weight": torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64),
            "0.bias": torch.randn(4, generator=g, dtype=torch.float64)} for _ in range(3)]  # float64: no rounding
    xs = [torch.randn(30, 3, 9, 9, generator=g, dtype=torch.float64) * (i + 1) for i in range(3)]
    merged = regmean_average(sds, model=template, model_inputs=xs, alpha=1.0, ridge=0.0)
    w = merged["0.weight"].double().requires_grad_(True)
    b = merged["0.bias"].double().requires_grad_(True)
    loss = 0
    for sd, x in zip(sds, xs):
        x = x.double()
        target = nn.functional.conv2d(x, sd["0.weight"].double(), sd["0.bias"].double(), stride=2, padding=1)
        loss = loss + ((nn.functional.conv2d(x, w, b, stride=2, padding=1) - target) ** 2).mean() / 3
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-8 and float(b.grad.abs().max()) < 1e-8
    mean = fedmerge.merge(sds, align=None)
    assert not torch.allclose(merged["0.weight"], mean["0.weight"], atol=1e-3)


@pytest.mark.parametrize("build", [_cnn, lambda s: (torch.manual_seed(s), MLP(input_shape=(1, 8, 8), widths=(16, 12)))[1]])
def test_mapped_grams_equal_the_grams_of_the_aligned_model(build, images):
    """What a federated server computes (a client's Grams, mapped) equals the Grams of the aligned model."""
    model = build(0)
    spec = model.permutation_spec()
    sd = model.state_dict()
    transform = fedmerge.random_transform(spec, 5)
    aligned = fedmerge.apply_transform(sd, spec, transform)
    mapped = map_grams(input_grams(model, sd, images), spec, transform)
    direct = input_grams(model, aligned, images)
    assert set(mapped) == set(direct) == set(regmean_layers(model))
    for name in direct:
        torch.testing.assert_close(mapped[name].xx, direct[name].xx, rtol=1e-5, atol=1e-5)  # float32 forward passes
        torch.testing.assert_close(mapped[name].x, direct[name].x, rtol=1e-5, atol=1e-5)  # float32 forward passes
    changed = [n for n in direct if not torch.allclose(direct[n].xx, input_grams(model, sd, images)[n].xx)]
    assert changed  # the permutation did move the Grams of the hidden layers' inputs


def test_pooled_grams_equal_the_grams_of_the_union(images):
    model = _cnn(0)
    sd = model.state_dict()
    a, b = input_grams(model, sd, images[:70]), input_grams(model, sd, images[70:])
    union = input_grams(model, sd, images)
    for name in union:
        pooled = a[name] + b[name]
        assert pooled.count == union[name].count
        torch.testing.assert_close(pooled.xx, union[name].xx, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_merge_of_identical_models_returns_that_model(n, images):
    model = _cnn(0)
    sd = model.state_dict()
    merged = fedmerge.merge([sd] * n, align=None, average="regmean", model=model,
                            average_options={"inputs": images})
    for k in sd:
        torch.testing.assert_close(merged[k], sd[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [2, 4])
def test_regmean_of_permuted_copies_computes_the_same_function(n, images):
    """Aligned (Git Re-Basin undoes the hidden permutations), RegMean returns the model's function."""
    model = _cnn(1)
    spec = model.permutation_spec()
    sd = model.state_dict()
    copies = [sd] + [fedmerge.apply_transform(sd, spec, fedmerge.random_transform(spec, 10 + i)) for i in range(n - 1)]
    merged = fedmerge.merge(copies, align="git-rebasin", model=model, average="regmean",
                            average_options={"model_inputs": [images[:100]] * n})
    torch.testing.assert_close(_out(model, merged, images), _out(model, sd, images), atol=1e-5, rtol=1e-5)


def test_batchnorm_resnet_regmean_keeps_the_function_of_identical_models(images):
    torch.manual_seed(0)
    model = resnet20(input_shape=(1, 8, 8), width=0.25, norm="batchnorm").eval()
    sd = model.state_dict()
    merged = regmean_average([sd, sd, sd], model=model, inputs=images[:50])
    torch.testing.assert_close(_out(model.eval(), merged, images[:50]), _out(model, sd, images[:50]), atol=1e-5,
                               rtol=1e-5)


def test_bad_input_is_refused(images):
    model = _cnn(0)
    sd = model.state_dict()
    with pytest.raises(ValueError, match="exactly one of inputs"):
        regmean_average([sd, sd], model=model)
    with pytest.raises(ValueError, match="exactly one of inputs"):
        regmean_average([sd, sd], model=model, inputs=images, grams=[{}, {}])
    with pytest.raises(ValueError, match="one calibration set per model"):
        regmean_average([sd, sd], model=model, model_inputs=[images])
    with pytest.raises(ValueError, match="alpha must be in"):
        regmean_average([sd, sd], model=model, inputs=images, alpha=1.5)
    with pytest.raises(ValueError, match="needs model="):
        regmean_average([sd, sd], inputs=images)
    grams = input_grams(model, sd, images)
    with pytest.raises(ValueError, match="model 1 has layers"):
        regmean_average([sd, sd], grams=[grams, {k: grams[k] for k in list(grams)[:2]}])
    bad = dict(grams)
    bad["fc2"] = InputGram(1.0, torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="Gram matrix is"):
        regmean_average([sd, sd], grams=[bad, bad])
    with pytest.raises(ValueError, match="not a layer RegMean can fit"):
        input_grams(model, sd, images, layers=["relu"])
    with pytest.raises(ValueError, match="cannot pool"):
        grams["fc1"] + grams["fc2"]
