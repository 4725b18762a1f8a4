"""Federated REPAIR: renormalise the merged model with per-unit sums from the clients, never their data.

REPAIR (:mod:`fedmerge.repair`) needs the endpoint models' activation statistics and the merged
model's.  In federated learning the server has no data, so the clients compute them:

1. **With its update** each client sends, for every repair point of the architecture, the
   per-unit count, sum and sum of squares of its *own* trained model's pre-activations on its own
   training data (:func:`client_statistics`; an ArrayRecord under :data:`STATS_KEY`).
2. **The server** maps each client's sums into the common space with that client's alignment
   (:func:`fedmerge.repair.map_statistics`) and pools them exactly: sums add, so the targets are
   the mean and standard deviation of the union of all clients' activations (law of total
   variance, not an average of standard deviations).
3. **One extra round trip** (a query message, :data:`REPAIR_QUERY`) sends the merged, not yet
   repaired model and the targets to the round's clients; each returns the same sums for the
   merged model on its data, computed in one pass with the correction active in train-mode
   semantics (every repair point renormalised to its target within each batch, so later points
   are measured downstream of corrected ones).
4. The server pools those sums and folds the correction into the merged weights
   (:func:`fedmerge.repair.fold_repair`) before the round ends.

Only per-unit sums leave a client.  Statistic replies are judged like model replies
(:func:`decode_statistics`: the expected points and shapes, finite values, positive counts); a
bad one is left out with its reason, and a round in which no statistics arrive keeps the
unrepaired merge and says so in its metrics.

The client side is :func:`client_statistics` plus a query handler; ``simulations/client_app.py``
shows both (``@app.query("repair")``).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from flwr.app import ArrayRecord

from fedmerge.repair import RepairPoint, UnitStatistics, find_repair_points, map_statistics, unit_statistics
from fedmerge.spec import SymmetrySpec

from .replies import record_tensors

__all__ = ["REPAIR_MODES", "REPAIR_QUERY", "STATS_KEY", "TARGETS_KEY", "client_statistics", "decode_statistics",
           "decode_targets", "encode_statistics", "encode_targets", "point_sizes", "pool", "record_bytes",
           "targets_from_clients"]

#: ``--repair`` choices (the first is the default).
REPAIR_MODES = ("none", "federated", "server")
#: Record key of a client's statistics (in its train reply and in its repair-query reply).
STATS_KEY = "repair-stats"
#: Record key of the targets in the repair query.
TARGETS_KEY = "repair-targets"
#: ``message_type`` of the repair query (a ClientApp serves it with ``@app.query("repair")``).
REPAIR_QUERY = "query.repair"


def encode_statistics(stats: Mapping[str, UnitStatistics]) -> ArrayRecord:
    """``{point: UnitStatistics}`` as an ArrayRecord (``<point>/count``, ``/sum``, ``/sum_sq``; float64)."""
    arrays = {}
    for name, s in stats.items():
        arrays[f"{name}/count"] = torch.tensor([s.count], dtype=torch.float64)
        arrays[f"{name}/sum"] = s.sum.detach().double().cpu()
        arrays[f"{name}/sum_sq"] = s.sum_sq.detach().double().cpu()
    return ArrayRecord(arrays)


def decode_statistics(record: ArrayRecord | None, points: Sequence[RepairPoint],
                      sizes: Mapping[str, int]) -> dict[str, UnitStatistics]:
    """The statistics in ``record``, or ``ValueError`` with the reason they cannot be used.

    ``sizes`` gives each point's number of units.  Every point must be there, with a positive
    finite count, finite sums of its size and non-negative sums of squares.
    """
    expected = {f"{p.name}/{part}" for p in points for part in ("count", "sum", "sum_sq")}
    arrays = record_tensors(record, STATS_KEY, expected, "statistics")
    out = {}
    for p in points:
        count, total, sq = (arrays[f"{p.name}/{part}"] for part in ("count", "sum", "sum_sq"))
        if count.numel() != 1 or not math.isfinite(float(count)) or float(count) <= 0:
            raise ValueError(f"statistics of {p.name!r}: the count must be one positive finite number, got "
                             f"{count.tolist()}")
        for what, t in (("sum", total), ("sum_sq", sq)):
            if tuple(t.shape) != (sizes[p.name],):
                raise ValueError(f"statistics of {p.name!r}: {what} has shape {tuple(t.shape)}, expected "
                                 f"({sizes[p.name]},)")
            if not torch.isfinite(t).all():
                raise ValueError(f"statistics of {p.name!r}: {what} has non-finite values")
        if (sq < 0).any():
            raise ValueError(f"statistics of {p.name!r}: negative sums of squares")
        out[p.name] = UnitStatistics(float(count), total.double(), sq.double())
    return out


def encode_targets(targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> ArrayRecord:
    """``{point: (mean, std)}`` as an ArrayRecord (``<point>/mean``, ``/std``)."""
    arrays = {}
    for name, (mean, std) in targets.items():
        arrays[f"{name}/mean"] = mean.detach().double().cpu()
        arrays[f"{name}/std"] = std.detach().double().cpu()
    return ArrayRecord(arrays)


def decode_targets(record: ArrayRecord | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of :func:`encode_targets` (``ValueError`` if the record is missing or incomplete)."""
    if record is None:
        raise ValueError(f"the repair query carries no {TARGETS_KEY!r} ArrayRecord")
    arrays = record.to_torch_state_dict()
    names = {k.rsplit("/", 1)[0] for k in arrays}
    out = {}
    for name in names:
        if f"{name}/mean" not in arrays or f"{name}/std" not in arrays:
            raise ValueError(f"the repair targets of {name!r} need both a mean and a std")
        out[name] = (arrays[f"{name}/mean"], arrays[f"{name}/std"])
    return out


def point_sizes(model: torch.nn.Module, points: Sequence[RepairPoint]) -> dict[str, int]:
    """Number of units of each repair point (the first axis of its weight)."""
    sd = model.state_dict()
    return {p.name: int(sd[f"{p.name}.weight"].shape[0]) for p in points}


def client_statistics(model: torch.nn.Module, images: torch.Tensor, *,
                      targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                      device: torch.device | str | None = None) -> ArrayRecord:
    """A client's reply record: per-unit sums of ``model`` at its repair points on its ``images``.

    Without ``targets``: the model's own statistics (sent with the update).  With ``targets``
    (from the repair query): the single-pass statistics with the correction active.
    """
    points = find_repair_points(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    state = {k: v.to(device) for k, v in model.state_dict().items()}
    stats = unit_statistics(model, state, images, points, targets=targets)
    return encode_statistics(stats)


def targets_from_clients(statistics: Sequence[Mapping[str, UnitStatistics]], transforms: Sequence[Mapping],
                         points: Sequence[RepairPoint], spec: SymmetrySpec
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """REPAIR targets ``{point: (mean, std)}``: each client's own statistics mapped into the common
    space by its alignment, pooled exactly (the union of all clients' activations)."""
    mapped = [map_statistics(s, points, spec, t) for s, t in zip(statistics, transforms, strict=True)]
    return {name: (s.mean, s.std) for name, s in pool(mapped).items()}


def pool(statistics: Sequence[Mapping[str, UnitStatistics]]) -> dict[str, UnitStatistics]:
    """The exact pooled statistics of several clients (sums add)."""
    if not statistics:
        raise ValueError("no statistics to pool")
    out = dict(statistics[0])
    for s in statistics[1:]:
        out = {k: out[k] + s[k] for k in out}
    return out


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of the arrays in ``record`` (what a client sent for statistics)."""
    return int(sum(len(array.data) for array in record.values()))
