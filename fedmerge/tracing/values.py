"""What flows along the graph during the analysis, and how a node's arguments are read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.operator_schemas import normalize_function

__all__ = ["T", "OTHER", "arguments", "fn_name", "meta_shape", "qualname"]


@dataclass(frozen=True)
class T:
    """A tensor in the graph: ``group`` acts on ``axis`` (``FIXED``: nothing is transformed).

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


def meta_shape(node: torch.fx.Node) -> tuple | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def qualname(cls: Any) -> str:
    if isinstance(cls, str):
        return cls
    return f"{cls.__module__}.{cls.__qualname__}"


def fn_name(target: Any) -> str:
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


def arguments(root: torch.nn.Module, node: torch.fx.Node, names: Sequence[str] = (), **defaults: Any
              ) -> dict[str, Any]:
    """The arguments of a call node by parameter name, with ``defaults`` for those not passed.

    torch.fx's :meth:`~torch.fx.Node.normalized_arguments` binds them to the signature of the
    function or module called.  It returns ``None`` for every ``call_method`` node; a tensor method
    has the signature of the torch function of the same name (``x.sum(1)`` is ``torch.sum(x, 1)``,
    both generated from one ATen schema), which is tried next.  Where neither binds — Python
    operators, varargs methods (``x.view(*shape)``, ``x.permute(*dims)``), overloads that need
    argument types (``torch.clamp``, ``torch.add``) — the positional arguments are named by
    ``names`` in order (the first is the tensor the call reads) and the keyword arguments are kept.
    """
    bound = None
    try:
        if node.op == "call_method":
            f = getattr(torch, node.target, None)
            if callable(f):
                bound = normalize_function(f, tuple(node.args), dict(node.kwargs),
                                           normalize_to_only_use_kwargs=True)
        else:
            bound = node.normalized_arguments(root, normalize_to_only_use_kwargs=True)
    except Exception:  # ambiguous overloads, unbindable arguments: name them by position below
        bound = None
    out = dict(defaults)
    if bound is not None:
        out.update(bound.kwargs)
        return out
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    return out
