"""Split a labelled dataset among federated clients: IID, Dirichlet(α) over labels, or label shards.

Every partitioner returns one ``LongTensor`` of sample indices per client.  The parts are
disjoint and together cover the dataset exactly once, and the same ``seed`` gives the same split,
so a simulation is reproducible and every sample is used once.  A split that would leave a client
without data raises ``ValueError`` instead of silently training an empty client.

* ``iid``: a random shuffle cut into near-equal parts.
* ``dirichlet``: for every class, the fraction each client receives is drawn from Dir(α)
  (Hsu et al., 2019; the non-IID setting of FedMA uses α = 0.5).  Small α: each client sees few
  classes; large α: close to IID.
* ``shards``: sort by label, cut into ``num_clients * shards_per_client`` shards and deal them out
  (McMahan et al., 2017), the pathological non-IID split.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["PARTITIONS", "partition", "iid_partition", "dirichlet_partition", "shard_partition"]

PARTITIONS = ("iid", "dirichlet", "shards")


def _labels(labels) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    return arr


def _check_clients(num_clients: int, num_samples: int) -> None:
    if int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients}")
    if num_clients > num_samples:
        raise ValueError(f"{num_clients} clients but only {num_samples} samples: "
                         f"client {num_samples} would get no data")


def _to_tensors(parts: list[np.ndarray]) -> list[torch.Tensor]:
    for c, part in enumerate(parts):
        if len(part) == 0:
            raise ValueError(f"client {c} would get no data; use fewer clients, a larger alpha, or more data")
    return [torch.from_numpy(np.sort(p).astype(np.int64)) for p in parts]


def iid_partition(labels, num_clients: int, *, seed: int = 0) -> list[torch.Tensor]:
    """Shuffle and cut into ``num_clients`` parts whose sizes differ by at most one."""
    y = _labels(labels)
    _check_clients(num_clients, len(y))
    order = np.random.default_rng(seed).permutation(len(y))
    return _to_tensors(np.array_split(order, num_clients))


def dirichlet_partition(labels, num_clients: int, *, alpha: float = 0.5, seed: int = 0,
                        max_tries: int = 100) -> list[torch.Tensor]:
    """Per class, split its samples among clients in Dir(α) proportions.

    Draws are repeated (deterministically, from the same seed) until every client has at least one
    sample; after ``max_tries`` failed draws a ``ValueError`` says which client stays empty.
    """
    y = _labels(labels)
    _check_clients(num_clients, len(y))
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            share = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for c, piece in enumerate(np.split(idx, cuts)):
                parts[c].append(piece)
        merged = [np.concatenate(p) for p in parts]
        if all(len(p) for p in merged):
            return _to_tensors(merged)
    empty = next(c for c, p in enumerate(merged) if len(p) == 0)
    raise ValueError(f"client {empty} would get no data with Dirichlet alpha={alpha} after {max_tries} draws; "
                     "use fewer clients or a larger alpha")


def shard_partition(labels, num_clients: int, *, shards_per_client: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """Sort by label, cut into ``num_clients * shards_per_client`` equal shards, deal them out at random."""
    y = _labels(labels)
    _check_clients(num_clients, len(y))
    if int(shards_per_client) != shards_per_client or shards_per_client < 1:
        raise ValueError(f"shards_per_client must be a positive integer, got {shards_per_client}")
    total = num_clients * shards_per_client
    if total > len(y):
        raise ValueError(f"{total} shards but only {len(y)} samples: some client would get no data")
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(y)), y))  # by label, ties in random order
    shards = np.array_split(order, total)
    dealt = rng.permutation(total)
    parts = [np.concatenate([shards[s] for s in dealt[c::num_clients]]) for c in range(num_clients)]
    return _to_tensors(parts)


def partition(labels, num_clients: int, method: str = "iid", *, alpha: float = 0.5,
              shards_per_client: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """Dispatch to one of :data:`PARTITIONS` by name."""
    if method == "iid":
        return iid_partition(labels, num_clients, seed=seed)
    if method == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha=alpha, seed=seed)
    if method == "shards":
        return shard_partition(labels, num_clients, shards_per_client=shards_per_client, seed=seed)
    raise ValueError(f"unknown partition {method!r}; choose one of {', '.join(PARTITIONS)}")
