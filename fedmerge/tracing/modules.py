"""Rules for ``call_module`` nodes: how each standard layer moves, creates or consumes unit groups.

A layer that *produces* units (Linear, Conv, ConvTranspose) starts a group on its output axis,
``orthogonal`` until a use lowers it; a layer that *consumes* units records the incoming group on
its weight's input axis (the weight absorbs any invertible map there, so the kind is unchanged);
norms, activations, pooling carry the group through, record it on their per-unit parameters and
lower its kind to what they commute with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from . import shapes
from .groups import FIXED
from .tables import (CONV, CONV_T, ELEMENTWISE_MODULES, HARDTANH, ORTHOGONAL, PAD_CONSTANT, PER_CHANNEL_NORMS,
                     PERMUTATION, SIGNED, SPATIAL_DIMS, SPATIAL_MODULES)
from .values import T

if TYPE_CHECKING:
    from .analysis import Analysis

__all__ = ["call_module"]


def call_module(an: "Analysis", node) -> T:
    name = node.target
    m = an.modules[name]
    for types, rule in _RULES:
        if isinstance(m, types):
            return rule(an, node, name, m)
    kind = elementwise_kind(m)
    if kind is not None:
        x = _input(an, node)
        an.lower(x, kind)
        return an.same(node, x)
    kind = spatial_kind(m)
    if kind is not None:
        if getattr(m, "return_indices", False):
            raise an.unsupported(node, "pooling with return_indices=True is not supported")
        return shapes.spatial(an, node, _input(an, node), spatial_dims(m), kind)
    raise an.unsupported(node)


def elementwise_kind(m: nn.Module) -> str | None:
    """The most general kind an elementwise module commutes with (``None``: not elementwise)."""
    if isinstance(m, HARDTANH):  # ReLU6 is Hardtanh(0, 6)
        return SIGNED if m.min_val == -m.max_val else PERMUTATION
    for types, kind in ELEMENTWISE_MODULES:
        if isinstance(m, types):
            return kind
    return None


def spatial_kind(m: nn.Module) -> str | None:
    if isinstance(m, PAD_CONSTANT):  # pad(Qx, c) = Q pad(x, c) needs Q to fix the constant vector
        return ORTHOGONAL if m.value == 0 else PERMUTATION
    for types, kind in SPATIAL_MODULES:
        if isinstance(m, types):
            return kind
    return None


def spatial_dims(m: nn.Module) -> int | None:
    for suffix, n in SPATIAL_DIMS.items():
        if type(m).__name__.endswith(suffix):
            return n
    return None  # Upsample: every axis after the channels


def _input(an: "Analysis", node) -> T:
    return an.tensor(node, an.args(node).get("input", node.args[0] if node.args else None))


def check_keys(an: "Analysis", node, m: nn.Module, known: set[str]) -> None:
    extra = [k for k in m.state_dict() if k not in known]
    if extra:
        raise an.unsupported(node, f"it has state {extra} that the tracer does not know how to permute")


def linear(an: "Analysis", node, name: str, m: nn.Linear) -> T:
    x = _input(an, node)
    out = an.layer_group(name, m.out_features)
    if x.group != FIXED and an.neg_axis(x) is None:
        an.need_rank(node, x)
    if x.group != FIXED and an.neg_axis(x) != -1:
        # Linear acts on the last axis, but the transformed axis is another one: keep that one (a
        # linear map along another axis commutes with any map of it), leave the new output units
        # untransformed (a tensor carries one transformed axis here).
        an.fix(out)
        an.assign(f"{name}.weight", [FIXED, FIXED])
        if m.bias is not None:
            an.assign(f"{name}.bias", [FIXED])
        return an.same(node, x)
    an.assign(f"{name}.weight", [out, x.group])
    if m.bias is not None:
        an.assign(f"{name}.bias", [out])
    check_keys(an, node, m, {"weight", "bias"})
    return an.make(node, out, -1, x.rank)


def channel_input(an: "Analysis", node, x: T, what: str) -> int:
    """The input group of a layer that reads channels on axis 1 (``FIXED`` if untransformed)."""
    if x.group == FIXED:
        return FIXED
    if an.pos_axis(node, x) == 1:
        return x.group
    raise an.unsupported(node, f"{what} reads channels on axis 1, but the permuted axis of its "
                               f"input is axis {x.axis} (of {x.rank})")


def conv(an: "Analysis", node, name: str, m) -> T:
    x = _input(an, node)
    g_in = channel_input(an, node, x, "a convolution")
    nd = len(m.kernel_size)
    rank = x.rank if x.rank is not None else nd + 2
    if m.groups == 1:
        out = an.layer_group(name, m.out_channels)
        an.assign(f"{name}.weight", [out, g_in] + [FIXED] * nd)
    elif m.groups == m.in_channels and m.out_channels % m.in_channels == 0:
        # depthwise: output channel j reads input channel j // k, so the input permutation acts
        # on the output in blocks of k = out / in consecutive channels.  Each channel has its own
        # filter, so only a permutation commutes with it (a sign flip would have to leave the
        # filter unflipped while flipping the bias, which one group element cannot do).
        out = g_in
        an.lower(x, PERMUTATION)
        an.assign(f"{name}.weight", [g_in, FIXED] + [FIXED] * nd)
    else:
        raise an.unsupported(
            node, f"it is a grouped convolution with groups={m.groups} (in_channels={m.in_channels}, "
                  f"out_channels={m.out_channels}); only groups=1 and depthwise convolutions "
                  f"(groups == in_channels) are supported, because a channel permutation would have "
                  f"to keep every channel inside its group")
    if m.bias is not None:
        an.assign(f"{name}.bias", [out])
    check_keys(an, node, m, {"weight", "bias"})
    return an.make(node, out, 1, rank)


def conv_transpose(an: "Analysis", node, name: str, m) -> T:
    x = _input(an, node)
    g_in = channel_input(an, node, x, "a transposed convolution")
    if m.groups != 1:
        raise an.unsupported(node, f"it is a grouped transposed convolution (groups={m.groups}); "
                                   f"only groups=1 is supported")
    nd = len(m.kernel_size)
    out = an.layer_group(name, m.out_channels)
    an.assign(f"{name}.weight", [g_in, out] + [FIXED] * nd)  # weight is (in, out, *kernel)
    if m.bias is not None:
        an.assign(f"{name}.bias", [out])
    check_keys(an, node, m, {"weight", "bias"})
    return an.make(node, out, 1, x.rank if x.rank is not None else nd + 2)


# Norms compute statistics per unit (BatchNorm, InstanceNorm) or over the units (LayerNorm,
# GroupNorm) and scale each unit by its own parameter: they commute with permutations of the units
# only.  (BatchNorm commutes with a sign flip only if its scale is left unflipped while its shift
# and running mean flip; one group element acts alike on all of them.)

def per_channel_norm(an: "Analysis", node, name: str, m) -> T:
    x = _input(an, node)
    # statistics over everything but axis 1: a permutation of another axis leaves them unchanged
    g = x.group if x.group != FIXED and an.pos_axis(node, x) == 1 else FIXED
    an.lower(x, PERMUTATION)
    for key, t in m.state_dict().items():
        an.assign(f"{name}.{key}", [] if key == "num_batches_tracked" else [g] * t.dim())
    return an.same(node, x)


def layer_norm(an: "Analysis", node, name: str, m: nn.LayerNorm) -> T:
    x = _input(an, node)
    k = len(m.normalized_shape)
    axes = [FIXED] * k
    if x.group != FIXED:
        rank = an.need_rank(node, x)
        a = an.pos_axis(node, x)
        # statistics over the last k axes are invariant to permuting any of them; the affine
        # parameters are elementwise over those axes
        if a >= rank - k:
            axes[a - (rank - k)] = x.group
    an.lower(x, PERMUTATION)
    for key in ("weight", "bias"):
        if getattr(m, key, None) is not None:
            an.assign(f"{name}.{key}", list(axes))
    check_keys(an, node, m, {"weight", "bias"})
    return an.same(node, x)


def group_norm(an: "Analysis", node, name: str, m: nn.GroupNorm) -> T:
    x = _input(an, node)
    g = channel_input(an, node, x, "GroupNorm")
    if g != FIXED and m.num_groups not in (1, m.num_channels):
        raise an.unsupported(
            node, f"GroupNorm with num_groups={m.num_groups} of {m.num_channels} channels normalises "
                  f"groups of channels together; only num_groups=1 (LayerNorm over (C, H, W)) or "
                  f"num_groups=C (per channel) commute with every channel permutation")
    an.lower(x, PERMUTATION)
    for key in ("weight", "bias"):
        if getattr(m, key, None) is not None:
            an.assign(f"{name}.{key}", [g])
    check_keys(an, node, m, {"weight", "bias"})
    return an.same(node, x)


def prelu(an: "Analysis", node, name: str, m: nn.PReLU) -> T:
    x = _input(an, node)
    g = FIXED
    if m.num_parameters > 1 and x.group != FIXED and an.pos_axis(node, x) == 1:
        g = x.group  # one slope per channel (axis 1)
    an.lower(x, PERMUTATION)
    an.assign(f"{name}.weight", [g])
    return an.same(node, x)


def flatten(an: "Analysis", node, name: str, m: nn.Flatten) -> T:
    return shapes.flatten(an, node, _input(an, node), m.start_dim, m.end_dim)


def empty_sequential(an: "Analysis", node, name: str, m: nn.Sequential) -> T:
    return an.same(node, _input(an, node))  # an empty Sequential is called as a leaf: the identity


_RULES = [
    (nn.Linear, linear),
    (CONV, conv),
    (CONV_T, conv_transpose),
    (PER_CHANNEL_NORMS, per_channel_norm),
    (nn.LayerNorm, layer_norm),
    (nn.GroupNorm, group_norm),
    (nn.PReLU, prelu),
    (nn.Flatten, flatten),
    (nn.Sequential, empty_sequential),
]
