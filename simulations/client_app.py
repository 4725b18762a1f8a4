"""The Flower ClientApp of the fedmerge simulations (Message API, Flower >= 1.41).

Each simulated client trains the global model it receives on its own share of the training set
and answers with the trained weights, or evaluates the global model on its held-out data.

How configuration reaches a client
----------------------------------
Everything a client needs (dataset, model, partitioning, local training settings) travels in the
``"config"`` :class:`~flwr.app.ConfigRecord` of every train/evaluate message, built on the server
by :func:`config_record`.  Nothing is read from ``context.run_config`` (``run_simulation`` leaves
it empty) nor from module globals, so the app behaves the same in any Ray worker process.  The
client's identity comes from the node config that the Simulation Engine fills in:
``context.node_config["partition-id"]`` and ``["num-partitions"]``.

Data is loaded lazily, once per worker process: the Simulation Engine ships this ClientApp and
the node's Context to a Ray actor for *every* message, so nothing heavy may live in a closure.
:func:`_partitions` and :func:`_client_data` are ``functools.lru_cache``-d on the settings that
determine them (an actor serves many partition ids in turn, so both are cached per process).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmerge.data import dataset_spec, load_dataset
from fedmerge.models import build_model
from fedmerge.partition import partition
from fedmerge.training import evaluate, resolve_device, train

__all__ = [
    "ARRAYS_KEY", "CONFIG_KEY", "CLIENT_EVAL_MODES", "DEFAULTS", "INIT_MODES", "METRICS_KEY", "PARTITION_QUERY",
    "ClientConfig", "ClientData", "app", "build_global_model", "config_record", "used_test_indices",
]

#: Record keys: the same as Flower's FedAvg uses (``arrayrecord_key``/``configrecord_key``).
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"

INIT_MODES = ("shared", "independent")
CLIENT_EVAL_MODES = ("holdout", "test")

#: Defaults of every key of the client ConfigRecord (hyphenated, as Flower's run configs are).
DEFAULTS: dict[str, Any] = {
    "dataset": "mnist",
    "data-dir": "",               # "" = none (only MNIST is bundled)
    "model": "mlp",
    "model-kwargs": "{}",         # JSON object, passed to fedmerge.models.build_model
    "partition": "iid",
    "alpha": 0.5,                 # Dirichlet concentration (partition "dirichlet")
    "num-clients": 0,             # 0 = take context.node_config["num-partitions"]
    "seed": 0,
    "local-epochs": 1,
    "batch-size": 64,
    "lr": 0.05,
    "momentum": 0.9,
    "init": "independent",        # round 1 from each client's own init ("shared": from the global model)
    "max-train-samples": 0,       # 0 = the whole training set (else a seeded random subset)
    "max-test-samples": 0,        # 0 = the whole test set (else a seeded random subset)
    "holdout-fraction": 0.1,      # share of each client's partition kept for client evaluation
    "client-eval": "holdout",     # evaluate handler: the client's held-out share or its test share
    "device": "auto",             # "auto" = cuda if available, else cpu
    "threads": 0,                 # torch threads in the client process (0 = leave as is)
}


@dataclass(frozen=True)
class ClientConfig:
    """The typed, hashable form of a client ConfigRecord (see :data:`DEFAULTS`)."""

    dataset: str
    data_dir: str
    model: str
    model_kwargs: str
    partition: str
    alpha: float
    num_clients: int
    seed: int
    local_epochs: int
    batch_size: int
    lr: float
    momentum: float
    init: str
    max_train_samples: int
    max_test_samples: int
    holdout_fraction: float
    client_eval: str
    device: str
    threads: int

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ClientConfig":
        """Build from a ConfigRecord or dict with hyphenated keys; missing keys take :data:`DEFAULTS`."""
        merged = {**DEFAULTS, **{k: v for k, v in values.items() if k in DEFAULTS}}
        kwargs = {}
        for key, default in DEFAULTS.items():
            value = merged[key]
            try:
                kwargs[key.replace("-", "_")] = type(default)(value)
            except (TypeError, ValueError):
                raise ValueError(f"config key {key!r}: cannot read {value!r} as {type(default).__name__}") from None
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.init not in INIT_MODES:
            raise ValueError(f"unknown init mode {self.init!r}; choose one of {', '.join(INIT_MODES)}")
        if self.client_eval not in CLIENT_EVAL_MODES:
            raise ValueError(f"unknown client-eval {self.client_eval!r}; choose one of {', '.join(CLIENT_EVAL_MODES)}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout-fraction must lie in [0, 1), got {self.holdout_fraction}")
        if self.client_eval == "holdout" and self.holdout_fraction == 0.0:
            raise ValueError("client-eval 'holdout' needs holdout-fraction > 0 (or use client-eval 'test')")
        kwargs = json.loads(self.model_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError(f"model-kwargs must be a JSON object, got {self.model_kwargs!r}")

    def kwargs(self) -> dict[str, Any]:
        return json.loads(self.model_kwargs)

    def as_dict(self) -> dict[str, Any]:
        """Hyphenated keys, as in the ConfigRecord."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


def config_record(values: Mapping[str, Any]) -> ConfigRecord:
    """The ConfigRecord sent with every train/evaluate message: the client keys of ``values``.

    ``values`` may hold other keys too (server settings); only :data:`DEFAULTS`' keys are sent.
    Values are checked by :class:`ClientConfig` first, so a bad setting fails on the server.
    """
    cfg = ClientConfig.from_mapping(values)
    return ConfigRecord(cfg.as_dict())


# ------------------------------------------------------------------------- models


def build_global_model(cfg: ClientConfig, *, seed: int | None = None) -> torch.nn.Module:
    """The configured zoo model, initialised from ``seed`` (``None``: ``cfg.seed``) without touching the global RNG."""
    spec = dataset_spec(cfg.dataset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed if seed is None else int(seed))
        return build_model(cfg.model, input_shape=spec.input_shape, num_classes=spec.num_classes, **cfg.kwargs())


def _device(cfg: ClientConfig) -> torch.device:
    return resolve_device(None if cfg.device == "auto" else cfg.device)


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
def _partitions(dataset: str, data_dir: str, max_train_samples: int, method: str, alpha: float,
                num_clients: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Every client's indices into the full training set (computed once per process and setting)."""
    ds = load_dataset(dataset, data_dir=_data_dir(data_dir), train=True)
    used = used_train_indices(dataset, data_dir, max_train_samples, seed)
    labels = ds.labels if used is None else ds.labels[used]
    parts = partition(labels, num_clients, method, alpha=alpha, seed=seed)
    return tuple(parts if used is None else [used[p] for p in parts])


@functools.lru_cache(maxsize=16)
def _test_shares(dataset: str, data_dir: str, max_test_samples: int, num_clients: int,
                 seed: int) -> tuple[torch.Tensor, ...]:
    """The test set (or its subset) cut IID into one share per client."""
    ds = load_dataset(dataset, data_dir=_data_dir(data_dir), train=False)
    used = used_test_indices(dataset, data_dir, max_test_samples, seed)
    labels = ds.labels if used is None else ds.labels[used]
    parts = partition(labels, num_clients, "iid", seed=seed)
    return tuple(parts if used is None else [used[p] for p in parts])


@dataclass(frozen=True)
class ClientData:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor


@functools.lru_cache(maxsize=256)
def _client_data(cfg: ClientConfig, partition_id: int, num_clients: int) -> ClientData:
    """Client ``partition_id``'s training data and evaluation data, cached per process."""
    parts = _partitions(cfg.dataset, cfg.data_dir, cfg.max_train_samples, cfg.partition, cfg.alpha,
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
        share = _test_shares(cfg.dataset, cfg.data_dir, cfg.max_test_samples, num_clients, cfg.seed)[partition_id]
        eval_images, eval_labels = test_set.images[share], test_set.labels[share]
    return ClientData(train_set.images[keep], train_set.labels[keep], eval_images, eval_labels)


# ---------------------------------------------------------------------- handlers


def _read(msg: Message, context: Context) -> tuple[ClientConfig, int, int, int]:
    """(config, partition id, number of partitions, server round) of an incoming message."""
    record = msg.content.config_records.get(CONFIG_KEY)
    if record is None:
        raise ValueError(f"message carries no {CONFIG_KEY!r} ConfigRecord")
    cfg = ClientConfig.from_mapping(record)
    partition_id = int(context.node_config["partition-id"])
    num_clients = int(context.node_config["num-partitions"])
    if cfg.num_clients and cfg.num_clients != num_clients:
        raise ValueError(f"config says {cfg.num_clients} clients but the simulation has {num_clients} nodes")
    if cfg.threads > 0 and torch.get_num_threads() != cfg.threads:
        torch.set_num_threads(cfg.threads)
    return cfg, partition_id, num_clients, int(record.get("server-round", 0))


def _load_model(msg: Message, cfg: ClientConfig) -> torch.nn.Module:
    arrays = msg.content.array_records.get(ARRAYS_KEY)
    if arrays is None:
        raise ValueError(f"message carries no {ARRAYS_KEY!r} ArrayRecord")
    model = build_global_model(cfg)
    model.load_state_dict(arrays.to_torch_state_dict())  # converted once: every call copies
    return model


def independent_init_seed(seed: int, partition_id: int) -> int:
    """Seed of client ``partition_id``'s own initial model under ``init "independent"``.

    Distinct per client and from the global model's seed (``seed``), so that the round-1 models
    are as unrelated as the independently trained models that one-shot merging papers merge.
    """
    return (seed * 100_003 + 1 + partition_id) % (2**63)


def _train_seed(seed: int, server_round: int, partition_id: int) -> int:
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**63)


app = ClientApp()


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received global model on this client's partition; reply weights + metrics.

    Under ``init "independent"`` the first round trains the client's own random init instead
    (:func:`independent_init_seed`); later rounds start from the global model as usual.

    The MetricRecord holds ``train_loss``, ``train_accuracy``, ``num-examples`` (FedAvg's weight)
    and ``partition-id`` (the server sorts replies by it and drops it from aggregated metrics).
    """
    cfg, pid, num_clients, server_round = _read(msg, context)
    if cfg.init == "independent" and server_round <= 1:
        # one-shot merging setting: round 1 starts from the client's own init, not the global model
        model = build_global_model(cfg, seed=independent_init_seed(cfg.seed, pid))
    else:
        model = _load_model(msg, cfg)
    data = _client_data(cfg, pid, num_clients)
    stats = train(model, data.train_images, data.train_labels, epochs=cfg.local_epochs,
                  batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                  seed=_train_seed(cfg.seed, server_round, pid), device=_device(cfg))
    metrics = MetricRecord({
        "train_loss": float(stats["loss"]),
        "train_accuracy": float(stats["accuracy"]),
        "num-examples": int(stats["num_examples"]),
        "partition-id": pid,  # lets the server order replies (and know who sent what)
    })
    content = RecordDict({ARRAYS_KEY: ArrayRecord(model.state_dict()), METRICS_KEY: metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this client's held-out share (or test share)."""
    cfg, pid, num_clients, _ = _read(msg, context)
    model = _load_model(msg, cfg)
    data = _client_data(cfg, pid, num_clients)
    stats = evaluate(model, data.eval_images, data.eval_labels, device=_device(cfg))
    metrics = MetricRecord({
        "eval_loss": float(stats["loss"]),
        "eval_accuracy": float(stats["accuracy"]),
        "num-examples": int(stats["num_examples"]),
        "partition-id": pid,
    })
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=msg)


#: ``message_type`` of the server's question "which partition are you?" (see :func:`partition_handler`).
PARTITION_QUERY = "query.partition"


@app.query("partition")
def partition_handler(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition id.

    Node ids are random in every simulation run; the server asks once, before round 1, when it
    samples a fraction of the clients, so that the same seed samples the same partitions.
    """
    metrics = MetricRecord({"partition-id": int(context.node_config["partition-id"])})
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=msg)
