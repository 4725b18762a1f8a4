"""MergeMany strategy: merge the clients' models after aligning each to the mean of the others.

MergeMany (the C²M³ paper's Appendix A baseline) repeatedly weight-matches every model to the
mean of all the others and re-averages; the common space is that running mean's.
"""

from __future__ import annotations

from typing import Any

from .merging_strategy import MergingStrategy

__all__ = ["MergeMany"]


class MergeMany(MergingStrategy):
    """Flower ``FedAvg`` aggregating with ``fedmerge.merge(align="mergemany")``.

    Parameters
    ----------
    max_iter:
        Sweeps over all clients per round (each sweep solves one weight matching per client).
        Unbounded MergeMany can take many sweeps on many models; a server merging every round
        caps it (BENCHMARKS.md, section (b), measures the uncapped run).
    inner_max_iter:
        Coordinate-descent passes of each weight matching.
    seed:
        Order of the permutation groups in the weight matchings.
    spec, model, device, **fedavg_kwargs:
        As :class:`~strategies.merging_strategy.MergingStrategy`.
    """

    align = "mergemany"

    def __init__(self, *, max_iter: int = 5, inner_max_iter: int = 100, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(match_options={"max_iter": max_iter, "inner_max_iter": inner_max_iter, "seed": seed},
                         **kwargs)
