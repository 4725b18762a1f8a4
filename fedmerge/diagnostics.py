"""Diagnostics of a matching: its objective and how far its pairwise maps are from cycle-consistent.

``cycle_error`` is the quantity of Figure 2 of the C²M³ paper in a form that does not depend on
the weights: going around a cycle of maps A → B → C → A, how many hidden units fail to come back
to themselves.  Maps factorised through a universe (C²M³, MergeMany, Git Re-Basin to a reference)
score exactly 0; independently computed pairwise Git Re-Basin maps in general do not.
"""

from __future__ import annotations

import itertools
from typing import Callable, Mapping, Sequence

import torch

from .permutation import compose_permutations, invert_permutation
from .spec import PermutationSpec

__all__ = ["matching_objective", "pairwise_map", "cycle_error", "pairwise_cycle_error"]

Perm = Mapping[str, torch.Tensor]


def matching_objective(state_dicts: Sequence[Mapping[str, torch.Tensor]], spec: PermutationSpec,
                       perms: Sequence[Perm]) -> float:
    """Eq. 4 of C²M³ at hard permutations: ``sum_{p<q} sum_key <U_p, U_q>`` (higher is better aligned).

    Comparable across methods and with the ``objective`` of a :class:`~fedmerge.MatchResult`.
    """
    from .matching._stack import Stack, pair_objective, stack_permutations
    stack = Stack.from_state_dicts(state_dicts, spec)
    return pair_objective(stack, stack_permutations(perms, stack.device))


def pairwise_map(perms: Sequence[Perm], source: int, target: int) -> dict[str, torch.Tensor]:
    """The map from model ``source`` to model ``target`` induced by maps into a common space.

    ``apply_permutation(sd_source, spec, pairwise_map(perms, source, target))`` is model
    ``source`` with its units in the order of model ``target`` (``P^{target,source}`` of the paper).
    """
    return compose_permutations(perms[source], invert_permutation(perms[target]))


def cycle_error(maps: Callable[[int, int], Perm] | Mapping[tuple[int, int], Perm], n: int) -> float:
    """Mean, over all triples ``a < b < c``, of the fraction of units not returned by ``a→b→c→a``.

    ``maps`` gives the map from model ``a`` into model ``b``'s order, as a function ``(a, b) -> perm``
    or a dict keyed by ``(a, b)``; a missing ``(a, b)`` is taken as the inverse of ``(b, a)``.
    Returns 0.0 for fewer than three models.
    """
    if callable(maps):
        get = maps
    else:
        def get(a: int, b: int) -> Perm:
            if (a, b) in maps:
                return maps[(a, b)]
            if (b, a) in maps:
                return invert_permutation(maps[(b, a)])
            raise ValueError(f"no map between models {a} and {b}")
    if n < 3:
        return 0.0
    # all ordered maps once (n² calls), then every triple's loop as batched gathers
    pairs = {(a, b): get(a, b) for a in range(n) for b in range(n) if a != b}
    triples = torch.tensor(list(itertools.combinations(range(n), 3)))
    wrong = torch.zeros(len(triples), dtype=torch.float64)
    units = 0
    for g in pairs[(0, 1)]:
        d = pairs[(0, 1)][g].numel()
        table = torch.zeros(n, n, d, dtype=torch.long)
        for (a, b), perm in pairs.items():
            table[a, b] = perm[g].cpu()
        fixed = torch.arange(d)
        for start in range(0, len(triples), 4096):  # bounded memory for large n
            a, b, c = triples[start:start + 4096].T
            ab, bc, ca = table[a, b], table[b, c], table[c, a]
            loop = ab.gather(1, bc.gather(1, ca))  # a -> b -> c -> a
            wrong[start:start + 4096] += (loop != fixed).sum(1)
        units += d
    return float((wrong / max(units, 1)).mean())


def pairwise_cycle_error(state_dicts: Sequence[Mapping[str, torch.Tensor]], spec: PermutationSpec, *,
                         seed: int | None = 0, max_iter: int = 100) -> float:
    """Cycle error of plain pairwise Git Re-Basin: every pair matched independently (O(n²) matchings).

    This is the failure C²M³ was designed to remove; use it to show it on your own models.
    """
    from .matching.weight_matching import weight_matching
    n = len(state_dicts)
    maps = {}
    for a, b in itertools.combinations(range(n), 2):
        # perm that reorders model a to look like model b
        maps[(a, b)], _, _ = weight_matching(state_dicts[b], state_dicts[a], spec, seed=seed, max_iter=max_iter)
    return cycle_error(maps, n)
