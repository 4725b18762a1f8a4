"""The one result object every matcher returns, in the manner of ``scipy.optimize.OptimizeResult``."""

from __future__ import annotations

from scipy.optimize import OptimizeResult

__all__ = ["MatchResult"]


class MatchResult(OptimizeResult):
    """Result of :func:`fedmerge.match`: a dict with attribute access.

    Attributes
    ----------
    perms : list[dict[str, Tensor]]
        One permutation per model, mapping it into the common space ("universe"):
        ``apply_permutation(state_dicts[i], spec, perms[i])`` is model ``i`` aligned.
    method : str
        ``"identity"``, ``"git-rebasin"``, ``"mergemany"`` or ``"c2m3"``.
    objective : float
        Eq. 4 of C²M³ at the final permutations: ``sum_{p<q} <U_p, U_q>`` over permuted entries.
        Higher means better aligned; comparable across methods on the same models.
    nit : int
        Iterations: Frank-Wolfe steps (c2m3), sweeps over the models (mergemany), or the most
        coordinate-descent sweeps of one weight matching (git-rebasin).
    converged, success : bool
        Whether the stopping rule was met before the iteration cap.
    cycle_error : float
        Mean fraction of units that do not come back around a 3-cycle of the pairwise maps the
        result defines (see :func:`fedmerge.diagnostics.cycle_error`); 0.0 for maps into a common space.
    seconds : float
        Wall time of the matching.
    message : str
        Why it stopped.
    history : list
        c2m3: relaxed objective after each iteration; mergemany: permutations changed per sweep.
    """

    def pairwise(self, source: int, target: int) -> dict:
        """The map from model ``source`` into model ``target``'s unit order (``P^{target,source}``)."""
        from ..diagnostics import pairwise_map
        return pairwise_map(self.perms, source, target)
