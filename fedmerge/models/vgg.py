"""VGG-9 / VGG-11 / VGG-16 for small images, with optional BatchNorm or LayerNorm after every conv.

VGG-9 is FedMA's (Wang et al., 2020) federated benchmark network: six 3x3 convs (32, 64, M, 128,
128, M, 256, 256, M) and three fully connected layers on the flattened 4x4 map (``pool=4``).

VGG is a plain chain, so its symmetry is one group per conv layer (the channels it produces) and
one per hidden classifier layer.  The interesting part is normalisation:

* ``batchnorm``: ``nn.BatchNorm2d``; its affine parameters *and* its running statistics belong to
  the channels, so all four are permuted with the conv group (``num_batches_tracked`` is a
  scalar, never permuted).
* ``layernorm``: ``nn.GroupNorm(1, C)``.  It normalises each sample over all of ``(C, H, W)``, as
  the LayerNorm variants of Git Re-Basin and C²M³ do, and that statistic is unchanged by any
  channel permutation.  Unlike ``nn.LayerNorm([C, H, W])`` its affine parameters are per channel,
  so the model does not depend on the input's spatial size and its norm layers permute exactly like
  BatchNorm's affine parameters.

The normalisation helpers here are shared with :mod:`fedmerge.models.resnet`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..spec import PermutationSpec

__all__ = ["VGG", "VGG_CONFIGS", "NORMS", "vgg9", "vgg11", "vgg16", "make_norm", "norm_axes"]

VGG_CONFIGS: dict[int, tuple] = {
    9: (32, 64, "M", 128, 128, "M", 256, 256, "M"),
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}
NORMS = (None, "batchnorm", "layernorm")


def make_norm(norm: str | None, channels: int) -> nn.Module | None:
    """The normalisation layer for ``channels`` feature maps (``None`` for no normalisation)."""
    if norm is None:
        return None
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "layernorm":
        return nn.GroupNorm(1, channels)  # LayerNorm over (C, H, W), per-channel affine
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def norm_axes(prefix: str, norm: nn.Module, group: str) -> dict[str, tuple]:
    """Spec entries of a ``make_norm`` layer whose channels are permuted by ``group``."""
    if isinstance(norm, nn.BatchNorm2d):
        return {f"{prefix}.weight": (group,), f"{prefix}.bias": (group,),
                f"{prefix}.running_mean": (group,), f"{prefix}.running_var": (group,),
                f"{prefix}.num_batches_tracked": ()}
    if isinstance(norm, nn.GroupNorm):
        return {f"{prefix}.weight": (group,), f"{prefix}.bias": (group,)}
    raise TypeError(f"no hand-written spec for normalisation layer {type(norm).__name__}")


def _scale(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class VGG(nn.Module):
    """Conv3x3 (padding 1) [+ norm] + ReLU blocks and ``MaxPool2d(2, ceil_mode=True)`` per config,
    ``AdaptiveAvgPool2d(pool)``, flatten, then ``Linear(hidden) + ReLU, Linear(hidden) + ReLU,
    Linear(num_classes)`` (the classifier of the C²M³ appendix with ``pool=1``; FedMA's VGG-9
    flattens a 4x4 map, ``pool=4``, and the first classifier layer then sees each channel 16 times).

    ``ceil_mode`` lets 28x28 inputs survive five poolings (28, 14, 7, 4, 2, 1).  ``width``
    multiplies the conv channel counts; ``hidden`` is the classifier width.  State_dict keys follow
    torchvision: ``features.{i}.*`` (index in the ``features`` Sequential) and ``classifier.{0,2,4}.*``.
    """

    def __init__(self, depth: int = 11, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10,
                 norm: str | None = None, width: float = 1.0, hidden: int = 512, pool: int = 1) -> None:
        super().__init__()
        if depth not in VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.depth, self.norm, self.width = depth, norm, width
        layers: list[nn.Module] = []
        c = self.input_shape[0]
        for v in VGG_CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            out = _scale(v, width)
            layers.append(nn.Conv2d(c, out, kernel_size=3, padding=1))
            if norm is not None:
                layers.append(make_norm(norm, out))
            layers.append(nn.ReLU(inplace=True))
            c = out
        self.features = nn.Sequential(*layers)
        if int(pool) < 1:
            raise ValueError(f"pool must be a positive integer, got {pool}")
        self.avgpool = nn.AdaptiveAvgPool2d(int(pool))
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(c * int(pool) ** 2, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, self.num_classes),
        )

        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He (Kaiming) normal init for convs (fan-out, as torchvision's VGG) and linears (fan-in).

        Without normalisation, PyTorch's default init leaves VGG-9 near chance for epochs on MNIST,
        and torchvision's N(0, 0.01) for linears stalls too with three 512-wide layers and no dropout.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.flatten(self.avgpool(x))
        return self.classifier(x)

    def permutation_spec(self) -> PermutationSpec:
        """Group ``features.{i}`` per conv (also acting on its norm), ``classifier.{0,2}`` per hidden layer."""
        axes: dict[str, tuple] = {}
        sizes: dict[str, int] = {}
        previous = None  # image channels
        for i, layer in enumerate(self.features):
            if isinstance(layer, nn.Conv2d):
                group = f"features.{i}"
                axes[f"features.{i}.weight"] = (group, previous, None, None)
                axes[f"features.{i}.bias"] = (group,)
                sizes[group] = layer.out_channels
                previous = group
            elif isinstance(layer, (nn.BatchNorm2d, nn.GroupNorm)):
                axes.update(norm_axes(f"features.{i}", layer, previous))
        for i in (0, 2):
            group = f"classifier.{i}"
            axes[f"classifier.{i}.weight"] = (group, previous)  # pool x pool blocks per channel for i = 0
            axes[f"classifier.{i}.bias"] = (group,)
            sizes[group] = self.classifier[i].out_features
            previous = group
        axes["classifier.4.weight"] = (None, previous)
        axes["classifier.4.bias"] = (None,)
        return PermutationSpec(axes, sizes)


def vgg9(*, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, norm: str | None = None,
         width: float = 1.0, hidden: int = 512) -> VGG:
    """FedMA's VGG-9 (no normalisation by default, as in FedMA; 4x4 map flattened into the classifier)."""
    return VGG(9, input_shape=input_shape, num_classes=num_classes, norm=norm, width=width, hidden=hidden, pool=4)


def vgg11(*, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, norm: str | None = None,
          width: float = 1.0, hidden: int = 512) -> VGG:
    """VGG-11 (``norm="batchnorm"`` for VGG-11-BN, ``"layernorm"`` for the LayerNorm variant)."""
    return VGG(11, input_shape=input_shape, num_classes=num_classes, norm=norm, width=width, hidden=hidden)


def vgg16(*, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, norm: str | None = None,
          width: float = 1.0, hidden: int = 512) -> VGG:
    """VGG-16 (``norm="batchnorm"`` for VGG-16-BN, ``"layernorm"`` for the LayerNorm variant)."""
    return VGG(16, input_shape=input_shape, num_classes=num_classes, norm=norm, width=width, hidden=hidden)
