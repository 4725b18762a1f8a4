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

from logging import WARNING
from pathlib import Path
from typing import Any, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from strategies import STRATEGIES, MergingStrategy

from .config import ClientConfig, config_record, load_config
from .grids import PartitionOrderedGrid, ReplyProgressGrid, ask_partitions
from .recorder import RunRecorder
from .task import build_global_model

__all__ = ["STRATEGIES", "app", "fedavg_kwargs", "make_strategy"]


def fedavg_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of Flower's ``FedAvg`` (and its subclasses) from the run configuration.

    Minimums are set so that ``fraction`` means what it says (at least one client per round) and
    the run waits until all ``num-clients`` simulated nodes are up.
    """
    num_clients = int(config["num-clients"])
    return {
        "fraction_train": float(config["fraction"]),
        "fraction_evaluate": float(config["fraction-evaluate"]),
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": num_clients,
    }


def make_strategy(config: Mapping[str, Any]) -> Strategy:
    """The configured strategy: Flower's FedAvg, or a fedmerge strategy given the model's architecture."""
    name = config["strategy"]
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}") from None
    kwargs = fedavg_kwargs(config)
    if issubclass(cls, MergingStrategy):
        cfg = ClientConfig.from_mapping(config)
        kwargs["model"] = build_global_model(cfg)  # zoo models carry their hand-written spec
        kwargs["device"] = cfg.device
        if int(config.get("max-iter", 0)) > 0:
            kwargs["max_iter"] = int(config["max-iter"])
    return cls(**kwargs)


# --------------------------------------------------------------------------- the app

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-rounds`` rounds of the configured strategy and write the outputs."""
    config = load_config(context)
    out_dir = Path(str(config["out"])).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    strategy = make_strategy(config)
    client_config = config_record(config)  # validates the client settings here, on the server
    recorder = RunRecorder(config, out_dir)
    try:
        recorder.instrument(strategy)
        if float(config["fraction"]) < 1 or float(config["fraction-evaluate"]) < 1:
            # sampled clients: the same seed must sample the same partitions in every run
            num_clients = int(config["num-clients"])
            partition_of = ask_partitions(grid, num_clients, timeout=float(config["round-timeout"]))
            if len(partition_of) < num_clients:
                log(WARNING, "only %d of %d clients told their partition id: client sampling is not "
                    "reproducible across runs", len(partition_of), num_clients)
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
    finally:
        recorder.close()
