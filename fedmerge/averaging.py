"""Averaging state_dicts: the (weighted) mean and linear interpolation.

These are the last step of every merge, after the models have been brought into a common space.
Floating-point entries are averaged in float64 and returned in their own dtype; integer entries
(BatchNorm's ``num_batches_tracked``) are not weights, so the largest value is kept.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .validation import check_state_dicts, normalize_weights

__all__ = ["weighted_average", "interpolate"]


def weighted_average(state_dicts: Sequence[Mapping[str, torch.Tensor]],
                     weights: Sequence[float] | torch.Tensor | None = None, *,
                     check: bool = True) -> dict[str, torch.Tensor]:
    """``sum_i w_i θ_i`` with ``w`` normalised to sum to one (uniform when ``weights`` is None)."""
    if check:
        check_state_dicts(state_dicts)
    w = normalize_weights(weights, len(state_dicts))
    out = {}
    for key, first in state_dicts[0].items():
        if torch.is_floating_point(first):
            acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
            for wi, sd in zip(w, state_dicts):
                if wi:
                    acc.add_(sd[key].to(device=first.device, dtype=torch.float64), alpha=wi)
            out[key] = acc.to(first.dtype)
        else:
            out[key] = torch.stack([sd[key].to(first.device) for sd in state_dicts]).amax(0)
    return out


def interpolate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    """``(1 - t) a + t b``, the linear path used for loss barriers and SLERP baselines."""
    if not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"t={t} is outside [0, 1]")
    return weighted_average([a, b], [1.0 - float(t), float(t)])
