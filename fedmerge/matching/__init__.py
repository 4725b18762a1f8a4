"""Matchers: bring n models into one common space by permuting their hidden units.

* :func:`~fedmerge.matching.weight_matching.weight_matching` — Git Re-Basin, pairwise.
* :func:`~fedmerge.matching.mergemany.merge_many_matching` — MergeMany, n models.
* :func:`~fedmerge.matching.c2m3.frank_wolfe_matching` — C²M³, n models, cycle-consistent.

Use them through :func:`fedmerge.match`, which validates input and returns a :class:`MatchResult`.
"""

from .c2m3 import frank_wolfe_matching
from .mergemany import merge_many_matching, reference_matching
from .result import MatchResult
from .weight_matching import weight_matching

__all__ = ["MatchResult", "frank_wolfe_matching", "merge_many_matching", "reference_matching", "weight_matching"]
