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
        iterations in a row.
    refine:
        Block-coordinate sweeps polishing the Frank-Wolfe permutations (each model's groups
        re-solved against the sum of the others; ``True``: until a sweep changes nothing;
        ``0``/``False``: the paper's algorithm alone).  Not in the paper.  The default, one sweep,
        unsticks Frank-Wolfe where it stalls between symmetric alignments, e.g. on an even number
        of permuted copies of one model (the test
        ``test_one_refinement_sweep_recovers_even_numbers_of_permuted_copies``).
    spec, model, device, **fedavg_kwargs:
        As :class:`~strategies.merging_strategy.MergingStrategy`.
    """

    align = "c2m3"

    def __init__(self, *, max_iter: int = 20, tol: float = 1e-6, patience: int = 5, refine: bool | int = 1,
                 **kwargs: Any) -> None:
        super().__init__(match_options={"max_iter": max_iter, "tol": tol, "patience": patience,
                                        "refine": refine}, **kwargs)
