"""Input checks shared by every entry point: fail loudly, naming the model index and the key.

Merging is a silent operation by nature — a wrong input still produces *a* state_dict — so every
public function that takes models runs these checks first and raises ``ValueError`` with the
model index and the key at fault.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from .spec import PermutationSpec

__all__ = ["check_like", "check_state_dicts", "normalize_weights"]


def check_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]],
                      spec: PermutationSpec | None = None, *, min_models: int = 1) -> None:
    """Raise ``ValueError`` unless all state_dicts share keys, shapes and finite values (and fit ``spec``).

    Finite means small enough for float32 arithmetic too: see :func:`check_like`.
    """
    if isinstance(state_dicts, Mapping):
        raise ValueError("expected a sequence of state_dicts, got a single mapping; wrap it in a list")
    state_dicts = list(state_dicts)
    if len(state_dicts) == 0:
        raise ValueError("no state_dicts given: need at least one model")
    if len(state_dicts) < min_models:
        raise ValueError(f"need at least {min_models} models, got {len(state_dicts)}")
    for i, sd in enumerate(state_dicts):
        if not isinstance(sd, Mapping):
            raise ValueError(f"model {i}: expected a state_dict (mapping), got {type(sd).__name__}")
        if len(sd) == 0:
            raise ValueError(f"model {i}: the state_dict is empty")
    ref = state_dicts[0]
    for i, sd in enumerate(state_dicts):
        check_like(sd, ref, name=f"model {i}", reference_name="model 0")
        if spec is not None:
            spec.check_state_dict(sd, name=f"model {i}")


def check_like(state_dict: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], *,
               name: str = "model", reference_name: str = "the reference") -> None:
    """Raise ``ValueError`` unless ``state_dict`` has ``reference``'s keys, shapes and dtype kinds and only
    finite values, small enough that each tensor's squared norm is finite in float32 (the precision in which
    models are matched: a diverged model of finite weights like 1e35 would overflow there); the message
    starts with ``name`` and names the key.

    This is the one-model form of :func:`check_state_dicts`, for callers that judge models one at a
    time against a known architecture (a federated server checking each client's update against the
    global model it sent, leaving out the bad ones instead of failing the whole merge).
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{name}: expected a state_dict (mapping), got {type(state_dict).__name__}")
    missing = [k for k in reference if k not in state_dict]
    if missing:
        raise ValueError(f"{name}: key {missing[0]!r} is missing ({reference_name} has it); "
                         "the models do not share an architecture")
    extra = [k for k in state_dict if k not in reference]
    if extra:
        raise ValueError(f"{name}: unexpected key {extra[0]!r} ({reference_name} does not have it); "
                         "the models do not share an architecture")
    for key, t in state_dict.items():
        ref = reference[key]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: key {key!r} holds a {type(t).__name__}, not a tensor")
        if t.shape != ref.shape:
            raise ValueError(f"{name}: key {key!r} has shape {tuple(t.shape)} but {reference_name} has "
                             f"{tuple(ref.shape)}")
        if torch.is_floating_point(t) != torch.is_floating_point(ref):
            raise ValueError(f"{name}: key {key!r} has dtype {t.dtype} but {reference_name} has {ref.dtype}")
        if t.is_complex() and not torch.isfinite(t).all():
            raise ValueError(f"{name}: key {key!r} contains {'NaN' if torch.isnan(t).any() else 'Inf'} values")
        if t.is_floating_point() and t.numel():
            flat = t.detach().reshape(-1).float()
            if not math.isfinite(float(torch.dot(flat, flat))):  # no temporary; NaN or Inf entries make it so too
                if not torch.isfinite(t).all():
                    raise ValueError(f"{name}: key {key!r} contains {'NaN' if torch.isnan(t).any() else 'Inf'} "
                                     "values")
                raise ValueError(f"{name}: key {key!r} has values too large for float32 arithmetic (largest "
                                 f"|value| {float(t.abs().max()):.3g}, its squared norm overflows float32, in which "
                                 "models are compared and merged); did its training diverge?")


def normalize_weights(weights: Sequence[float] | torch.Tensor | None, n: int) -> list[float]:
    """Turn per-model weights (e.g. client sample counts) into fractions summing to one."""
    if weights is None:
        return [1.0 / n] * n
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().tolist()
    weights = list(weights)
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} models")
    values = []
    for i, w in enumerate(weights):
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"model {i}: weight {w!r} is not a number") from None
        if not math.isfinite(w):
            raise ValueError(f"model {i}: weight {w} is not finite")
        if w < 0:
            raise ValueError(f"model {i}: weight {w} is negative")
        values.append(w)
    total = sum(values)
    if total <= 0:
        raise ValueError("all weights are zero: nothing to average")
    return [w / total for w in values]
