"""Symmetry specifications: which group of hidden units sits on which parameter axis, and how it may move.

A network's hidden units can be reordered without changing the function it computes, as long as
every tensor that touches those units is reordered consistently: the rows of the layer that
produces them, the columns of the layer that consumes them, their bias, their normalisation
parameters and running statistics.  A :class:`SymmetrySpec` records exactly that, as the
PermutationSpec of Git Re-Basin and C²M³ does, in a declarative and model-free way: for every key
of a ``state_dict`` it lists, per axis, the name of the group acting on that axis or ``None``.
Per group it also records the **kind** of transformation that is a true symmetry of the network
(:mod:`fedmerge.symmetry`): ``"permutation"`` (the default), ``"signed-permutation"`` (units
followed only by odd activations such as ``tanh``) or ``"orthogonal"`` (no elementwise
nonlinearity between producer and consumer).  Everything else in fedmerge (applying transforms,
matching, merging) works from the spec and plain tensors, never from a module instance.

A group may act on an axis whose length is a multiple ``k * d`` of the group size ``d``; the axis
is then read as ``d`` blocks of ``k`` consecutive entries.  That is what ``flatten`` of a
``(C, H, W)`` feature map produces, so a CNN whose first linear layer reads flattened feature maps
needs no special treatment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch

from .symmetry import KINDS, Group

__all__ = ["PermutationSpec", "SymmetrySpec"]

Axes = tuple  # tuple[str | None, ...]


@dataclass(frozen=True)
class SymmetrySpec:
    """Which group of units acts on which axis of which ``state_dict`` entry, and of which kind.

    Parameters
    ----------
    axes:
        ``{key: (group or None, ...)}`` with one entry per axis of the tensor stored under
        ``key``.  Every key of the state_dicts the spec is used with must be present; unpermuted
        tensors (the output bias, ``num_batches_tracked``) carry only ``None``.
    sizes:
        ``{group: d}``, the number of units in each group.
    kinds:
        ``{group: kind}`` for groups that are not plain permutation groups (``"signed-permutation"``,
        ``"orthogonal"``, see :mod:`fedmerge.symmetry`); every other group is ``"permutation"``.
        The :attr:`kinds` attribute lists every group.

    ``PermutationSpec`` is the same class under its earlier name.

    Two specs compare equal when they describe the same symmetry, whatever the group names:
    the hand-written spec of a zoo model and the one traced from it name their groups
    differently but must be equal.
    """

    axes: Mapping[str, Axes]
    sizes: Mapping[str, int]
    kinds: Mapping[str, str] | None = None
    _canonical: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        axes = {str(k): tuple(v) for k, v in self.axes.items()}
        sizes = {str(g): int(d) for g, d in self.sizes.items()}
        used = {g for ax in axes.values() for g in ax if g is not None}
        missing = sorted(used - sizes.keys())
        if missing:
            raise ValueError(f"spec: groups {missing} are used but have no size")
        unused = sorted(sizes.keys() - used)
        if unused:
            raise ValueError(f"spec: groups {unused} have a size but act on no axis")
        for g, d in sizes.items():
            if d < 1:
                raise ValueError(f"spec: group {g!r} has size {d}; sizes must be >= 1")
        given = {str(g): str(k) for g, k in (self.kinds or {}).items()}
        unknown = sorted(given.keys() - sizes.keys())
        if unknown:
            raise ValueError(f"spec: kinds are given for groups {unknown}, which the spec does not have")
        for g, k in given.items():
            if k not in KINDS:
                raise ValueError(f"spec: group {g!r} has kind {k!r}; choose one of {', '.join(KINDS)}")
        kinds = {g: given.get(g, "permutation") for g in sizes}
        object.__setattr__(self, "axes", axes)
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "kinds", kinds)
        object.__setattr__(self, "_canonical", self._make_canonical())

    # ------------------------------------------------------------------ views
    @property
    def groups(self) -> dict[str, list[tuple[str, int]]]:
        """``{group: [(key, axis), ...]}`` in key order: every place a group acts."""
        out: dict[str, list[tuple[str, int]]] = {g: [] for g in self.sizes}
        for key, ax in self.axes.items():
            for a, g in enumerate(ax):
                if g is not None:
                    out[g].append((key, a))
        return out

    def group(self, g: str) -> Group:
        """The :class:`~fedmerge.symmetry.Group` (the operations) of group ``g``'s kind."""
        return KINDS[self.kinds[g]]

    @property
    def is_permutation_only(self) -> bool:
        """True when every group is a permutation group (what the C²M³ matcher requires)."""
        return all(k == "permutation" for k in self.kinds.values())

    def with_kinds(self, kinds: Mapping[str, str]) -> "SymmetrySpec":
        """The same spec with the kinds of some groups replaced."""
        return SymmetrySpec(self.axes, self.sizes, {**self.kinds, **kinds})

    @property
    def permuted_keys(self) -> list[str]:
        """Keys with at least one permuted axis (the only ones matching has to look at)."""
        return [k for k, ax in self.axes.items() if any(g is not None for g in ax)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.axes)

    def __len__(self) -> int:
        return len(self.axes)

    # --------------------------------------------------------------- equality
    def _make_canonical(self) -> tuple:
        rename: dict[str, int] = {}
        items = []
        for key in sorted(self.axes):
            canon = []
            for g in self.axes[key]:
                if g is None:
                    canon.append(None)
                else:
                    canon.append(rename.setdefault(g, len(rename)))
            items.append((key, tuple(canon)))
        sizes = tuple(sorted((rename[g], d, self.kinds[g]) for g, d in self.sizes.items()))
        return tuple(items), sizes

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SymmetrySpec):
            return NotImplemented
        return self._canonical == other._canonical

    def __hash__(self) -> int:
        return hash(self._canonical)

    def difference(self, other: "SymmetrySpec") -> str | None:
        """A one-line description of the first key where two specs differ, or ``None``.

        Group names are compared up to renaming, so this is what to print when a traced spec and
        a hand-written one disagree.
        """
        mine, theirs = dict(self._canonical[0]), dict(other._canonical[0])
        for key in sorted(mine.keys() | theirs.keys()):
            if key not in theirs:
                return f"{key!r} is only in the first spec"
            if key not in mine:
                return f"{key!r} is only in the second spec"
            if mine[key] != theirs[key]:
                return (f"{key!r}: axes {self.axes[key]} vs {other.axes[key]} "
                        "do not describe the same grouping")
        if self._canonical[1] != other._canonical[1]:
            mine_s, theirs_s = self._canonical[1], other._canonical[1]
            if [x[:2] for x in mine_s] == [x[:2] for x in theirs_s]:
                return "the group kinds differ"
            return "the group sizes differ"
        return None

    # ------------------------------------------------------------- validation
    def check_state_dict(self, state_dict: Mapping[str, torch.Tensor], *, name: str = "state_dict") -> None:
        """Raise ``ValueError`` unless ``state_dict`` has exactly the spec's keys and compatible shapes."""
        keys = set(state_dict)
        missing = [k for k in self.axes if k not in keys]
        if missing:
            raise ValueError(f"{name}: key {missing[0]!r} of the spec is missing "
                             f"({len(missing)} missing in all)")
        extra = [k for k in state_dict if k not in self.axes]
        if extra:
            raise ValueError(f"{name}: key {extra[0]!r} is not in the spec "
                             f"({len(extra)} unexpected in all)")
        for key, ax in self.axes.items():
            t = state_dict[key]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}: key {key!r} holds a {type(t).__name__}, not a tensor")
            if t.dim() != len(ax):
                raise ValueError(f"{name}: key {key!r} has {t.dim()} axes but the spec lists {len(ax)}")
            for a, g in enumerate(ax):
                if g is not None and t.shape[a] % self.sizes[g]:
                    raise ValueError(
                        f"{name}: key {key!r} axis {a} has length {t.shape[a]}, not a multiple of "
                        f"the size {self.sizes[g]} of group {g!r}")

    @classmethod
    def from_groups(cls, groups: Mapping[str, list[tuple[str, int]]],
                    shapes: Mapping[str, torch.Size | tuple[int, ...]],
                    sizes: Mapping[str, int] | None = None,
                    kinds: Mapping[str, str] | None = None) -> "SymmetrySpec":
        """Build a spec from ``{group: [(key, axis), ...]}`` and the shapes of a state_dict.

        Keys of ``shapes`` that no group touches become all-``None`` entries.  Without ``sizes``
        a group's size is the shortest axis it acts on (the layer that produces the units).
        """
        axes: dict[str, list] = {k: [None] * len(s) for k, s in shapes.items()}
        inferred: dict[str, int] = {}
        for g, places in groups.items():
            for key, a in places:
                if key not in axes:
                    raise ValueError(f"group {g!r} names key {key!r}, which is not in the state_dict")
                if axes[key][a] is not None:
                    raise ValueError(f"key {key!r} axis {a} is claimed by {axes[key][a]!r} and {g!r}")
                axes[key][a] = g
                n = int(shapes[key][a])
                inferred[g] = min(inferred.get(g, n), n)
        return cls({k: tuple(v) for k, v in axes.items()}, dict(sizes) if sizes else inferred, kinds)


#: The earlier name of :class:`SymmetrySpec` (every hand-written spec uses it; groups default to permutations).
PermutationSpec = SymmetrySpec
