"""CIFAR ResNet-20 (He et al. 2016) with LayerNorm (default) or BatchNorm.

Residual connections are what make ResNet symmetry non-local: ``out = f(x) + x`` only commutes
with a channel permutation if ``f``'s output channels and ``x``'s channels are permuted by the
*same* permutation.  So all blocks of a stage that are joined by identity shortcuts share a single
"residual stream" group (``stage{s}.residual``), which also covers the stem for stage 1.  A
downsampling block's 1x1-conv shortcut produces new channels, so stages 2 and 3 start new residual
groups.  Inside each block the channels between its two convs are free: ``stage{s}.block{b}.inner``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import PermutationSpec
from .vgg import make_norm, norm_axes

__all__ = ["BasicBlock", "ResNet20", "resnet20"]

NORMS = ("layernorm", "batchnorm")


class BasicBlock(nn.Module):
    """``relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))``.

    The shortcut is ``Sequential(conv1x1, norm)`` when the block changes resolution or width and
    ``nn.Identity()`` otherwise.  Convs have no bias: the norm that follows has one.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                make_norm(norm, out_channels))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """Stem ``conv3x3(16w) + norm + relu``, three stages of three :class:`BasicBlock` (16w, 32w, 64w;
    stride 2 at the start of stages 2 and 3), global average pool, ``Linear``.

    ``width`` (int or float) multiplies every channel count.  State_dict keys: ``conv1``, ``norm1``,
    ``stage{s}.{b}.{conv1,norm1,conv2,norm2,shortcut.0,shortcut.1}``, ``fc``.
    """

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, width: float = 1,
                 norm: str = "layernorm") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.width, self.norm = width, norm
        widths = [max(1, int(round(c * width))) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(self.input_shape[0], widths[0], 3, padding=1, bias=False)
        self.norm1 = make_norm(norm, widths[0])
        c = widths[0]
        stages = []
        for s, out in enumerate(widths):
            blocks = []
            for b in range(3):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(BasicBlock(c, out, stride, norm))
                c = out
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.fc = nn.Linear(c, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        x = x.mean(dim=(2, 3))  # global average pool
        return self.fc(x)

    def permutation_spec(self) -> PermutationSpec:
        """One ``stage{s}.residual`` group per stage, one ``stage{s}.block{b}.inner`` group per block."""
        axes: dict[str, tuple] = {}
        sizes: dict[str, int] = {}
        stream = "stage1.residual"  # the stem writes the stage-1 residual stream
        axes["conv1.weight"] = (stream, None, None, None)
        axes.update(norm_axes("norm1", self.norm1, stream))
        sizes[stream] = self.conv1.out_channels
        for s, stage in enumerate((self.stage1, self.stage2, self.stage3), start=1):
            for b, block in enumerate(stage):
                p, inner = f"stage{s}.{b}", f"stage{s}.block{b}.inner"
                block_in = stream
                if isinstance(block.shortcut, nn.Sequential):  # downsampling: a new residual stream
                    stream = f"stage{s}.residual"
                    sizes[stream] = block.shortcut[0].out_channels
                axes[f"{p}.conv1.weight"] = (inner, block_in, None, None)
                axes.update(norm_axes(f"{p}.norm1", block.norm1, inner))
                axes[f"{p}.conv2.weight"] = (stream, inner, None, None)
                axes.update(norm_axes(f"{p}.norm2", block.norm2, stream))
                if isinstance(block.shortcut, nn.Sequential):
                    axes[f"{p}.shortcut.0.weight"] = (stream, block_in, None, None)
                    axes.update(norm_axes(f"{p}.shortcut.1", block.shortcut[1], stream))
                sizes[inner] = block.conv1.out_channels
        axes["fc.weight"] = (None, stream)
        axes["fc.bias"] = (None,)
        return PermutationSpec(axes, sizes)


def resnet20(*, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, width: float = 1,
             norm: str = "layernorm") -> ResNet20:
    """ResNet-20 (LayerNorm by default; ``norm="batchnorm"`` for the BN variant)."""
    return ResNet20(input_shape=input_shape, num_classes=num_classes, width=width, norm=norm)
