"""Flower server strategies that aggregate by aligning weight-space symmetries (built on :mod:`fedmerge`).

Each is Flower's ``flwr.serverapp.strategy.FedAvg`` with its aggregation replaced by
``fedmerge.merge``, so it drops into any Flower ServerApp (simulation or deployment)::

    from strategies import C2M3
    strategy = C2M3(model=MyNet(), fraction_train=1.0, min_available_nodes=20)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(MyNet().state_dict()), num_rounds=5)

================  ==========================  ===========================================
name              class                        alignment before the weighted mean
================  ==========================  ===========================================
``fedavg``        Flower's ``FedAvg``          none (the baseline)
``git-rebasin``   :class:`GitRebasin`          every client to the first client
``mergemany``     :class:`MergeMany`           every client to the mean of the others
``c2m3``          :class:`C2M3`                all clients into a cycle-consistent universe
``orthogonal``    :class:`Orthogonal`          generalised Procrustes into a common space
================  ==========================  ===========================================

Every strategy takes ``average=`` (``"mean"``, ``"spherical"``, ``"spherical-projection"`` or
``"regmean"``: :mod:`strategies.federated_regmean`) and ``repair=`` (``"none"``, ``"federated"``:
:mod:`strategies.federated_repair`, or ``"server"``).

Client replies are judged first (:mod:`strategies.replies`); bad ones are left out, with the
reason, instead of stopping the run.
"""

try:
    from flwr.serverapp.strategy import FedAvg
except ImportError as exc:  # the core install (`pip install fedmerge`) has no Flower
    raise ImportError("the strategies need Flower: pip install 'fedmerge[federated]'") from exc

from .c2m3 import C2M3
from .git_rebasin import GitRebasin
from .mergemany import MergeMany
from .merging_strategy import MergingStrategy
from .orthogonal import Orthogonal
from .replies import ClientUpdate, LeftOut, split_evaluate_replies, split_train_replies

__all__ = ["C2M3", "ClientUpdate", "FedAvg", "GitRebasin", "LeftOut", "MergeMany", "MergingStrategy", "Orthogonal",
           "STRATEGIES", "split_evaluate_replies", "split_train_replies"]

#: Strategy name (as on the command line) -> class.
STRATEGIES = {"fedavg": FedAvg, "git-rebasin": GitRebasin, "mergemany": MergeMany, "c2m3": C2M3,
              "orthogonal": Orthogonal}
