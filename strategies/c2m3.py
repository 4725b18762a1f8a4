"""C²M³ strategy: merge the clients' models in a cycle-consistent universe (Frank-Wolfe).

Every client's model is mapped into one shared "universe" space by C²M³'s Frank-Wolfe matching
(``fedmerge.match(method="c2m3")``); the sample-count weighted mean is taken there.  Because
all maps go through the universe, the alignment of any two clients is consistent with every
third one, and no client is privileged as the reference.
"""

from __future__ import annotations

from typing import Any

from .merging_strategy import MergingStrategy

__all__ = ["C2M3"]


class C2M3(MergingStrategy):
    """Flower ``FedAvg`` aggregating with ``fedmerge.merge(align="c2m3")``.

    Parameters
    ----------
    max_iter:
        Frank-Wolfe iterations per round.  The paper runs up to 200 with a 1e-6 tolerance; a
        server merging every round caps it, since the merged model's accuracy is nearly reached
        long before the objective converges (BENCHMARKS.md, section (a), measures both), and
        models trained from one global model converge in a few iterations.
    tol, patience:
        Stop earlier when the objective improves by less than ``tol`` (relative) for ``patience``
        iterations in a row.  Default ``None``: the library's rule for the refinement chosen (with
        a capped ``refine``, such as this strategy's default, the authors' rule,
        :data:`fedmerge.matching.c2m3.PAPER_STOP`; see :func:`fedmerge.matching.c2m3.c2m3_matching`).
    refine:
        Block-coordinate sweeps polishing the Frank-Wolfe permutations (each model's groups
        re-solved against the sum of the others).  Default ``1``: one sweep per round, since a
        sweep to the fixed point (``True``, the library default) costs tens of sweeps on 20
        independently trained models (BENCHMARKS.md (a)); the round's ``match_converged`` says
        whether that sweep changed nothing (a fixed point: no single permutation can be
        improved).  ``0``/``False`` with ``init="identity"`` is the paper's algorithm alone.  Not
        in the paper.  Refinement unsticks Frank-Wolfe where it stalls between symmetric
        alignments (``tests/test_c2m3_default.py``).
    init:
        Frank-Wolfe's start, as in :func:`fedmerge.matching.c2m3.c2m3_matching` (default
        ``"auto"``: permuted copies are recognised and matched exactly; on other models
        Frank-Wolfe starts from identity matrices, and the sequential match that recognised no
        copies is refined and kept instead where it scores higher than the refined rounding).
    spec, model, device, **fedavg_kwargs:
        As :class:`~strategies.merging_strategy.MergingStrategy`.
    """

    align = "c2m3"

    def __init__(self, *, max_iter: int = 20, tol: float | None = None, patience: int | None = None,
                 refine: bool | int = 1, init: str = "auto", **kwargs: Any) -> None:
        options = {"max_iter": max_iter, "tol": tol, "patience": patience, "refine": refine, "init": init}
        # tol and patience left out unless given: the library's rule for the refinement chosen applies
        super().__init__(match_options={k: v for k, v in options.items() if v is not None}, **kwargs)
