"""Rules for ``call_function`` and ``call_method`` nodes: torch functions, tensor methods, operators."""

from __future__ import annotations

import builtins
import numbers
import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from . import shapes
from .groups import FIXED
from .tables import (BINARY_FUNCS, BINARY_METHODS, BOUNDED, ELEMENTWISE_FUNCS, ELEMENTWISE_METHODS, FACTORIES,
                     NON_TENSOR_ATTRS, NON_TENSOR_METHODS, ORTHOGONAL, PERMUTATION, REDUCE_FUNCS, REDUCE_METHODS,
                     SIGNED, SPATIAL_DIMS, SPATIAL_FUNCS)
from .values import OTHER, T, meta_shape

if TYPE_CHECKING:
    from .analysis import Analysis

__all__ = ["call_function", "call_method"]

_MOVE_FUNCS = {torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze", torch.permute: "permute",
               torch.transpose: "transpose", torch.swapaxes: "swapaxes"}


def call_function(an: "Analysis", node) -> Any:
    f = node.target
    args = node.args
    if f is builtins.getattr:
        base = an.value(args[0])
        if isinstance(base, T) and args[1] not in NON_TENSOR_ATTRS:
            raise an.unsupported(node, f"attribute '{args[1]}' of a tensor is not supported")
        return OTHER
    if f is operator.getitem:
        base = an.value(args[0])
        if isinstance(base, T):
            raise an.unsupported(node, "indexing or slicing a tensor is not supported")
        if isinstance(base, (tuple, list)) and isinstance(args[1], int):
            return base[args[1]]
        return OTHER
    if f in (builtins.len, builtins.int, builtins.float):
        return OTHER
    if f in BINARY_FUNCS:
        return binary(an, node, BINARY_FUNCS[f])
    if an.has_tensor(list(args[1:]) + list(node.kwargs.values())):
        raise an.unsupported(node)  # of several tensors, only +, -, *, / are understood
    if f in ELEMENTWISE_FUNCS:
        return elementwise(an, node, f, ELEMENTWISE_FUNCS[f])
    if f in SPATIAL_FUNCS:
        a = an.args(node)
        if a.get("return_indices"):
            raise an.unsupported(node, "pooling with return_indices=True is not supported")
        name = getattr(f, "__name__", "")
        n = next((d for s, d in SPATIAL_DIMS.items() if name.endswith(s)), None)
        return shapes.spatial(an, node, an.tensor(node, a["input"]), n, SPATIAL_FUNCS[f])
    if f is F.pad:
        a = an.args(node, ("input", "pad", "mode", "value"), mode="constant", value=None)
        # constant padding by c != 0 commutes only with maps that fix the constant vector
        kind = PERMUTATION if a["mode"] == "constant" and a["value"] not in (None, 0, 0.0) else ORTHOGONAL
        return shapes.spatial(an, node, an.tensor(node, a["input"]), len(a["pad"]) // 2, kind)
    if f is torch.flatten:
        a = an.args(node, ("input", "start_dim", "end_dim"), start_dim=0, end_dim=-1)
        return shapes.flatten(an, node, an.tensor(node, a["input"]), a["start_dim"], a["end_dim"])
    if f is torch.reshape:
        a = an.args(node, ("input", "shape"))
        return shapes.reshape(an, node, an.tensor(node, a["input"]), (a["shape"],))
    if f in REDUCE_FUNCS:
        return shapes.reduce(an, node, REDUCE_FUNCS[f])
    if f in _MOVE_FUNCS:
        return shapes.move_axes(an, node, _MOVE_FUNCS[f])
    if not an.has_tensor(list(args) + list(node.kwargs.values())):
        # no tensor goes in: arithmetic on sizes, or a new tensor (torch.zeros...), untransformed
        if meta_shape(node) is not None or getattr(f, "__name__", "") in FACTORIES:
            return an.make(node, FIXED, None, None)
        return OTHER
    raise an.unsupported(node)


def call_method(an: "Analysis", node) -> Any:
    m = node.target
    args = node.args
    if m in NON_TENSOR_METHODS:
        return OTHER
    if m in BINARY_METHODS:
        return binary(an, node, BINARY_METHODS[m])
    if m not in ("to", "type_as") and an.has_tensor(list(args[1:]) + list(node.kwargs.values())):
        raise an.unsupported(node)  # of several tensors, only +, -, *, / are understood
    if m in ELEMENTWISE_METHODS:
        return elementwise(an, node, m, ELEMENTWISE_METHODS[m])
    if m in ("view", "reshape"):
        a = an.args(node)
        shape = a.get("shape", a.get("size"))
        return shapes.reshape(an, node, an.tensor(node, a["input"]), (shape,) if shape is not None else args[1:])
    if m == "flatten":
        a = an.args(node, ("input", "start_dim", "end_dim"), start_dim=0, end_dim=-1)
        return shapes.flatten(an, node, an.tensor(node, a["input"]), a["start_dim"], a["end_dim"])
    if m in REDUCE_METHODS:
        return shapes.reduce(an, node, REDUCE_METHODS[m])
    if m in ("squeeze", "unsqueeze", "permute", "transpose", "swapaxes"):
        return shapes.move_axes(an, node, m)
    raise an.unsupported(node)


def elementwise(an: "Analysis", node, target, kind: str) -> T:
    """A function of each entry: the units keep their axis, the kind drops to what ``target`` commutes with."""
    x = an.tensor(node, an.args(node).get("input", node.args[0] if node.args else None))
    if target in BOUNDED:  # hardtanh, clamp: odd only when the bounds are symmetric
        lo, hi, lo_default, hi_default = BOUNDED[target]
        a = an.args(node, ("input", lo, hi), **{lo: lo_default, hi: hi_default})
        low, high = a[lo], a[hi]
        symmetric = (isinstance(low, numbers.Real) and isinstance(high, numbers.Real) and low == -high)
        kind = kind if symmetric else PERMUTATION
    an.lower(x, kind)
    return an.same(node, x)


def binary(an: "Analysis", node, op: str) -> Any:
    """``a + b`` and friends: elementwise, so both operands must be transformed alike.

    ``op`` is ``"add"``, ``"sub"``, ``"mul"``, ``"div"``, ``"pow"`` or ``"max"`` (maximum/minimum).
    Sums and differences of two transformed operands are linear (their groups are joined, kinds
    unchanged); products, quotients, powers and maxima of two are not (permutations only).  With
    an untransformed operand ``c`` (a scalar, or a tensor broadcast along the units): ``x * c``
    and ``x / c`` are linear, ``c / x`` is odd, ``x + c`` and ``x - c`` commute only with maps that
    fix the constant vector (permutations), the others likewise.  Python operators have no
    signature to normalise, so the operands are read by position.
    """
    named = ("input", "other", "exponent", "self")
    operands = list(node.args[:2]) + [v for k, v in node.kwargs.items() if k in named]
    if len(operands) != 2 or an.has_tensor(list(node.args[2:]) + [
            v for k, v in node.kwargs.items() if k not in named]):
        raise an.unsupported(node)
    vals = [an.value(a) for a in operands]
    tensors = [v for v in vals if isinstance(v, T)]
    if not tensors:
        return OTHER
    if op == "div" and node.kwargs.get("rounding_mode") is not None:
        op = "pow"  # floor / trunc division: not linear
    if len(tensors) == 1:  # tensor and scalar
        x = tensors[0]
        an.lower(x, _with_constant(op, tensor_first=isinstance(vals[0], T)))
        return an.same(node, x)
    a, b = (an.tensor(node, operands[0]), an.tensor(node, operands[1]))
    if a.group == FIXED and b.group == FIXED:
        return an.make(node, FIXED, None, None)
    if a.group != FIXED and b.group != FIXED:
        na, nb = an.neg_axis(a), an.neg_axis(b)
        if na is None or nb is None:
            if not (a.axis == b.axis and a.rank == b.rank):
                an.need_rank(node, a if na is None else b)
            na = nb = a.axis
        if na != nb:
            raise an.unsupported(node, f"its operands are permuted on different axes ({a.axis} and {b.axis})")
        g = an.union(a.group, b.group)  # residual connection: one transformation for both
        if op not in ("add", "sub"):  # (Qx) * (Qy) != Q(x * y) unless Q is a permutation
            an.groups.lower(g, PERMUTATION)
        return an.make(node, g, na, None if na >= 0 else max(a.rank or 0, b.rank or 0) or None)
    p, u = (a, b) if a.group != FIXED else (b, a)
    na = an.neg_axis(p)
    broadcast = False  # does the untransformed operand have length 1 (or no entry) on that axis?
    if na is not None and u.shape is not None:
        broadcast = len(u.shape) < -na or u.shape[na] == 1
    elif na is not None and u.rank is not None:
        broadcast = u.rank < -na
    if broadcast:
        an.lower(p, _with_constant(op, tensor_first=p is a))
        return an.same(node, p)
    an.fix(p.group)  # x + f(x) with an untransformed x: f's output must stay untransformed
    return an.make(node, FIXED, None, p.rank)


def _with_constant(op: str, tensor_first: bool) -> str:
    """The kind that ``x op c`` (or ``c op x``) commutes with, for ``c`` constant along the units."""
    if op == "mul" or (op == "div" and tensor_first):
        return ORTHOGONAL  # scaling
    if op == "div":
        return SIGNED  # c / x is odd in x
    return PERMUTATION  # x + c: Q must fix the constant vector; x ** c, max(x, c): elementwise nonlinear
