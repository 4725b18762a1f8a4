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

``average="regmean"`` fits every linear and convolutional layer by least squares on the clients'
own layer inputs (RegMean, :mod:`fedmerge.regmean`), from Gram matrices the clients send with
their updates (:mod:`strategies.federated_regmean`).

BatchNorm and rotations: an alignment that searches rotations of units carrying BatchNorm
statistics (the ``orthogonal`` strategy with ``relax=True``, or a group the spec declares
orthogonal) folds every BatchNorm into the layer that produces its input first
(:mod:`fedmerge.batchnorm`), aligns and averages the folded models, and unfolds the merge into
the BatchNorm architecture (``fold_batchnorm=``; the same pipeline as
``fedmerge.batchnorm.merge``).  The running statistics of the new global model are re-estimated
on the server's calibration inputs with ``repair="server"``, and otherwise estimated without
data from the clients' own statistics moved by their maps
(:meth:`fedmerge.batchnorm.BatchNormFolding.merged_statistics`).

``repair`` renormalises the merged model's activations before the round ends (REPAIR,
:mod:`fedmerge.repair`): ``"federated"`` from per-unit sums the clients send, with one extra round
trip (:mod:`strategies.federated_repair`), ``"server"`` on a calibration set the server holds.

A concrete strategy (one per module) only says which alignment it uses and which options it passes
to :func:`fedmerge.match`.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import Any, Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedmerge import AVERAGERS, apply_transform, match, merge
from fedmerge.regmean import InputGram, map_grams, regmean_layers
from fedmerge.repair import find_repair_points, fold_repair
from fedmerge.spec import PermutationSpec
from fedmerge.training import resolve_device

from . import federated_regmean as frm
from . import federated_repair as fr
from .replies import LeftOut, error_reason, split_evaluate_replies, split_train_replies

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
    average:
        The averaging stage of ``fedmerge.merge`` (:data:`fedmerge.AVERAGERS`): ``"mean"``, the
        default; ``"spherical"``: SLERP / Karcher mean; ``"regmean"``: least squares on the
        clients' layer inputs, from the Gram matrices each client sends with its update (its
        ClientApp must send them, see :mod:`strategies.federated_regmean`; needs ``model``).
    repair:
        ``"none"`` (default), ``"federated"`` (the clients send per-unit statistics with their
        updates and answer one repair query per round: their ClientApp must do both, see
        :mod:`strategies.federated_repair`) or ``"server"`` (REPAIR on ``repair_inputs``, a
        calibration set held by the server).  Both need ``model``.
    repair_inputs:
        The server's calibration inputs for ``repair="server"`` (a tensor or an iterable of batches).
    repair_options:
        Options of :func:`fedmerge.repair.repair` for ``repair="server"`` (``target``, ``passes``...).
    fold_batchnorm:
        ``None`` (default): fold BatchNorm into the producing layers exactly when the alignment
        searches rotations of groups that carry BatchNorm statistics (:meth:`rotated_groups`);
        ``True``: always (the model must have a BatchNorm directly after a Linear/Conv);
        ``False``: never (a search over rotations then runs on the unfolded weights, and a
        group declared orthogonal that carries BatchNorm is refused by the aligner).  Needs
        ``model``; not combined with ``average="regmean"``.  The matching diagnostics
        (``match_objective``...) are then those of the folded models.
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
    left_out_repair:
        ``{server_round: [LeftOut, ...]}``: clients whose statistics were not used, and why.
    folding:
        The :class:`fedmerge.batchnorm.BatchNormFolding` the merges go through (``None``: the
        models are merged as they are).
    """

    #: Alignment passed to ``fedmerge.merge`` (``None``: plain weighted mean).
    align: str | None = None

    def __init__(self, *, spec: PermutationSpec | None = None, model: torch.nn.Module | None = None,
                 device: str | torch.device | None = "auto", match_options: Mapping[str, Any] | None = None,
                 average: str = "mean", repair: str = fr.REPAIR_MODES[0], repair_inputs: Any = None,
                 repair_options: Mapping[str, Any] | None = None, fold_batchnorm: bool | None = None,
                 **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        if average not in AVERAGERS:
            raise ValueError(f"unknown average {average!r}; choose one of {', '.join(AVERAGERS)}")
        if repair not in fr.REPAIR_MODES:
            raise ValueError(f"unknown repair {repair!r}; choose one of {', '.join(fr.REPAIR_MODES)}")
        if average == "regmean" and model is None:
            raise ValueError("average='regmean' needs model=<an nn.Module> (it names the layers to fit)")
        if repair != "none" and model is None:
            raise ValueError(f"repair={repair!r} runs the model's forward pass: pass model=<an nn.Module>")
        if repair == "server" and repair_inputs is None:
            raise ValueError("repair='server' needs repair_inputs=<the server's calibration inputs>")
        if repair != "server" and (repair_inputs is not None or repair_options):
            raise ValueError("repair_inputs and repair_options are for repair='server'")
        self._spec_given = spec is not None
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
        self.left_out_repair: dict[int, list[LeftOut]] = {}
        self.last_result = None
        self.model = model
        self.average = average
        self.repair = repair
        self.repair_inputs = repair_inputs
        self.repair_options: dict[str, Any] = dict(repair_options or {})
        self.folding = self._batchnorm_folding(fold_batchnorm)
        self._regmean_dims = frm.layer_dims(model, regmean_layers(model)) if average == "regmean" else {}
        self._repair_points = find_repair_points(model, spec) if repair == "federated" else []
        self._repair_sizes = fr.point_sizes(model, self._repair_points) if self._repair_points else {}
        self._global: ArrayRecord | None = None  # the arrays sent in the current round
        self._grid: Grid | None = None  # kept for the repair query inside aggregate_train
        self._train_config: ConfigRecord | None = None
        self._timeout = 3600.0

    def rotated_groups(self) -> list[str]:
        """The spec's groups that this strategy's alignment searches over rotations (none by default).

        The permutation aligners (Git Re-Basin, MergeMany, C²M³) solve every group over
        permutations; :class:`~strategies.orthogonal.Orthogonal` overrides this.
        """
        return []

    def _batchnorm_folding(self, fold: bool | None):
        """The BatchNorm folding the merges go through, or ``None`` (see ``fold_batchnorm``)."""
        if fold not in (None, True, False):
            raise ValueError(f"fold_batchnorm must be None (automatic), True or False, got {fold!r}")
        if fold is False or self.align is None and fold is None:
            return None
        if fold is None:
            with_bn = [g for g in self.rotated_groups()
                       if any(k.rsplit(".", 1)[-1] == "running_var" for k, _ in self.spec.groups[g])]
            if not with_bn:
                return None
            if self.model is None:
                log(WARNING, "%s searches rotations of groups that carry BatchNorm statistics (%s) but has no "
                    "model= to fold BatchNorm with: the search runs on the unfolded weights", type(self).__name__,
                    ", ".join(with_bn))
                return None
        if self.model is None:
            raise ValueError("fold_batchnorm=True needs model=<the nn.Module> (folding traces its BatchNorm layers)")
        if self.average == "regmean":
            raise ValueError("fold_batchnorm with average='regmean' is not supported: RegMean fits the layers of "
                             "the model the clients' Gram matrices were computed on")
        from fedmerge.batchnorm import fold_batchnorm
        has_own = callable(getattr(self.model, "permutation_spec", None))
        return fold_batchnorm(self.model, self.spec if self._spec_given or has_own else None)

    def summary(self) -> None:
        super().summary()
        options = ", ".join(f"{k}={v!r}" for k, v in self.match_options.items()) or "defaults"
        log(INFO, "\t└──> Merging: fedmerge.merge(align=%r, average=%r) on %s, options: %s, repair: %s",
            self.align, self.average, self.device, options, self.repair)
        if self.folding is not None:
            log(INFO, "\t└──> BatchNorm folded into %d producing layers for the merge, unfolded after",
                len(self.folding.pairs))

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              **kwargs: Any):
        """Flower's ``start``; the round ``timeout`` also bounds the repair query."""
        self._timeout = float(timeout)
        return super().start(grid=grid, initial_arrays=initial_arrays, num_rounds=num_rounds, timeout=timeout,
                             **kwargs)

    # -- hooks -------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's, remembering the global model so that replies can be checked against it."""
        if self._global is None and self.spec is not None:
            # a spec that does not fit the model is a server bug: say so before anyone trains
            self.spec.check_state_dict(arrays.to_torch_state_dict(), name="the initial global model")
        self._global = arrays
        self._grid, self._train_config = grid, config
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, merge the usable ones with ``fedmerge.merge``, report diagnostics."""
        start = time.perf_counter()
        replies = list(replies)
        reference = self._global.to_torch_state_dict() if self._global is not None else None
        updates, left_out = split_train_replies(replies, reference, weight_key=self.weighted_by_key,
                                                extra_records=(fr.STATS_KEY, frm.GRAMS_KEY))
        grams: list | None = None
        if self.average == "regmean":
            updates, grams = self._regmean_grams(server_round, updates, left_out)
        log(INFO, "aggregate_train: %d of %d replies usable", len(updates), len(replies))
        if left_out:
            self.left_out[server_round] = left_out
            for item in left_out:
                log(WARNING, "round %d: client node %d left out: %s", server_round, item.node_id, item.reason)
        if not updates:
            log(WARNING, "round %d: no usable client update; the global model stays as it was", server_round)
            return None, MetricRecord({"clients_merged": 0, "clients_left_out": len(left_out)})

        state_dicts = [{k: v.to(self.device) for k, v in u.state_dict.items()} for u in updates]
        server_repair = {"repair": self.repair_inputs, "repair_options": self.repair_options,
                         "model": self.model} if self.repair == "server" else {}
        weights = [u.num_examples for u in updates]
        if grams:
            merged, result = self._regmean_merge(state_dicts, weights, grams, server_repair)
        elif self.folding is not None:
            merged, result = self._folded_merge(state_dicts, weights)
        else:
            merged, result = merge(state_dicts, align=self.align,
                                   average="mean" if self.average == "regmean" else self.average,
                                   weights=weights, spec=self.spec, full_output=True,
                                   align_options=self.match_options, **server_repair)
        self.last_result = result
        repair_metrics: dict[str, Any] = {}
        if self.repair == "federated":
            transforms = result.transforms or [{} for _ in updates]  # align=None: the models' own space
            merged, repair_metrics = self._federated_repair(server_round, updates, merged, transforms)
        elif self.repair == "server":
            repair_metrics = {"repair_applied": 1, "repair_seconds": float(result.stage_seconds["repair"])}
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
        for key, value in repair_metrics.items():
            metrics[key] = value
        if self.average == "regmean":
            metrics["regmean_applied"] = int(bool(grams))
            metrics["regmean_clients"] = len(grams or [])
            if grams:
                metrics["regmean_grams_bytes_per_client"] = int(max(g[1] for g in grams))
        metrics["aggregation_seconds"] = time.perf_counter() - start
        return arrays, metrics

    def _folded_merge(self, state_dicts: list, weights: list):
        """Fold the clients' BatchNorms, merge the folded models, unfold the merge (``fold_batchnorm``).

        REPAIR on the server's inputs runs on the folded model, whose running statistics are then
        re-estimated on the same inputs; without them the statistics are the clients' own, moved
        by their maps and averaged (a data-free estimate; the eval-mode function is exact either way).
        """
        folding = self.folding
        folded = [folding.fold(sd) for sd in state_dicts]
        server_repair = {"repair": self.repair_inputs, "repair_options": self.repair_options} \
            if self.repair == "server" else {}
        merged, result = merge(folded, align=self.align, average=self.average, weights=weights, spec=folding.spec,
                               model=folding.model, full_output=True, align_options=self.match_options,
                               **server_repair)
        start = time.perf_counter()
        if self.repair == "server":
            out = folding.unfold(merged, self.repair_inputs)
        else:
            transforms = result.transforms or None  # align=None: the clients' own space
            out = folding.unfold(merged, statistics=folding.merged_statistics(state_dicts, transforms, weights))
        result.stage_seconds = {**result.stage_seconds, "unfold": time.perf_counter() - start}
        return out, result

    def _regmean_grams(self, server_round: int, updates: list, left_out: list) -> tuple[list, list | None]:
        """The updates whose Gram matrices are usable, and ``[(grams, bytes), ...]`` for them.

        A client with unusable Grams is left out of the merge (its reason appended to
        ``left_out``), unless no client has usable ones: then every update is merged by the
        weighted mean and ``None`` comes back for the Grams.
        """
        usable, grams, bad = [], [], []
        for update in updates:
            record = update.content.array_records.get(frm.GRAMS_KEY)
            try:
                grams.append((frm.decode_grams(record, self._regmean_dims), fr.record_bytes(record)))
            except ValueError as exc:
                bad.append(LeftOut(update.node_id, f"RegMean Gram matrices: {exc}"))
                continue
            usable.append(update)
        if not usable:
            log(WARNING, "round %d: no client sent usable Gram matrices: RegMean falls back to the weighted mean",
                server_round)
            return updates, None
        left_out.extend(bad)
        return usable, grams

    def _regmean_merge(self, state_dicts: list, weights: list, grams: list, server_repair: dict):
        """Align, move each client's Grams into the common space with its alignment, fit the layers."""
        start = time.perf_counter()
        if self.align is None:
            result, aligned, transforms = None, state_dicts, [{} for _ in state_dicts]
        else:
            result = match(state_dicts, self.spec, self.align, **self.match_options)
            transforms = result.transforms
            aligned = [apply_transform(sd, self.spec, t, check=False) for sd, t in zip(state_dicts, transforms)]
        align_seconds = time.perf_counter() - start
        mapped = [map_grams({k: InputGram(v.count, v.xx.to(self.device), v.x.to(self.device)) for k, v in g.items()},
                            self.spec, t) for (g, _), t in zip(grams, transforms)]
        merged, merge_result = merge(aligned, align=None, average="regmean", weights=weights, spec=self.spec,
                                     full_output=True, average_options={"grams": mapped}, **server_repair)
        if result is None:
            return merged, merge_result
        result.average, result.repair = merge_result.average, merge_result.repair
        result.stage_seconds = {**merge_result.stage_seconds, "align": align_seconds}
        return merged, result

    def _leave_out_statistics(self, server_round: int, node_id: int, reason: str) -> None:
        self.left_out_repair.setdefault(server_round, []).append(LeftOut(node_id, reason))
        log(WARNING, "round %d: statistics of node %d left out of REPAIR: %s", server_round, node_id, reason)

    def _federated_repair(self, server_round: int, updates: list, merged: dict[str, torch.Tensor],
                          transforms: list) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Targets from the clients' own statistics, one query for the merged model's, then the fold."""
        start = time.perf_counter()
        points, sizes = self._repair_points, self._repair_sizes
        endpoint, used_transforms, sent = [], [], {}
        for update, transform in zip(updates, transforms):
            record = update.content.array_records.get(fr.STATS_KEY)
            try:
                endpoint.append(fr.decode_statistics(record, points, sizes))
            except ValueError as exc:
                self._leave_out_statistics(server_round, update.node_id, f"update statistics: {exc}")
                continue
            used_transforms.append(transform)
            sent[update.node_id] = fr.record_bytes(record)
        metrics: dict[str, Any] = {"repair_applied": 0, "repair_clients_targets": len(endpoint),
                                   "repair_clients_merged": 0}
        if not endpoint:
            log(WARNING, "round %d: no client sent usable statistics: the merge is not repaired", server_round)
            return merged, {**metrics, "repair_stats_bytes": 0, "repair_seconds": time.perf_counter() - start}
        try:
            targets = fr.targets_from_clients(endpoint, used_transforms, points, self.spec)
        except ValueError as exc:  # e.g. rotations that mix units: per-unit sums cannot follow them
            log(WARNING, "round %d: the merge is not repaired: %s", server_round, exc)
            return merged, {**metrics, "repair_stats_bytes": int(sum(sent.values())),
                            "repair_seconds": time.perf_counter() - start}
        content = {self.arrayrecord_key: ArrayRecord({k: v.detach().cpu() for k, v in merged.items()}),
                   fr.TARGETS_KEY: fr.encode_targets(targets)}
        if self._train_config is not None:
            content[self.configrecord_key] = ConfigRecord(dict(self._train_config))
        messages = [Message(RecordDict(dict(content)), dst_node_id=node, message_type=fr.REPAIR_QUERY)
                    for node in sent]
        replies = list(self._grid.send_and_receive(messages, timeout=self._timeout)) if self._grid else []
        answered = {int(r.metadata.src_node_id) for r in replies}
        for node in sorted(set(sent) - answered):
            self._leave_out_statistics(server_round, node, "no answer to the repair query")
        merged_stats = []
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if reply.has_error():
                self._leave_out_statistics(server_round, node, f"repair query: {error_reason(reply)}")
                continue
            record = reply.content.array_records.get(fr.STATS_KEY)
            try:
                merged_stats.append(fr.decode_statistics(record, points, sizes))
            except ValueError as exc:
                self._leave_out_statistics(server_round, node, f"repair query: {exc}")
                continue
            sent[node] += fr.record_bytes(record)
        metrics["repair_clients_merged"] = len(merged_stats)
        metrics["repair_stats_bytes"] = int(sum(sent.values()))
        metrics["repair_stats_bytes_per_client"] = int(max(sent.values()))
        if not merged_stats:
            log(WARNING, "round %d: no statistics of the merged model arrived: the merge is not repaired",
                server_round)
            return merged, {**metrics, "repair_seconds": time.perf_counter() - start}
        repaired = fold_repair(merged, points, fr.pool(merged_stats), targets)
        metrics["repair_applied"] = 1
        metrics["repair_seconds"] = time.perf_counter() - start
        return repaired, metrics

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
