"""The Flower strategies on hand-made client replies: faithful merges, weights, and bad replies left out."""

from __future__ import annotations

import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies

import fedmerge
from fedmerge import apply_permutation, compose_permutations, invert_permutation, random_permutation
from fedmerge.models import MLP
from strategies import C2M3, STRATEGIES, FedAvg, GitRebasin, MergeMany, MergingStrategy, Orthogonal

MERGING = [GitRebasin, MergeMany, C2M3, Orthogonal]


def _metadata(node: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id=f"ins-{node}", group_id="1", created_at=time.time(), ttl=3600.0,
                    message_type="train")


def _reply(node: int, state_dict=None, num_examples=100, *, metrics=None, arrays=None) -> Message:
    """A client's reply as the SuperLink delivers it: weights + a MetricRecord with the sample count."""
    content = RecordDict()
    if arrays is not None:
        for i, a in enumerate(arrays):
            content[f"arrays{i}"] = a
    elif state_dict is not None:
        content["arrays"] = ArrayRecord({k: v.detach().clone() for k, v in state_dict.items()})
    record = {"train_loss": 0.1 * node, "train_accuracy": 0.9}
    if num_examples is not None:
        record["num-examples"] = num_examples
    content["metrics"] = MetricRecord(record if metrics is None else metrics)
    return Message(content, metadata=_metadata(node))


def _error_reply(node: int, reason: str) -> Message:
    return Message(error=Error(code=1, reason=reason), metadata=_metadata(node))


def _outputs(state_dict, x):
    model = MLP(widths=(64, 128, 64))
    model.load_state_dict(state_dict)
    model.eval()
    with torch.no_grad():
        return model(x)


def _permuted_copies(base, spec, seeds):
    """``base`` and copies of it under the hidden permutations drawn from ``seeds`` (each moves every group)."""
    hidden = [random_permutation(spec, s) for s in seeds]
    for h in hidden:
        assert all(not torch.equal(h[g], torch.arange(d)) for g, d in spec.sizes.items())
    return [base] + [apply_permutation(base, spec, h) for h in hidden], [fedmerge.identity_permutation(spec)] + hidden


def _assert_hidden_permutations_recovered(result, hidden, spec):
    """The merge aligned the copies: its maps undo the hidden permutations (a merge that returned one
    client's model unchanged would compute the same function, so the function check alone cannot tell)."""
    for i in range(1, len(hidden)):
        expected = compose_permutations(invert_permutation(hidden[i]), hidden[0])
        got = result.pairwise(i, 0)
        assert all(torch.equal(got[g].cpu(), expected[g]) for g in spec.sizes), i


@pytest.mark.parametrize("cls", MERGING, ids=lambda c: c.__name__)
def test_permuted_copies_aggregate_back_to_the_model(cls, trained_mlp, mnist_subset):
    spec = trained_mlp.permutation_spec()
    base = trained_mlp.state_dict()
    copies, hidden = _permuted_copies(base, spec, [10, 11, 12])
    strategy = cls(model=trained_mlp, device="cpu")
    replies = [_reply(node, sd, num_examples=50 * (node + 1)) for node, sd in enumerate(copies)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    x = mnist_subset[0][:256]
    torch.testing.assert_close(_outputs(arrays.to_torch_state_dict(), x), _outputs(base, x), atol=1e-5, rtol=0)
    result = strategy.last_result
    _assert_hidden_permutations_recovered(result, hidden, spec)
    assert metrics["clients_merged"] == 4 and metrics["clients_left_out"] == 0
    # the diagnostics are the merge's own: the objective of perfectly aligned copies, its iterations
    best = fedmerge.match([base] * 4, spec, method="identity").objective
    assert metrics["match_objective"] == pytest.approx(best, rel=1e-6)
    assert metrics["match_iterations"] == result.nit
    assert metrics["match_converged"] == int(result.converged) == 1
    if cls is C2M3:  # the sequential start is certified optimal (Cauchy-Schwarz): returned without iterating
        assert result.nit == 0 and "Cauchy" in result.message
    else:  # permuted copies are recovered in a few sweeps: the stopping rule triggers
        assert 1 <= result.nit < 10
    assert metrics["match_seconds"] == pytest.approx(result.seconds)
    assert metrics["aggregation_seconds"] >= metrics["match_seconds"] > 0
    # the clients' own metrics, weighted by their sample counts (50, 100, 150, 200)
    assert metrics["train_loss"] == pytest.approx(sum(0.1 * n * 50 * (n + 1) for n in range(4)) / 500)
    assert strategy.left_out == {} and strategy.last_result.n_models == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_strategy_merges_on_the_gpu_and_returns_cpu_arrays(trained_mlp, mnist_subset):
    """``device="auto"`` picks CUDA: replies (CPU) are matched and merged there, and the new global model
    goes back to Flower as an ArrayRecord computing the same function."""
    spec = trained_mlp.permutation_spec()
    base = trained_mlp.state_dict()
    copies, hidden = _permuted_copies(base, spec, [30, 31])
    strategy = C2M3(model=trained_mlp)
    assert strategy.device.type == "cuda"
    arrays, metrics = strategy.aggregate_train(1, [_reply(node, sd) for node, sd in enumerate(copies)])
    assert all(p.is_cuda for perm in strategy.last_result.perms for p in perm.values())  # matched on the GPU
    merged = arrays.to_torch_state_dict()
    x = mnist_subset[0][:256]
    torch.testing.assert_close(_outputs(merged, x), _outputs(base, x), atol=1e-5, rtol=0)
    _assert_hidden_permutations_recovered(strategy.last_result, hidden, spec)
    assert metrics["clients_merged"] == 3


@pytest.mark.parametrize("cls", MERGING, ids=lambda c: c.__name__)
def test_sample_counts_weight_the_merge(cls):
    torch.manual_seed(0)
    models = [MLP(input_shape=(12,), widths=(6, 5), num_classes=3).state_dict() for _ in range(3)]
    spec = MLP(input_shape=(12,), widths=(6, 5), num_classes=3).permutation_spec()
    counts = [10, 1, 30]
    strategy = cls(spec=spec, device="cpu")
    arrays, _ = strategy.aggregate_train(1, [_reply(n, sd, c) for n, (sd, c) in enumerate(zip(models, counts))])
    expected = fedmerge.merge(models, align=cls.align, weights=counts, spec=spec, **strategy.match_options)
    got = arrays.to_torch_state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0)
    uniform = fedmerge.merge(models, align=cls.align, spec=spec, **strategy.match_options)
    assert not torch.allclose(got["layers.0.weight"], uniform["layers.0.weight"])


def _bad_replies(base: dict) -> list[tuple[Message, str]]:
    """One malformed reply per way a client can go wrong, with a fragment of the expected reason."""
    key = "layers.0.weight"
    nan = {k: v.clone() for k, v in base.items()}
    nan[key][0, 0] = float("nan")
    inf = {k: v.clone() for k, v in base.items()}
    inf["layers.0.bias"][1] = float("inf")
    diverged = {k: v.clone() for k, v in base.items()}  # finite, but its squared norm overflows float32
    diverged["layers.1.weight"][2, 3] = 1e35
    wrong_shape = {**base, key: base[key][:, :-1]}
    missing = {k: v for k, v in base.items() if k != key}
    extra = {**base, "head.extra": torch.zeros(3)}
    int_weights = {**base, key: base[key].to(torch.int64)}
    return [
        (_error_reply(10, "Exception ClientAppException occurred. Message: CUDA out of memory"),
         "client error: CUDA out of memory"),
        (_reply(11, nan), "contains NaN"),
        (_reply(12, inf), "contains Inf"),
        (_reply(13, wrong_shape), "has shape"),
        (_reply(14, missing), "is missing"),
        (_reply(15, extra), "unexpected key 'head.extra'"),
        (_reply(16, int_weights), "dtype"),
        (_reply(17, base, num_examples=0), "must be positive"),
        (_reply(18, base, num_examples=-5), "must be positive"),
        (_reply(19, base, num_examples=None), "has no 'num-examples'"),
        (_reply(20, base, num_examples=float("nan")), "one finite number"),
        (_reply(21, base, metrics={"num-examples": [1, 2]}), "one finite number"),
        (_reply(22, arrays=[ArrayRecord(base), ArrayRecord(base)]), "exactly one ArrayRecord"),
        (_reply(23, arrays=[]), "exactly one ArrayRecord, got 0"),
        (_reply(24, diverged), "'layers.1.weight' has values too large for float32 arithmetic"),
    ]


@pytest.mark.parametrize("cls", MERGING, ids=lambda c: c.__name__)
def test_malformed_replies_are_left_out_with_their_reason(cls, trained_mlp, mnist_subset):
    spec = trained_mlp.permutation_spec()
    base = {k: v.clone() for k, v in trained_mlp.state_dict().items()}
    copies, hidden = _permuted_copies(base, spec, [1])
    good = [_reply(0, copies[0]), _reply(1, copies[1])]
    bad = _bad_replies(base)
    strategy = cls(spec=spec, device="cpu")
    arrays, metrics = strategy.aggregate_train(3, good[:1] + [m for m, _ in bad] + good[1:])
    x = mnist_subset[0][:256]
    torch.testing.assert_close(_outputs(arrays.to_torch_state_dict(), x), _outputs(base, x), atol=1e-5, rtol=0)
    _assert_hidden_permutations_recovered(strategy.last_result, hidden, spec)
    assert metrics["clients_merged"] == 2 and metrics["clients_left_out"] == len(bad)
    left = {item.node_id: item.reason for item in strategy.left_out[3]}
    assert sorted(left) == [m.metadata.src_node_id for m, _ in bad]
    for msg, fragment in bad:
        assert fragment in left[msg.metadata.src_node_id], (fragment, left[msg.metadata.src_node_id])


def test_a_round_without_usable_updates_keeps_the_global_model(trained_mlp):
    base = trained_mlp.state_dict()
    strategy = C2M3(model=trained_mlp, device="cpu")
    bad = _bad_replies(base)
    arrays, metrics = strategy.aggregate_train(2, [bad[i][0] for i in (0, 1, 2, 7)])
    assert arrays is None  # Flower's start() keeps the previous global model
    assert metrics["clients_merged"] == 0 and metrics["clients_left_out"] == 4
    arrays, metrics = strategy.aggregate_train(3, [])
    assert arrays is None and metrics["clients_merged"] == 0 and metrics["clients_left_out"] == 0


def test_flower_fedavg_stops_on_what_fedmerge_leaves_out(trained_mlp):
    """The contrast the strategies exist for: Flower's own FedAvg raises on one malformed reply."""
    base = trained_mlp.state_dict()
    replies = [_reply(0, base), _reply(1, base, num_examples=None)]
    with pytest.raises(InconsistentMessageReplies):
        FedAvg().aggregate_train(1, replies)
    arrays, metrics = GitRebasin(model=trained_mlp, device="cpu").aggregate_train(1, replies)
    assert arrays is not None and metrics["clients_left_out"] == 1


def test_malformed_evaluation_replies_are_left_out():
    replies = [_reply(0, None, 30, metrics={"num-examples": 30, "eval_accuracy": 0.5}),
               _reply(1, None, 10, metrics={"num-examples": 10, "eval_accuracy": 0.9}),
               _reply(2, None, None, metrics={"eval_accuracy": 1.0}),
               _error_reply(3, "boom")]
    with pytest.raises(InconsistentMessageReplies):
        FedAvg().aggregate_evaluate(1, replies[:3])
    strategy = C2M3(spec=MLP(widths=(4,)).permutation_spec())
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["eval_accuracy"] == pytest.approx((30 * 0.5 + 10 * 0.9) / 40)
    assert [(i.node_id, i.reason) for i in strategy.left_out_evaluate[1]] == [
        (2, "its MetricRecord has no 'num-examples' (the sample count that weights the merge)"),
        (3, "client error: boom")]
    assert C2M3(spec=MLP(widths=(4,)).permutation_spec()).aggregate_evaluate(1, replies[2:]) is None


def test_construction_errors_and_registry():
    with pytest.raises(ValueError, match="needs the model's symmetry"):
        C2M3()
    with pytest.raises(TypeError, match="PermutationSpec"):
        MergeMany(spec={"layers.0": 4})
    assert set(STRATEGIES) == {"fedavg", "git-rebasin", "mergemany", "c2m3", "orthogonal"}
    assert all(issubclass(STRATEGIES[name], MergingStrategy) and STRATEGIES[name].align == name
               for name in ("git-rebasin", "mergemany", "c2m3", "orthogonal"))


class _Grid:
    """The part of a Flower Grid that FedAvg's node sampling uses: the connected node ids, per call."""

    def __init__(self, *connected):
        self.connected, self.calls = list(connected), 0

    def get_node_ids(self):
        count = self.connected[min(self.calls, len(self.connected) - 1)]
        self.calls += 1
        return list(range(1, count + 1))


def test_match_and_fedavg_options_reach_what_they_configure(trained_mlp, monkeypatch):
    """``max_iter`` reaches the matcher; ``fraction_train`` and ``min_available_nodes`` reach FedAvg's sampling."""
    from flwr.serverapp.strategy import strategy_utils
    from flwr.supercore.task_identity import TaskIdentity
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):  # as Flower's ServerApp runtime sets them
        monkeypatch.setattr(TaskIdentity, name, value)
    monkeypatch.setattr(strategy_utils, "sleep", lambda seconds: None)

    spec = trained_mlp.permutation_spec()
    base = trained_mlp.state_dict()
    copies, _ = _permuted_copies(base, spec, [5, 6])
    _, metrics = C2M3(model=trained_mlp, device="cpu", max_iter=1, refine=0, init="identity").aggregate_train(
        1, [_reply(n, sd) for n, sd in enumerate(copies)])
    assert metrics["match_iterations"] == 1 and metrics["match_converged"] == 0

    arrays = ArrayRecord(base)
    strategy = C2M3(model=trained_mlp, fraction_train=0.5, min_available_nodes=3)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({}), _Grid(10)))
    assert len(messages) == 5 and len({m.metadata.dst_node_id for m in messages}) == 5
    grid = _Grid(2, 2, 2, 10)  # two nodes at first: sampling waits for the third
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({}), grid))
    assert grid.calls == 4 and len(messages) == 2  # 0.5 of 2 nodes, at least min_train_nodes=2


def test_a_spec_that_does_not_fit_the_global_model_is_refused_before_training():
    strategy = C2M3(spec=MLP(widths=(5,)).permutation_spec())
    with pytest.raises(ValueError, match=r"the initial global model: key 'layers.0.weight'"):
        strategy.configure_train(1, ArrayRecord(MLP(widths=(4,)).state_dict()), ConfigRecord({}), _Grid(10))


def test_fedma_network_permuted_copies_aggregate_back():
    """VGG-9 (FedMA's setting): the flattened 4x4 map feeds the classifier; C²M³ still recovers
    four permuted copies (an even count: see refine=1 in the C2M3 strategy)."""
    from fedmerge.models import vgg9

    torch.manual_seed(0)
    model = vgg9(width=0.25, hidden=32)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.bias.normal_(0, 0.1)  # He init leaves biases at zero; make them matter
    spec = model.permutation_spec()
    base = model.state_dict()
    copies, hidden = _permuted_copies(base, spec, [3, 4, 5])
    strategy = C2M3(model=model, device="cpu")
    arrays, metrics = strategy.aggregate_train(1, [_reply(n, sd, 10 + n) for n, sd in enumerate(copies)])
    x = torch.randn(8, 3, 32, 32)
    merged = vgg9(width=0.25, hidden=32)
    merged.load_state_dict(arrays.to_torch_state_dict())
    model.eval(), merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=0)
    _assert_hidden_permutations_recovered(strategy.last_result, hidden, spec)
    assert metrics["clients_merged"] == 4


# --------------------------------------------------------------------------- BatchNorm folding in a round
def _forward(model, state_dict, x, *, train=False):
    model.train(train)
    try:
        with torch.no_grad():
            return torch.func.functional_call(model, {k: v.clone() for k, v in state_dict.items()}, (x,))
    finally:
        model.eval()


def test_relaxed_orthogonal_round_folds_batchnorm_and_permuted_copies_aggregate_back(bn_resnet):
    model = bn_resnet()
    spec = model.permutation_spec()
    base = model.state_dict()
    copies, hidden = _permuted_copies(base, spec, [10, 11, 12])
    strategy = Orthogonal(model=model, relax=True, device="cpu")
    assert strategy.folding is not None and len(strategy.folding.pairs) == 21  # every BatchNorm folded
    arrays, metrics = strategy.aggregate_train(1, [_reply(n, sd, 10 * (n + 1)) for n, sd in enumerate(copies)])
    merged = arrays.to_torch_state_dict()
    assert set(merged) == set(base) and metrics["clients_merged"] == 4  # back in the BatchNorm architecture
    x = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_forward(model, merged, x), _forward(model, base, x), atol=1e-5, rtol=0)
    _assert_hidden_permutations_recovered(strategy.last_result, hidden, spec)
    # the running statistics are the clients' own (moved and averaged), not the identity: train mode, in which
    # the clients go on training, computes what the clients' models compute in train mode
    assert float((merged["norm1.running_var"] - 1).abs().max()) > 0.05
    torch.testing.assert_close(_forward(model, merged, x, train=True), _forward(model, base, x, train=True),
                               atol=1e-3, rtol=0)
    identity = strategy.folding.unfold(strategy.folding.fold(base))  # what unfolding without statistics gives
    assert not torch.allclose(_forward(model, identity, x, train=True), _forward(model, base, x, train=True),
                              atol=1e-2)


def test_relaxed_orthogonal_round_on_independent_batchnorm_clients_is_the_folded_merge(bn_resnet):
    model = bn_resnet()
    sds = [bn_resnet(seed).state_dict() for seed in range(3)]
    counts = [30, 10, 20]
    strategy = Orthogonal(model=model, relax=True, device="cpu")
    arrays, metrics = strategy.aggregate_train(1, [_reply(n, sd, c) for n, (sd, c) in enumerate(zip(sds, counts))])
    merged = arrays.to_torch_state_dict()
    assert all(bool(torch.isfinite(v).all()) for v in merged.values())
    assert all(float(v.min()) > 0 for k, v in merged.items() if k.endswith("running_var"))
    x = torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    assert bool(torch.isfinite(_forward(model, merged, x)).all())
    assert all(torch.equal(t[g].sort().values, torch.arange(d)) for t in strategy.last_result.transforms
               for g, d in model.permutation_spec().sizes.items())  # exact maps: permutations of the units
    expected = fedmerge.batchnorm.merge(sds, model=model, align="orthogonal", weights=counts,
                                        **strategy.match_options)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, atol=1e-5, rtol=1e-5)
    # without folding the rotations are searched on the BatchNorm model's own weights: another merge
    unfolded = Orthogonal(model=model, relax=True, device="cpu", fold_batchnorm=False)
    assert unfolded.folding is None
    other, _ = unfolded.aggregate_train(1, [_reply(n, sd, c) for n, (sd, c) in enumerate(zip(sds, counts))])
    assert not torch.allclose(other.to_torch_state_dict()["conv1.weight"], merged["conv1.weight"], atol=1e-3)


def test_folded_round_with_server_repair_repairs_the_folded_merge_and_re_estimates_statistics(bn_resnet):
    model = bn_resnet()
    sds = [bn_resnet(seed).state_dict() for seed in range(2)]
    x = torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(6))
    strategy = Orthogonal(model=model, relax=True, device="cpu", repair="server", repair_inputs=x)
    arrays, metrics = strategy.aggregate_train(1, [_reply(n, sd) for n, sd in enumerate(sds)])
    merged = arrays.to_torch_state_dict()
    assert metrics["repair_applied"] == 1 and strategy.folding is not None
    expected = fedmerge.batchnorm.merge(sds, model=model, align="orthogonal", weights=[100, 100], repair=x,
                                        **strategy.match_options)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, atol=1e-5, rtol=1e-5)
    # the statistics are those of the merged model on the server's inputs: train mode there is eval mode
    torch.testing.assert_close(_forward(model, merged, x, train=True), _forward(model, merged, x), atol=1e-3,
                               rtol=0)


def test_a_group_declared_orthogonal_through_batchnorm_is_rotated_after_folding():
    """Linear -> BN -> Linear: the first group may rotate once BatchNorm is folded (a dense hidden rotation,
    which no permutation undoes); without folding the aligner refuses to rotate BatchNorm channels."""
    from torch import nn

    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(),
                        nn.Linear(6, 3))
    net.input_shape = (10,)  # what the tracer needs to read BatchNorm1d's input as (batch, features)
    g = torch.Generator().manual_seed(2)
    for mod in (net[1], net[3]):
        mod.running_mean.normal_(0, 0.3, generator=g)
        mod.running_var.uniform_(0.5, 1.5, generator=g)
        mod.weight.data.uniform_(0.5, 1.5, generator=g)
    net.eval()
    spec = fedmerge.relaxed_spec(fedmerge.spec_for(net), ["0"])
    sd = net.state_dict()
    folding = fedmerge.batchnorm.fold_batchnorm(net, spec)
    hidden = fedmerge.random_transform(folding.spec, 4)  # a dense rotation of group "0", a permutation of "2"
    rotated = folding.unfold(fedmerge.apply_transform(folding.fold(sd), folding.spec, hidden))
    x = torch.randn(32, 10, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(_forward(net, rotated, x), _forward(net, sd, x), atol=1e-5, rtol=0)
    assert float((rotated["0.weight"] - sd["0.weight"]).abs().max()) > 0.1
    replies = [_reply(0, sd), _reply(1, rotated)]
    strategy = Orthogonal(spec=spec, model=net, device="cpu")
    assert strategy.rotated_groups() == ["0"] and strategy.folding is not None
    arrays, _ = strategy.aggregate_train(1, replies)
    torch.testing.assert_close(_forward(net, arrays.to_torch_state_dict(), x), _forward(net, sd, x),
                               atol=1e-4, rtol=0)
    q = strategy.last_result.transforms[1]["0"]
    assert float((q.abs() - q.abs().round()).abs().max()) > 0.1  # the map found is a dense rotation
    with pytest.raises(ValueError, match="carries BatchNorm statistics"):
        Orthogonal(spec=spec, model=net, device="cpu", fold_batchnorm=False).aggregate_train(1, replies)


def test_batchnorm_folding_options_and_errors(trained_mlp, bn_resnet):
    model = bn_resnet()
    assert Orthogonal(model=model, device="cpu").folding is None  # nothing rotated: permutations on BN units
    assert C2M3(model=model, device="cpu").folding is None
    assert C2M3(model=model, device="cpu", fold_batchnorm=True).folding is not None
    with pytest.raises(ValueError, match="fold_batchnorm must be None"):
        Orthogonal(model=model, fold_batchnorm="yes")
    with pytest.raises(ValueError, match="fold_batchnorm=True needs model="):
        Orthogonal(spec=model.permutation_spec(), fold_batchnorm=True)
    with pytest.raises(ValueError, match="not supported"):
        Orthogonal(model=model, relax=True, average="regmean")
    with pytest.raises(ValueError, match="no BatchNorm layer directly after"):
        Orthogonal(model=trained_mlp, fold_batchnorm=True)
    with pytest.raises(ValueError, match="relax must be True or False"):
        Orthogonal(model=model, relax="yes")
