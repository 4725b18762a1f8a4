"""One pass over a torch.fx graph: the state of the analysis and the driver that dispatches each node.

The rules for each kind of node live in :mod:`.modules` (``call_module``) and :mod:`.functions`
(``call_function`` / ``call_method``); this module holds what they share: the value of every node
(:class:`~.values.T` for tensors), the unit groups (:class:`~.groups.UnitGroups`), the groups
recorded on every ``state_dict`` axis, error messages that name the culprit, and the spec built
at the end.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx
from torch import nn

from ..spec import SymmetrySpec
from .errors import HINT, TracingError, UnsupportedModuleError
from .functions import call_function, call_method
from .groups import FIXED, UnitGroups
from .modules import call_module
from .tables import SUPPORTED
from .values import OTHER, T, arguments, fn_name, meta_shape, qualname

__all__ = ["Analysis"]


class Analysis:
    def __init__(self, root: nn.Module, display_root: str, prefix: str) -> None:
        self.root = root
        self.display_root = display_root  # class name of the user's module, for messages
        self.prefix = prefix  # "module." when the user's module was wrapped
        self.modules = dict(root.named_modules())
        self.state = root.state_dict()
        self.groups = UnitGroups()
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
            return f"module '{self.name(node.target)}' ({qualname(type(m))})"
        what = f"{fn_name(node.target)} (graph node '{node.name}')"
        stack = node.meta.get("nn_module_stack")
        if stack:
            path, cls = list(stack.values())[-1]
            return f"{what} in module '{self.name(path)}' ({qualname(cls)})"
        return f"{what} in the forward of {self.display_root}"

    def unsupported(self, node: torch.fx.Node, why: str = "") -> UnsupportedModuleError:
        why = f": {why}" if why else " is not supported"
        direct = [a.target for a in node.all_input_nodes if a.op == "get_attr" and a.target in self.state]
        if direct:
            why += (f"; it uses parameter '{self.name(direct[0])}' directly (functional use of a parameter, "
                    f"e.g. F.linear(x, self.weight)): the tracer only knows how the parameters of standard "
                    f"layers transform, so use nn.Linear / nn.Conv* modules")
        return UnsupportedModuleError(
            f"cannot derive a permutation spec: {self.where(node)}{why}. Supported: {SUPPORTED}. "
            f"Otherwise {HINT}.")

    # ---------------------------------------------------------------- groups
    def find(self, g: int) -> int:
        return self.groups.find(g)

    def union(self, a: int, b: int) -> int:
        return self.groups.union(a, b)

    def fix(self, g: int) -> None:
        self.groups.fix(g)

    def lower(self, x: T, kind: str) -> None:
        """A use of ``x`` that only commutes with transformations of ``kind`` of its units."""
        if x.group != FIXED:
            self.groups.lower(x.group, kind)

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
            self.module_group[name] = self.groups.new(size, self.name(name))
        return self.module_group[name]

    # ---------------------------------------------------------------- values
    def make(self, node: torch.fx.Node, group: int, axis: int | None, rank: int | None) -> T:
        shape = meta_shape(node)
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
        return T(group, axis, rank, shape)

    def same(self, node: torch.fx.Node, x: T) -> T:
        return self.make(node, x.group, x.axis, x.rank)

    def value(self, arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            return self.values[arg]
        if isinstance(arg, (tuple, list)):
            return type(arg)(self.value(a) for a in arg)
        return OTHER

    def tensor(self, node: torch.fx.Node, arg: Any) -> T:
        v = self.value(arg)
        if not isinstance(v, T):
            raise self.unsupported(node, "its input is not a single tensor")
        g = self.find(v.group)
        return T(g, v.axis if g != FIXED else None, v.rank, v.shape)

    def has_tensor(self, args) -> bool:
        """Whether any argument (searching inside tuples, lists and dicts) is a tensor."""
        for a in args:
            if isinstance(a, (tuple, list)):
                if self.has_tensor(a):
                    return True
            elif isinstance(a, dict):
                if self.has_tensor(list(a.values())):
                    return True
            elif isinstance(a, torch.fx.Node) and isinstance(self.values[a], T):
                return True
        return False

    def args(self, node: torch.fx.Node, names: Sequence[str] = ("input",), **defaults: Any) -> dict[str, Any]:
        """``node``'s arguments by name (see :func:`~.values.arguments`)."""
        return arguments(self.root, node, names, **defaults)

    def neg_axis(self, t: T) -> int | None:
        if t.axis is None:
            return None
        if t.axis < 0:
            return t.axis
        return t.axis - t.rank if t.rank is not None else None

    def need_rank(self, node: torch.fx.Node, t: T) -> int:
        if t.rank is None:
            raise TracingError(
                f"cannot derive a permutation spec: {self.where(node)} needs to know the number of "
                f"dimensions of its input; pass example_input= to spec_from_module (or give the "
                f"model an input_shape attribute)")
        return t.rank

    def pos_axis(self, node: torch.fx.Node, t: T) -> int:
        """The transformed axis of ``t``, counted from the front."""
        if t.axis is not None and t.axis >= 0:
            return t.axis
        return t.axis + self.need_rank(node, t)

    # ---------------------------------------------------------------- driver
    def run(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "placeholder":
                shape = meta_shape(node)
                self.values[node] = T(FIXED, None, len(shape) if shape is not None else None, shape)
            elif node.op == "get_attr":
                self.values[node] = self.get_attr(node)
            elif node.op == "call_module":
                self.values[node] = call_module(self, node)
            elif node.op == "call_function":
                self.values[node] = call_function(self, node)
            elif node.op == "call_method":
                self.values[node] = call_method(self, node)
            elif node.op == "output":
                self.output(self.value(node.args[0]))

    def output(self, v: Any) -> None:
        if isinstance(v, T):
            self.fix(v.group)
        elif isinstance(v, (tuple, list)):
            for item in v:
                self.output(item)
        elif isinstance(v, dict):
            for item in v.values():
                self.output(item)

    def get_attr(self, node: torch.fx.Node) -> Any:
        """A tensor attribute read in ``forward``: a constant that is never transformed.

        A parameter or buffer used this way (say an input-normalisation buffer) keeps all its axes
        untransformed; the rules for whatever consumes it then decide whether that is consistent (a
        residual-style ``x + self.bias`` fixes ``x``'s group, ``F.linear(x, self.weight)`` is refused).
        """
        obj = self.root
        for part in node.target.split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, torch.Tensor):
            return OTHER
        if node.target in self.state:
            self.assign(node.target, [FIXED] * obj.dim())
        return T(FIXED, None, obj.dim(), tuple(obj.shape))

    # ---------------------------------------------------------------- result
    def spec(self) -> SymmetrySpec:
        axes: dict[str, tuple] = {}
        sizes: dict[str, int] = {}
        kinds: dict[str, str] = {}
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
                    base = self.groups.origin[r]
                    name, i = base, 1
                    while name in sizes:
                        i += 1
                        name = f"{base}#{i}"
                    names[r] = name
                    sizes[name] = self.groups.size[r]
                    kinds[name] = self.groups.kind[r]
                out.append(names[r])
            axes[self.name(key)] = tuple(out)
        return SymmetrySpec(axes, sizes, kinds)
