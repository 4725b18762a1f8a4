"""The entry points: trace a module with torch.fx, propagate shapes, run the analysis, return the spec."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..spec import SymmetrySpec
from .analysis import Analysis
from .errors import HINT, TracingError, UntraceableModuleError
from .values import qualname

__all__ = ["spec_for", "spec_from_module"]


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


def spec_from_module(module: nn.Module, example_input: Any = None) -> SymmetrySpec:
    """Trace ``module`` with torch.fx and derive its :class:`~fedmerge.spec.SymmetrySpec`, kinds included.

    ``example_input`` (a tensor, or a tuple for several inputs) lets the tracer know tensor shapes,
    which some rules need (reshapes, reductions over negative dims); without it the module's
    ``input_shape`` attribute is used when it has one.  The module is run once on that input in
    eval mode (its state is not changed).

    Each group's kind is the most general one every use of its units commutes with (see
    :mod:`fedmerge.tracing`): ``"orthogonal"`` when nothing but linear maps sits between the
    layer that produces the units and the layers that consume them, ``"signed-permutation"`` when
    only odd functions (tanh...) and dropout do, ``"permutation"`` otherwise.

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
            where = f" The failure happened inside module '{path or '<root>'}' ({qualname(cls)})."
        raise UntraceableModuleError(
            f"cannot derive a permutation spec: {qualname(type(module))} cannot be traced by torch.fx "
            f"({type(e).__name__}: {e}).{where} The model must be traceable by torch.fx: no control flow "
            f"or loops that depend on tensor values or sizes. Otherwise {HINT}.") from e
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
    analysis = Analysis(root, display, prefix)
    analysis.run(gm.graph)
    spec = analysis.spec()
    spec.check_state_dict(module.state_dict(), name=f"{display}.state_dict()")
    return spec


def spec_for(model: nn.Module) -> SymmetrySpec:
    """The model's own ``permutation_spec()`` when it has one (zoo models), else the traced spec."""
    method = getattr(model, "permutation_spec", None)
    if callable(method):
        return method()
    return spec_from_module(model)
