"""The multi-layer perceptron of the C²M³ paper (784-256-512-512-256-10 on MNIST).

An MLP is the simplest case of weight-space symmetry: the hidden units of each hidden layer can be
reordered freely, as long as the rows of that layer's weight and bias and the columns of the next
layer's weight are reordered alike.  Its hand-written :meth:`MLP.permutation_spec` is therefore one
group per hidden layer, named after the layer that produces the units.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import PermutationSpec

__all__ = ["MLP"]


class MLP(nn.Module):
    """Flatten, ``Linear + ReLU`` per hidden width, a final ``Linear``, ``log_softmax`` output.

    The paper's MLP returns log-probabilities, so this one does too (training code accepts logits
    or log-probabilities alike).  State_dict keys are ``layers.{i}.weight/bias`` for the hidden
    layers and ``head.weight/bias`` for the classifier.
    """

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10,
                 widths: Sequence[int] = (256, 512, 512, 256)) -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.widths = tuple(int(w) for w in widths)
        dims = [math.prod(self.input_shape), *self.widths]
        self.flatten = nn.Flatten()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        for layer in self.layers:
            x = F.relu(layer(x))
        return F.log_softmax(self.head(x), dim=-1)

    def permutation_spec(self) -> PermutationSpec:
        """Group ``layers.{i}`` permutes the outputs of hidden layer ``i`` and the inputs of the next."""
        axes: dict[str, tuple] = {}
        sizes: dict[str, int] = {}
        previous = None  # the flattened image is never permuted
        for i, layer in enumerate(self.layers):
            group = f"layers.{i}"
            axes[f"layers.{i}.weight"] = (group, previous)
            axes[f"layers.{i}.bias"] = (group,)
            sizes[group] = layer.out_features
            previous = group
        axes["head.weight"] = (None, previous)  # class logits keep their order
        axes["head.bias"] = (None,)
        return PermutationSpec(axes, sizes)
