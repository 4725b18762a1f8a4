"""The run configuration of the simulations: every default, its typed client part, and how it is loaded.

:data:`DEFAULTS` is the single source of every default.  ``simulations/run.py`` takes its flag
defaults from it, the ServerApp starts from it (:func:`load_config`), the ClientApp fills missing
keys of a message's ConfigRecord from it (:class:`ClientConfig`), and ``[tool.flwr.app.config]``
in ``pyproject.toml`` (which cannot import Python) repeats it, checked value by value by
``tests/test_config.py``.  Keys are hyphenated, as Flower's run configs are.

How configuration reaches the ServerApp
---------------------------------------
``flwr.simulation.run_simulation`` leaves ``context.run_config`` empty, so ``simulations/run.py``
puts the whole configuration, as JSON, in the environment variable :data:`CONFIG_ENV` before it
calls ``run_simulation``; the ServerApp runs in a thread of that same process and reads it in
:func:`load_config`.  Keys found in ``context.run_config`` (``flwr run`` fills it from
``[tool.flwr.app.config]`` and ``--run-config``) are read too; the environment wins.

How configuration reaches a client
----------------------------------
Everything a client needs travels in the ``"config"`` ConfigRecord of every train/evaluate message,
built on the server by :func:`config_record` from the :data:`CLIENT_DEFAULTS` keys.  Nothing is
read from ``context.run_config`` nor from module globals, so a client behaves the same in any Ray
worker process.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from flwr.app import ConfigRecord

from fedmerge import AVERAGERS
from strategies.federated_repair import REPAIR_MODES

if TYPE_CHECKING:
    from flwr.app import Context

__all__ = ["CLIENT_DEFAULTS", "CLIENT_EVAL_MODES", "CONFIG_ENV", "DEFAULTS", "INIT_MODES", "RESOURCE_DEFAULTS",
           "SERVER_DEFAULTS", "ClientConfig", "config_record", "default_out", "load_config"]

#: Environment variable holding the run configuration (JSON object), set by simulations/run.py.
CONFIG_ENV = "FEDMERGE_SIM_CONFIG"

INIT_MODES = ("shared", "independent")
CLIENT_EVAL_MODES = ("holdout", "test")

#: Keys of the ConfigRecord sent to the clients with every message, and their defaults.
CLIENT_DEFAULTS: dict[str, Any] = {
    "dataset": "mnist",
    "data-dir": "",               # "" = none (only MNIST is bundled)
    "model": "mlp",
    "model-kwargs": "{}",         # JSON object, passed to fedmerge.models.build_model
    "partition": "iid",
    "alpha": 0.5,                 # Dirichlet concentration (partition "dirichlet")
    # The number of nodes the server waits for (up to node-wait seconds; then it runs with those
    # connected, at least min-clients).  A client splits the data by its node config's
    # num-partitions (the Simulation Engine sets it to the number of simulated nodes).
    "num-clients": 20,
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
    # Torch threads per client process (0 = leave torch's default, one per core).  1 matches the
    # default of one Ray CPU per client; run.py sets it to its --cpus-per-client.
    "threads": 1,
    # REPAIR of the merged model (strategies.federated_repair): "federated" makes every client send
    # per-unit activation sums with its update and answer the repair query; "server" repairs on
    # repair-samples training samples held by the server; "none" does neither.
    "repair": "none",
    # fedmerge.merge's averaging stage: "mean", "spherical" (SLERP / Karcher) or "regmean" (least
    # squares on the clients' layer inputs: every client sends its Gram matrices with its update).
    "average": "mean",
}

#: Keys only the ServerApp reads, and their defaults.
SERVER_DEFAULTS: dict[str, Any] = {
    "strategy": "c2m3",           # the main command's; "fedavg" is the baseline to compare with
    "num-rounds": 3,
    "fraction": 1.0,              # fraction of clients sampled for training each round
    "fraction-evaluate": 1.0,     # fraction of clients asked to evaluate the global model each round
    "max-iter": 0,                # matching iterations per round (0: the strategy's default)
    "out": "",                    # output directory; "" = runs/<strategy>-<dataset>-<model>-<time>
    "progress": True,             # tqdm bars over rounds and over the replies of each round
    "stop-on-failure": False,     # True: the first failed or malformed client reply stops the run
    "round-timeout": 3600.0,      # seconds to wait for the replies of one round
    # Seconds to wait for num-clients nodes to connect before round 1 (and, in later rounds, for
    # min-clients); then the run goes on with the nodes connected, or stops if fewer than min-clients.
    "node-wait": 60.0,
    "min-clients": 2,             # fewest connected nodes to run with (capped at num-clients)
    "repair-samples": 1000,       # repair "server": calibration samples drawn (seeded) from the training set
}

#: Every key of the run configuration (``[tool.flwr.app.config]`` holds exactly these).
DEFAULTS: dict[str, Any] = {**CLIENT_DEFAULTS, **SERVER_DEFAULTS}

#: Ray settings of simulations/run.py: the resources of one client actor (``flwr run`` takes them
#: from the federation config instead: ``client-resources-num-cpus``/``-num-gpus``; Flower's default
#: of 2 CPUs would run one client at a time on a 2-core machine), the cluster to connect to
#: (``ray-address``; "" = start a private Ray instance) and the CPUs/GPUs declared to that private
#: instance (``ray-num-cpus``/``-num-gpus``, Flower's ``init-args-num-cpus``/``-num-gpus``; 0 = detect).
RESOURCE_DEFAULTS: dict[str, Any] = {"cpus-per-client": 1.0, "gpus-per-client": 0.0,
                                     "ray-address": "", "ray-num-cpus": 0, "ray-num-gpus": 0}


def default_out(config: Mapping[str, Any], root: str | os.PathLike = "runs") -> Path:
    """``<root>/<strategy>-<dataset>-<model>-<time>``: the output directory when ``out`` is ``""``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{config['strategy']}-{config['dataset']}-{config['model']}-{stamp}"


def load_config(context: Context | None = None) -> dict[str, Any]:
    """:data:`DEFAULTS`, then ``context.run_config``, then the JSON in ``$FEDMERGE_SIM_CONFIG``."""
    config: dict[str, Any] = dict(DEFAULTS)
    if context is not None and context.run_config:
        config.update(dict(context.run_config))
    raw = os.environ.get(CONFIG_ENV)
    if raw:
        try:
            env = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"${CONFIG_ENV} is not valid JSON: {exc}") from None
        if not isinstance(env, dict):
            raise ValueError(f"${CONFIG_ENV} must hold a JSON object")
        config.update(env)
    if int(config.get("num-clients", 0)) < 1:
        raise ValueError("the configuration must give num-clients >= 1")
    if not config.get("out"):
        config["out"] = str(default_out(config))
    return config


@dataclass(frozen=True)
class ClientConfig:
    """The typed, hashable form of a client ConfigRecord (see :data:`CLIENT_DEFAULTS`)."""

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
    repair: str
    average: str

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ClientConfig":
        """Build from a ConfigRecord or dict with hyphenated keys; missing keys take :data:`CLIENT_DEFAULTS`.

        Other keys (server settings) are ignored.
        """
        merged = {**CLIENT_DEFAULTS, **{k: v for k, v in values.items() if k in CLIENT_DEFAULTS}}
        kwargs = {}
        for key, default in CLIENT_DEFAULTS.items():
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
        if self.repair not in REPAIR_MODES:
            raise ValueError(f"unknown repair {self.repair!r}; choose one of {', '.join(REPAIR_MODES)}")
        if self.average not in AVERAGERS:
            raise ValueError(f"unknown average {self.average!r}; choose one of {', '.join(AVERAGERS)}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout-fraction must lie in [0, 1), got {self.holdout_fraction}")
        if self.client_eval == "holdout" and self.holdout_fraction == 0.0:
            raise ValueError("client-eval 'holdout' needs holdout-fraction > 0 (or use client-eval 'test')")
        kwargs = json.loads(self.model_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError(f"model-kwargs must be a JSON object, got {self.model_kwargs!r}")

    def kwargs(self) -> dict[str, Any]:
        """The model's constructor arguments (``model-kwargs``, decoded)."""
        return json.loads(self.model_kwargs)

    def as_dict(self) -> dict[str, Any]:
        """Hyphenated keys, as in the ConfigRecord."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


def config_record(values: Mapping[str, Any]) -> ConfigRecord:
    """The ConfigRecord sent with every train/evaluate message: the client keys of ``values``.

    ``values`` may hold other keys too (server settings); only :data:`CLIENT_DEFAULTS`' keys are
    sent.  Values are checked by :class:`ClientConfig` first, so a bad setting fails on the server.
    """
    return ConfigRecord(ClientConfig.from_mapping(values).as_dict())
