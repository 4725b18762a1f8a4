"""The model zoo, its hand-written specs, the fx tracer and the spec self-check.

The central property: a random permutation applied by the spec leaves the network's function
unchanged (eval mode, and train mode for BatchNorm nets), and the traced spec is the hand spec.
For groups of other kinds, a random element of the inferred kind (a rotation, a signed
permutation) leaves the function unchanged too, while one of the next more general kind does not.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmerge.models import MLP, MODELS, VGG, ResNet20, SmallCNN, build_model, resnet20, vgg9, vgg11, vgg16
from fedmerge.permutation import apply_permutation, random_permutation
from fedmerge.spec import PermutationSpec
from fedmerge.spec_check import SpecError, check_spec
from fedmerge.transforms import apply_transform, random_transform
from fedmerge.tracing import (TracingError, UnsupportedModuleError, UntraceableModuleError, spec_for,
                              spec_from_module)

ATOL = 1e-5

ZOO = {
    "mlp": lambda: MLP(),
    "mlp-small": lambda: MLP(input_shape=(3, 8, 8), num_classes=5, widths=(16, 8)),
    "cnn-mnist": lambda: SmallCNN(),
    "cnn-cifar": lambda: SmallCNN(input_shape=(3, 32, 32), channels=(8, 16, 12), hidden=32),
    "vgg9": lambda: vgg9(width=0.125, hidden=32),
    "vgg9-mnist": lambda: vgg9(input_shape=(1, 28, 28), width=0.125, hidden=32),
    "vgg11": lambda: vgg11(width=0.125),
    "vgg11-bn": lambda: vgg11(width=0.125, norm="batchnorm"),
    "vgg11-ln": lambda: vgg11(width=0.125, norm="layernorm"),
    "vgg16": lambda: vgg16(width=0.125),
    "vgg16-bn": lambda: vgg16(width=0.125, norm="batchnorm"),
    "vgg16-ln": lambda: vgg16(width=0.125, norm="layernorm"),
    "vgg11-bn-mnist": lambda: VGG(11, input_shape=(1, 28, 28), norm="batchnorm", width=0.125, hidden=64),
    "resnet20-ln-w1": lambda: resnet20(width=1, norm="layernorm"),
    "resnet20-bn-w1": lambda: resnet20(width=1, norm="batchnorm"),
    "resnet20-ln-w2": lambda: resnet20(width=2, norm="layernorm"),
    "resnet20-bn-w2": lambda: resnet20(width=2, norm="batchnorm"),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small convs on a shared 2-core machine run ~100x slower with 2 intra-op threads than with 1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def prepare(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer non-trivial affine parameters, BN layers non-trivial running stats and
    zero-initialised biases (VGG's He init) small random values, as training would.

    Default norm init (weight 1, bias 0, mean 0, var 1) and zero biases are invariant under
    permutation, so a spec that forgot those entries would pass; this makes them matter.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None and not m.bias.any():
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        if has_bn(model):
            bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
            for m in bns:
                m.momentum = 1.0  # running stats = the last batch's, so eval mode stays well scaled
            model.train()
            for _ in range(2):
                model(torch.randn((8, *model.input_shape), generator=g))
            for m in bns:
                m.momentum = 0.1
    model.eval()
    return model


def outputs(model: nn.Module, state: dict, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The model's outputs in float64, so that a permuted copy must agree to atol 1e-5 whatever the
    output scale (in float32, summing in another order differs by ~1e-5 on VGG-16's outputs)."""
    probe = copy.deepcopy(model)
    probe.load_state_dict(state)
    probe.double().train(mode == "train")
    with torch.no_grad():
        return probe(x.double())


def example(model: nn.Module, seed: int = 1) -> torch.Tensor:
    return torch.randn((4, *model.input_shape), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=list(ZOO), scope="module")
def zoo_model(request):
    torch.manual_seed(0)
    return request.param, prepare(ZOO[request.param]())


# ----------------------------------------------------------------------------- zoo


def test_registry_builds_every_model():
    assert {"mlp", "cnn", "vgg11", "vgg11-bn", "vgg16", "vgg16-bn", "resnet20", "resnet20-bn"} <= set(MODELS)
    for name in MODELS:
        kwargs = {"width": 0.125} if name.startswith("vgg") else {}
        model = build_model(name, input_shape=(1, 28, 28), num_classes=7, **kwargs)
        out = model(torch.randn(2, 1, 28, 28))
        assert out.shape == (2, 7)
        assert model.input_shape == (1, 28, 28)
    assert isinstance(build_model("resnet20", input_shape=(3, 32, 32), num_classes=10).norm1, nn.GroupNorm)
    assert isinstance(build_model("resnet20-bn", input_shape=(3, 32, 32), num_classes=10).norm1, nn.BatchNorm2d)


def test_unknown_model_name_lists_known_names():
    with pytest.raises(ValueError, match="resnet20-bn"):
        build_model("resnet50", input_shape=(3, 32, 32), num_classes=10)


def test_mlp_is_the_paper_architecture():
    model = MLP()
    shapes = [tuple(p.shape) for p in model.parameters() if p.dim() == 2]
    assert shapes == [(256, 784), (512, 256), (512, 512), (256, 512), (10, 256)]
    out = model(torch.randn(3, 1, 28, 28))
    assert torch.allclose(out.exp().sum(-1), torch.ones(3), atol=1e-5)  # log-probabilities


def test_vgg_and_resnet_shapes():
    assert sum(isinstance(m, nn.Conv2d) for m in vgg9().modules()) == 6  # FedMA's VGG-9: 6 convs + 3 fc
    assert [m.in_features for m in vgg9().classifier if isinstance(m, nn.Linear)] == [4096, 512, 512]
    assert sum(isinstance(m, nn.Conv2d) for m in vgg11().modules()) == 8
    assert sum(isinstance(m, nn.Conv2d) for m in vgg16().modules()) == 13
    assert [m.out_features for m in vgg16().classifier if isinstance(m, nn.Linear)] == [512, 512, 10]
    r = ResNet20(width=2)
    convs = [m for m in r.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 18 + 2  # stem, 9 blocks x 2, two downsampling shortcuts
    assert r.fc.in_features == 128
    assert isinstance(r.stage1[0].shortcut, nn.Identity) and isinstance(r.stage2[0].shortcut, nn.Sequential)


def test_hand_specs_name_groups_readably():
    assert set(MLP().permutation_spec().sizes) == {"layers.0", "layers.1", "layers.2", "layers.3"}
    spec = ResNet20(norm="batchnorm").permutation_spec()
    assert spec.sizes["stage1.residual"] == 16 and spec.sizes["stage3.residual"] == 64
    assert spec.sizes["stage2.block0.inner"] == 32
    places = set(spec.groups["stage2.residual"])
    # one residual stream: the downsampling shortcut and every block's conv2 write it
    assert {("stage2.0.shortcut.0.weight", 0), ("stage2.0.conv2.weight", 0), ("stage2.1.conv2.weight", 0),
            ("stage2.2.conv2.weight", 0), ("stage2.2.norm2.running_var", 0), ("stage3.0.conv1.weight", 1),
            ("stage3.0.shortcut.0.weight", 1)} <= places
    assert ("stage1.0.conv1.weight", 1) in spec.groups["stage1.residual"]
    assert ("conv1.weight", 0) in spec.groups["stage1.residual"]
    assert spec.axes["stage1.0.norm1.num_batches_tracked"] == ()
    cnn = SmallCNN()
    assert cnn.permutation_spec().axes["fc1.weight"] == ("fc1", "convs.1")
    assert cnn.fc1.in_features == 64 * 7 * 7


def test_permutation_preserves_function(zoo_model):
    name, model = zoo_model
    spec = model.permutation_spec()
    state = model.state_dict()
    spec.check_state_dict(state)
    perm = random_permutation(spec, 1)
    permuted = apply_permutation(state, spec, perm)
    changed = [k for k in spec.permuted_keys if not torch.equal(state[k], permuted[k])]
    assert changed == spec.permuted_keys  # every permuted entry (BN buffers too) really moved
    x = example(model)
    for mode in (("eval", "train") if has_bn(model) else ("eval",)):
        ref = outputs(model, state, x, mode)
        out = outputs(model, permuted, x, mode)
        assert ref.abs().max() > 1e-3
        assert (ref - out).abs().max() <= ATOL, f"{name} in {mode} mode"


def test_bn_buffers_matter_in_eval_mode():
    model = prepare(vgg11(width=0.125, norm="batchnorm"))
    spec = model.permutation_spec()
    perm = random_permutation(spec, 1)
    state = model.state_dict()
    wrong = PermutationSpec({k: (() if k.endswith("num_batches_tracked") else
                                 tuple(None for _ in ax) if "running" in k else ax)
                             for k, ax in spec.axes.items()}, spec.sizes)
    x = example(model)
    ref = outputs(model, state, x, "eval")
    assert (ref - outputs(model, apply_permutation(state, wrong, perm), x, "eval")).abs().max() > 1e-3
    # ... while train mode, which ignores the running statistics, does not notice
    ref = outputs(model, state, x, "train")
    assert (ref - outputs(model, apply_permutation(state, wrong, perm), x, "train")).abs().max() <= ATOL


def test_traced_spec_equals_hand_spec(zoo_model):
    name, model = zoo_model
    hand, traced = model.permutation_spec(), spec_from_module(model)
    assert traced == hand, f"{name}: {hand.difference(traced)}"


def test_tracing_does_not_need_an_example_input():
    for model in (MLP(), SmallCNN(), ResNet20(norm="batchnorm"), vgg11(width=0.125, norm="layernorm")):
        del model.input_shape
        assert spec_from_module(model) == model.permutation_spec()


def test_tracing_leaves_the_model_untouched():
    model = prepare(resnet20(norm="batchnorm"))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec_from_module(model)
    assert model.training and model.stage1[0].norm1.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_check_spec_passes(zoo_model):
    _, model = zoo_model
    check_spec(model)
    check_spec(model, spec_from_module(model))


def test_spec_for_prefers_the_hand_spec():
    model = ResNet20()
    assert spec_for(model).sizes.keys() == model.permutation_spec().sizes.keys()
    assert "stage1.residual" in spec_for(model).sizes


# ----------------------------------------------------------------------------- broken specs


def broken(spec: PermutationSpec, key: str, axes: tuple) -> PermutationSpec:
    table = dict(spec.axes)
    table[key] = axes
    used = {g for ax in table.values() for g in ax if g is not None}
    sizes = {g: d for g, d in spec.sizes.items() if g in used}
    return PermutationSpec(table, sizes)


def test_missing_bias_group_is_named():
    model = prepare(MLP())
    spec = broken(model.permutation_spec(), "layers.2.bias", (None,))
    with pytest.raises(SpecError, match=r"'layers\.2\.bias': axis 0 should be permuted by group 'layers\.2'") as e:
        check_spec(model, spec)
    assert e.value.key == "layers.2.bias" and e.value.axis == 0 and e.value.diff > ATOL


def test_unpermuted_running_var_is_named():
    model = prepare(vgg11(width=0.125, norm="batchnorm"))
    spec = broken(model.permutation_spec(), "features.1.running_var", (None,))
    with pytest.raises(SpecError, match=r"'features\.1\.running_var'.*eval mode") as e:
        check_spec(model, spec)
    assert (e.value.key, e.value.group) == ("features.1.running_var", "features.0")


def test_fresh_model_with_constant_entries_is_checked_too():
    # a fresh ResNet has zero running means, unit running variances and unit norm scales: permuting
    # them changes nothing, so the check must not rely on their values to catch a wrong spec
    model = resnet20(norm="batchnorm")
    spec = broken(model.permutation_spec(), "norm1.running_var", (None,))
    with pytest.raises(SpecError, match=r"'norm1\.running_var'"):
        check_spec(model, spec)
    spec = broken(model.permutation_spec(), "stage1.0.norm1.weight", (None,))
    with pytest.raises(SpecError, match=r"'stage1\.0\.norm1\.weight'"):
        check_spec(model, spec)


def test_unpermuted_shortcut_running_mean_is_named():
    model = prepare(resnet20(norm="batchnorm"))
    spec = broken(model.permutation_spec(), "stage2.0.shortcut.1.running_mean", (None,))
    with pytest.raises(SpecError, match=r"'stage2\.0\.shortcut\.1\.running_mean'") as e:
        check_spec(model, spec)
    assert e.value.group == "stage2.residual"


def test_wrongly_permuted_entry_is_named():
    model = prepare(SmallCNN(input_shape=(3, 32, 32), channels=(8, 16, 12), hidden=32))
    spec = broken(model.permutation_spec(), "fc1.bias", ("convs.0",))  # 32 entries: fits blocks of 8
    with pytest.raises(SpecError, match=r"'fc1\.bias': axis 0 should not be permuted by group 'convs\.0'"):
        check_spec(model, spec)


def test_broken_residual_stream_names_the_group():
    model = prepare(resnet20(norm="layernorm"))
    spec = model.permutation_spec()
    table = dict(spec.axes)
    for key in ("stage1.1.conv2.weight", "stage1.1.norm2.weight", "stage1.1.norm2.bias"):
        table[key] = tuple("bogus" if g == "stage1.residual" else g for g in table[key])
    spec = PermutationSpec(table, {**spec.sizes, "bogus": 16})
    with pytest.raises(SpecError, match=r"group 'stage1\.residual'.*no change on a single axis") as e:
        check_spec(model, spec)
    assert e.value.key is None
    assert "stage1.0.conv2.weight[0]" in str(e.value)


def test_spec_that_does_not_fit_the_state_dict():
    model = MLP()
    spec = model.permutation_spec()
    table = {k: v for k, v in spec.axes.items() if k != "head.bias"}
    with pytest.raises(SpecError, match="'head.bias'"):
        check_spec(model, PermutationSpec(table, spec.sizes))


def test_check_spec_needs_an_input():
    model = MLP()
    del model.input_shape
    with pytest.raises(ValueError, match="example_input"):
        check_spec(model)
    check_spec(model, example_input=torch.randn(3, 1, 28, 28))


# ----------------------------------------------------------------------------- user-defined models


class ResidualCNN(nn.Module):
    """Not from the zoo: a residual block and a classifier reading a flattened 4x4 feature map."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(8, 6, 3, padding=1)
        self.conv_b = nn.Conv2d(6, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        h = F.relu(self.bn(self.conv_in(x)))
        h = h + self.conv_b(torch.relu(self.conv_a(h)))
        h = F.max_pool2d(F.max_pool2d(h, 2), 2)  # 16x16 -> 4x4
        h = h.view(h.size(0), -1)
        return self.fc2(F.relu(self.fc1(h)))


def test_user_model_gets_a_working_traced_spec():
    model = prepare_user(ResidualCNN())
    x = torch.randn(4, 3, 16, 16)
    spec = spec_from_module(model, x)
    stream = spec.axes["conv_in.weight"][0]
    assert spec.axes["conv_b.weight"][0] == stream and spec.axes["bn.running_var"] == (stream,)
    assert spec.axes["fc1.weight"][1] == stream and spec.sizes[stream] == 8  # 128 entries, blocks of 16
    assert spec.axes["conv_a.weight"][0] not in (None, stream)
    hand = PermutationSpec({
        "conv_in.weight": ("s", None, None, None), "conv_in.bias": ("s",), "bn.weight": ("s",),
        "bn.bias": ("s",), "bn.running_mean": ("s",), "bn.running_var": ("s",), "bn.num_batches_tracked": (),
        "conv_a.weight": ("a", "s", None, None), "conv_a.bias": ("a",),
        "conv_b.weight": ("s", "a", None, None), "conv_b.bias": ("s",),
        "fc1.weight": ("f", "s"), "fc1.bias": ("f",), "fc2.weight": (None, "f"), "fc2.bias": (None,)},
        {"s": 8, "a": 6, "f": 32})
    assert spec == hand, hand.difference(spec)
    assert spec_from_module(model) == hand  # x.view(x.size(0), -1) is recognised without shapes too
    check_spec(model, spec, x)
    with pytest.raises(SpecError, match=r"'conv_b\.bias'"):
        check_spec(model, broken(spec, "conv_b.bias", (None,)), x)


def prepare_user(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


class ConvNeXtish(nn.Module):
    """Depthwise conv, channels-last LayerNorm + MLP via permute, residual, mean pooling."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.up = nn.Linear(c, 4 * c)
        self.down = nn.Linear(4 * c, c)
        self.head_norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.down(F.gelu(self.up(self.norm(y))))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(self.head_norm(x.mean((-2, -1))))


class ChannelLayerNormCNN(nn.Module):
    """nn.LayerNorm over (C, H, W) and a conv applied twice (shared weights)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.norm = nn.LayerNorm([6, 8, 8])
        self.shared = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x):
        x = torch.tanh(self.norm(self.conv(x)))
        x = self.shared(F.relu(self.shared(x)))
        return self.fc(torch.flatten(x, 1))


def randomize_(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


def test_channels_last_block_with_depthwise_conv():
    model = randomize_(ConvNeXtish())
    x = torch.randn(3, 3, 8, 8)
    spec = spec_from_module(model, x)
    stream = spec.axes["stem.weight"][0]
    assert spec.axes["dw.weight"] == (stream, None, None, None)
    assert spec.axes["norm.weight"] == (stream,) and spec.axes["down.weight"][0] == stream
    assert spec.axes["up.weight"][1] == stream and len(spec.sizes) == 2
    check_spec(model, spec, x)


def test_layernorm_over_chw_and_shared_layer():
    model = randomize_(ChannelLayerNormCNN())
    x = torch.randn(3, 2, 8, 8)
    spec = spec_from_module(model, x)
    g = spec.axes["conv.weight"][0]
    assert spec.axes["norm.weight"] == (g, None, None)
    assert spec.axes["shared.weight"] == (g, g, None, None)  # called on its own output
    check_spec(model, spec, x)


# ----------------------------------------------------------------------------- unsupported models


class GroupedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gconv = nn.Conv2d(4, 8, 3, groups=2)

    def forward(self, x):
        return self.gconv(self.conv(x)).mean((2, 3))


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 16, batch_first=True)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.fc(x))


class LoopRNN(nn.Module):
    """An RNN written as a Python loop over the sequence length."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.rec = nn.Linear(5, 5)

    def forward(self, x):
        h = torch.tanh(self.inp(x[:, 0]))
        for t in range(1, x.size(1)):  # a loop over a traced size
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
        return h


class FunctionalLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return F.linear(x, self.weight)


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = FunctionalLinear()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.relu(self.proj(x)))


class ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1).mean((2, 3))


class GroupNorm2(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.gn = nn.GroupNorm(2, 8)

    def forward(self, x):
        return self.gn(self.conv(x)).mean((2, 3))


def test_grouped_conv_is_refused_by_name():
    with pytest.raises(UnsupportedModuleError, match=r"'gconv' \(torch\.nn\.modules\.conv\.Conv2d\).*groups=2"):
        spec_from_module(GroupedConvNet(), torch.randn(2, 3, 8, 8))


def test_lstm_is_refused_by_name():
    with pytest.raises(UnsupportedModuleError, match=r"'rnn' \(torch\.nn\.modules\.rnn\.LSTM\)") as e:
        spec_from_module(LSTMNet(), torch.randn(2, 5, 8))
    assert "Supported:" in str(e.value) and isinstance(e.value, TracingError) and isinstance(e.value, ValueError)
    with pytest.raises(UnsupportedModuleError, match=r"LSTM"):
        spec_from_module(nn.LSTM(8, 16))


def test_data_dependent_control_flow_is_refused():
    with pytest.raises(UntraceableModuleError, match=r"GatedNet.*torch\.fx") as e:
        spec_from_module(GatedNet())
    assert "'gate'" in str(e.value) and "Gate" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_python_loop_rnn_is_refused():
    with pytest.raises(UntraceableModuleError, match=r"LoopRNN.*Proxy.*traceable by torch\.fx"):
        spec_from_module(LoopRNN(), torch.randn(2, 4, 3))


def test_functional_parameter_use_is_refused():
    with pytest.raises(UnsupportedModuleError, match=r"functional\.linear.*'proj' \(.*FunctionalLinear\)") as e:
        spec_from_module(FunctionalNet(), torch.randn(2, 3))
    assert "parameter 'proj.weight' directly" in str(e.value)


def test_buffers_read_in_forward_stay_unpermuted():
    class Normalised(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.randn(1, 3, 1, 1))
            self.conv = nn.Conv2d(3, 4, 3)
            self.scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
            self.fc = nn.Linear(4, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            h = self.conv(x - self.mean) * self.scale  # a per-channel parameter used by hand
            return self.out(F.relu(self.fc(h.mean((2, 3)))))

    model = Normalised()
    spec = spec_from_module(model, torch.randn(2, 3, 5, 5))
    assert spec.axes["mean"] == (None, None, None, None)
    assert spec.axes["scale"] == (None, None, None) and spec.axes["conv.weight"][0] is None  # kept safe
    # the hidden units after them are still free, so the check below has a group to transform
    assert spec.axes["fc.weight"] == ("fc", None) and list(spec.sizes) == ["fc"]
    check_spec(model, spec, torch.randn(2, 3, 5, 5))
    with pytest.raises(SpecError, match=r"'fc\.bias'"):
        check_spec(model, broken(spec, "fc.bias", (None,)), torch.randn(2, 3, 5, 5))


def test_concat_and_groupnorm_with_two_groups_are_refused():
    with pytest.raises(UnsupportedModuleError, match=r"torch\.cat"):
        spec_from_module(ConcatNet(), torch.randn(2, 3, 4, 4))
    with pytest.raises(UnsupportedModuleError, match=r"'gn'.*num_groups=2"):
        spec_from_module(GroupNorm2(), torch.randn(2, 3, 4, 4))


def test_unsupported_model_cannot_be_checked_without_a_spec():
    with pytest.raises(ValueError, match="rnn"):
        check_spec(LSTMNet(), example_input=torch.randn(2, 5, 8))


def test_residual_with_the_raw_input_keeps_it_unpermuted():
    class InputResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 6)
            self.fc2 = nn.Linear(6, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            return self.out(x + self.fc2(F.relu(self.fc1(x))))

    model = InputResidual()
    spec = spec_from_module(model, torch.randn(2, 6))
    assert spec.axes["fc1.weight"] == ("fc1", None)  # the hidden units are free
    assert spec.axes["fc2.weight"] == (None, "fc1")  # but fc2 writes into the input's (fixed) stream
    assert spec.axes["out.weight"] == (None, None) and len(spec.sizes) == 1
    check_spec(model, spec, torch.randn(3, 6))


def test_vgg_uses_he_init_so_that_deep_plain_vggs_train():
    torch.manual_seed(0)
    model = vgg9()
    conv = model.features[5]  # 64 -> 128 channels, 3x3
    assert conv.weight.std().item() == pytest.approx((2 / (128 * 9)) ** 0.5, rel=0.05)
    assert torch.count_nonzero(conv.bias) == 0
    fc = model.classifier[0]  # 4096 -> 512
    assert fc.weight.std().item() == pytest.approx((2 / 4096) ** 0.5, rel=0.05)


# ----------------------------------------------------------------------------- group kinds

KIND_ABOVE = {"permutation": "signed-permutation", "signed-permutation": "orthogonal"}


def max_change(model: nn.Module, spec: PermutationSpec, x: torch.Tensor, transform: dict, mode="eval") -> float:
    """How much transforming the weights by ``transform`` changes the outputs, in float64."""
    state = {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    return float((outputs(model, state, x, mode) - outputs(model, apply_transform(state, spec, transform), x, mode))
                 .abs().max())


def mlp_with(act: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), act, nn.Linear(8, 7), copy.deepcopy(act), nn.Linear(7, 3)).eval()


class Unary(nn.Module):
    """fc2(op(fc1(x))): one hidden group whose kind only ``op`` decides."""

    def __init__(self, op):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.op, self.fc2 = nn.Linear(6, 8), op, nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.op(self.fc1(x)))


class ConvUnary(nn.Module):
    """fc(flatten(op(conv(x)))) on 8x8 inputs: the kind of the conv's channel group is up to ``op``."""

    def __init__(self, op):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.op = nn.Conv2d(3, 4, 3, padding=1), op
        self.fc = nn.Linear(op(torch.zeros(1, 4, 8, 8)).numel(), 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.op(self.conv(x)), start_dim=1))


class ResidualMLP(nn.Module):
    """head(s + branch(s)) with s = inp(x): the stream and the branch's output are one group."""

    def __init__(self, relu: bool):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.branch, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.relu = relu

    def forward(self, x):
        s = self.inp(x)
        t = self.branch(s)
        return self.head(s + (F.relu(t) if self.relu else t))


def norm_mlp(norm: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), norm, nn.Linear(8, 3))
    with torch.no_grad():
        for key, t in norm.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape) + 0.5 if key in ("weight", "running_var") else torch.randn(t.shape) * 0.3)
    return model.eval()


MLP_CASES = {  # name: (model, input, expected kind of the first hidden group)
    "identity": (lambda: mlp_with(nn.Identity()), (5, 6), "orthogonal"),
    "tanh": (lambda: mlp_with(nn.Tanh()), (5, 6), "signed-permutation"),
    "relu": (lambda: mlp_with(nn.ReLU()), (5, 6), "permutation"),
    "dropout": (lambda: mlp_with(nn.Dropout(0.3)), (5, 6), "signed-permutation"),
    "hardtanh": (lambda: mlp_with(nn.Hardtanh(-0.5, 0.5)), (5, 6), "signed-permutation"),
    "relu6": (lambda: mlp_with(nn.ReLU6()), (5, 6), "permutation"),  # Hardtanh(0, 6)
    "batchnorm": (lambda: norm_mlp(nn.BatchNorm1d(8)), (5, 6), "permutation"),
    "layernorm": (lambda: norm_mlp(nn.LayerNorm(8)), (5, 6), "permutation"),
    "residual": (lambda: ResidualMLP(relu=False), (5, 6), "orthogonal"),
    "residual-relu-branch": (lambda: ResidualMLP(relu=True), (5, 6), "permutation"),
    # functions and methods, positional and keyword arguments
    "neg-and-scale": (lambda: Unary(lambda h: -h * 2.5 / 1.5), (5, 6), "orthogonal"),
    "to-contiguous": (lambda: Unary(lambda h: h.to(h.dtype).contiguous().clone()), (5, 6), "orthogonal"),
    "torch.tanh": (lambda: Unary(torch.tanh), (5, 6), "signed-permutation"),
    "sin": (lambda: Unary(torch.sin), (5, 6), "signed-permutation"),
    "softsign": (lambda: Unary(F.softsign), (5, 6), "signed-permutation"),
    "F.dropout": (lambda: Unary(lambda h: F.dropout(h, 0.3, training=False)), (5, 6), "signed-permutation"),
    "hardtanh-kw": (lambda: Unary(lambda h: F.hardtanh(h, min_val=-0.5, max_val=0.5)), (5, 6),
                    "signed-permutation"),
    "hardtanh-asymmetric": (lambda: Unary(lambda h: F.hardtanh(h, -0.5, 1.0)), (5, 6), "permutation"),
    "clamp-symmetric": (lambda: Unary(lambda h: h.clamp(-0.5, 0.5)), (5, 6), "signed-permutation"),
    "clamp-min": (lambda: Unary(lambda h: torch.clamp(h, min=0.0)), (5, 6), "permutation"),
    "shift": (lambda: Unary(lambda h: h + 0.1), (5, 6), "permutation"),
    "gelu": (lambda: Unary(F.gelu), (5, 6), "permutation"),
    "sigmoid": (lambda: Unary(torch.sigmoid), (5, 6), "permutation"),
    "softmax": (lambda: Unary(lambda h: h.softmax(dim=-1)), (5, 6), "permutation"),
    "square": (lambda: Unary(lambda h: h * h), (5, 6), "permutation"),
    # spatial operations on conv channels
    "avg-pool": (lambda: ConvUnary(lambda h: F.avg_pool2d(h, kernel_size=2)), (3, 3, 8, 8), "orthogonal"),
    "zero-pad": (lambda: ConvUnary(lambda h: F.pad(h, pad=(1, 1, 1, 1))), (3, 3, 8, 8), "orthogonal"),
    "reflect-pad": (lambda: ConvUnary(nn.ReflectionPad2d(1)), (3, 3, 8, 8), "orthogonal"),
    "upsample": (lambda: ConvUnary(lambda h: F.interpolate(h, scale_factor=2, mode="bilinear")), (3, 3, 8, 8),
                 "orthogonal"),
    "spatial-mean": (lambda: ConvUnary(lambda h: h.mean(dim=(2, 3), keepdim=True)), (3, 3, 8, 8), "orthogonal"),
    "max-pool": (lambda: ConvUnary(lambda h: F.max_pool2d(h, kernel_size=2)), (3, 3, 8, 8), "permutation"),
    "constant-pad": (lambda: ConvUnary(lambda h: F.pad(h, (1, 1, 1, 1), value=0.5)), (3, 3, 8, 8), "permutation"),
    "spatial-amax": (lambda: ConvUnary(lambda h: h.amax(dim=(2, 3), keepdim=True)), (3, 3, 8, 8), "permutation"),
    "channel-sum": (lambda: ConvUnary(lambda h: h.sum(1, keepdim=True)), (3, 3, 8, 8), "permutation"),
    "depthwise": (lambda: ConvUnary(nn.Conv2d(4, 4, 3, padding=1, groups=4)), (3, 3, 8, 8), "permutation"),
}


def _kind_case(name):
    factory, shape, kind = MLP_CASES[name]
    model = factory()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    spec = spec_from_module(model, x)
    first = next(g for key in model.state_dict() for g in spec.axes[key] if g is not None)
    return name, model, x, spec, first, kind


@pytest.fixture(params=list(MLP_CASES), scope="module")
def kind_case(request):
    return _kind_case(request.param)


#: Cases with a kind above the inferred one that check_spec can test: nothing is above orthogonal, and
#: dropout is the identity in eval mode, the only mode checked for models with dropout.
REFUSABLE = [name for name, (_, _, kind) in MLP_CASES.items()
             if kind != "orthogonal" and name not in ("dropout", "F.dropout")]


def test_traced_kind_is_inferred_from_what_uses_the_units(kind_case):
    name, _, _, spec, first, kind = kind_case
    assert spec.kinds[first] == kind, f"{name}: {spec.kinds}"


def test_a_random_element_of_the_inferred_kind_preserves_the_function(kind_case):
    name, model, x, spec, _, _ = kind_case
    for seed in range(3):
        transform = random_transform(spec, seed)
        for mode in ("eval", "train") if any(isinstance(m, nn.BatchNorm1d) for m in model.modules()) else ("eval",):
            assert max_change(model, spec, x, transform, mode) <= ATOL, f"{name}, seed {seed}, {mode} mode"
    check_spec(model, spec, x)


@pytest.mark.parametrize("case", REFUSABLE)
def test_check_spec_refuses_a_kind_above_the_inferred_one(case):
    name, model, x, spec, first, kind = _kind_case(case)
    upgraded = spec.with_kinds({first: KIND_ABOVE[kind]})
    with pytest.raises(SpecError, match=rf"group '{first}' is declared {KIND_ABOVE[kind]} but .* use '{kind}'") as e:
        check_spec(model, upgraded, x)
    assert (e.value.group, e.value.kind) == (first, kind), name


def test_relu_units_declared_orthogonal_are_refused_with_a_clear_message():
    model = mlp_with(nn.ReLU())
    x = torch.randn(5, 6)
    spec = spec_from_module(model, x)
    with pytest.raises(SpecError, match=r"group '0' is declared orthogonal but a random rotation of its units "
                                        r"changes the output .* while a random permutation leaves it unchanged; "
                                        r"its units are probably followed by a nonlinearity: use 'permutation'"):
        check_spec(model, spec.with_kinds({"0": "orthogonal"}), x)


def test_tanh_units_declared_orthogonal_are_refused_with_a_clear_message():
    model = mlp_with(nn.Tanh())
    x = torch.randn(5, 6)
    spec = spec_from_module(model, x)
    with pytest.raises(SpecError, match=r"group '2' is declared orthogonal but a random rotation .* a random "
                                        r"signed permutation leaves it unchanged.*odd.*use 'signed-permutation'"):
        check_spec(model, spec.with_kinds({"2": "orthogonal"}), x)


def test_batchnorm_units_declared_signed_are_refused():
    model = norm_mlp(nn.BatchNorm1d(8))
    x = torch.randn(5, 6)
    spec = spec_from_module(model, x).with_kinds({"0": "signed-permutation"})
    with pytest.raises(SpecError, match=r"group '0' is declared signed-permutation.*use 'permutation'"):
        check_spec(model, spec, x)


def test_a_random_rotation_preserves_a_linear_mlp_but_not_a_relu_mlp():
    x = torch.randn(5, 6)
    linear, relu = mlp_with(nn.Identity()), mlp_with(nn.ReLU())
    rotations = spec_from_module(linear, x)
    assert set(rotations.kinds.values()) == {"orthogonal"}
    rotation = random_transform(rotations, 0)
    assert max_change(linear, rotations, x, rotation) <= ATOL
    # the same rotation of the same weights, with a ReLU between the layers
    assert max_change(relu, rotations, x, rotation) > 1e-2


def test_wrong_axis_in_an_orthogonal_group_is_still_located():
    model = mlp_with(nn.Identity())
    x = torch.randn(5, 6)
    spec = broken(spec_from_module(model, x), "0.bias", (None,))
    with pytest.raises(SpecError, match=r"'0\.bias': axis 0 should be transformed by group '0'") as e:
        check_spec(model, spec.with_kinds({"0": "orthogonal"}), x)
    assert (e.value.key, e.value.axis, e.value.kind) == ("0.bias", 0, None)
