"""The learning task both apps share: the configured model, the data subsets and partitions, the seeds.

The ServerApp builds the global model and evaluates it on the test samples in use; the ClientApp
trains and evaluates on its partition; ``simulations/run.py`` checks the partitions before Ray
starts, and the round-time benchmark repeats the clients' work in a plain loop.  All of them call
these functions, so they agree on which samples, partitions and seeds a configuration means.

Partitions and each client's sample indices are ``functools.lru_cache``-d on the settings that
determine them: the Simulation Engine ships the ClientApp and the node's Context to a Ray actor for
*every* message, and one actor serves many partition ids in turn, so they are computed once per
process.  The samples themselves are gathered per message, so that a worker's memory does not grow
with the number of distinct clients it has served.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass

import torch

from fedmerge.data import dataset_spec, load_dataset
from fedmerge.models import build_model
from fedmerge.partition import partition
from fedmerge.training import resolve_device

from .config import ClientConfig

__all__ = ["ClientData", "build_global_model", "client_data", "client_partitions", "client_test_shares", "assigned_gpus",
           "device_of", "independent_init_seed", "server_test_set", "train_seed", "used_test_indices", "used_train_indices"]


def build_global_model(cfg: ClientConfig, *, seed: int | None = None) -> torch.nn.Module:
    """The configured zoo model, initialised from ``seed`` (``None``: ``cfg.seed``) without touching the global RNG."""
    spec = dataset_spec(cfg.dataset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed if seed is None else int(seed))
        return build_model(cfg.model, input_shape=spec.input_shape, num_classes=spec.num_classes, **cfg.kwargs())


def assigned_gpus() -> list[str]:
    """The GPU ids Ray gave this process (a client actor with ``--gpus-per-client`` > 0), else ``[]``.

    Ray sets ``CUDA_VISIBLE_DEVICES`` of every actor to the GPUs it assigned (``""`` when none); in
    a Ray worker ``ray.get_gpu_ids()`` says the same.
    """
    ray = sys.modules.get("ray")  # never import Ray here: the server and the benchmarks use this module too
    if ray is not None:
        try:
            if ray.is_initialized():
                ids = [str(i) for i in ray.get_gpu_ids()]
                if ids:
                    return ids
        except Exception:  # noqa: BLE001 - not a worker, or an old Ray: fall back to the variable
            pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [v.strip() for v in visible.split(",") if v.strip()]


@functools.lru_cache(maxsize=None)
def _usable_device(requested: str, gpus: tuple[str, ...], cuda: bool, count: int) -> torch.device:
    """``requested`` if this process can use it, else a fallback, with one warning per process and case."""
    log = logging.getLogger("flwr")  # its handler reaches the driver's terminal from a Ray actor
    if requested == "auto":
        if not cuda and gpus:
            log.warning("fedmerge client (pid %d): Ray assigned GPU %s (CUDA_VISIBLE_DEVICES=%s) but torch "
                        "cannot use CUDA here (torch.cuda.is_available() is False): training on the CPU",
                        os.getpid(), ",".join(gpus), os.environ.get("CUDA_VISIBLE_DEVICES", ""))
        return resolve_device(None)
    device = torch.device(requested)
    if device.type == "cuda" and not cuda:
        log.warning("fedmerge: device %r is not usable (torch.cuda.is_available() is False%s): using the CPU",
                    requested, f"; Ray assigned GPU {','.join(gpus)}" if gpus else "")
        return torch.device("cpu")
    if device.type == "cuda" and device.index is not None and device.index >= count:
        log.warning("fedmerge: device %r is not usable (this process sees %d CUDA device(s)%s): using cuda:0",
                    requested, count, f", Ray assigned GPU {','.join(gpus)}" if gpus else "")
        return torch.device("cuda", 0)
    return device


def device_of(cfg: ClientConfig) -> torch.device:
    """The torch device to compute on: the configured one (``"auto"``: CUDA when available), if usable.

    Under Ray a client actor sees only the GPUs assigned to it (as ``cuda:0``...).  When the device
    is not usable -- CUDA wanted or GPUs assigned, but ``torch.cuda.is_available()`` is False (a
    CPU-only torch, a broken driver, GPUs only declared to Ray) -- this falls back to the CPU (or to
    ``cuda:0`` for an index beyond the visible GPUs) and logs a warning once per process.
    """
    cuda = torch.cuda.is_available()
    return _usable_device(cfg.device, tuple(assigned_gpus()), cuda, torch.cuda.device_count() if cuda else 0)


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


@functools.lru_cache(maxsize=4096)
def _client_indices(cfg: ClientConfig, partition_id: int, num_clients: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of client ``partition_id``'s training samples and of its evaluation samples (into the
    training set for ``client-eval "holdout"``, else into the test set), cached per process.

    Only indices are cached (8 bytes a sample, at most the dataset's size over all partitions), not
    the gathered images: a worker serving hundreds of sampled clients would otherwise keep a second
    copy of every partition it has seen (``client_data`` gathers them again, a copy of the
    partition's images, each call)."""
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
    if cfg.client_eval == "holdout":
        return keep, hold
    return keep, client_test_shares(cfg.dataset, cfg.data_dir, cfg.max_test_samples, num_clients, cfg.seed)[partition_id]


def client_data(cfg: ClientConfig, partition_id: int, num_clients: int) -> ClientData:
    """Client ``partition_id``'s training data and evaluation data (its indices are cached per process)."""
    keep, eval_idx = _client_indices(cfg, partition_id, num_clients)
    train_set = load_dataset(cfg.dataset, data_dir=_data_dir(cfg.data_dir), train=True)
    eval_set = train_set if cfg.client_eval == "holdout" else load_dataset(
        cfg.dataset, data_dir=_data_dir(cfg.data_dir), train=False)
    return ClientData(train_set.images[keep], train_set.labels[keep], eval_set.images[eval_idx],
                      eval_set.labels[eval_idx])


def server_test_set(cfg: ClientConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of the test samples in use: what the server evaluates the global model on."""
    test = load_dataset(cfg.dataset, data_dir=_data_dir(cfg.data_dir), train=False)
    idx = used_test_indices(cfg.dataset, cfg.data_dir, cfg.max_test_samples, cfg.seed)
    return (test.images, test.labels) if idx is None else (test.images[idx], test.labels[idx])
