"""Fixtures shared by several test modules (module code must not import each other)."""

from __future__ import annotations

import pytest
import torch

from fedmerge.data import load_dataset
from fedmerge.models import MLP
from fedmerge.training import train


@pytest.fixture(scope="session")
def mnist_subset():
    ds = load_dataset("mnist")
    return ds.images[:3000], ds.labels[:3000]


@pytest.fixture(scope="session")
def trained_mlp(mnist_subset):
    """A small MLP really trained on MNIST: its units are distinct, as in the paper's setting."""
    images, labels = mnist_subset
    torch.manual_seed(0)
    model = MLP(widths=(64, 128, 64))
    train(model, images, labels, epochs=1, batch_size=64, lr=0.05, seed=0, device="cpu")
    return model
