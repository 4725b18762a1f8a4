"""Aligners: bring n models into one common space by transforming their hidden units.

* :func:`~fedmerge.matching.git_rebasin.git_rebasin_matching` — ``"git-rebasin"``: every model
  weight-matched to one reference.
* :func:`~fedmerge.matching.mergemany.mergemany_matching` — ``"mergemany"``: each model to the
  mean of the others.
* :func:`~fedmerge.matching.c2m3.c2m3_matching` — ``"c2m3"``: all models into a universe at once,
  cycle-consistent.
* :func:`~fedmerge.matching.weight_matching.weight_matching` — the two-model building block.

Use them through :func:`fedmerge.match`, which validates input and returns a :class:`MatchResult`.
"""

from .c2m3 import c2m3_matching
from .git_rebasin import git_rebasin_matching
from .mergemany import mergemany_matching
from .result import MatchResult
from .weight_matching import weight_matching

__all__ = ["MatchResult", "c2m3_matching", "git_rebasin_matching", "mergemany_matching", "weight_matching"]
