"""fedmerge: symmetry-aware model merging (Git Re-Basin, MergeMany, C²M³) for federated learning.

The public API is small: :func:`match` finds, for each model, the permutation of its hidden units
into a common space; :func:`merge` aligns and averages.  Both are pure functions over
``state_dict`` s and a :class:`PermutationSpec`, which a zoo model writes by hand and any traceable
``nn.Module`` gets from :func:`spec_from_module`.  Nothing here imports Flower.
"""

from .api import METHODS, match, merge
from .averaging import interpolate, weighted_average
from .diagnostics import cycle_error, matching_objective, pairwise_cycle_error, pairwise_map
from .matching import MatchResult
from .permutation import (apply_permutation, compose_permutations, identity_permutation, invert_permutation,
                          random_permutation)
from .spec import PermutationSpec

__version__ = "0.1.0"

__all__ = [
    "METHODS", "MatchResult", "PermutationSpec", "apply_permutation", "check_spec", "compose_permutations",
    "cycle_error", "identity_permutation", "interpolate", "invert_permutation", "match", "matching_objective",
    "merge", "pairwise_cycle_error", "pairwise_map", "random_permutation", "spec_for", "spec_from_module",
    "weighted_average",
]


def __getattr__(name):  # the tracing and self-check modules import torch.fx: load them on first use
    if name in ("spec_from_module", "spec_for"):
        from . import tracing
        return getattr(tracing, name)
    if name == "check_spec":
        from .spec_check import check_spec
        return check_spec
    raise AttributeError(f"module 'fedmerge' has no attribute {name!r}")
