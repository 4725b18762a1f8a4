"""Diagnostics of an alignment: its objective and how far its pairwise maps are from cycle-consistent.

``cycle_error`` is the quantity of Figure 2 of the C²M³ paper in a form that does not depend on
the weights: going around a cycle of maps A → B → C → A, how many hidden units fail to come back
to themselves.  Maps factorised through a universe (C²M³, MergeMany, Git Re-Basin to a reference)
compose to the identity by construction; independently computed pairwise Git Re-Basin maps in
general do not (:func:`pairwise_cycle_error` shows it on any models).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping, Sequence

import torch

from .matching._stack import Stack, pair_objective, stack_permutations
from .matching.git_rebasin import float_entries
from .matching.weight_matching import weight_matching
from .spec import SymmetrySpec
from .symmetry import KINDS, group_of_element
from .transforms import apply_transform, invert_transform, pairwise_map

__all__ = ["matching_objective", "pairwise_map", "cycle_error", "pairwise_cycle_error"]

Transform = Mapping[str, Any]


def matching_objective(state_dicts: Sequence[Mapping[str, torch.Tensor]], spec: SymmetrySpec,
                       transforms: Sequence[Transform]) -> float:
    """Eq. 4 of C²M³ at the given transforms: ``sum_{p<q} sum_key <U_p, U_q>`` (higher is better aligned).

    Comparable across methods and with the ``objective`` of a :class:`~fedmerge.MatchResult`;
    computed as ``(||sum_p U_p||² - sum_p ||U_p||²) / 2`` in O(n) per entry.
    """
    if len(transforms) != len(state_dicts):
        raise ValueError(f"got {len(transforms)} transforms for {len(state_dicts)} models")
    if spec.is_permutation_only and all(isinstance(e, torch.Tensor) and e.dim() == 1
                                        for t in transforms for e in t.values()):
        stack = Stack.from_state_dicts(state_dicts, spec)  # gathers on one stacked tensor per entry
        return pair_objective(stack, stack_permutations(transforms, stack.device))
    total, squares = {}, 0.0
    for sd, t in zip(state_dicts, transforms):
        u = apply_transform(float_entries(sd, spec), spec, t)
        for k, v in u.items():
            v = v.double()
            total[k] = total[k] + v if k in total else v
            squares += float((v * v).sum())
    return float((sum(float((s * s).sum()) for s in total.values()) - squares) / 2)


def cycle_error(maps: Callable[[int, int], Transform] | Mapping[tuple[int, int], Transform], n: int) -> float:
    """Mean, over all triples ``a < b < c``, of the share of units not returned by ``a→b→c→a``.

    ``maps`` gives the map from model ``a`` into model ``b``'s order, as a function ``(a, b) -> map``
    or a dict keyed by ``(a, b)``; a missing ``(a, b)`` is taken as the inverse of ``(b, a)``.
    A unit's defect is what :meth:`fedmerge.symmetry.Group.defect` counts (1 for a permutation
    that moves it; ``||M - I||_F² / 2`` in general), divided by the number of units of all groups.
    Returns 0.0 for fewer than three models.
    """
    if callable(maps):
        get = maps
    else:
        def get(a: int, b: int) -> Transform:
            if (a, b) in maps:
                return maps[(a, b)]
            if (b, a) in maps:
                return invert_transform(maps[(b, a)])
            raise ValueError(f"no map between models {a} and {b}")
    if n < 3:
        return 0.0
    # all ordered maps once (n² calls), then every triple's loop
    pairs = {(a, b): get(a, b) for a in range(n) for b in range(n) if a != b}
    triples = torch.tensor(list(itertools.combinations(range(n), 3)))
    wrong = torch.zeros(len(triples), dtype=torch.float64)
    units = 0
    for g, first in pairs[(0, 1)].items():
        kind = group_of_element(first)
        if kind is KINDS["permutation"]:
            d = first.numel()
            _permutation_loops(pairs, g, n, d, triples, wrong)
        else:
            d = kind.matrix(first).shape[0]
            for t, (a, b, c) in enumerate(triples.tolist()):
                loop = kind.compose(kind.compose(pairs[(a, b)][g], pairs[(b, c)][g]), pairs[(c, a)][g])
                wrong[t] += kind.defect(loop)
        units += d
    return float((wrong / max(units, 1)).mean())


def _permutation_loops(pairs, g: str, n: int, d: int, triples: torch.Tensor, wrong: torch.Tensor) -> None:
    """Add, per triple, the units a permutation group's loop ``a→b→c→a`` moves (batched gathers)."""
    table = torch.zeros(n, n, d, dtype=torch.long)
    for (a, b), perm in pairs.items():
        table[a, b] = perm[g].cpu()
    fixed = torch.arange(d)
    for start in range(0, len(triples), 4096):  # bounded memory for large n
        a, b, c = triples[start:start + 4096].T
        ab, bc, ca = table[a, b], table[b, c], table[c, a]
        loop = ab.gather(1, bc.gather(1, ca))  # a -> b -> c -> a
        wrong[start:start + 4096] += (loop != fixed).sum(1)


def pairwise_cycle_error(state_dicts: Sequence[Mapping[str, torch.Tensor]], spec: SymmetrySpec, *,
                         seed: int | None = 0, max_iter: int = 100) -> float:
    """Cycle error of plain pairwise Git Re-Basin: every pair matched independently (O(n²) matchings).

    This is the failure C²M³ was designed to remove; use it to show it on your own models.
    """
    n = len(state_dicts)
    maps = {}
    for a, b in itertools.combinations(range(n), 2):
        # the map that reorders model a to look like model b
        maps[(a, b)], _, _ = weight_matching(state_dicts[b], state_dicts[a], spec, seed=seed, max_iter=max_iter)
    return cycle_error(maps, n)
