"""Client partitions are disjoint, cover the data, are reproducible, and refuse empty clients."""

from __future__ import annotations

import pytest
import torch

from fedmerge.partition import partition

LABELS = torch.arange(1000) % 10


def _check_exact_cover(parts, n):
    joined = torch.cat(parts)
    assert joined.numel() == n
    assert torch.equal(joined.sort().values, torch.arange(n))
    assert all(p.numel() > 0 for p in parts)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
def test_parts_are_disjoint_covering_and_deterministic(method):
    parts = partition(LABELS, 20, method, alpha=0.5, seed=3)
    assert len(parts) == 20
    _check_exact_cover(parts, len(LABELS))
    again = partition(LABELS, 20, method, alpha=0.5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = partition(LABELS, 20, method, alpha=0.5, seed=4)
    assert any(not torch.equal(a, b) for a, b in zip(parts, other))


def test_iid_sizes_are_balanced():
    sizes = [p.numel() for p in partition(LABELS, 7, "iid")]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_alpha_controls_label_skew():
    def classes_per_client(alpha):
        parts = partition(LABELS, 10, "dirichlet", alpha=alpha, seed=0)
        return sum(LABELS[p].unique().numel() for p in parts) / len(parts)
    assert classes_per_client(0.05) < 5 < classes_per_client(100.0)


def test_shards_give_each_client_few_labels():
    parts = partition(LABELS, 10, "shards", shards_per_client=2, seed=0)
    assert all(LABELS[p].unique().numel() <= 2 for p in parts)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_clients=2000, method="iid"), "client 1000 would get no data"),
    (dict(num_clients=0, method="iid"), "positive integer"),
    (dict(num_clients=600, method="shards"), "some client would get no data"),
    (dict(num_clients=5, method="dirichlet", alpha=0), "alpha must be a positive number"),
    (dict(num_clients=5, method="zipf"), "unknown partition 'zipf'"),
])
def test_bad_requests_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        partition(LABELS, **kwargs)


def test_dirichlet_that_leaves_a_client_empty_is_refused():
    with pytest.raises(ValueError, match=r"client \d+ would get no data with Dirichlet"):
        partition(torch.zeros(12, dtype=torch.long), 10, "dirichlet", alpha=0.01, seed=0)
