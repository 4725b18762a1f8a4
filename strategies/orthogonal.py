"""Orthogonal strategy: merge the clients' models after generalised orthogonal Procrustes alignment.

Every client's model is mapped into one common space by ``fedmerge.match(method="orthogonal")``:
per group of hidden units the Procrustes rotation (closed form by an SVD) against the mean of the
other clients, in sweeps, so no client is the reference and the maps are cycle-consistent by
construction.  Each group is solved within its kind in the spec: groups the spec declares
orthogonal (units with only linear maps around them) get rotations, ReLU units, which only admit
permutations, get permutations (LAPs), so every aligned model still computes its own function.
``relax=True`` searches the ReLU groups over all rotations too and projects the result back to the
nearest permutation: a different, much slower search per round (BENCHMARKS.md (f)).

A rotation of units that carry BatchNorm statistics is not a symmetry (every channel is
normalised by its own statistics), so when the search rotates such groups (``relax=True`` on a
BatchNorm network, or a group the spec declares orthogonal) the strategy folds the BatchNorms into
the layers producing their inputs, aligns and averages the folded models, and unfolds the merge
with re-estimated statistics (``fold_batchnorm``, :class:`~strategies.merging_strategy.MergingStrategy`).
"""

from __future__ import annotations

from typing import Any

from .merging_strategy import MergingStrategy

__all__ = ["Orthogonal"]


class Orthogonal(MergingStrategy):
    """Flower ``FedAvg`` aggregating with ``fedmerge.merge(align="orthogonal")``.

    Parameters
    ----------
    relax:
        ``False`` (default): each group solved within its own kind; ``True``: every group searched
        over all rotations, the maps of non-orthogonal groups projected back to their kind.
    max_iter:
        Sweeps over the clients per round (each client re-solved against the mean of the others);
        a server merging every round caps them, as MergeMany's strategy does.
    solver:
        ``"svd"`` (closed-form Procrustes) or ``"stiefel"`` (Riemannian optimisation, pymanopt:
        ``pip install 'fedmerge[manifold]'``).
    seed:
        Order in which the clients are visited.
    spec, model, device, average, repair, fold_batchnorm, **fedavg_kwargs:
        As :class:`~strategies.merging_strategy.MergingStrategy`; by default BatchNorm is folded
        when the groups searched over rotations (:meth:`rotated_groups`) carry it.
    """

    align = "orthogonal"

    def __init__(self, *, relax: bool = False, max_iter: int = 5, solver: str = "svd", seed: int = 0,
                 **kwargs: Any) -> None:
        if not isinstance(relax, bool):
            raise ValueError(f"relax must be True or False, got {relax!r}")
        super().__init__(match_options={"relax": relax, "max_iter": max_iter, "solver": solver, "seed": seed},
                         **kwargs)

    def rotated_groups(self) -> list[str]:
        """Every group with ``relax=True``; otherwise the groups the spec declares orthogonal."""
        if self.spec is None:
            return []
        if self.match_options.get("relax"):
            return list(self.spec.sizes)
        return [g for g, kind in self.spec.kinds.items() if kind == "orthogonal"]
