"""Tests for fedmerge.training on a small slice of the bundled MNIST."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmerge.data import load_dataset
from fedmerge.training import evaluate, resolve_device, train


@pytest.fixture(scope="module")
def mnist_small():
    tr = load_dataset("mnist")
    te = load_dataset("mnist", train=False)
    return tr.images[:2000], tr.labels[:2000], te.images[:1000], te.labels[:1000]


def _mlp(dropout: float = 0.0, log_softmax: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 10)]
    if log_softmax:
        layers.append(nn.LogSoftmax(dim=1))
    return nn.Sequential(*layers)


def test_one_epoch_beats_chance(mnist_small):
    x, y, xt, yt = mnist_small
    model = _mlp()
    before = evaluate(model, xt, yt, device="cpu")
    stats = train(model, x, y, epochs=1, batch_size=64, lr=0.05, seed=0, device="cpu")
    after = evaluate(model, xt, yt, device="cpu")

    assert stats["num_examples"] == 2000 and stats["steps"] == 32 and stats["epochs"] == 1
    assert len(stats["epoch_losses"]) == 1 and stats["loss"] == stats["epoch_losses"][0]
    assert stats["epoch_accuracies"] == [stats["accuracy"]] and stats["device"] == "cpu"
    assert stats["accuracy"] > 0.5  # measured on the training batches while learning; chance is 0.1
    assert after["accuracy"] > 0.6
    assert after["loss"] < before["loss"]


def test_seed_makes_training_deterministic(mnist_small):
    x, y, _, _ = mnist_small
    x, y = x[:512], y[:512]
    base = _mlp(dropout=0.3)  # dropout: randomness inside the model is seeded too
    a, b, c = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)

    rng_before = torch.get_rng_state()
    ra = train(a, x, y, epochs=2, batch_size=50, seed=123, device="cpu")
    rb = train(b, x, y, epochs=2, batch_size=50, seed=123, device="cpu")
    train(c, x, y, epochs=2, batch_size=50, seed=124, device="cpu")
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched

    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert ra["epoch_losses"] == rb["epoch_losses"]
    assert ra["steps"] == 2 * 11  # ceil(512 / 50) per epoch


def test_evaluate_returns_loss_and_accuracy(mnist_small):
    x, y, xt, yt = mnist_small
    logits_model = _mlp(dropout=0.5)
    train(logits_model, x[:512], y[:512], epochs=1, seed=0, device="cpu")  # better than chance, not perfect
    logprob_model = _mlp(log_softmax=True)  # log_softmax head: same layers, loaded with the same weights
    logprob_model.load_state_dict(logits_model.state_dict())
    logits_model.train()

    r1 = evaluate(logits_model, xt, yt, batch_size=256, device="cpu")
    assert logits_model.training  # mode restored
    # against the definitions, in eval mode (dropout off: a train-mode evaluation would differ)
    with torch.no_grad():
        out = logits_model.eval()(xt)
        logits_model.train()
        noisy = logits_model(xt)
    expected_accuracy = float((out.argmax(1) == yt).double().mean())
    assert r1["num_examples"] == 1000
    assert r1["loss"] == pytest.approx(float(F.cross_entropy(out, yt)), rel=1e-5)
    assert r1["accuracy"] == pytest.approx(expected_accuracy, abs=1e-12)
    assert 0.3 < r1["accuracy"] < 1.0
    assert abs(float(F.cross_entropy(noisy, yt)) - r1["loss"]) > 1e-3

    r2 = evaluate(logprob_model, xt, yt, batch_size=333, device="cpu")
    assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
    assert r2["accuracy"] == r1["accuracy"]


def test_log_softmax_model_trains_like_logits_model(mnist_small):
    x, y, _, _ = mnist_small
    a, b = _mlp(), _mlp(log_softmax=True)
    ra = train(a, x[:256], y[:256], epochs=1, seed=5, device="cpu")
    rb = train(b, x[:256], y[:256], epochs=1, seed=5, device="cpu", progress=True)
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)


def test_input_validation(mnist_small):
    x, y, _, _ = mnist_small
    with pytest.raises(ValueError, match="differ in length"):
        train(_mlp(), x[:10], y[:9], epochs=1, device="cpu")
    with pytest.raises(ValueError, match="1-D class indices"):
        train(_mlp(), x[:10], y[:10, None], epochs=1, device="cpu")
    with pytest.raises(ValueError, match="empty"):
        evaluate(_mlp(), x[:0], y[:0], device="cpu")


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # named devices are taken as given


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_and_evaluate_on_cuda(mnist_small):
    x, y, xt, yt = mnist_small
    model = _mlp()
    stats = train(model, x, y, epochs=1, seed=0)  # device=None -> cuda
    assert stats["device"].startswith("cuda")
    assert next(model.parameters()).is_cuda
    assert evaluate(model, xt, yt)["accuracy"] > 0.6
