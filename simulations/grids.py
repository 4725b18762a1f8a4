"""Wrappers of the Flower ``Grid`` handed to ``strategy.start``, and the partition query.

Each wrapper changes one Grid method and passes every other one to the wrapped grid, so they stack
(``ReplyProgressGrid(PartitionOrderedGrid(grid, ...))``) and work for any Flower strategy.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any, Iterable, Mapping

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from .messages import PARTITION_QUERY, partition_id

__all__ = ["PartitionOrderedGrid", "ReplyProgressGrid", "ask_partitions"]


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
