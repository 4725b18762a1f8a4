"""What the tracer knows about torch operations: which are elementwise, spatial, binary, reductions...

Every elementwise or spatial operation is listed with the most general symmetry kind it preserves
(see the package docstring for the reasoning): ``ORTHOGONAL`` for linear maps that act on every
unit alike (they commute with any rotation of the units), ``SIGNED`` for odd functions and
elementwise masks (they commute with sign flips and permutations), ``PERMUTATION`` for everything
else that acts on each unit separately.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

PERMUTATION, SIGNED, ORTHOGONAL = "permutation", "signed-permutation", "orthogonal"

SUPPORTED = (
    "nn.Linear; nn.Conv1d/2d/3d and nn.ConvTranspose1d/2d/3d with groups=1, depthwise convs "
    "(groups == in_channels); nn.BatchNorm1d/2d/3d, nn.InstanceNorm1d/2d/3d, nn.LayerNorm, "
    "nn.GroupNorm with 1 or C groups; elementwise activations (ReLU, ReLU6, LeakyReLU, PReLU, ELU, SELU, "
    "CELU, GELU, SiLU, Mish, Sigmoid, Tanh, Softsign, Tanhshrink, Hardshrink, Softshrink, Softplus, "
    "Hardswish, Hardsigmoid, Hardtanh, Softmax, LogSoftmax), Identity and Dropout; max/avg/adaptive/LP "
    "pooling, Upsample and padding; flatten, view/reshape that keep the feature axis leading, "
    "squeeze/unsqueeze/permute/transpose, mean/sum/amax/amin reductions; +, -, *, / between tensors or "
    "with scalars"
)


def _funcs(module, names, kind):
    return {f: kind for f in (getattr(module, n, None) for n in names) if f is not None}


# ----------------------------------------------------------------------------- elementwise functions

#: ``{function: kind}`` for functions applied to each entry of one tensor.
ELEMENTWISE_FUNCS: dict = {
    **_funcs(F, ["relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "selu_", "celu",
                 "celu_", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "sigmoid", "softplus", "logsigmoid",
                 "alpha_dropout", "feature_alpha_dropout", "softmax", "log_softmax", "softmin", "rrelu",
                 "threshold"], PERMUTATION),
    **_funcs(torch, ["relu", "relu_", "sigmoid", "sigmoid_", "softmax", "log_softmax", "exp", "log", "abs",
                     "sqrt", "rsqrt", "square", "selu", "celu", "cos", "cosh"], PERMUTATION),
    # odd functions and elementwise masks: f(-x) = -f(x)
    **_funcs(F, ["tanh", "softsign", "tanhshrink", "hardshrink", "softshrink", "hardtanh", "hardtanh_",
                 "dropout", "dropout1d", "dropout2d", "dropout3d"], SIGNED),
    **_funcs(torch, ["tanh", "tanh_", "sin", "sinh", "asinh", "atan", "arctan", "erf", "sign", "dropout",
                     "clamp", "clip"], SIGNED),
    # linear
    **_funcs(torch, ["neg", "negative"], ORTHOGONAL),
    operator.neg: ORTHOGONAL, operator.pos: ORTHOGONAL, operator.abs: PERMUTATION,
}

#: ``{method name: kind}`` for tensor methods applied to each entry (or returning the tensor as it is).
ELEMENTWISE_METHODS: dict = {
    **{m: PERMUTATION for m in ("relu", "relu_", "sigmoid", "sigmoid_", "exp", "log", "abs", "sqrt", "rsqrt",
                                "square", "softmax", "log_softmax", "cos")},
    **{m: SIGNED for m in ("tanh", "tanh_", "sin", "erf", "sign", "clamp", "clamp_", "clip")},
    **{m: ORTHOGONAL for m in ("neg", "contiguous", "float", "double", "half", "bfloat16", "to", "clone",
                               "detach", "cpu", "cuda", "type_as", "requires_grad_")},
}

#: Functions whose oddness depends on their bounds: ``{function or method: (lower, upper, defaults)}``;
#: they are odd (listed as SIGNED above) only when ``lower == -upper``, else they are PERMUTATION.
BOUNDED = {
    **{f: ("min_val", "max_val", -1.0, 1.0) for f in (F.hardtanh, F.hardtanh_)},
    **{f: ("min", "max", None, None) for f in (torch.clamp, torch.clip, "clamp", "clamp_", "clip")},
}

# ----------------------------------------------------------------------------- elementwise modules

_PADDING = nn.modules.padding
#: ``(module classes, kind)`` in the order they are tested (subclasses first).
ELEMENTWISE_MODULES: list = [
    (nn.Identity, ORTHOGONAL),
    ((nn.AlphaDropout, nn.FeatureAlphaDropout), PERMUTATION),  # dropped units get a nonzero value
    (nn.modules.dropout._DropoutNd, SIGNED),
    ((nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink), SIGNED),
    ((nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Softplus,
      nn.LogSigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Threshold, nn.RReLU, nn.Softmax, nn.LogSoftmax,
      nn.Softmin, nn.Softmax2d), PERMUTATION),
]
#: Hardtanh (and its subclass ReLU6) is odd only with symmetric bounds.
HARDTANH = nn.Hardtanh

# ----------------------------------------------------------------------------- spatial operations

SPATIAL_DIMS = {"1d": 1, "2d": 2, "3d": 3}

#: ``{function: kind}`` for pooling, upsampling: they act on the trailing spatial axes, channel by channel.
SPATIAL_FUNCS: dict = {
    **_funcs(F, ["max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
                 "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "lp_pool3d"], PERMUTATION),
    **_funcs(torch, ["max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d"], PERMUTATION),
    **_funcs(F, ["avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                 "adaptive_avg_pool3d", "interpolate", "upsample"], ORTHOGONAL),
    **_funcs(torch, ["avg_pool1d", "adaptive_avg_pool1d"], ORTHOGONAL),
}

#: ``(module classes, kind)`` for pooling, upsampling and padding modules (constant padding: see PAD_CONSTANT).
SPATIAL_MODULES: list = [
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
      nn.LPPool1d, nn.LPPool2d), PERMUTATION),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
      nn.Upsample, _PADDING._ReflectionPadNd, _PADDING._ReplicationPadNd)
     + ((_PADDING._CircularPadNd,) if hasattr(_PADDING, "_CircularPadNd") else ()), ORTHOGONAL),
]
#: Padding with a constant ``c``: linear for ``c == 0``, else ``x -> pad(x, c)`` only commutes with permutations.
PAD_CONSTANT = _PADDING._ConstantPadNd

# ----------------------------------------------------------------------------- binary operations

#: ``{function: operation}`` for the binary operations understood (``"add"`` covers ``-`` too).
BINARY_FUNCS: dict = {
    operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub",
    operator.mul: "mul", operator.imul: "mul", operator.truediv: "div", operator.itruediv: "div",
    operator.pow: "pow",
    **{f: op for op, names in (("add", ["add"]), ("sub", ["sub", "subtract"]), ("mul", ["mul", "multiply"]),
                               ("div", ["div", "divide", "true_divide"]), ("pow", ["pow"]),
                               ("max", ["maximum", "minimum"]))
       for f in (getattr(torch, n, None) for n in names) if f is not None},
}
BINARY_METHODS: dict = {"add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul", "mul_": "mul",
                        "div": "div", "div_": "div", "pow": "pow", "maximum": "max", "minimum": "max"}

# ----------------------------------------------------------------------------- reductions

#: ``{function: kind}``: the kind a reduction over axes *other than* the units preserves
#: (a sum is linear; a max is not).  A reduction over the units themselves is only permutation-invariant.
REDUCE_FUNCS: dict = {**_funcs(torch, ["mean", "sum"], ORTHOGONAL), **_funcs(torch, ["amax", "amin"], PERMUTATION)}
REDUCE_METHODS: dict = {"mean": ORTHOGONAL, "sum": ORTHOGONAL, "amax": PERMUTATION, "amin": PERMUTATION}

# ----------------------------------------------------------------------------- everything else

FACTORIES = {"zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange", "linspace", "eye",
             "tensor", "as_tensor", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
             "randn_like"}
NON_TENSOR_METHODS = {"size", "dim", "numel", "nelement", "stride", "element_size", "is_contiguous",
                      "get_device", "ndimension"}
NON_TENSOR_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
PER_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
