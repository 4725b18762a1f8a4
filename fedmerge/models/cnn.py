"""A small convolutional network whose classifier reads a flattened ``C x H x W`` feature map.

This model exists to exercise the one non-obvious rule of CNN symmetry: after ``flatten`` the
first linear layer's input axis has ``C * H * W`` entries, and a permutation of the ``C`` channels
moves whole ``H * W`` blocks of it.  The spec expresses that by listing the channel group on that
axis (its length is a multiple of the group size), and :func:`fedmerge.permutation.permute_axis`
applies it block-wise.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import PermutationSpec

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """``[conv3x3 + ReLU + maxpool2] * len(channels)``, flatten, ``Linear(hidden) + ReLU``, ``Linear``.

    Pooling uses ``ceil_mode=True`` so that odd spatial sizes (MNIST's 7x7 after two pools) keep
    their border.  State_dict keys: ``convs.{i}.*``, ``fc1.*``, ``fc2.*``.
    """

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10,
                 channels: Sequence[int] = (32, 64), hidden: int = 128) -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        if len(self.input_shape) != 3:
            raise ValueError(f"SmallCNN needs a (C, H, W) input_shape, got {self.input_shape}")
        self.num_classes = int(num_classes)
        c, h, w = self.input_shape
        convs = []
        for out in channels:
            convs.append(nn.Conv2d(c, int(out), kernel_size=3, padding=1))
            c, h, w = int(out), math.ceil(h / 2), math.ceil(w / 2)
        self.convs = nn.ModuleList(convs)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.feature_shape = (c, h, w)
        self.fc1 = nn.Linear(c * h * w, int(hidden))
        self.fc2 = nn.Linear(int(hidden), self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = self.pool(self.relu(conv(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)

    def permutation_spec(self) -> PermutationSpec:
        """Group ``convs.{i}`` per conv layer, ``fc1`` for the hidden units of the classifier.

        The last conv group also acts on ``fc1.weight`` axis 1 (length ``C * H * W``, block-wise).
        """
        axes: dict[str, tuple] = {}
        sizes: dict[str, int] = {}
        previous = None  # image channels are never permuted
        for i, conv in enumerate(self.convs):
            group = f"convs.{i}"
            axes[f"convs.{i}.weight"] = (group, previous, None, None)
            axes[f"convs.{i}.bias"] = (group,)
            sizes[group] = conv.out_channels
            previous = group
        axes["fc1.weight"] = ("fc1", previous)
        axes["fc1.bias"] = ("fc1",)
        sizes["fc1"] = self.fc1.out_features
        axes["fc2.weight"] = (None, "fc1")
        axes["fc2.bias"] = (None,)
        return PermutationSpec(axes, sizes)
