"""The learning task both apps share: the configured model, the data subsets and partitions, the seeds.

The ServerApp builds the global model and evaluates it on the test samples in use; the ClientApp
trains and evaluates on its partition; ``simulations/run.py`` checks the partitions before Ray
starts, and the round-time benchmark repeats the clients' work in a plain loop.  All of them call
these functions, so they agree on which samples, partitions and seeds a configuration means.

Partitions and client data are ``functools.lru_cache``-d on the settings that determine them: the
Simulation Engine ships the ClientApp and the node's Context to a Ray actor for *every* message,
and one actor serves many partition ids in turn, so they are computed once per process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fedmerge.data import dataset_spec, load_dataset
from fedmerge.models import build_model
from fedmerge.partition import partition
from fedmerge.training import resolve_device

from .config import ClientConfig

__all__ = ["ClientData", "build_global_model", "client_data", "client_partitions", "client_test_shares", "device_of",
           "independent_init_seed", "server_test_set", "train_seed", "used_test_indices", "used_train_indices"]


def build_global_model(cfg: ClientConfig, *, seed: int | None = None) -> torch.nn.Module:
    """The configured zoo model, initialised from ``seed`` (``None``: ``cfg.seed``) without touching the global RNG."""
    spec = dataset_spec(cfg.dataset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed if seed is None else int(seed))
        return build_model(cfg.model, input_shape=spec.input_shape, num_classes=spec.num_classes, **cfg.kwargs())


def device_of(cfg: ClientConfig) -> torch.device:
    """The configured torch device (``"auto"``: CUDA when available)."""
    return resolve_device(None if cfg.device == "auto" else cfg.device)


def independent_init_seed(seed: int, partition_id: int) -> int:
    """Seed of client ``partition_id``'s own initial model under ``init "independent"``.

    Distinct per client and from the global model's seed (``seed``), so that the round-1 models
    are as unrelated as the independently trained models that one-shot merging papers merge.
    """
    return (seed * 100_003 + 1 + partition_id) % (2**63)


def train_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Seed of client ``partition_id``'s local training in round ``server_round``."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**63)


# --------------------------------------------------------------------------- data


def _data_dir(cfg_data_dir: str) -> str | None:
    return cfg_data_dir or None


def _subset(n: int, limit: int, seed: int) -> torch.Tensor | None:
    """Sorted indices of a seeded random subset of ``limit`` of ``n`` samples (``None``: all)."""
    if limit <= 0 or limit >= n:
        return None
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:limit].sort().values


def used_train_indices(dataset: str, data_dir: str, max_train_samples: int, seed: int) -> torch.Tensor | None:
    """Indices of the training samples in use (``None``: all of them)."""
    n = len(load_dataset(dataset, data_dir=_data_dir(data_dir), train=True))
    return _subset(n, max_train_samples, seed)


def used_test_indices(dataset: str, data_dir: str, max_test_samples: int, seed: int) -> torch.Tensor | None:
    """Indices of the test samples in use (``None``: all of them); the server evaluates on the same ones."""
    n = len(load_dataset(dataset, data_dir=_data_dir(data_dir), train=False))
    return _subset(n, max_test_samples, seed + 1)


@functools.lru_cache(maxsize=16)
def client_partitions(dataset: str, data_dir: str, max_train_samples: int, method: str, alpha: float,
                      num_clients: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Every client's indices into the full training set (computed once per process and setting)."""
    ds = load_dataset(dataset, data_dir=_data_dir(data_dir), train=True)
    used = used_train_indices(dataset, data_dir, max_train_samples, seed)
    labels = ds.labels if used is None else ds.labels[used]
    parts = partition(labels, num_clients, method, alpha=alpha, seed=seed)
    return tuple(parts if used is None else [used[p] for p in parts])


@functools.lru_cache(maxsize=16)
def client_test_shares(dataset: str, data_dir: str, max_test_samples: int, num_clients: int,
                       seed: int) -> tuple[torch.Tensor, ...]:
    """The test set (or its subset) cut IID into one share per client."""
    ds = load_dataset(dataset, data_dir=_data_dir(data_dir), train=False)
    used = used_test_indices(dataset, data_dir, max_test_samples, seed)
    labels = ds.labels if used is None else ds.labels[used]
    parts = partition(labels, num_clients, "iid", seed=seed)
    return tuple(parts if used is None else [used[p] for p in parts])


@dataclass(frozen=True)
class ClientData:
    """One client's training samples and the samples it evaluates the global model on."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor


@functools.lru_cache(maxsize=256)
def client_data(cfg: ClientConfig, partition_id: int, num_clients: int) -> ClientData:
    """Client ``partition_id``'s training data and evaluation data, cached per process."""
    parts = client_partitions(cfg.dataset, cfg.data_dir, cfg.max_train_samples, cfg.partition, cfg.alpha,
                              num_clients, cfg.seed)
    idx = parts[partition_id]
    n_hold = int(round(len(idx) * cfg.holdout_fraction))
    if cfg.holdout_fraction > 0 and n_hold == 0 and len(idx) > 1:
        n_hold = 1
    if n_hold >= len(idx):
        raise ValueError(f"client {partition_id} has only {len(idx)} samples: nothing left to train on "
                         f"after holding out {cfg.holdout_fraction:.0%}")
    g = torch.Generator().manual_seed(cfg.seed * 7919 + partition_id)
    order = idx[torch.randperm(len(idx), generator=g)]
    hold, keep = order[:n_hold].sort().values, order[n_hold:].sort().values
    train_set = load_dataset(cfg.dataset, data_dir=_data_dir(cfg.data_dir), train=True)
    if cfg.client_eval == "holdout":
        eval_images, eval_labels = train_set.images[hold], train_set.labels[hold]
    else:
        test_set = load_dataset(cfg.dataset, data_dir=_data_dir(cfg.data_dir), train=False)
        share = client_test_shares(cfg.dataset, cfg.data_dir, cfg.max_test_samples, num_clients, cfg.seed)[partition_id]
        eval_images, eval_labels = test_set.images[share], test_set.labels[share]
    return ClientData(train_set.images[keep], train_set.labels[keep], eval_images, eval_labels)


def server_test_set(cfg: ClientConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of the test samples in use: what the server evaluates the global model on."""
    test = load_dataset(cfg.dataset, data_dir=_data_dir(cfg.data_dir), train=False)
    idx = used_test_indices(cfg.dataset, cfg.data_dir, cfg.max_test_samples, cfg.seed)
    return (test.images, test.labels) if idx is None else (test.images[idx], test.labels[idx])
