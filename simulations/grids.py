"""Wrappers of the Flower ``Grid`` handed to ``strategy.start``, and the partition query.

Each wrapper changes one Grid method and passes every other one to the wrapped grid, so they stack
(``ReplyProgressGrid(PartitionOrderedGrid(grid, ...))``) and work for any Flower strategy.
"""

from __future__ import annotations

import math
import random
import time
from logging import INFO, WARNING
from typing import Any, Callable, Iterable, Mapping

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from .messages import PARTITION_QUERY, partition_id

__all__ = ["NodeWaitGrid", "NotEnoughNodesError", "PartitionOrderedGrid", "ReplyProgressGrid", "ask_partitions",
           "wait_for_nodes"]


class NotEnoughNodesError(RuntimeError):
    """Fewer nodes connected than the run needs, after waiting ``node-wait`` seconds."""


def wait_for_nodes(grid: Grid, expected: int, minimum: int, timeout: float, *, poll: float = 1.0,
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> list[int]:
    """The ids of the connected nodes, once ``expected`` are connected or ``timeout`` seconds have passed.

    Flower's FedAvg waits without a limit for ``min_available_nodes``: a run asking for more
    nodes than the federation has would hang before round 1.  This waits at most ``timeout``
    seconds; with fewer than ``expected`` nodes by then it logs a warning and returns those
    connected if they are at least ``minimum`` (capped at ``expected``), else it raises
    :class:`NotEnoughNodesError` naming the numbers.
    """
    minimum = max(1, min(int(minimum), int(expected)))
    start = clock()
    last_count = -1
    while True:
        nodes = list(grid.get_node_ids())
        waited = clock() - start
        if len(nodes) >= expected:
            log(INFO, "%d of %d nodes connected after %.0f s", len(nodes), expected, waited)
            return nodes
        if waited >= timeout:
            break
        if len(nodes) != last_count:
            log(INFO, "waiting up to %.0f s for %d nodes: %d connected", timeout, expected, len(nodes))
            last_count = len(nodes)
        sleep(min(poll, max(0.0, timeout - waited)))
    if len(nodes) < minimum:
        raise NotEnoughNodesError(
            f"expected {expected} nodes (num-clients), only {len(nodes)} connected after waiting "
            f"{timeout:g} s (node-wait), fewer than the minimum of {minimum} (min-clients): start more "
            f"SuperNodes, or lower num-clients / min-clients, or raise node-wait")
    log(WARNING, "expected %d nodes (num-clients), %d connected after waiting %g s (node-wait): "
        "running with the %d connected", expected, len(nodes), timeout, len(nodes))
    return nodes


class NodeWaitGrid:
    """The Grid, whose ``get_node_ids`` gives up once fewer than ``minimum`` nodes stayed connected for ``timeout`` s.

    Flower's node sampling polls ``get_node_ids`` once a second, without a limit, until the
    strategy's ``min_available_nodes`` are connected.  Nodes that leave during a run would make
    it hang there; through this wrapper the poll raises :class:`NotEnoughNodesError` instead.
    Every other Grid method is the wrapped grid's.
    """

    def __init__(self, grid: Grid, minimum: int, timeout: float, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._grid = grid
        self._minimum = int(minimum)
        self._timeout = float(timeout)
        self._clock = clock
        self._short_since: float | None = None

    def get_node_ids(self) -> list[int]:
        nodes = list(self._grid.get_node_ids())
        if len(nodes) >= self._minimum:
            self._short_since = None
            return nodes
        now = self._clock()
        if self._short_since is None:
            self._short_since = now
        elif now - self._short_since >= self._timeout:
            raise NotEnoughNodesError(
                f"only {len(nodes)} nodes connected for {now - self._short_since:.0f} s (node-wait), "
                f"fewer than the minimum of {self._minimum} (min-clients)")
        return nodes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class PartitionOrderedGrid:
    """The Grid, listing nodes in partition order and seeding the sampler before each listing.

    Flower's FedAvg samples ``fraction`` of the clients with the module-level ``random.sample``
    over ``grid.get_node_ids()``, and simulated node ids are random in every run: the same
    ``--seed`` would sample different partitions each time.  Handed to ``strategy.start`` in place
    of the Grid, this lists the nodes sorted by partition id and re-seeds ``random`` (from the run
    seed and a call counter) just before each listing, so each round samples the same partitions
    in every run with that seed.  Every other Grid method is the wrapped grid's.
    """

    def __init__(self, grid: Grid, partition_of: Mapping[int, int], seed: int) -> None:
        self._grid = grid
        self._partition_of = dict(partition_of)
        self._seed = int(seed)
        self._calls = 0

    def get_node_ids(self) -> list[int]:
        nodes = sorted(self._grid.get_node_ids(), key=lambda n: (self._partition_of.get(n, math.inf), n))
        self._calls += 1
        random.seed(f"fedmerge-sampling:{self._seed}:{self._calls}")
        return nodes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class ReplyProgressGrid:
    """The Grid, with a progress bar over the replies of each ``send_and_receive``.

    A round's messages go out together and Flower's ``send_and_receive`` returns when the last
    reply is in, so without this nothing moves on screen while the clients train, however long
    that takes.  Same push-then-poll loop and timeout as Flower's own, through the public
    ``push_messages``/``pull_messages``; every other Grid method is the wrapped grid's.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        from tqdm.auto import tqdm

        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else "no"
        waiting = set(self._grid.push_messages(messages))
        del messages
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        with tqdm(total=len(waiting), desc=f"{kind} replies", unit="client", leave=False) as bar:
            while waiting and (timeout is None or time.time() < end):
                pulled = list(self._grid.pull_messages(waiting))
                replies.extend(pulled)
                waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
                bar.update(len(pulled))
                if waiting:
                    time.sleep(getattr(self._grid, "pull_interval", 0.1))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def ask_partitions(grid: Grid, num_clients: int, *, timeout: float) -> dict[int, int]:
    """``{node id: partition id}`` of the connected nodes, asked once with a query message.

    Waits (up to ``timeout``) for ``num_clients`` nodes, as FedAvg does before sampling.  Nodes
    that do not answer (a ClientApp without the ``partition`` query) are missing from the map.
    """
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < num_clients and time.monotonic() < deadline:
        time.sleep(0.5)
    messages = [Message(RecordDict(), dst_node_id=node, message_type=PARTITION_QUERY) for node in nodes]
    partition_of = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        pid = partition_id(reply)
        if pid is not None:
            partition_of[int(reply.metadata.src_node_id)] = pid
    return partition_of
