"""The Flower ClientApp of the fedmerge simulations (Message API, Flower >= 1.41).

Each simulated client trains the global model it receives on its own share of the training set
and answers with the trained weights, or evaluates the global model on its held-out data.

Everything a client needs (dataset, model, partitioning, local training settings) travels in the
``"config"`` ConfigRecord of every train/evaluate message (:mod:`simulations.config`).  The
client's identity comes from the node config that the Simulation Engine fills in:
``context.node_config["partition-id"]`` and ``["num-partitions"]``.  Data is loaded lazily, once
per worker process (:mod:`simulations.task`): the Simulation Engine ships this ClientApp and the
node's Context to a Ray actor for *every* message, so nothing heavy may live in a closure.

The device is the configured one if this process can use it (:func:`simulations.task.device_of`):
a client that Ray gave a GPU it cannot use trains on the CPU and logs a warning.  With the
environment variable ``FEDMERGE_CLIENT_TRACE`` set to a directory (it must be set where the Ray
workers start: in the shell of run.py for its private Ray instance, in that of ``ray start`` for a
cluster), every train/evaluate call appends one JSON line to ``<dir>/client-<host>-<pid>.jsonl``:
partition, round, start and end times, the GPUs Ray assigned, ``CUDA_VISIBLE_DEVICES`` and the
device used -- to see how clients were spread over processes and GPUs.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

import dataclasses

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmerge.training import evaluate, train
from strategies import federated_regmean, federated_repair

from .config import ClientConfig
from .messages import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, PARTITION_KEY
from .task import assigned_gpus, build_global_model, client_data, device_of, independent_init_seed, train_seed

__all__ = ["TRACE_ENV", "app", "evaluate_handler", "node_partition", "partition_handler", "repair_handler",
           "train_handler"]

def node_partition(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` of this node's node config, checked.

    The Simulation Engine sets both (``num-partitions``: the number of simulated nodes); a
    SuperNode gets them from ``flower-supernode --node-config "partition-id=0 num-partitions=2"``.
    ``num-partitions`` decides how the data is split; it need not equal the server's
    ``num-clients`` (the number of nodes the server waits for).
    """
    try:
        pid, num = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"the node config must give integers partition-id and num-partitions "
                         f"(flower-supernode --node-config \"partition-id=0 num-partitions=2\"), "
                         f"got {dict(context.node_config)}") from None
    if num < 1 or not 0 <= pid < num:
        raise ValueError(f"node config: partition-id {pid} is out of range for num-partitions {num} "
                         f"(0 <= partition-id < num-partitions)")
    return pid, num


#: Environment variable: a directory where every client call appends a JSON line (see the module doc).
TRACE_ENV = "FEDMERGE_CLIENT_TRACE"


@contextlib.contextmanager
def _traced(handler: str, partition_id: int, server_round: int, device: torch.device) -> Iterator[None]:
    """Append this call's placement and timing to ``$FEDMERGE_CLIENT_TRACE`` (a no-op when unset)."""
    trace_dir = os.environ.get(TRACE_ENV)
    start = time.time()
    try:
        yield
    finally:
        if trace_dir:
            host = socket.gethostname()
            entry = {"handler": handler, "partition-id": partition_id, "round": server_round, "host": host,
                     "pid": os.getpid(), "start": start, "end": time.time(), "gpu-ids": assigned_gpus(),
                     "cuda-visible-devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": str(device)}
            path = Path(trace_dir) / f"client-{host}-{os.getpid()}.jsonl"
            with path.open("a") as f:  # one file per process: no interleaved writes
                f.write(json.dumps(entry) + "\n")


def _read(msg: Message, context: Context) -> tuple[ClientConfig, int, int, int]:
    """(config, partition id, number of partitions, server round) of an incoming message."""
    record = msg.content.config_records.get(CONFIG_KEY)
    if record is None:
        raise ValueError(f"message carries no {CONFIG_KEY!r} ConfigRecord")
    cfg = ClientConfig.from_mapping(record)
    partition_id, num_clients = node_partition(context)
    if context.node_config.get("data-dir"):  # a SuperNode's own data directory wins over the server's
        cfg = dataclasses.replace(cfg, data_dir=str(context.node_config["data-dir"]))
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


app = ClientApp()


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received global model on this client's partition; reply weights + metrics.

    Under ``init "independent"`` the first round trains the client's own random init instead
    (:func:`simulations.task.independent_init_seed`); later rounds start from the global model as usual.

    The MetricRecord holds ``train_loss``, ``train_accuracy``, ``num-examples`` (FedAvg's weight)
    and ``partition-id`` (the server sorts replies by it and drops it from aggregated metrics).
    """
    cfg, pid, num_clients, server_round = _read(msg, context)
    if cfg.init == "independent" and server_round <= 1:
        # one-shot merging setting: round 1 starts from the client's own init, not the global model
        model = build_global_model(cfg, seed=independent_init_seed(cfg.seed, pid))
    else:
        model = _load_model(msg, cfg)
    data = client_data(cfg, pid, num_clients)
    device = device_of(cfg)
    with _traced("train", pid, server_round, device):
        stats = train(model, data.train_images, data.train_labels, epochs=cfg.local_epochs,
                      batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                      seed=train_seed(cfg.seed, server_round, pid), device=device)
    metrics = MetricRecord({
        "train_loss": float(stats["loss"]),
        "train_accuracy": float(stats["accuracy"]),
        "num-examples": int(stats["num_examples"]),
        PARTITION_KEY: pid,  # lets the server order replies (and know who sent what)
    })
    content = RecordDict({ARRAYS_KEY: ArrayRecord(model.state_dict()), METRICS_KEY: metrics})
    if cfg.repair == "federated":  # per-unit sums of this model on this client's data, for REPAIR
        content[federated_repair.STATS_KEY] = federated_repair.client_statistics(model, data.train_images,
                                                                                 device=device)
    if cfg.average == "regmean":  # Gram matrices of this model's layer inputs on this client's data
        content[federated_regmean.GRAMS_KEY] = federated_regmean.client_grams(model, data.train_images,
                                                                              device=device)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this client's held-out share (or test share)."""
    cfg, pid, num_clients, server_round = _read(msg, context)
    model = _load_model(msg, cfg)
    data = client_data(cfg, pid, num_clients)
    device = device_of(cfg)
    with _traced("evaluate", pid, server_round, device):
        stats = evaluate(model, data.eval_images, data.eval_labels, device=device)
    metrics = MetricRecord({
        "eval_loss": float(stats["loss"]),
        "eval_accuracy": float(stats["accuracy"]),
        "num-examples": int(stats["num_examples"]),
        PARTITION_KEY: pid,
    })
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=msg)


@app.query("repair")
def repair_handler(msg: Message, context: Context) -> Message:
    """Federated REPAIR's second half: per-unit sums of the merged model on this client's training data.

    The query carries the merged (not yet repaired) model and the REPAIR targets; the sums are
    taken in one pass with the correction active (:func:`strategies.federated_repair.client_statistics`).
    Only these sums leave the client.
    """
    cfg, pid, num_clients, server_round = _read(msg, context)
    model = _load_model(msg, cfg)
    targets = federated_repair.decode_targets(msg.content.array_records.get(federated_repair.TARGETS_KEY))
    data = client_data(cfg, pid, num_clients)
    device = device_of(cfg)
    with _traced("repair", pid, server_round, device):
        record = federated_repair.client_statistics(model, data.train_images, targets=targets, device=device)
    metrics = MetricRecord({"num-examples": int(data.train_images.shape[0]), PARTITION_KEY: pid})
    return Message(content=RecordDict({federated_repair.STATS_KEY: record, METRICS_KEY: metrics}), reply_to=msg)


@app.query("partition")
def partition_handler(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition id.

    Node ids are random in every simulation run; the server asks once, before round 1, when it
    samples a fraction of the clients, so that the same seed samples the same partitions.
    """
    metrics = MetricRecord({PARTITION_KEY: node_partition(context)[0]})
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=msg)
