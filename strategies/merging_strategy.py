"""The shared base of fedmerge's strategies: Flower's FedAvg with ``fedmerge.merge`` as aggregation.

Sampling, message construction, client evaluation and the round loop (``start``) stay Flower's
``FedAvg``; only the two aggregation hooks change:

* ``aggregate_train`` judges every reply (:mod:`strategies.replies`), leaves out the bad ones with
  the reason logged and kept in :attr:`MergingStrategy.left_out`, and merges the rest with
  ``fedmerge.merge(align=..., weights=<sample counts>)``.  Its MetricRecord carries the clients'
  weighted metrics plus the aggregation time and the matching diagnostics.  A round in which no
  update is usable returns no arrays, so Flower's ``start`` keeps the previous global model: a bad
  round never crashes the run.
* ``aggregate_evaluate`` leaves out malformed evaluation replies the same way instead of raising.

A concrete strategy (one per module) only says which alignment it uses and which options it passes
to :func:`fedmerge.match`.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import Any, Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedmerge import merge
from fedmerge.spec import PermutationSpec
from fedmerge.training import resolve_device

from .replies import LeftOut, split_evaluate_replies, split_train_replies

__all__ = ["MergingStrategy"]


class MergingStrategy(FedAvg):
    """Flower ``FedAvg`` whose server merges client models with ``fedmerge.merge(align=self.align)``.

    Parameters
    ----------
    spec, model:
        The model's symmetry (:class:`fedmerge.spec.PermutationSpec`), or a template ``nn.Module``
        to derive it from (zoo models use their hand-written spec, others are traced).  One of the
        two is required unless ``align`` is ``None``.
    device:
        Where the merge runs: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:0"``...
        The global model always goes back to the clients from CPU memory.
    match_options:
        Keyword options of :func:`fedmerge.match` for this alignment (e.g. ``max_iter``).
    **fedavg_kwargs:
        Flower ``FedAvg``'s own arguments (``fraction_train``, ``min_available_nodes``,
        ``weighted_by_key``...).

    Attributes
    ----------
    left_out, left_out_evaluate:
        ``{server_round: [LeftOut(node_id, reason), ...]}`` for every round with a left-out
        training (evaluation) reply.
    last_result:
        The :class:`fedmerge.matching.MatchResult` of the last merge (``None`` before any).
    """

    #: Alignment passed to ``fedmerge.merge`` (``None``: plain weighted mean).
    align: str | None = None

    def __init__(self, *, spec: PermutationSpec | None = None, model: torch.nn.Module | None = None,
                 device: str | torch.device | None = "auto", match_options: Mapping[str, Any] | None = None,
                 **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        if spec is None and model is not None:
            from fedmerge.tracing import spec_for
            spec = spec_for(model)
        if spec is None and self.align is not None:
            raise ValueError(f"{type(self).__name__} needs the model's symmetry: pass spec=PermutationSpec(...) "
                             "or model=<an nn.Module of the trained architecture>")
        if spec is not None and not isinstance(spec, PermutationSpec):
            raise TypeError(f"spec must be a fedmerge PermutationSpec, got {type(spec).__name__}")
        self.spec = spec
        self.device = resolve_device(None if device in (None, "auto") else device)
        self.match_options: dict[str, Any] = dict(match_options or {})
        self.left_out: dict[int, list[LeftOut]] = {}
        self.left_out_evaluate: dict[int, list[LeftOut]] = {}
        self.last_result = None
        self._global: ArrayRecord | None = None  # the arrays sent in the current round

    def summary(self) -> None:
        super().summary()
        options = ", ".join(f"{k}={v!r}" for k, v in self.match_options.items()) or "defaults"
        log(INFO, "\t└──> Merging: fedmerge.merge(align=%r) on %s, options: %s", self.align, self.device, options)

    # -- hooks -------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's, remembering the global model so that replies can be checked against it."""
        if self._global is None and self.spec is not None:
            # a spec that does not fit the model is a server bug: say so before anyone trains
            self.spec.check_state_dict(arrays.to_torch_state_dict(), name="the initial global model")
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, merge the usable ones with ``fedmerge.merge``, report diagnostics."""
        start = time.perf_counter()
        replies = list(replies)
        reference = self._global.to_torch_state_dict() if self._global is not None else None
        updates, left_out = split_train_replies(replies, reference, weight_key=self.weighted_by_key)
        log(INFO, "aggregate_train: %d of %d replies usable", len(updates), len(replies))
        if left_out:
            self.left_out[server_round] = left_out
            for item in left_out:
                log(WARNING, "round %d: client node %d left out: %s", server_round, item.node_id, item.reason)
        if not updates:
            log(WARNING, "round %d: no usable client update; the global model stays as it was", server_round)
            return None, MetricRecord({"clients_merged": 0, "clients_left_out": len(left_out)})

        state_dicts = [{k: v.to(self.device) for k, v in u.state_dict.items()} for u in updates]
        merged, result = merge(state_dicts, align=self.align, weights=[u.num_examples for u in updates],
                               spec=self.spec, full_output=True, **self.match_options)
        self.last_result = result
        arrays = ArrayRecord({k: v.detach().cpu() for k, v in merged.items()})

        metrics = self._client_metrics(server_round, [u.content for u in updates])
        metrics["clients_merged"] = len(updates)
        metrics["clients_left_out"] = len(left_out)
        if self.align is not None:
            metrics["match_objective"] = float(result.objective)
            metrics["match_iterations"] = int(result.nit)
            metrics["match_converged"] = int(bool(result.converged))
            metrics["match_cycle_error"] = float(result.cycle_error)
            metrics["match_seconds"] = float(result.seconds)
        metrics["aggregation_seconds"] = time.perf_counter() - start
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted client evaluation metrics of the well-formed replies (the others are logged)."""
        usable, left_out = split_evaluate_replies(replies, weight_key=self.weighted_by_key)
        if left_out:
            self.left_out_evaluate[server_round] = left_out
        for item in left_out:
            log(WARNING, "round %d: evaluation reply of node %d left out: %s", server_round, item.node_id,
                item.reason)
        if not usable:
            return None
        return self.evaluate_metrics_aggr_fn([m.content for m in usable], self.weighted_by_key)

    def _client_metrics(self, server_round: int, contents: list) -> MetricRecord:
        """The clients' weighted train metrics; a failure here loses metrics, never the round."""
        try:
            return self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        except Exception as exc:  # noqa: BLE001 - e.g. metric lists of different lengths
            log(WARNING, "round %d: client train metrics not aggregated: %s", server_round, exc)
            return MetricRecord()
