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


#: Triples :func:`fedmerge.match` checks for its ``cycle_error`` (all of them up to n = 19 models).
MATCH_CYCLE_TRIPLES = 1000


def cycle_error(maps: Callable[[int, int], Transform] | Mapping[tuple[int, int], Transform], n: int, *,
                max_triples: int | None = None, seed: int = 0) -> float:
    """Mean, over the triples ``a < b < c``, of the share of units not returned by ``a→b→c→a``.

    ``maps`` gives the map from model ``a`` into model ``b``'s order, as a function ``(a, b) -> map``
    or a dict keyed by ``(a, b)``; a missing ``(a, b)`` is taken as the inverse of ``(b, a)``.
    A unit's defect is what :meth:`fedmerge.symmetry.Group.defect` counts (1 for a permutation
    that moves it; ``||M - I||_F² / 2`` in general), divided by the number of units of all groups.
    Returns 0.0 for fewer than three models.

    Every one of the ``n(n-1)(n-2)/6`` triples is checked by default (O(n³) loops).
    ``max_triples=K`` checks all of them when there are at most ``K``, and otherwise ``K`` triples
    drawn uniformly at random (generator seeded with ``seed``): an unbiased estimate of the mean at
    O(K) cost, whatever ``n`` — which is what :func:`fedmerge.match` reports for many models.
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
    if max_triples is not None and max_triples < 1:
        raise ValueError(f"max_triples must be a positive number of triples or None, got {max_triples}")
    triples = _triples(n, max_triples, seed)
    loops = torch.stack([triples[:, 0] * n + triples[:, 1], triples[:, 1] * n + triples[:, 2],
                         triples[:, 2] * n + triples[:, 0]], dim=1)  # each loop's three maps, as a * n + b
    needed = loops.flatten().unique()
    row_of = torch.full((n * n,), -1, dtype=torch.long)
    row_of[needed] = torch.arange(len(needed))
    loops = row_of[loops]
    pairs = [get(int(k) // n, int(k) % n) for k in needed]  # each map the loops need, once
    wrong = torch.zeros(len(triples), dtype=torch.float64)
    units = 0
    for g, first in pairs[0].items():
        kind = group_of_element(first)
        if kind is KINDS["permutation"]:
            d = first.numel()
            _permutation_loops(torch.stack([p[g].cpu() for p in pairs]), loops, wrong)
        else:
            d = kind.matrix(first).shape[0]
            for t, (ab, bc, ca) in enumerate(loops.tolist()):
                loop = kind.compose(kind.compose(pairs[ab][g], pairs[bc][g]), pairs[ca][g])
                wrong[t] += kind.defect(loop)
        units += d
    return float((wrong / max(units, 1)).mean())


def _triples(n: int, max_triples: int | None, seed: int) -> torch.Tensor:
    """Every triple ``a < b < c`` of ``range(n)`` (rows), or ``max_triples`` of them drawn uniformly."""
    total = n * (n - 1) * (n - 2) // 6
    if max_triples is None or total <= max_triples:
        return torch.tensor(list(itertools.combinations(range(n), 3)))
    gen = torch.Generator().manual_seed(seed)
    # three distinct models per draw, uniformly: the first three of a random order of all n
    keys = torch.rand(max_triples, n, generator=gen)
    return keys.topk(3, dim=1).indices.sort(dim=1).values


def _permutation_loops(maps: torch.Tensor, loops: torch.Tensor, wrong: torch.Tensor) -> None:
    """Add, per loop (rows of ``maps`` for a→b, b→c, c→a), the units a permutation group's loop moves."""
    fixed = torch.arange(maps.shape[1])
    for start in range(0, len(loops), 4096):  # bounded memory for many triples
        ab, bc, ca = maps[loops[start:start + 4096]].unbind(1)
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
