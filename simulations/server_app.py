"""The Flower ServerApp of the fedmerge simulations (Message API, Flower >= 1.41).

``main`` builds the global model, picks a strategy by name from :data:`STRATEGIES`, runs it with
``strategy.start(...)`` and a centralised ``evaluate_fn`` (the global model on the test set, before
the first round and after every round), and writes into the output directory:

* ``results.json``: the full configuration, one entry per round (test accuracy/loss, aggregated
  client train and evaluate metrics, aggregation and round seconds, replies and failures) and a
  ``final`` section; rewritten after every round, ``"complete": true`` once the run has ended;
* ``tensorboard/``: TensorBoard scalars (``tensorboard --logdir DIR``);
* ``checkpoints/round-{r}.pt``: the global model after round ``r`` (``round-0.pt``: the initial
  model), a dict with ``state_dict`` and what is needed to rebuild the model.

How configuration reaches the ServerApp
---------------------------------------
``flwr.simulation.run_simulation`` leaves ``context.run_config`` empty, so ``simulations/run.py``
puts the whole configuration, as JSON, in the environment variable :data:`CONFIG_ENV` before it
calls ``run_simulation``; the ServerApp runs in a thread of that same process and reads it in
:func:`load_config`.  Keys found in ``context.run_config`` (e.g. from ``flwr run`` and a
``[tool.flwr.app.config]`` table) are read too; the environment wins.  The clients get what
they need from the ConfigRecord of every message (:func:`simulations.client_app.config_record`).

Strategies
----------
:data:`STRATEGIES` is :data:`strategies.STRATEGIES`: Flower's own ``FedAvg`` (the baseline) and the
fedmerge strategies (``git-rebasin``, ``mergemany``, ``c2m3``), which subclass it and merge with
``fedmerge.merge``.  :func:`make_strategy` builds one from the run configuration.

Failed clients
--------------
A client whose reply is an error or malformed is left out of the round and recorded in
``results.json`` (``failures``: round, node, partition, reason); a round without any usable
update keeps the previous global model (``global_model_kept``).  ``stop-on-failure`` turns the
first failure into an error that stops the run instead.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from logging import WARNING
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedmerge.data import load_dataset
from fedmerge.training import evaluate, resolve_device

from strategies import STRATEGIES, MergingStrategy
from strategies.replies import LeftOut, error_reason

from .client_app import PARTITION_QUERY, ClientConfig, build_global_model, config_record, used_test_indices

__all__ = ["CONFIG_ENV", "SERVER_DEFAULTS", "STRATEGIES", "PartitionOrderedGrid", "ReplyProgressGrid", "RunRecorder",
           "app", "ask_partitions", "fedavg_kwargs", "load_config", "make_strategy"]

#: Key of the client's partition id in its reply MetricRecord.
PARTITION_KEY = "partition-id"

#: Environment variable holding the run configuration (JSON object), set by simulations/run.py.
CONFIG_ENV = "FEDMERGE_SIM_CONFIG"

#: Server-side settings (the client-side ones are simulations.client_app.DEFAULTS).
SERVER_DEFAULTS: dict[str, Any] = {
    "strategy": "fedavg",
    "num-rounds": 3,
    "fraction": 1.0,              # fraction of clients sampled for training each round
    "fraction-evaluate": 1.0,     # fraction of clients asked to evaluate the global model each round
    "out": "runs/simulation",
    "progress": True,             # tqdm bar over rounds
    "stop-on-failure": False,     # True: the first failed or malformed client reply stops the run
    "max-iter": 0,                # matching iterations per round (0: the strategy's default)
    "round-timeout": 3600.0,      # seconds to wait for the replies of one round
}



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


def load_config(context: Context | None = None) -> dict[str, Any]:
    """Defaults, then ``context.run_config``, then the JSON in ``$FEDMERGE_SIM_CONFIG``."""
    from .client_app import DEFAULTS

    config: dict[str, Any] = {**DEFAULTS, **SERVER_DEFAULTS}
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
    return config


# ------------------------------------------------------------------------ recording


def _partition_id(msg: Message) -> int | None:
    """The partition id a (non-error) reply of our ClientApp carries, if any."""
    if msg.has_error():
        return None
    for record in msg.content.metric_records.values():
        if PARTITION_KEY in record:
            return int(record[PARTITION_KEY])
    return None


def _left_out(strategy: Strategy, phase: str, server_round: int, replies: list[Message]) -> list[LeftOut]:
    """Who was left out of ``phase`` this round: as the fedmerge strategy judged it, or, for
    Flower's FedAvg (which skips error replies and raises on malformed ones), the error replies."""
    if isinstance(strategy, MergingStrategy):
        record = strategy.left_out if phase == "train" else strategy.left_out_evaluate
        return record.get(server_round, [])
    return [LeftOut(int(m.metadata.src_node_id), error_reason(m)) for m in replies if m.has_error()]


def _json_float(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class RunRecorder:
    """Per-round bookkeeping: centralised evaluation, checkpoints, TensorBoard, results.json, tqdm.

    :meth:`instrument` wraps a strategy instance's ``aggregate_train``/``aggregate_evaluate`` (so it
    works for any subclass that overrides them) to time the aggregation, count failed replies and
    keep the aggregated client metrics; :meth:`evaluate_fn` is given to ``strategy.start``.
    """

    def __init__(self, config: Mapping[str, Any], out_dir: Path, *, device: torch.device | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.config = dict(config)
        self.client_cfg = ClientConfig.from_mapping(config)
        self.out_dir = out_dir
        self.ckpt_dir = out_dir / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.num_rounds = int(config["num-rounds"])
        self.stop_on_failure = bool(config.get("stop-on-failure", False))
        self._partition_of: dict[int, int] = {}  # node id -> partition id, learnt from replies
        self.device = device if device is not None else resolve_device(
            None if self.client_cfg.device == "auto" else self.client_cfg.device)
        cfg = self.client_cfg
        test = load_dataset(cfg.dataset, data_dir=cfg.data_dir or None, train=False)
        idx = used_test_indices(cfg.dataset, cfg.data_dir, cfg.max_test_samples, cfg.seed)
        self.test_images = test.images if idx is None else test.images[idx]
        self.test_labels = test.labels if idx is None else test.labels[idx]
        self.model = build_global_model(cfg)
        self.rounds: dict[int, dict[str, Any]] = {}
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self.t_start = time.perf_counter()
        self._t_last = self.t_start
        self.bar = None
        if config.get("progress", True):
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.num_rounds, desc=f"{config['strategy']} rounds", unit="round")

    # -- strategy hooks -------------------------------------------------------------------

    def _round(self, server_round: int) -> dict[str, Any]:
        return self.rounds.setdefault(server_round, {"round": server_round})

    def _learn_partitions(self, replies: Iterable[Message]) -> list[int]:
        """Remember each replying node's partition; return the partitions that replied, in order."""
        partitions = []
        for msg in replies:
            pid = _partition_id(msg)
            if pid is not None:
                self._partition_of[int(msg.metadata.src_node_id)] = pid
                partitions.append(pid)
        return partitions

    def _record_failures(self, server_round: int, phase: str, left_out: list[LeftOut]) -> None:
        """Keep left-out clients in results.json; raise if ``stop-on-failure`` is set."""
        rec = self._round(server_round)
        rec[f"{phase}_failures"] = len(left_out)
        for item in left_out:
            entry = {"round": server_round, "phase": phase, "node_id": item.node_id,
                     "partition_id": self._partition_of.get(item.node_id), "reason": item.reason}
            rec.setdefault("failures", []).append(entry)
        if left_out and self.stop_on_failure:
            reasons = "; ".join(sorted({item.reason for item in left_out}))
            raise RuntimeError(f"round {server_round}: {len(left_out)} {phase} replies failed "
                               f"(stop-on-failure is set): {reasons}")

    @staticmethod
    def _ordered(replies: Iterable[Message]) -> list[Message]:
        """Replies sorted by the clients' partition ids (failed replies last).

        Replies arrive in completion order; averaging (and any merge that treats model 0 as the
        reference) in a fixed order makes a run reproducible.
        """
        def key(msg: Message) -> tuple[int, int]:
            pid = _partition_id(msg)
            return (1, 0) if msg.has_error() else (0, 0 if pid is None else pid)
        return sorted(replies, key=key)

    @staticmethod
    def _without_partition_id(metrics: MetricRecord | None) -> MetricRecord | None:
        if metrics is not None and PARTITION_KEY in metrics:
            del metrics[PARTITION_KEY]  # a weighted mean of client ids means nothing
        return metrics

    def instrument(self, strategy: Strategy) -> Strategy:
        aggregate_train = strategy.aggregate_train
        aggregate_evaluate = strategy.aggregate_evaluate

        def timed_aggregate_train(server_round: int, replies: Iterable[Message]):
            replies = self._ordered(replies)
            partitions = self._learn_partitions(replies)
            rec = self._round(server_round)
            rec["train_replies"] = len(replies)
            rec["train_partitions"] = partitions
            t0 = time.perf_counter()
            arrays, metrics = aggregate_train(server_round, replies)
            rec["aggregation_seconds"] = time.perf_counter() - t0
            self._record_failures(server_round, "train", _left_out(strategy, "train", server_round, replies))
            metrics = self._without_partition_id(metrics)
            for key, value in (metrics or {}).items():
                rec[key] = value  # a strategy's own aggregation_seconds (measured inside) wins
            if arrays is None:
                rec["global_model_kept"] = True
            return arrays, metrics

        def recorded_aggregate_evaluate(server_round: int, replies: Iterable[Message]):
            replies = self._ordered(replies)
            partitions = self._learn_partitions(replies)
            rec = self._round(server_round)
            rec["evaluate_replies"] = len(replies)
            rec["evaluate_partitions"] = partitions
            metrics = self._without_partition_id(aggregate_evaluate(server_round, replies))
            self._record_failures(server_round, "evaluate", _left_out(strategy, "evaluate", server_round, replies))
            for key, value in (metrics or {}).items():
                rec[f"client_{key}"] = value  # client_eval_loss, client_eval_accuracy
            return metrics

        strategy.aggregate_train = timed_aggregate_train  # type: ignore[method-assign]
        strategy.aggregate_evaluate = recorded_aggregate_evaluate  # type: ignore[method-assign]
        return strategy

    def evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Centralised evaluation of the global model; also checkpoints and logs the round."""
        self.model.load_state_dict(arrays.to_torch_state_dict())  # converted once: every call copies
        stats = evaluate(self.model, self.test_images, self.test_labels, device=self.device)
        now = time.perf_counter()
        rec = self._round(server_round)
        rec["test_accuracy"] = float(stats["accuracy"])
        rec["test_loss"] = float(stats["loss"])
        rec["round_seconds"] = now - self._t_last
        rec["elapsed_seconds"] = now - self.t_start
        self._t_last = now
        cfg = self.client_cfg
        torch.save({
            "round": server_round,
            "strategy": self.config["strategy"],
            "model": cfg.model,
            "model_kwargs": cfg.kwargs(),
            "dataset": cfg.dataset,
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "test_accuracy": rec["test_accuracy"],
            "test_loss": rec["test_loss"],
        }, self.ckpt_dir / f"round-{server_round}.pt")
        scalars = {
            "test/accuracy": rec.get("test_accuracy"),
            "test/loss": rec.get("test_loss"),
            "train/loss": rec.get("train_loss"),
            "train/accuracy": rec.get("train_accuracy"),
            "client_eval/loss": rec.get("client_eval_loss"),
            "client_eval/accuracy": rec.get("client_eval_accuracy"),
            "time/aggregation_seconds": rec.get("aggregation_seconds"),
            "time/round_seconds": rec.get("round_seconds") if server_round > 0 else None,
            "match/objective": rec.get("match_objective"),
            "match/iterations": rec.get("match_iterations"),
            "match/cycle_error": rec.get("match_cycle_error"),
            "match/seconds": rec.get("match_seconds"),
            "clients/merged": rec.get("clients_merged"),
            "clients/train_failures": rec.get("train_failures"),
        }
        for tag, value in scalars.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(tag, value, server_round)
        self.writer.flush()
        if server_round > 0 and self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(test_acc=f"{rec['test_accuracy']:.4f}")
        self.write_results(complete=False)
        return MetricRecord({"test_accuracy": rec["test_accuracy"], "test_loss": rec["test_loss"]})

    # -- outputs --------------------------------------------------------------------------

    def results(self, *, complete: bool) -> dict[str, Any]:
        import flwr

        rounds = [{k: _json_float(v) for k, v in self.rounds[r].items()} for r in sorted(self.rounds) if r > 0]
        initial = self.rounds.get(0, {})
        evaluated = [r for r in rounds if r.get("test_accuracy") is not None]
        last = evaluated[-1] if evaluated else {}  # a run stopped mid-round reports its last evaluated model
        return {
            "complete": complete,
            "config": self.config,
            "versions": {"flwr": flwr.__version__, "torch": torch.__version__},
            "device": str(self.device),
            "num_test_samples": int(self.test_labels.shape[0]),
            "initial": {"test_accuracy": initial.get("test_accuracy"), "test_loss": initial.get("test_loss")},
            "rounds": rounds,
            "failures": [f for r in rounds for f in r.get("failures", [])],
            "final": {
                "round": last.get("round", 0),
                "test_accuracy": last.get("test_accuracy"),
                "test_loss": last.get("test_loss"),
                "wall_seconds": time.perf_counter() - self.t_start,
            },
        }

    def write_results(self, *, complete: bool) -> Path:
        path = self.out_dir / "results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results(complete=complete), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.writer.close()


# --------------------------------------------------------------------------- client sampling

class PartitionOrderedGrid:
    """The Grid, listing nodes in partition order and seeding the sampler before each listing.

    Flower's FedAvg samples ``fraction`` of the clients with the module-level ``random.sample``
    over ``grid.get_node_ids()``, and simulated node ids are random in every run: the same
    ``--seed`` would sample different partitions each time.  Handed to ``strategy.start`` in place
    of the Grid, this lists the nodes sorted by partition id and re-seeds ``random`` (from the run
    seed and a call counter) just before each listing, so each round samples the same partitions
    in every run with that seed.  Every other Grid method is the wrapped grid's.
    """

    def __init__(self, grid: Grid, partition_of: Mapping[int, int], seed: int) -> None:
        self._grid = grid
        self._partition_of = dict(partition_of)
        self._seed = int(seed)
        self._calls = 0

    def get_node_ids(self) -> list[int]:
        nodes = sorted(self._grid.get_node_ids(), key=lambda n: (self._partition_of.get(n, math.inf), n))
        self._calls += 1
        random.seed(f"fedmerge-sampling:{self._seed}:{self._calls}")
        return nodes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class ReplyProgressGrid:
    """The Grid, with a progress bar over the replies of each ``send_and_receive``.

    A round's messages go out together and Flower's ``send_and_receive`` returns when the last
    reply is in, so without this nothing moves while clients train (a VGG-9 round takes minutes on
    a CPU).  Same push-then-poll loop and timeout as Flower's own, through the public
    ``push_messages``/``pull_messages``; every other Grid method is the wrapped grid's.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        from tqdm.auto import tqdm

        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else "no"
        waiting = set(self._grid.push_messages(messages))
        del messages
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        with tqdm(total=len(waiting), desc=f"{kind} replies", unit="client", leave=False) as bar:
            while waiting and (timeout is None or time.time() < end):
                pulled = list(self._grid.pull_messages(waiting))
                replies.extend(pulled)
                waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
                bar.update(len(pulled))
                if waiting:
                    time.sleep(getattr(self._grid, "pull_interval", 0.1))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def ask_partitions(grid: Grid, num_clients: int, *, timeout: float) -> dict[int, int]:
    """``{node id: partition id}`` of the connected nodes, asked once with a query message.

    Waits (up to ``timeout``) for ``num_clients`` nodes, as FedAvg does before sampling.  Nodes
    that do not answer (a ClientApp without the ``partition`` query) are missing from the map.
    """
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < num_clients and time.monotonic() < deadline:
        time.sleep(0.5)
    messages = [Message(RecordDict(), dst_node_id=node, message_type=PARTITION_QUERY) for node in nodes]
    partition_of = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        pid = _partition_id(reply)
        if pid is not None:
            partition_of[int(reply.metadata.src_node_id)] = pid
    return partition_of


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
