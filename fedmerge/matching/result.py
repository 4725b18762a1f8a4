"""The one result object every aligner returns, in the manner of ``scipy.optimize.OptimizeResult``."""

from __future__ import annotations

from scipy.optimize import OptimizeResult

from ..transforms import pairwise_map

__all__ = ["MatchResult"]


class MatchResult(OptimizeResult):
    """Result of :func:`fedmerge.match` and :func:`fedmerge.merge`: a dict with attribute access.

    Attributes
    ----------
    transforms : list[dict[str, element]]
        One transform per model, mapping it into the common space ("universe"):
        ``apply_transform(state_dicts[i], spec, transforms[i])`` is model ``i`` aligned.  Elements
        are those of each group's kind (:mod:`fedmerge.symmetry`): index vectors for permutations.
    perms : list[dict[str, element]]
        The same list, under its name for permutation-only specs (kept so that earlier code works).
    method : str
        The aligner: ``"identity"``, ``"git-rebasin"``, ``"mergemany"``, ``"c2m3"`` or the name of
        a user's callable.
    objective : float
        Eq. 4 of C²M³ at the final transforms: ``sum_{p<q} <U_p, U_q>`` over the entries groups act
        on.  Higher means better aligned; comparable across methods on the same models.
    nit : int
        Iterations: Frank-Wolfe steps (c2m3), sweeps over the models (mergemany), or the most
        coordinate-ascent sweeps of one weight matching (git-rebasin).
    converged, success : bool
        Whether the stopping rule was met before the iteration cap (False when stopped by the callback).
    cycle_error : float
        Mean defect, per unit, around the 3-cycles of the pairwise maps the result defines (see
        :func:`fedmerge.diagnostics.cycle_error`).  Maps into one common space, as every aligner
        here returns, compose to the identity around any cycle: 0 up to rounding, by construction.
        Checked on every triple up to ``MATCH_CYCLE_TRIPLES`` (1000) of them, on that many drawn at
        random beyond, so that many models cost no O(n³) pass.
    seconds : float
        Wall time of the alignment.
    message : str
        Why it stopped.
    history : list
        c2m3: relaxed objective after each iteration; mergemany: models whose transform changed per sweep.

    :func:`fedmerge.merge` adds ``average`` and ``repair`` (the stages' names) and ``stage_seconds``.
    """

    def pairwise(self, source: int, target: int) -> dict:
        """The map from model ``source`` into model ``target``'s unit order (``P^{target,source}``)."""
        return pairwise_map(self.transforms, source, target)
