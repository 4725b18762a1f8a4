"""Git Re-Basin strategy: align every client's model to the first client's, then average.

Pairwise weight matching (Ainsworth et al.) of each update to one reference update — the first
usable reply of the round, in the order the server received or sorted them.  The cheapest
alignment, but the reference is privileged and the maps between two non-reference clients are not
cycle-consistent (see ``fedmerge.diagnostics.cycle_error``).
"""

from __future__ import annotations

from typing import Any

from .merging_strategy import MergingStrategy

__all__ = ["GitRebasin"]


class GitRebasin(MergingStrategy):
    """Flower ``FedAvg`` aggregating with ``fedmerge.merge(align="git-rebasin")``.

    Parameters
    ----------
    max_iter:
        Coordinate-descent passes of each weight matching.
    seed:
        Order of the permutation groups in the coordinate descent.
    spec, model, device, **fedavg_kwargs:
        As :class:`~strategies.merging_strategy.MergingStrategy`.
    """

    align = "git-rebasin"

    def __init__(self, *, max_iter: int = 100, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(match_options={"max_iter": max_iter, "seed": seed}, **kwargs)
