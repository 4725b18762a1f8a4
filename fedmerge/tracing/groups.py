"""Union-find over groups of units, each carrying its size and the kind of symmetry it allows.

Every layer output starts a group; a residual addition (or a layer called twice) joins two groups
into one, since a single transformation must then act on both.  Group ``FIXED`` (id 0) stands for
"not transformed": whatever is joined with it drops out of the spec, and joining groups of
different sizes fixes both (no single transformation can act on both).

Kinds form a chain, ``permutation`` ⊂ ``signed-permutation`` ⊂ ``orthogonal``: a group starts as
``orthogonal`` at the layer that produces it and every use of its units can only *lower* it to the
most general kind that use commutes with; joining two groups takes the lower of their kinds.
"""

from __future__ import annotations

from .tables import ORTHOGONAL, PERMUTATION, SIGNED

__all__ = ["FIXED", "KIND_ORDER", "UnitGroups", "meet"]

FIXED = 0

#: From the least to the most general kind.
KIND_ORDER = (PERMUTATION, SIGNED, ORTHOGONAL)


def meet(a: str, b: str) -> str:
    """The more restrictive of two kinds (the transformations both allow)."""
    return a if KIND_ORDER.index(a) <= KIND_ORDER.index(b) else b


class UnitGroups:
    """Disjoint sets of unit groups with a size, a readable origin and a kind per set."""

    def __init__(self) -> None:
        self.parent: list[int] = [FIXED]
        self.size: list[int] = [0]
        self.origin: list[str] = ["<fixed>"]
        self.kind: list[str] = [PERMUTATION]

    def new(self, size: int, origin: str, kind: str = ORTHOGONAL) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.origin.append(origin)
        self.kind.append(kind)
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
            # no single transformation can act on both: keep both untransformed (always valid)
            self.parent[ra] = FIXED
            self.parent[rb] = FIXED
            return FIXED
        lo, hi = min(ra, rb), max(ra, rb)  # the earliest group names the merged one; FIXED wins
        self.parent[hi] = lo
        self.kind[lo] = meet(self.kind[lo], self.kind[hi])
        return lo

    def fix(self, g: int) -> None:
        self.union(g, FIXED)

    def lower(self, g: int, kind: str) -> None:
        """Record a use of group ``g``'s units that only commutes with transformations of ``kind``."""
        r = self.find(g)
        if r != FIXED:
            self.kind[r] = meet(self.kind[r], kind)

    def kind_of(self, g: int) -> str:
        return self.kind[self.find(g)]
