"""fedmerge: symmetry-aware model merging (Git Re-Basin, MergeMany, C²M³) for federated learning.

The public API is small: :func:`match` finds, for each model, the transform of its hidden units
(a permutation, signed permutation or rotation per group, :mod:`fedmerge.symmetry`) into a common
space; :func:`merge` aligns, averages and optionally repairs, each stage a registered name or a
callable.  Both are pure functions over ``state_dict`` s and a :class:`SymmetrySpec`, which a zoo
model writes by hand and any traceable ``nn.Module`` gets from :func:`spec_from_module`.  Nothing
here imports Flower.
"""

from .api import ALIGNERS, AVERAGERS, METHODS, REPAIRERS, match, merge
from .averaging import interpolate, weighted_average
from .diagnostics import cycle_error, matching_objective, pairwise_cycle_error, pairwise_map
from .matching import MatchResult
from .matching.orthogonal import orthogonal_matching, relaxed_spec
from . import alignment_metrics  # noqa: F401  (E_res, sign change, CKA, barriers: fedmerge.alignment_metrics.*)
from .regmean import regmean_average
from .spherical import karcher_mean, slerp, spherical_average
from . import permutation  # noqa: F401  (fedmerge.permutation.* stays reachable as before)
from .progress import ProgressBar
from .spec import PermutationSpec, SymmetrySpec
from .symmetry import SignedPermutation
from .transforms import (apply_permutation, apply_transform, compose_permutations, compose_transforms,
                         identity_permutation, identity_transform, invert_permutation, invert_transform,
                         random_permutation, random_transform)

__version__ = "0.1.0"

__all__ = [
    "ALIGNERS", "AVERAGERS", "METHODS", "MatchResult", "PermutationSpec", "ProgressBar", "REPAIRERS",
    "SignedPermutation", "SymmetrySpec", "apply_permutation", "apply_transform", "check_spec",
    "compose_permutations", "compose_transforms", "cycle_error", "identity_permutation", "identity_transform",
    "interpolate", "invert_permutation", "invert_transform", "match", "matching_objective", "merge",
    "pairwise_cycle_error", "pairwise_map", "random_permutation", "random_transform", "spec_for",
    "spec_from_module", "weighted_average",
    "alignment_metrics", "karcher_mean", "orthogonal_matching", "regmean_average", "relaxed_spec", "slerp",
    "spherical_average",
]


def __getattr__(name):  # the tracing and self-check modules import torch.fx: load them on first use
    if name in ("spec_from_module", "spec_for"):
        from . import tracing
        return getattr(tracing, name)
    if name == "check_spec":
        from .spec_check import check_spec
        return check_spec
    raise AttributeError(f"module 'fedmerge' has no attribute {name!r}")
