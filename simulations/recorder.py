"""The results of a run: centralised evaluation, checkpoints, TensorBoard scalars, results.json, tqdm.

:class:`RunRecorder` writes into the output directory:

* ``results.json``: the full configuration, one entry per round (test accuracy/loss, aggregated
  client train and evaluate metrics, aggregation and round seconds, replies and failures) and a
  ``final`` section; rewritten after every round, ``"complete": true`` once the run has ended;
* ``tensorboard/``: TensorBoard scalars (``tensorboard --logdir DIR``);
* ``checkpoints/round-{r}.pt``: the global model after round ``r`` (``round-0.pt``: the initial
  model), a dict with ``state_dict`` and what is needed to rebuild the model.

A client whose reply is an error or malformed is left out of the round and recorded in
``results.json`` (``failures``: round, node, partition, reason); a round without any usable
update keeps the previous global model (``global_model_kept``).  ``stop-on-failure`` turns the
first failure into an error that stops the run instead.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fedmerge.training import evaluate

from strategies import MergingStrategy
from strategies.replies import LeftOut, error_reason

from .config import ClientConfig
from .messages import PARTITION_KEY, partition_id
from .task import build_global_model, device_of, server_test_set

__all__ = ["RunRecorder", "left_out_of"]


def left_out_of(strategy: Strategy, phase: str, server_round: int, replies: list[Message]) -> list[LeftOut]:
    """Who was left out of ``phase`` this round: as the fedmerge strategy judged it, or, for
    Flower's FedAvg (which skips error replies and raises on malformed ones), the error replies."""
    if isinstance(strategy, MergingStrategy):
        record = {"train": strategy.left_out, "evaluate": strategy.left_out_evaluate,
                  "repair": strategy.left_out_repair}[phase]
        return record.get(server_round, [])
    if phase == "repair":
        return []
    return [LeftOut(int(m.metadata.src_node_id), error_reason(m)) for m in replies if m.has_error()]


def _json_float(x: Any) -> Any:
    """``x``, with a non-finite float as ``None`` (strict JSON has no NaN/Infinity)."""
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
        self.device = device if device is not None else device_of(self.client_cfg)
        self.test_images, self.test_labels = server_test_set(self.client_cfg)
        self.model = build_global_model(self.client_cfg)
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
            pid = partition_id(msg)
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
            pid = partition_id(msg)
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
            self._record_failures(server_round, "train", left_out_of(strategy, "train", server_round, replies))
            if getattr(strategy, "repair", "none") == "federated":  # statistics left out of REPAIR
                self._record_failures(server_round, "repair", left_out_of(strategy, "repair", server_round, replies))
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
            self._record_failures(server_round, "evaluate", left_out_of(strategy, "evaluate", server_round, replies))
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
