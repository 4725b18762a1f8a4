"""The model zoo: the architectures of the C²M³ paper, each with a hand-written permutation spec.

Every zoo model takes its input shape and number of classes as constructor arguments, records
``input_shape`` (so :func:`fedmerge.spec_check.check_spec` can build an example input) and has a
``permutation_spec()`` method written layer by layer.  The hand-written specs are the reference
that the automatic tracer (:mod:`fedmerge.tracing`) is tested against; :func:`build_model` builds
a model by name, for configuration files and command lines.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

from torch import nn

from .cnn import SmallCNN
from .mlp import MLP
from .resnet import BasicBlock, ResNet20, resnet20
from .vgg import VGG, vgg9, vgg11, vgg16

__all__ = ["MLP", "SmallCNN", "VGG", "ResNet20", "BasicBlock", "vgg9", "vgg11", "vgg16", "resnet20",
           "MODELS", "build_model"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "vgg9": partial(VGG, 9, norm=None, pool=4),
    "vgg11": partial(VGG, 11, norm=None),
    "vgg11-bn": partial(VGG, 11, norm="batchnorm"),
    "vgg11-ln": partial(VGG, 11, norm="layernorm"),
    "vgg16": partial(VGG, 16, norm=None),
    "vgg16-bn": partial(VGG, 16, norm="batchnorm"),
    "vgg16-ln": partial(VGG, 16, norm="layernorm"),
    "resnet20": partial(ResNet20, norm="layernorm"),
    "resnet20-bn": partial(ResNet20, norm="batchnorm"),
}

MODELS: tuple[str, ...] = tuple(_REGISTRY)


def build_model(name: str, *, input_shape: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
    """Build zoo model ``name`` (one of :data:`MODELS`); ``kwargs`` go to its constructor (e.g. ``width``)."""
    try:
        factory = _REGISTRY[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None
    return factory(input_shape=tuple(input_shape), num_classes=num_classes, **kwargs)
