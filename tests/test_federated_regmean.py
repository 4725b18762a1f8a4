"""Federated RegMean (strategies.federated_regmean): Gram records, the strategy's round, bad replies."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord

import fedmerge
from fedmerge.models import MLP
from fedmerge.regmean import input_grams
from strategies import C2M3, MergingStrategy
from strategies import federated_regmean as frm


def _models(n: int):
    torch.manual_seed(4)
    return [MLP(input_shape=(1, 6, 6), widths=(12, 8)) for _ in range(n)]


def _inputs(n: int):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(40 + 10 * i, 1, 6, 6, generator=g) + i for i in range(n)]


def test_gram_records_round_trip_and_bad_ones_are_refused():
    model = _models(1)[0]
    x = _inputs(1)[0]
    grams = input_grams(model, model.state_dict(), x)
    dims = frm.layer_dims(model)
    assert dims == {"layers.0": 36, "layers.1": 12, "head": 8}
    back = frm.decode_grams(frm.client_grams(model, x), dims)
    for name, g in grams.items():
        assert back[name].count == g.count == 40
        torch.testing.assert_close(back[name].xx, g.xx, rtol=1e-5, atol=1e-4)  # sent as float32 means
        torch.testing.assert_close(back[name].x, g.x, rtol=1e-5, atol=1e-4)

    def broken(part, value):
        arrays = frm.encode_grams(grams).to_torch_state_dict()
        arrays[f"layers.1/{part}"] = value
        return ArrayRecord(arrays)

    with pytest.raises(ValueError, match="carries no 'regmean-grams'"):
        frm.decode_grams(None, dims)
    with pytest.raises(ValueError, match="positive finite"):
        frm.decode_grams(broken("count", torch.tensor([0.0], dtype=torch.float64)), dims)
    with pytest.raises(ValueError, match="non-finite"):
        frm.decode_grams(broken("x", torch.full((12,), float("nan"))), dims)
    with pytest.raises(ValueError, match=r"expected \(78,\)"):
        frm.decode_grams(broken("xx", torch.zeros(77)), dims)
    negative = frm.encode_grams(grams).to_torch_state_dict()["layers.1/xx"].clone()
    negative[0] = -1.0  # entry (0, 0) of the upper triangle: a negative mean square
    with pytest.raises(ValueError, match="negative mean squares"):
        frm.decode_grams(broken("xx", negative), dims)
    arrays = frm.encode_grams(grams).to_torch_state_dict()
    del arrays["head/x"]
    with pytest.raises(ValueError, match="missing"):
        frm.decode_grams(ArrayRecord(arrays), dims)


def test_the_strategy_round_is_regmean_on_the_clients_own_inputs(train_reply):
    """The server's merge from the clients' Grams (their own models, mapped) equals RegMean computed centrally."""
    models, xs = _models(3), _inputs(3)
    strategy = C2M3(model=models[0], device="cpu", average="regmean", max_iter=5)
    replies = [train_reply(i + 1, m, {frm.GRAMS_KEY: frm.client_grams(m, x)}, len(x))
               for i, (m, x) in enumerate(zip(models, xs))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["regmean_applied"] == 1 and metrics["regmean_clients"] == 3 and metrics["clients_merged"] == 3
    sds = [m.state_dict() for m in models]
    expected = fedmerge.merge(sds, align="c2m3", model=models[0], weights=[len(x) for x in xs],
                              align_options=strategy.match_options, average="regmean",
                              average_options={"model_inputs": xs})
    mean = fedmerge.merge(sds, align="c2m3", model=models[0], weights=[len(x) for x in xs],
                          align_options=strategy.match_options)
    got = arrays.to_torch_state_dict()
    for k, v in got.items():
        torch.testing.assert_close(v, expected[k], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got["layers.1.weight"], mean["layers.1.weight"], atol=1e-3)


def test_clients_with_bad_grams_are_left_out_and_none_means_the_weighted_mean(train_reply):
    models, xs = _models(3), _inputs(3)
    strategy = C2M3(model=models[0], device="cpu", average="regmean", max_iter=5)
    nan = frm.encode_grams(input_grams(models[1], models[1].state_dict(), xs[1])).to_torch_state_dict()
    nan["head/xx"] = torch.full_like(nan["head/xx"], float("nan"))
    replies = [train_reply(1, models[0], {frm.GRAMS_KEY: frm.client_grams(models[0], xs[0])}, 40),
               train_reply(2, models[1], {frm.GRAMS_KEY: ArrayRecord(nan)}, 50),
               train_reply(3, models[2], {frm.GRAMS_KEY: frm.client_grams(models[2], xs[2])}, 60)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients_merged"] == 2 and metrics["clients_left_out"] == 1 and metrics["regmean_clients"] == 2
    [left] = strategy.left_out[1]
    assert left.node_id == 2 and "RegMean Gram matrices" in left.reason and "non-finite" in left.reason

    plain = C2M3(model=models[0], device="cpu", average="regmean", max_iter=5)
    arrays, metrics = plain.aggregate_train(1, [train_reply(i + 1, m, None, 40) for i, m in enumerate(models)])
    assert metrics["regmean_applied"] == 0 and metrics["clients_merged"] == 3
    expected = fedmerge.merge([m.state_dict() for m in models], align="c2m3", model=models[0], weights=[40] * 3,
                              align_options=plain.match_options)
    for k, v in arrays.to_torch_state_dict().items():
        torch.testing.assert_close(v, expected[k])


def test_regmean_settings_are_checked_and_fedavg_gets_the_merging_strategy(train_reply):
    from simulations.config import DEFAULTS
    from simulations.server_app import make_strategy
    with pytest.raises(ValueError, match="average='regmean' needs model="):
        C2M3(spec=MLP(widths=(8,)).permutation_spec(), average="regmean")
    base = {**DEFAULTS, "strategy": "fedavg", "model-kwargs": '{"widths": [16]}', "average": "regmean"}
    strategy = make_strategy(base)
    assert type(strategy) is MergingStrategy and strategy.align is None and strategy.average == "regmean"
    models, xs = _models(2), _inputs(2)
    strategy = MergingStrategy(model=models[0], device="cpu", average="regmean")
    replies = [train_reply(i + 1, m, {frm.GRAMS_KEY: frm.client_grams(m, x)}, len(x))
               for i, (m, x) in enumerate(zip(models, xs))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected = fedmerge.merge([m.state_dict() for m in models], align=None, model=models[0], weights=[40, 50],
                              average="regmean", average_options={"model_inputs": xs})
    for k, v in arrays.to_torch_state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-4, atol=1e-4)
