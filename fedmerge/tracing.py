"""Derive a :class:`~fedmerge.spec.PermutationSpec` automatically, by tracing a module with torch.fx.

Writing a spec by hand is error-prone (a forgotten bias or BatchNorm buffer silently breaks the
symmetry), and users' models have no hand-written spec at all.  But the spec follows mechanically
from the dataflow: a layer that *produces* features (Linear, Conv) starts a new permutation group
on its output axis; layers that act on each feature separately (norms, activations, pooling) carry
the group through and have their per-feature parameters permuted by it; a layer that *consumes*
features has its input axis permuted by the incoming group; a residual addition forces both of its
operands to share one permutation, so their groups are merged (union-find); and whatever reaches
the network output must keep its order, so those groups are dropped (made ``None``).

:func:`spec_from_module` walks the torch.fx graph once, applying exactly those rules, and refuses
(with an error naming the module) anything it does not understand, rather than guessing: a wrong
spec would make merging silently produce a broken model.  When in doubt a group may always be made
``None`` (no permutation is always a valid symmetry), which the rules use where a tensor would need
two permuted axes.
"""

from __future__ import annotations

import builtins
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .spec import PermutationSpec

__all__ = ["spec_from_module", "spec_for", "TracingError", "UnsupportedModuleError", "UntraceableModuleError"]


class TracingError(ValueError):
    """The tracer cannot derive a spec for this module (see the message for the culprit)."""


class UnsupportedModuleError(TracingError):
    """A layer or operation whose permutation behaviour the tracer does not know."""


class UntraceableModuleError(TracingError):
    """torch.fx could not trace the module (e.g. data-dependent control flow)."""


SUPPORTED = (
    "nn.Linear; nn.Conv1d/2d/3d and nn.ConvTranspose1d/2d/3d with groups=1, depthwise convs "
    "(groups == in_channels); nn.BatchNorm1d/2d/3d, nn.InstanceNorm1d/2d/3d, nn.LayerNorm, "
    "nn.GroupNorm with 1 or C groups; elementwise activations (ReLU, ReLU6, LeakyReLU, PReLU, ELU, SELU, "
    "CELU, GELU, SiLU, Mish, Sigmoid, Tanh, Softplus, Hardswish, Hardsigmoid, Hardtanh, Softmax, "
    "LogSoftmax), Identity and Dropout; max/avg/adaptive/LP pooling, Upsample and padding; flatten, "
    "view/reshape that keep the feature axis leading, squeeze/unsqueeze/permute/transpose, "
    "mean/sum/amax/amin reductions; +, -, *, / between tensors or with scalars"
)

_HINT = "write a permutation_spec() method for this model by hand instead"

# ----------------------------------------------------------------------------- operation tables


def _funcs(module, names):
    return {f for f in (getattr(module, n, None) for n in names) if f is not None}


_ACTIVATION_NAMES = ["relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "selu_",
                     "celu", "celu_", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "hardtanh",
                     "hardtanh_", "sigmoid", "tanh", "softplus", "softsign", "tanhshrink", "logsigmoid",
                     "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
                     "softmax", "log_softmax", "softmin", "rrelu", "threshold"]
_ELEMENTWISE_FUNCS = (_funcs(F, _ACTIVATION_NAMES)
                      | _funcs(torch, ["relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "softmax",
                                       "log_softmax", "exp", "log", "abs", "neg", "sqrt", "rsqrt", "square",
                                       "clamp", "clip", "erf", "dropout", "selu", "celu"])
                      | {operator.neg, operator.pos, operator.abs})
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "abs", "neg",
                        "sqrt", "rsqrt", "square", "clamp", "clamp_", "clip", "softmax", "log_softmax", "erf",
                        "contiguous", "float", "double", "half", "bfloat16", "to", "clone", "detach", "cpu",
                        "cuda", "type_as", "requires_grad_"}
_SPATIAL_FUNCS = _funcs(F, ["max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
                            "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
                            "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
                            "lp_pool1d", "lp_pool2d", "lp_pool3d", "interpolate", "upsample"]) \
    | _funcs(torch, ["max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "adaptive_avg_pool1d",
                     "adaptive_max_pool1d"])
_SPATIAL_DIMS = {"1d": 1, "2d": 2, "3d": 3}
_BINARY_FUNCS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                 operator.imul, operator.itruediv, operator.pow} \
    | _funcs(torch, ["add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "maximum",
                     "minimum", "pow"])
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum"}
_REDUCE_FUNCS = _funcs(torch, ["mean", "sum", "amax", "amin"])
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_FACTORIES = {"zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange", "linspace", "eye",
              "tensor", "as_tensor", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
              "randn_like"}
_NON_TENSOR_METHODS = {"size", "dim", "numel", "nelement", "stride", "element_size", "is_contiguous",
                       "get_device", "ndimension"}
_NON_TENSOR_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                        nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
                        nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Threshold, nn.RReLU, nn.Identity,
                        nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d,
                        nn.modules.dropout._DropoutNd)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
                 nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd,
                 nn.modules.padding._ConstantPadNd)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PER_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)

FIXED = 0  # union-find id of "not permuted": anything joined with it is dropped from the spec


# ----------------------------------------------------------------------------- values


@dataclass(frozen=True)
class _T:
    """A tensor in the graph: ``group`` acts on ``axis`` (``FIXED``: nothing is permuted).

    ``axis`` is non-negative when ``rank`` is known, else counted from the end (``-1``).
    """

    group: int
    axis: int | None
    rank: int | None
    shape: tuple | None = None


class _Other:
    """A non-tensor value (sizes, shapes, dtypes, Python numbers)."""

    def __repr__(self) -> str:
        return "<non-tensor>"


OTHER = _Other()


def _meta_shape(node: torch.fx.Node) -> tuple | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _qualname(cls: Any) -> str:
    if isinstance(cls, str):
        return cls
    return f"{cls.__module__}.{cls.__qualname__}"


def _fn_name(target: Any) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}"
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", repr(target))
    if getattr(F, name, None) is target:
        return f"torch.nn.functional.{name}"
    if getattr(torch, name, None) is target:
        return f"torch.{name}"
    if mod in ("_operator", "operator"):
        mod = "operator"
    elif mod.startswith("torch._C") or not mod:
        mod = "torch"
    return f"{mod}.{name}"


class _Tracer(torch.fx.Tracer):
    """The default fx tracer, remembering the innermost module a tracing failure happened in."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: tuple[str, type] | None = None

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                try:
                    self.failed_in = (self.path_of_module(m), type(m))
                except Exception:
                    self.failed_in = ("?", type(m))
            raise


class _Wrap(nn.Module):
    """Lets a bare leaf layer (``nn.Linear``, ``nn.LSTM``...) be traced as a call_module node."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


# ----------------------------------------------------------------------------- the analysis


class _Analysis:
    def __init__(self, root: nn.Module, display_root: str, prefix: str) -> None:
        self.root = root
        self.display_root = display_root  # class name of the user's module, for messages
        self.prefix = prefix  # "module." when the user's module was wrapped
        self.modules = dict(root.named_modules())
        self.state = root.state_dict()
        self.parent: list[int] = [FIXED]
        self.size: list[int] = [0]
        self.origin: list[str] = ["<fixed>"]
        self.module_group: dict[str, int] = {}
        self.axes: dict[str, list[int]] = {}
        self.values: dict[torch.fx.Node, Any] = {}

    # ---------------------------------------------------------------- naming
    def name(self, qualified: str) -> str:
        if self.prefix and qualified.startswith(self.prefix):
            return qualified[len(self.prefix):]
        if self.prefix and qualified == self.prefix[:-1]:
            return "<root>"
        return qualified or "<root>"

    def where(self, node: torch.fx.Node) -> str:
        if node.op == "call_module":
            m = self.modules[node.target]
            return f"module '{self.name(node.target)}' ({_qualname(type(m))})"
        what = f"{_fn_name(node.target)} (graph node '{node.name}')"
        stack = node.meta.get("nn_module_stack")
        if stack:
            path, cls = list(stack.values())[-1]
            return f"{what} in module '{self.name(path)}' ({_qualname(cls)})"
        return f"{what} in the forward of {self.display_root}"

    def unsupported(self, node: torch.fx.Node, why: str = "") -> UnsupportedModuleError:
        why = f": {why}" if why else " is not supported"
        direct = [a.target for a in node.all_input_nodes if a.op == "get_attr" and a.target in self.state]
        if direct:
            why += (f"; it uses parameter '{self.name(direct[0])}' directly (functional use of a parameter, "
                    f"e.g. F.linear(x, self.weight)): the tracer only knows how the parameters of standard "
                    f"layers permute, so use nn.Linear / nn.Conv* modules")
        return UnsupportedModuleError(
            f"cannot derive a permutation spec: {self.where(node)}{why}. Supported: {SUPPORTED}. "
            f"Otherwise {_HINT}.")

    # ---------------------------------------------------------------- union-find
    def new_group(self, size: int, origin: str) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.origin.append(origin)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if FIXED not in (ra, rb) and self.size[ra] != self.size[rb]:
            # no single permutation can act on both: keep both unpermuted (always valid)
            self.parent[ra] = FIXED
            self.parent[rb] = FIXED
            return FIXED
        lo, hi = min(ra, rb), max(ra, rb)  # the earliest group names the merged one; FIXED wins
        self.parent[hi] = lo
        return lo

    def fix(self, g: int) -> None:
        self.union(g, FIXED)

    def assign(self, key: str, groups: list[int]) -> None:
        previous = self.axes.get(key)
        if previous is None:
            self.axes[key] = list(groups)
        else:  # a module called more than once: its weights must fit every call
            for p, g in zip(previous, groups):
                self.union(p, g)

    def layer_group(self, name: str, size: int) -> int:
        """The group of a layer's output units (the same group every time the layer is called)."""
        if name not in self.module_group:
            self.module_group[name] = self.new_group(size, self.name(name))
        return self.module_group[name]

    # ---------------------------------------------------------------- values
    def make(self, node: torch.fx.Node, group: int, axis: int | None, rank: int | None) -> _T:
        shape = _meta_shape(node)
        if shape is not None:
            if rank is not None and axis is not None and axis < 0:
                axis += rank
            if rank is None and axis is not None and axis < 0:
                axis += len(shape)
            rank = len(shape)
        elif rank is not None and axis is not None and axis < 0:
            axis += rank
        group = self.find(group)
        if group == FIXED:
            axis = None
        return _T(group, axis, rank, shape)

    def same(self, node: torch.fx.Node, x: _T) -> _T:
        return self.make(node, x.group, x.axis, x.rank)

    def value(self, arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            return self.values[arg]
        if isinstance(arg, (tuple, list)):
            return type(arg)(self.value(a) for a in arg)
        return OTHER

    def tensor(self, node: torch.fx.Node, arg: Any) -> _T:
        v = self.value(arg)
        if not isinstance(v, _T):
            raise self.unsupported(node, "its input is not a single tensor")
        return _T(self.find(v.group), v.axis if self.find(v.group) != FIXED else None, v.rank, v.shape)

    def neg_axis(self, t: _T) -> int | None:
        if t.axis is None:
            return None
        if t.axis < 0:
            return t.axis
        return t.axis - t.rank if t.rank is not None else None

    def need_rank(self, node: torch.fx.Node, t: _T) -> int:
        if t.rank is None:
            raise TracingError(
                f"cannot derive a permutation spec: {self.where(node)} needs to know the number of "
                f"dimensions of its input; pass example_input= to spec_from_module (or give the "
                f"model an input_shape attribute)")
        return t.rank

    def pos_axis(self, node: torch.fx.Node, t: _T) -> int:
        """The permuted axis of ``t``, counted from the front."""
        if t.axis is not None and t.axis >= 0:
            return t.axis
        return t.axis + self.need_rank(node, t)

    # ---------------------------------------------------------------- driver
    def run(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "placeholder":
                shape = _meta_shape(node)
                self.values[node] = _T(FIXED, None, len(shape) if shape is not None else None, shape)
            elif node.op == "get_attr":
                self.values[node] = self.get_attr(node)
            elif node.op == "call_module":
                self.values[node] = self.call_module(node)
            elif node.op == "call_function":
                self.values[node] = self.call_function(node)
            elif node.op == "call_method":
                self.values[node] = self.call_method(node)
            elif node.op == "output":
                self.output(self.value(node.args[0]))

    def output(self, v: Any) -> None:
        if isinstance(v, _T):
            self.fix(v.group)
        elif isinstance(v, (tuple, list)):
            for item in v:
                self.output(item)
        elif isinstance(v, dict):
            for item in v.values():
                self.output(item)

    def get_attr(self, node: torch.fx.Node) -> Any:
        """A tensor attribute read in ``forward``: a constant that is never permuted.

        A parameter or buffer used this way (say an input-normalisation buffer) keeps all its axes
        unpermuted; the rules for whatever consumes it then decide whether that is consistent (a
        residual-style ``x + self.bias`` fixes ``x``'s group, ``F.linear(x, self.weight)`` is refused).
        """
        obj = self.root
        for part in node.target.split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, torch.Tensor):
            return OTHER
        if node.target in self.state:
            self.assign(node.target, [FIXED] * obj.dim())
        return _T(FIXED, None, obj.dim(), tuple(obj.shape))

    # ---------------------------------------------------------------- modules
    def call_module(self, node: torch.fx.Node) -> _T:
        name = node.target
        m = self.modules[name]
        if isinstance(m, nn.Linear):
            return self.linear(node, name, m)
        if isinstance(m, _CONV):
            return self.conv(node, name, m)
        if isinstance(m, _CONV_T):
            return self.conv_transpose(node, name, m)
        if isinstance(m, _PER_CHANNEL_NORMS):
            return self.per_channel_norm(node, name, m)
        if isinstance(m, nn.LayerNorm):
            return self.layer_norm(node, name, m)
        if isinstance(m, nn.GroupNorm):
            return self.group_norm(node, name, m)
        if isinstance(m, nn.PReLU):
            return self.prelu(node, name, m)
        if isinstance(m, _ELEMENTWISE_MODULES):
            return self.same(node, self.tensor(node, node.args[0]))
        if isinstance(m, _POOL_MODULES):
            if getattr(m, "return_indices", False):
                raise self.unsupported(node, "pooling with return_indices=True is not supported")
            return self.spatial(node, self.tensor(node, node.args[0]), self.spatial_dims(m))
        if isinstance(m, nn.Flatten):
            return self.flatten(node, self.tensor(node, node.args[0]), m.start_dim, m.end_dim)
        if isinstance(m, nn.Sequential):  # an empty Sequential is called as a leaf
            return self.same(node, self.tensor(node, node.args[0]))
        raise self.unsupported(node)

    def check_keys(self, node: torch.fx.Node, name: str, m: nn.Module, known: set[str]) -> None:
        extra = [k for k in m.state_dict() if k not in known]
        if extra:
            raise self.unsupported(node, f"it has state {extra} that the tracer does not know how to permute")

    def linear(self, node, name, m: nn.Linear) -> _T:
        x = self.tensor(node, node.args[0])
        out = self.layer_group(name, m.out_features)
        in_group = x.group
        if x.group != FIXED and self.neg_axis(x) is None:
            self.need_rank(node, x)
        if x.group != FIXED and self.neg_axis(x) != -1:
            # Linear acts on the last axis, but the permuted axis is another one: keep that one,
            # leave the new output units unpermuted (a tensor carries one permuted axis here).
            self.fix(out)
            self.assign(f"{name}.weight", [FIXED, FIXED])
            if m.bias is not None:
                self.assign(f"{name}.bias", [FIXED])
            return self.same(node, x)
        self.assign(f"{name}.weight", [out, in_group])
        if m.bias is not None:
            self.assign(f"{name}.bias", [out])
        self.check_keys(node, name, m, {"weight", "bias"})
        return self.make(node, out, -1, x.rank)

    def channel_input(self, node, x: _T, what: str) -> int:
        """The input group of a layer that reads channels on axis 1 (``FIXED`` if unpermuted)."""
        if x.group == FIXED:
            return FIXED
        if self.pos_axis(node, x) == 1:
            return x.group
        raise self.unsupported(node, f"{what} reads channels on axis 1, but the permuted axis of its "
                                     f"input is axis {x.axis} (of {x.rank})")

    def conv(self, node, name, m) -> _T:
        x = self.tensor(node, node.args[0])
        g_in = self.channel_input(node, x, "a convolution")
        nd = len(m.kernel_size)
        rank = x.rank if x.rank is not None else nd + 2
        if m.groups == 1:
            out = self.layer_group(name, m.out_channels)
            self.assign(f"{name}.weight", [out, g_in] + [FIXED] * nd)
        elif m.groups == m.in_channels and m.out_channels % m.in_channels == 0:
            # depthwise: output channel j reads input channel j // k, so the input permutation acts
            # on the output in blocks of k = out / in consecutive channels
            out = g_in
            self.assign(f"{name}.weight", [g_in, FIXED] + [FIXED] * nd)
        else:
            raise self.unsupported(
                node, f"it is a grouped convolution with groups={m.groups} (in_channels={m.in_channels}, "
                      f"out_channels={m.out_channels}); only groups=1 and depthwise convolutions "
                      f"(groups == in_channels) are supported, because a channel permutation would have "
                      f"to keep every channel inside its group")
        if m.bias is not None:
            self.assign(f"{name}.bias", [out])
        self.check_keys(node, name, m, {"weight", "bias"})
        return self.make(node, out, 1, rank)

    def conv_transpose(self, node, name, m) -> _T:
        x = self.tensor(node, node.args[0])
        g_in = self.channel_input(node, x, "a transposed convolution")
        if m.groups != 1:
            raise self.unsupported(node, f"it is a grouped transposed convolution (groups={m.groups}); "
                                         f"only groups=1 is supported")
        nd = len(m.kernel_size)
        out = self.layer_group(name, m.out_channels)
        self.assign(f"{name}.weight", [g_in, out] + [FIXED] * nd)  # weight is (in, out, *kernel)
        if m.bias is not None:
            self.assign(f"{name}.bias", [out])
        self.check_keys(node, name, m, {"weight", "bias"})
        return self.make(node, out, 1, x.rank if x.rank is not None else nd + 2)

    def per_channel_norm(self, node, name, m) -> _T:
        x = self.tensor(node, node.args[0])
        # statistics over everything but axis 1: a permutation of another axis leaves them unchanged
        g = x.group if x.group != FIXED and self.pos_axis(node, x) == 1 else FIXED
        for key, t in m.state_dict().items():
            self.assign(f"{name}.{key}", [] if key == "num_batches_tracked" else [g] * t.dim())
        return self.same(node, x)

    def layer_norm(self, node, name, m: nn.LayerNorm) -> _T:
        x = self.tensor(node, node.args[0])
        k = len(m.normalized_shape)
        axes = [FIXED] * k
        if x.group != FIXED:
            rank = self.need_rank(node, x)
            a = self.pos_axis(node, x)
            # statistics over the last k axes are invariant to permuting any of them; the affine
            # parameters are elementwise over those axes
            if a >= rank - k:
                axes[a - (rank - k)] = x.group
        for key in ("weight", "bias"):
            if getattr(m, key, None) is not None:
                self.assign(f"{name}.{key}", list(axes))
        self.check_keys(node, name, m, {"weight", "bias"})
        return self.same(node, x)

    def group_norm(self, node, name, m: nn.GroupNorm) -> _T:
        x = self.tensor(node, node.args[0])
        g = self.channel_input(node, x, "GroupNorm")
        if g != FIXED and m.num_groups not in (1, m.num_channels):
            raise self.unsupported(
                node, f"GroupNorm with num_groups={m.num_groups} of {m.num_channels} channels normalises "
                      f"groups of channels together; only num_groups=1 (LayerNorm over (C, H, W)) or "
                      f"num_groups=C (per channel) commute with every channel permutation")
        for key in ("weight", "bias"):
            if getattr(m, key, None) is not None:
                self.assign(f"{name}.{key}", [g])
        self.check_keys(node, name, m, {"weight", "bias"})
        return self.same(node, x)

    def prelu(self, node, name, m: nn.PReLU) -> _T:
        x = self.tensor(node, node.args[0])
        g = FIXED
        if m.num_parameters > 1 and x.group != FIXED and self.pos_axis(node, x) == 1:
            g = x.group  # one slope per channel (axis 1)
        self.assign(f"{name}.weight", [g])
        return self.same(node, x)

    def spatial_dims(self, m: nn.Module) -> int | None:
        for suffix, n in _SPATIAL_DIMS.items():
            if type(m).__name__.endswith(suffix):
                return n
        return None  # Upsample: every axis after the channels

    def spatial(self, node, x: _T, n: int | None) -> _T:
        """Pooling, upsampling, padding: they act on the last ``n`` axes, each channel separately."""
        if x.group != FIXED and x.rank is not None:
            a = self.pos_axis(node, x)
            first_spatial = x.rank - n if n is not None else 2
            if a >= first_spatial:
                raise self.unsupported(node, f"it acts on axis {a}, which carries a permutation")
        return self.same(node, x)

    # ---------------------------------------------------------------- functions and methods
    def call_function(self, node: torch.fx.Node) -> Any:
        f = node.target
        args = node.args
        if f is builtins.getattr:
            base = self.value(args[0])
            if isinstance(base, _T) and args[1] not in _NON_TENSOR_ATTRS:
                raise self.unsupported(node, f"attribute '{args[1]}' of a tensor is not supported")
            return OTHER
        if f is operator.getitem:
            base = self.value(args[0])
            if isinstance(base, _T):
                raise self.unsupported(node, "indexing or slicing a tensor is not supported")
            if isinstance(base, (tuple, list)) and isinstance(args[1], int):
                return base[args[1]]
            return OTHER
        if f in (builtins.len, builtins.int, builtins.float):
            return OTHER
        if f in _BINARY_FUNCS:
            return self.binary(node)
        if self.has_tensor(list(args[1:]) + list(node.kwargs.values())):
            raise self.unsupported(node)  # of several tensors, only +, -, *, / are understood
        if f in _ELEMENTWISE_FUNCS:
            return self.same(node, self.tensor(node, args[0]))
        if f in _SPATIAL_FUNCS:
            name = getattr(f, "__name__", "")
            n = next((d for s, d in _SPATIAL_DIMS.items() if name.endswith(s)), None)
            if node.kwargs.get("return_indices") or (len(args) > 6 and args[6] is True):
                raise self.unsupported(node, "pooling with return_indices=True is not supported")
            return self.spatial(node, self.tensor(node, args[0]), n)
        if f is F.pad:
            pad = args[1] if len(args) > 1 else node.kwargs.get("pad")
            return self.spatial(node, self.tensor(node, args[0]), len(pad) // 2)
        if f is torch.flatten:
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, self.tensor(node, args[0]), start, end)
        if f is torch.reshape:
            return self.reshape(node, self.tensor(node, args[0]), args[0], args[1:] or (node.kwargs.get("shape"),))
        if f in _REDUCE_FUNCS:
            return self.reduce(node)
        if f in (torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose, torch.swapaxes):
            return self.move_axes(node, f.__name__)
        if not self.has_tensor(list(args) + list(node.kwargs.values())):
            # no tensor goes in: arithmetic on sizes, or a new tensor (torch.zeros...), unpermuted
            shape = _meta_shape(node)
            if shape is not None or getattr(f, "__name__", "") in _FACTORIES:
                return self.make(node, FIXED, None, None)
            return OTHER
        raise self.unsupported(node)

    def has_tensor(self, args) -> bool:
        """Whether any argument (searching inside tuples, lists and dicts) is a tensor."""
        for a in args:
            if isinstance(a, (tuple, list)):
                if self.has_tensor(a):
                    return True
            elif isinstance(a, dict):
                if self.has_tensor(list(a.values())):
                    return True
            elif isinstance(a, torch.fx.Node) and isinstance(self.values[a], _T):
                return True
        return False

    def call_method(self, node: torch.fx.Node) -> Any:
        m = node.target
        args = node.args
        if m in _NON_TENSOR_METHODS:
            return OTHER
        if m in _BINARY_METHODS:
            return self.binary(node)
        if m not in ("to", "type_as") and self.has_tensor(list(args[1:]) + list(node.kwargs.values())):
            raise self.unsupported(node)  # of several tensors, only +, -, *, / are understood
        if m in _ELEMENTWISE_METHODS:
            return self.same(node, self.tensor(node, args[0]))
        if m in ("view", "reshape"):
            return self.reshape(node, self.tensor(node, args[0]), args[0], args[1:])
        if m == "flatten":
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, self.tensor(node, args[0]), start, end)
        if m in _REDUCE_METHODS:
            return self.reduce(node)
        if m in ("squeeze", "unsqueeze", "permute", "transpose", "swapaxes"):
            return self.move_axes(node, m)
        raise self.unsupported(node)

    def binary(self, node) -> Any:
        """``a + b`` and friends: elementwise, so both operands must be permuted alike."""
        named = ("input", "other", "exponent")
        operands = list(node.args[:2]) + [v for k, v in node.kwargs.items() if k in named]
        if len(operands) != 2 or self.has_tensor(list(node.args[2:]) + [
                v for k, v in node.kwargs.items() if k not in named]):
            raise self.unsupported(node)
        vals = [self.value(a) for a in operands]
        tensors = [v for v in vals if isinstance(v, _T)]
        if not tensors:
            return OTHER
        if len(tensors) == 1:  # tensor and scalar
            return self.same(node, tensors[0])
        a, b = (self.tensor(node, operands[0]), self.tensor(node, operands[1]))
        if a.group == FIXED and b.group == FIXED:
            return self.make(node, FIXED, None, None)
        if a.group != FIXED and b.group != FIXED:
            na, nb = self.neg_axis(a), self.neg_axis(b)
            if na is None or nb is None:
                if not (a.axis == b.axis and a.rank == b.rank):
                    self.need_rank(node, a if na is None else b)
                na = nb = a.axis
            if na != nb:
                raise self.unsupported(node, f"its operands are permuted on different axes ({a.axis} and {b.axis})")
            g = self.union(a.group, b.group)  # residual connection: one permutation for both
            return self.make(node, g, na, None if na >= 0 else max(a.rank or 0, b.rank or 0) or None)
        p, u = (a, b) if a.group != FIXED else (b, a)
        na = self.neg_axis(p)
        broadcast = False  # does the unpermuted operand have length 1 (or no entry) on that axis?
        if na is not None and u.shape is not None:
            broadcast = len(u.shape) < -na or u.shape[na] == 1
        elif na is not None and u.rank is not None:
            broadcast = u.rank < -na
        if broadcast:
            return self.same(node, p)
        self.fix(p.group)  # x + f(x) with an unpermuted x: f's output must stay unpermuted
        return self.make(node, FIXED, None, p.rank)

    def flatten(self, node, x: _T, start: int, end: int) -> _T:
        if x.group == FIXED:
            if x.rank:
                rank = x.rank - (end % x.rank - start % x.rank)
            else:  # unknown input rank: flatten(x, s) with end_dim=-1 still has rank s + 1
                rank = start + 1 if end == -1 and start >= 0 else None
            return self.make(node, FIXED, None, rank)
        if x.rank is None:
            if start == 1 and end == -1 and x.axis == 1:
                return self.make(node, x.group, 1, 2)
            self.need_rank(node, x)
        rank = x.rank
        s, e = start % rank, end % rank
        a = self.pos_axis(node, x)
        if a < s:
            new = a
        elif a == s:  # the permuted axis leads the merged axis: a block-wise permutation of it
            new = s
        elif a <= e:
            raise self.unsupported(node, f"it merges axis {a}, which carries a permutation, behind axis {s}; "
                                         f"the permuted axis must lead the flattened block")
        else:
            new = a - (e - s)
        return self.make(node, x.group, new, rank - (e - s))

    def reshape(self, node, x: _T, x_arg, shape_args) -> _T:
        if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
            shape_args = tuple(shape_args[0])
        if x.group == FIXED:
            return self.make(node, FIXED, None, len(shape_args) or None)
        in_shape, out_shape = x.shape, _meta_shape(node)
        if in_shape is not None and out_shape is not None:
            a = self.pos_axis(node, x)
            before = math.prod(in_shape[:a])
            acc = 1
            for b, n in enumerate(out_shape):
                if acc == before and n % in_shape[a] == 0 and n > 0:
                    return self.make(node, x.group, b, len(out_shape))
                acc *= n
                if acc > before:
                    break
            raise self.unsupported(node, f"it reshapes {tuple(in_shape)} to {tuple(out_shape)}, which splits or "
                                         f"moves axis {a}, which carries a permutation")
        # no shapes: recognise x.view(x.size(0), -1) / x.reshape(x.shape[0], -1)
        if len(shape_args) == 2 and shape_args[1] == -1 and self.is_batch_size(shape_args[0]) and (
                x.axis == 1):
            return self.make(node, x.group, 1, 2)
        raise TracingError(
            f"cannot derive a permutation spec: {self.where(node)} reshapes a permuted tensor and the "
            f"tracer needs shapes to check it; pass example_input= to spec_from_module (or give the model "
            f"an input_shape attribute)")

    def is_batch_size(self, arg) -> bool:
        if not isinstance(arg, torch.fx.Node):
            return False
        if arg.op == "call_method" and arg.target == "size":
            dim = arg.args[1] if len(arg.args) > 1 else arg.kwargs.get("dim")
            return dim == 0
        if arg.op == "call_function" and arg.target is operator.getitem and arg.args[1] == 0:
            base = arg.args[0]
            return isinstance(base, torch.fx.Node) and (
                (base.op == "call_function" and base.target is builtins.getattr and base.args[1] == "shape")
                or (base.op == "call_method" and base.target == "size" and len(base.args) == 1))
        return False

    def reduce(self, node) -> _T:
        args, kw = node.args, node.kwargs
        x = self.tensor(node, args[0])
        dims = args[1] if len(args) > 1 else kw.get("dim", kw.get("axis"))
        keepdim = args[2] if len(args) > 2 else kw.get("keepdim", False)
        if not isinstance(keepdim, bool):
            keepdim = False
        if dims is None:  # a full reduction: a scalar, invariant to every permutation
            return self.make(node, FIXED, None, 0)
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims):
            raise self.unsupported(node, "reduction dims must be constants")
        if x.group == FIXED:
            rank = None if x.rank is None else (x.rank if keepdim else x.rank - len(dims))
            return self.make(node, FIXED, None, rank)
        rank = self.need_rank(node, x)
        dims = sorted({d % rank for d in dims})
        a = self.pos_axis(node, x)
        new_rank = rank if keepdim else rank - len(dims)
        if a in dims:  # summing over the permuted units gives the same result in any order
            return self.make(node, FIXED, None, new_rank)
        new = a if keepdim else a - sum(d < a for d in dims)
        return self.make(node, x.group, new, new_rank)

    def move_axes(self, node, op: str) -> _T:
        args = node.args
        x = self.tensor(node, args[0])
        rest = list(args[1:])
        if x.group == FIXED:
            return self.make(node, FIXED, None, None)
        rank = self.need_rank(node, x)
        a = self.pos_axis(node, x)
        if op == "unsqueeze":
            d = (rest[0] if rest else node.kwargs["dim"]) % (rank + 1)
            return self.make(node, x.group, a + (d <= a), rank + 1)
        if op == "squeeze":
            if rest or "dim" in node.kwargs:
                ds = rest[0] if rest else node.kwargs["dim"]
                ds = [ds] if isinstance(ds, int) else list(ds)
                ds = [d % rank for d in ds]
                if x.shape is not None:
                    ds = [d for d in ds if x.shape[d] == 1]
            elif x.shape is not None:
                ds = [d for d, n in enumerate(x.shape) if n == 1]
            else:
                self.need_rank(node, _T(x.group, x.axis, None))
                ds = []
            if a in ds:  # a group of size 1 has nothing to permute
                return self.make(node, FIXED, None, rank - len(ds))
            return self.make(node, x.group, a - sum(d < a for d in ds), rank - len(ds))
        if op == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            dims = [d % rank for d in (dims or node.kwargs.get("dims"))]
            return self.make(node, x.group, dims.index(a), rank)
        # transpose / swapaxes
        d0 = (rest[0] if rest else node.kwargs.get("dim0")) % rank
        d1 = (rest[1] if len(rest) > 1 else node.kwargs.get("dim1")) % rank
        new = d1 if a == d0 else d0 if a == d1 else a
        return self.make(node, x.group, new, rank)

    # ---------------------------------------------------------------- result
    def spec(self) -> PermutationSpec:
        axes: dict[str, tuple] = {}
        sizes: dict[str, int] = {}
        names: dict[int, str] = {}
        for key, t in self.state.items():
            groups = self.axes.get(key)
            if groups is None:  # never used by the forward: any order is fine, keep it
                groups = [FIXED] * t.dim()
            if len(groups) != t.dim():
                raise TracingError(f"internal error: {len(groups)} axes recorded for {key!r} of shape "
                                   f"{tuple(t.shape)}")
            out = []
            for g in groups:
                r = self.find(g)
                if r == FIXED:
                    out.append(None)
                    continue
                if r not in names:
                    base = self.origin[r]
                    name, i = base, 1
                    while name in sizes:
                        i += 1
                        name = f"{base}#{i}"
                    names[r] = name
                    sizes[name] = self.size[r]
                out.append(names[r])
            axes[self.name(key)] = tuple(out)
        return PermutationSpec(axes, sizes)


# ----------------------------------------------------------------------------- public API


def _example(module: nn.Module, example_input: Any) -> tuple | None:
    if example_input is not None:
        return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    shape = getattr(module, "input_shape", None)
    if shape is None:
        return None
    p = next((t for t in module.parameters() if t.is_floating_point()), None)
    dtype = p.dtype if p is not None else torch.float32
    device = p.device if p is not None else None
    return (torch.zeros((2, *tuple(shape)), dtype=dtype, device=device),)


def spec_from_module(module: nn.Module, example_input: Any = None) -> PermutationSpec:
    """Trace ``module`` with torch.fx and derive its :class:`PermutationSpec`.

    ``example_input`` (a tensor, or a tuple for several inputs) lets the tracer know tensor shapes,
    which some rules need (reshapes, reductions over negative dims); without it the module's
    ``input_shape`` attribute is used when it has one.  The module is run once on that input in
    eval mode (its state is not changed).

    Raises :class:`UnsupportedModuleError` naming the layer or operation it does not know and
    :class:`UntraceableModuleError` when torch.fx cannot trace the module; both are ``ValueError``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"spec_from_module needs an nn.Module, got {type(module).__name__}")
    display = type(module).__name__
    root, prefix = module, ""
    tracer = _Tracer()
    if tracer.is_leaf_module(module, ""):
        root, prefix = _Wrap(module), "module."
    try:
        graph = tracer.trace(root)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError... on untraceable code
        where = ""
        if tracer.failed_in is not None:
            path, cls = tracer.failed_in
            path = path[len(prefix):] if prefix and path.startswith(prefix) else path
            where = f" The failure happened inside module '{path or '<root>'}' ({_qualname(cls)})."
        raise UntraceableModuleError(
            f"cannot derive a permutation spec: {_qualname(type(module))} cannot be traced by torch.fx "
            f"({type(e).__name__}: {e}).{where} The model must be traceable by torch.fx: no control flow "
            f"or loops that depend on tensor values or sizes. Otherwise {_HINT}.") from e
    gm = torch.fx.GraphModule(root, graph)
    args = _example(module, example_input)
    if args is not None:
        modes = {m: m.training for m in root.modules()}
        try:
            root.eval()
            with torch.no_grad():
                ShapeProp(gm).propagate(*args)
        except Exception as e:
            raise TracingError(f"cannot derive a permutation spec: running {display} on the example input "
                               f"failed ({type(e).__name__}: {e})") from e
        finally:
            for m, training in modes.items():
                m.training = training
    analysis = _Analysis(root, display, prefix)
    analysis.run(gm.graph)
    spec = analysis.spec()
    spec.check_state_dict(module.state_dict(), name=f"{display}.state_dict()")
    return spec


def spec_for(model: nn.Module) -> PermutationSpec:
    """The model's own ``permutation_spec()`` when it has one (zoo models), else the traced spec."""
    method = getattr(model, "permutation_spec", None)
    if callable(method):
        return method()
    return spec_from_module(model)
