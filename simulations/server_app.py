"""The Flower ServerApp of the fedmerge simulations (Message API, Flower >= 1.41).

``main`` loads the run configuration (:func:`simulations.config.load_config`), builds the global
model, picks a strategy by name from :data:`STRATEGIES`, and runs it with ``strategy.start(...)``,
a :class:`~simulations.recorder.RunRecorder` (centralised evaluation of the global model before
the first round and after every round; results.json, TensorBoard, checkpoints in ``out``) and the
Grid wrapped by :mod:`simulations.grids` (reproducible sampling when ``fraction`` < 1, a progress
bar over the replies).

:data:`STRATEGIES` is :data:`strategies.STRATEGIES`: Flower's own ``FedAvg`` (the baseline) and the
fedmerge strategies (``git-rebasin``, ``mergemany``, ``c2m3``), which subclass it and merge with
``fedmerge.merge``.  :func:`make_strategy` builds one from the run configuration.
"""

from __future__ import annotations

from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from strategies import STRATEGIES, MergingStrategy

from .config import DEFAULTS, ClientConfig, config_record, load_config
from .grids import NodeWaitGrid, PartitionOrderedGrid, ReplyProgressGrid, ask_partitions, wait_for_nodes
from .recorder import RunRecorder
from .task import build_global_model

__all__ = ["STRATEGIES", "app", "fedavg_kwargs", "make_strategy", "min_nodes", "resolve_out", "server_calibration"]


def fedavg_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of Flower's ``FedAvg`` (and its subclasses) from the run configuration.

    Minimums are set so that ``fraction`` means what it says (at least one client per round) and
    the strategy waits for all ``num-clients`` nodes.  FedAvg would wait for them without a limit:
    the ServerApp waits itself, at most ``node-wait`` seconds
    (:func:`simulations.grids.wait_for_nodes`), then lowers ``min_available_nodes`` to
    :func:`min_nodes` and bounds every later wait (:class:`simulations.grids.NodeWaitGrid`).
    """
    return {
        "fraction_train": float(config["fraction"]),
        "fraction_evaluate": float(config["fraction-evaluate"]),
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": int(config["num-clients"]),
    }


def min_nodes(config: Mapping[str, Any]) -> int:
    """The fewest connected nodes a run goes on with: ``min-clients``, capped at ``num-clients`` (>= 1)."""
    return max(1, min(int(config.get("min-clients", DEFAULTS["min-clients"])), int(config["num-clients"])))


def make_strategy(config: Mapping[str, Any]) -> Strategy:
    """The configured strategy: Flower's FedAvg, or a fedmerge strategy given the model's architecture.

    ``fedavg`` with ``average`` other than ``"mean"`` or a ``repair`` is :class:`MergingStrategy`
    without alignment (FedAvg's sampling and rounds, fedmerge's averaging and repair stages).
    """
    name = config["strategy"]
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}") from None
    kwargs = fedavg_kwargs(config)
    average = str(config.get("average", DEFAULTS["average"]))
    repair = ClientConfig.from_mapping(config).repair
    if not issubclass(cls, MergingStrategy) and (average != "mean" or repair != "none"):
        # FedAvg with fedmerge's averaging or repair stage: the merging strategy without alignment
        cls = MergingStrategy
    if issubclass(cls, MergingStrategy):
        kwargs["average"] = average
        cfg = ClientConfig.from_mapping(config)
        kwargs["model"] = build_global_model(cfg)  # zoo models carry their hand-written spec
        kwargs["device"] = cfg.device
        if int(config.get("max-iter", 0)) > 0:
            kwargs["max_iter"] = int(config["max-iter"])
        kwargs["repair"] = cfg.repair
        if cfg.repair == "server":
            kwargs["repair_inputs"] = server_calibration(cfg, int(config["repair-samples"]))
    return cls(**kwargs)


def server_calibration(cfg: ClientConfig, samples: int) -> torch.Tensor:
    """The server's calibration set for ``repair "server"``: ``samples`` training images, drawn with the run seed.

    In a real deployment the server would hold data of its own; the simulation stands it in with
    a seeded sample of the training set.
    """
    from fedmerge.data import load_dataset
    if samples < 1:
        raise ValueError(f"repair-samples must be >= 1 for repair 'server', got {samples}")
    images = load_dataset(cfg.dataset, data_dir=cfg.data_dir or None).images
    g = torch.Generator().manual_seed(int(cfg.seed))
    index = torch.randperm(images.shape[0], generator=g)[:samples]
    return images[index].clone()


def resolve_out(config: Mapping[str, Any]) -> Path:
    """``out`` as an absolute path: ``~`` expanded, a relative path taken from the working directory.

    The working directory is this process's: under ``simulations/run.py`` the one run.py was started
    in (run.py resolves ``--out`` itself), under ``flwr run`` on a SuperLink the directory that the
    SuperLink (which starts the ServerApp's ``flower-superexec``) was started in, on its host.
    """
    return Path(str(config["out"])).expanduser().resolve()


# --------------------------------------------------------------------------- the app

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-rounds`` rounds of the configured strategy and write the outputs."""
    config = load_config(context)
    out_dir = resolve_out(config)
    config["out"] = str(out_dir)  # results.json says where everything went
    out_dir.mkdir(parents=True, exist_ok=True)
    log(INFO, "fedmerge: results, checkpoints and TensorBoard go to %s", out_dir)
    strategy = make_strategy(config)
    client_config = config_record(config)  # validates the client settings here, on the server
    recorder = RunRecorder(config, out_dir)
    try:
        recorder.instrument(strategy)
        # Flower's sampling would wait forever for nodes that never come: bound every wait
        node_wait = float(config["node-wait"])
        nodes = wait_for_nodes(grid, int(config["num-clients"]), min_nodes(config), node_wait)
        grid = NodeWaitGrid(grid, min_nodes(config), node_wait)
        strategy.min_available_nodes = min_nodes(config)  # the wait for num-clients is over
        if float(config["fraction"]) < 1 or float(config["fraction-evaluate"]) < 1:
            # sampled clients: the same seed must sample the same partitions in every run
            num_nodes = len(nodes)
            partition_of = ask_partitions(grid, num_nodes, timeout=float(config["round-timeout"]))
            if len(partition_of) < num_nodes:
                log(WARNING, "only %d of %d clients told their partition id: client sampling is not "
                    "reproducible across runs", len(partition_of), num_nodes)
            grid = PartitionOrderedGrid(grid, partition_of, int(config["seed"]))
        if config.get("progress", True):
            grid = ReplyProgressGrid(grid)  # a bar over the clients' replies inside each round
        initial = ArrayRecord(recorder.model.state_dict())
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=int(config["num-rounds"]),
            timeout=float(config["round-timeout"]),
            # FedAvg writes "server-round" into these records in place: give each its own copy
            train_config=ConfigRecord(dict(client_config)),
            evaluate_config=ConfigRecord(dict(client_config)),
            evaluate_fn=recorder.evaluate_fn,
        )
    except BaseException:
        recorder.write_results(complete=False)  # keep what was measured, failures included
        raise
    else:
        recorder.write_results(complete=True)
        log(INFO, "fedmerge: results in %s", out_dir / "results.json")
    finally:
        recorder.close()
