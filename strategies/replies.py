"""Sorting client replies into usable updates and left-out clients, each with a reason.

Flower's own ``FedAvg`` checks replies as a whole and raises ``InconsistentMessageReplies`` when any
one of them is malformed, which stops the run.  A merging server must be stricter about content
(a NaN weight or a wrong shape silently poisons every merge) and more forgiving about the round: a
bad update is left out, with its reason, and the others are merged.  :func:`split_train_replies`
and :func:`split_evaluate_replies` do that judging; the strategies only act on the verdicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
from flwr.app import ArrayRecord, Message, RecordDict

from fedmerge.validation import check_like

__all__ = ["ClientUpdate", "LeftOut", "error_reason", "record_tensors", "split_evaluate_replies",
           "split_train_replies"]


@dataclass
class ClientUpdate:
    """A client's accepted training reply: its weights (converted once) and its sample count."""

    node_id: int
    state_dict: dict[str, torch.Tensor]
    num_examples: float
    content: RecordDict = field(repr=False)


@dataclass(frozen=True)
class LeftOut:
    """A client whose reply was not used this round, and why."""

    node_id: int
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {"node_id": self.node_id, "reason": self.reason}


def error_reason(msg: Message) -> str:
    """The client's own message from an error reply.

    The Simulation Engine wraps a ClientApp exception as ``"<class '...ClientAppException'>:<'\\n
    Exception ClientAppException occurred. Message: <the client's message>'>"``; a deployment's
    error replies carry plain text.  Either way the last meaningful line is returned.
    """
    lines = [ln.strip() for ln in (msg.error.reason or "").splitlines() if ln.strip()]
    last = lines[-1] if lines else "no reason given"
    last = last[: -len("'>")] if last.endswith("'>") else last
    return f"client error: {last.split('occurred. Message: ', 1)[-1]}"


def _judge(msg: Message, weight_key: str) -> tuple[float, None] | tuple[None, str]:
    """``(sample count, None)`` when a reply's metrics are usable, else ``(None, the reason)``."""
    if msg.has_error():
        return None, error_reason(msg)
    records = list(msg.content.metric_records.values())
    if len(records) != 1:
        return None, f"expected exactly one MetricRecord, got {len(records)}"
    value = records[0].get(weight_key)
    if value is None:
        return None, f"its MetricRecord has no {weight_key!r} (the sample count that weights the merge)"
    if isinstance(value, list) or not math.isfinite(float(value)):
        return None, f"{weight_key!r} must be one finite number, got {value!r}"
    if float(value) <= 0:
        return None, f"{weight_key!r} must be positive, got {value!r}"
    return float(value), None


def split_evaluate_replies(replies: Iterable[Message], *, weight_key: str = "num-examples"
                           ) -> tuple[list[Message], list[LeftOut]]:
    """Evaluation replies that carry one MetricRecord with a positive ``weight_key``, and the rest."""
    usable: list[Message] = []
    left_out: list[LeftOut] = []
    for msg in replies:
        _, reason = _judge(msg, weight_key)
        if reason is None:
            usable.append(msg)
        else:
            left_out.append(LeftOut(int(msg.metadata.src_node_id), reason))
    return usable, left_out


def split_train_replies(replies: Iterable[Message], reference: Mapping[str, torch.Tensor] | None = None, *,
                        weight_key: str = "num-examples", extra_records: Iterable[str] = ()
                        ) -> tuple[list[ClientUpdate], list[LeftOut]]:
    """Training replies that can be merged, and the clients left out with the reason.

    A reply is used when it is not an error, carries exactly one ArrayRecord and one MetricRecord,
    its sample count ``weight_key`` is one positive finite number, and its weights have the
    ``reference``'s keys, shapes and dtype kinds with only finite values.  ``reference`` is the
    global model the server sent; without one, the first well-formed reply serves.  ArrayRecords
    named in ``extra_records`` (e.g. REPAIR statistics) are not the model and are judged by whoever
    reads them.  Each
    ArrayRecord is converted to tensors exactly once (every conversion copies).  Order is kept.
    """
    updates: list[ClientUpdate] = []
    left_out: list[LeftOut] = []
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        weight, reason = _judge(msg, weight_key)
        extra = set(extra_records)
        arrays = [] if reason is not None else [a for k, a in msg.content.array_records.items() if k not in extra]
        if reason is None and len(arrays) != 1:
            reason = f"expected exactly one ArrayRecord, got {len(arrays)}"
        if reason is None:
            try:
                state_dict = arrays[0].to_torch_state_dict()
                check_like(state_dict, state_dict if reference is None else reference, name="update",
                           reference_name="the global model")
            except (ValueError, TypeError, RuntimeError) as exc:
                reason = str(exc)
        if reason is not None:
            left_out.append(LeftOut(node, reason))
            continue
        if reference is None:
            reference = state_dict
        updates.append(ClientUpdate(node, state_dict, weight, msg.content))
    return updates, left_out


def record_tensors(record: ArrayRecord | None, key: str, expected: set[str], what: str) -> dict[str, torch.Tensor]:
    """The tensors of an extra ArrayRecord of a reply (statistics, Gram matrices), or ``ValueError``.

    The record (sent under ``key``) must be there, convert to tensors and hold exactly the
    ``expected`` names; ``what`` names its content in the reason ("statistics").
    """
    if record is None:
        raise ValueError(f"the reply carries no {key!r} ArrayRecord")
    try:
        arrays = record.to_torch_state_dict()
    except Exception as exc:  # noqa: BLE001 - a record that does not convert is malformed
        raise ValueError(f"its {key!r} record does not convert to tensors: {exc}") from None
    missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
    if missing or extra:
        raise ValueError(f"its {what} do not fit the model: missing {missing[:4]}, unexpected {extra[:4]}")
    return arrays
