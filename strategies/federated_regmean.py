"""Federated RegMean: the clients send second moments of their layer inputs, the server fits the layers.

RegMean (:mod:`fedmerge.regmean`) merges every linear and convolutional layer by least squares on
each model's own layer inputs; all it needs from a model is, per layer, the Gram matrix
``E[x̃ x̃ᵀ]`` of its inputs ``x̃ = (x, 1)``.  In federated learning:

1. **With its update** each client sends, for every RegMean layer of the architecture, the count
   of its input rows and their mean Gram matrix (upper triangle, float32) and mean vector, taken
   with its *own* trained model on its own training data (:func:`client_grams`; an ArrayRecord
   under :data:`GRAMS_KEY`).
2. **The server** aligns the models, moves each client's Grams into the common space with that
   client's alignment (:func:`fedmerge.regmean.map_grams`) and fits every layer there
   (``fedmerge.merge(average="regmean")``).  No extra round trip.

Only these moments leave a client, never samples; for a layer with ``d`` inputs they are
``d(d+3)/2 + 1`` numbers (the paper's MLP: about 0.64 M, 2.6 MB, about the size of the model).
They say more about the data than REPAIR's per-unit sums: a Gram matrix of ``n < d`` rows has
rank ``n`` and gives away the span of those rows, and a client with a single sample gives away the
sample itself (its first layer's inputs are the raw features).  Use it where second moments of
the clients' data may leave them.
Replies are judged like model replies (:func:`decode_grams`: the expected layers and shapes, finite
values, a positive count, non-negative diagonals); a client whose Grams are unusable is left out
of the merge with its reason, and a round in which no client sends usable Grams falls back to the
weighted mean and says so in its metrics.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from flwr.app import ArrayRecord

from fedmerge.regmean import InputGram, input_grams, regmean_layers

from .replies import record_tensors

__all__ = ["GRAMS_KEY", "client_grams", "decode_grams", "encode_grams", "layer_dims"]

#: Record key of a client's Gram matrices (in its train reply).
GRAMS_KEY = "regmean-grams"


def layer_dims(model: torch.nn.Module, layers: Sequence[str] | None = None) -> dict[str, int]:
    """Input dimension of each RegMean layer (in-features, or in-channels × kernel positions)."""
    sd = model.state_dict()
    layers = regmean_layers(model) if layers is None else layers
    return {name: int(sd[f"{name}.weight"][0].numel()) for name in layers}


def encode_grams(grams: Mapping[str, InputGram]) -> ArrayRecord:
    """``{layer: InputGram}`` as an ArrayRecord: ``<layer>/count`` (float64), ``/xx`` (mean Gram,
    upper triangle, float32) and ``/x`` (mean input, float32)."""
    arrays = {}
    for name, g in grams.items():
        d = g.xx.shape[0]
        rows, cols = torch.triu_indices(d, d)
        arrays[f"{name}/count"] = torch.tensor([g.count], dtype=torch.float64)
        arrays[f"{name}/xx"] = (g.xx[rows, cols] / g.count).float().cpu()
        arrays[f"{name}/x"] = (g.x / g.count).float().cpu()
    return ArrayRecord(arrays)


def decode_grams(record: ArrayRecord | None, dims: Mapping[str, int]) -> dict[str, InputGram]:
    """The Gram matrices in ``record``, or ``ValueError`` with the reason they cannot be used.

    ``dims`` gives each layer's input dimension (:func:`layer_dims`).  Every layer must be there
    with a positive finite count and finite moments of the right sizes whose diagonal (mean
    squares) is non-negative.
    """
    expected = {f"{name}/{part}" for name in dims for part in ("count", "xx", "x")}
    arrays = record_tensors(record, GRAMS_KEY, expected, "Gram matrices")
    out = {}
    for name, d in dims.items():
        count, packed, mean = (arrays[f"{name}/{part}"] for part in ("count", "xx", "x"))
        if count.numel() != 1 or not math.isfinite(float(count)) or float(count) <= 0:
            raise ValueError(f"Gram of {name!r}: the count must be one positive finite number, got {count.tolist()}")
        for what, t, size in (("xx", packed, d * (d + 1) // 2), ("x", mean, d)):
            if tuple(t.shape) != (size,):
                raise ValueError(f"Gram of {name!r}: {what} has shape {tuple(t.shape)}, expected ({size},)")
            if not torch.isfinite(t).all():
                raise ValueError(f"Gram of {name!r}: {what} has non-finite values")
        rows, cols = torch.triu_indices(d, d)
        xx = torch.zeros(d, d, dtype=torch.float64)
        xx[rows, cols] = packed.double()
        xx = xx + xx.T - torch.diag(torch.diagonal(xx))
        if (torch.diagonal(xx) < 0).any():
            raise ValueError(f"Gram of {name!r}: negative mean squares on the diagonal")
        n = float(count)
        out[name] = InputGram(n, xx * n, mean.double() * n)
    return out


def client_grams(model: torch.nn.Module, images: torch.Tensor, *,
                 device: torch.device | str | None = None) -> ArrayRecord:
    """A client's reply record: the Gram matrices of ``model``'s layer inputs on its ``images``."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    state = {k: v.to(device) for k, v in model.state_dict().items()}
    return encode_grams(input_grams(model, state, images))
