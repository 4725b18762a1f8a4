"""Rules for operations that move, merge or reduce axes, shared by module and function calls.

They follow the transformed axis through ``flatten``/``view``/``reshape``, ``squeeze``/
``unsqueeze``/``permute``/``transpose``, reductions and spatial operations (pooling, upsampling,
padding), and lower the group's kind where the operation is not linear in the units.
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import TYPE_CHECKING, Any

import torch.fx

from .errors import TracingError
from .groups import FIXED
from .tables import PERMUTATION
from .values import T, meta_shape

if TYPE_CHECKING:
    from .analysis import Analysis


def flatten(an: "Analysis", node, x: T, start: int, end: int) -> T:
    if x.group == FIXED:
        if x.rank:
            rank = x.rank - (end % x.rank - start % x.rank)
        else:  # unknown input rank: flatten(x, s) with end_dim=-1 still has rank s + 1
            rank = start + 1 if end == -1 and start >= 0 else None
        return an.make(node, FIXED, None, rank)
    if x.rank is None:
        if start == 1 and end == -1 and x.axis == 1:
            return an.make(node, x.group, 1, 2)
        an.need_rank(node, x)
    rank = x.rank
    s, e = start % rank, end % rank
    a = an.pos_axis(node, x)
    if a < s:
        new = a
    elif a == s:  # the transformed axis leads the merged axis: a block-wise transformation of it
        new = s
    elif a <= e:
        raise an.unsupported(node, f"it merges axis {a}, which carries a permutation, behind axis {s}; "
                                   f"the permuted axis must lead the flattened block")
    else:
        new = a - (e - s)
    return an.make(node, x.group, new, rank - (e - s))


def reshape(an: "Analysis", node, x: T, shape_args: Any) -> T:
    shape_args = tuple(shape_args)
    if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
        shape_args = tuple(shape_args[0])
    if x.group == FIXED:
        return an.make(node, FIXED, None, len(shape_args) or None)
    in_shape, out_shape = x.shape, meta_shape(node)
    if in_shape is not None and out_shape is not None:
        a = an.pos_axis(node, x)
        before = math.prod(in_shape[:a])
        acc = 1
        for b, n in enumerate(out_shape):
            if acc == before and n % in_shape[a] == 0 and n > 0:
                return an.make(node, x.group, b, len(out_shape))
            acc *= n
            if acc > before:
                break
        raise an.unsupported(node, f"it reshapes {tuple(in_shape)} to {tuple(out_shape)}, which splits or "
                                   f"moves axis {a}, which carries a permutation")
    # no shapes: recognise x.view(x.size(0), -1) / x.reshape(x.shape[0], -1)
    if len(shape_args) == 2 and shape_args[1] == -1 and is_batch_size(an, shape_args[0]) and x.axis == 1:
        return an.make(node, x.group, 1, 2)
    raise TracingError(
        f"cannot derive a permutation spec: {an.where(node)} reshapes a permuted tensor and the "
        f"tracer needs shapes to check it; pass example_input= to spec_from_module (or give the model "
        f"an input_shape attribute)")


def is_batch_size(an: "Analysis", arg) -> bool:
    """Whether ``arg`` is ``x.size(0)`` or ``x.shape[0]``."""
    if not isinstance(arg, torch.fx.Node):
        return False
    if arg.op == "call_method" and arg.target == "size":
        return an.args(arg, ("input", "dim")).get("dim") == 0
    if arg.op == "call_function" and arg.target is operator.getitem and arg.args[1] == 0:
        base = arg.args[0]
        return isinstance(base, torch.fx.Node) and (
            (base.op == "call_function" and base.target is builtins.getattr and base.args[1] == "shape")
            or (base.op == "call_method" and base.target == "size" and len(base.args) == 1))
    return False


def reduce(an: "Analysis", node, other_axes_kind: str) -> T:
    """``sum``/``mean``/``amax``/``amin``; ``other_axes_kind``: the kind a reduction over other axes keeps."""
    a = an.args(node, ("input", "dim", "keepdim"))
    x = an.tensor(node, a["input"])
    dims = a.get("dim", a.get("axis"))
    keepdim = a.get("keepdim", False)
    if not isinstance(keepdim, bool):
        keepdim = False
    if dims is None:  # a full reduction: a scalar, invariant to permutations only
        an.lower(x, PERMUTATION)
        return an.make(node, FIXED, None, 0)
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims):
        raise an.unsupported(node, "reduction dims must be constants")
    if x.group == FIXED:
        rank = None if x.rank is None else (x.rank if keepdim else x.rank - len(dims))
        return an.make(node, FIXED, None, rank)
    rank = an.need_rank(node, x)
    dims = sorted({d % rank for d in dims})
    ax = an.pos_axis(node, x)
    new_rank = rank if keepdim else rank - len(dims)
    if ax in dims:  # summing over the permuted units gives the same result in any order
        an.lower(x, PERMUTATION)
        return an.make(node, FIXED, None, new_rank)
    an.lower(x, other_axes_kind)
    new = ax if keepdim else ax - sum(d < ax for d in dims)
    return an.make(node, x.group, new, new_rank)


def move_axes(an: "Analysis", node, op: str) -> T:
    """``squeeze``, ``unsqueeze``, ``permute``, ``transpose``/``swapaxes``: the units move, nothing mixes."""
    names = {"unsqueeze": ("input", "dim"), "squeeze": ("input", "dim"), "permute": ("input", "dims"),
             "transpose": ("input", "dim0", "dim1"), "swapaxes": ("input", "axis0", "axis1")}[op]
    a = an.args(node, names)
    x = an.tensor(node, a["input"])
    if x.group == FIXED:
        return an.make(node, FIXED, None, None)
    rank = an.need_rank(node, x)
    ax = an.pos_axis(node, x)
    if op == "unsqueeze":
        d = a["dim"] % (rank + 1)
        return an.make(node, x.group, ax + (d <= ax), rank + 1)
    if op == "squeeze":
        if a.get("dim") is not None:
            ds = a["dim"]
            ds = [ds] if isinstance(ds, int) else list(ds)
            ds = [d % rank for d in ds]
            if x.shape is not None:
                ds = [d for d in ds if x.shape[d] == 1]
        elif x.shape is not None:
            ds = [d for d, n in enumerate(x.shape) if n == 1]
        else:
            an.need_rank(node, T(x.group, x.axis, None))
            ds = []
        if ax in ds:  # a group of size 1 has nothing to permute
            return an.make(node, FIXED, None, rank - len(ds))
        return an.make(node, x.group, ax - sum(d < ax for d in ds), rank - len(ds))
    if op == "permute":
        dims = a.get("dims")
        if isinstance(dims, int):  # x.permute(0, 2, 3, 1): varargs
            dims = node.args[1:]
        dims = [d % rank for d in dims]
        return an.make(node, x.group, dims.index(ax), rank)
    d0 = a.get("dim0", a.get("axis0")) % rank
    d1 = a.get("dim1", a.get("axis1")) % rank
    new = d1 if ax == d0 else d0 if ax == d1 else ax
    return an.make(node, x.group, new, rank)


def spatial(an: "Analysis", node, x: T, n: int | None, kind: str) -> T:
    """Pooling, upsampling, padding: they act on the last ``n`` axes, each channel separately."""
    if x.group != FIXED and x.rank is not None:
        a = an.pos_axis(node, x)
        first_spatial = x.rank - n if n is not None else 2
        if a >= first_spatial:
            raise an.unsupported(node, f"it acts on axis {a}, which carries a permutation")
    an.lower(x, kind)
    return an.same(node, x)
