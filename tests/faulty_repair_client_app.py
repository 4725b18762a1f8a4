"""A ClientApp for the federated-REPAIR failure test: fedmerge's own, except two clients' statistics.

Partition 1 sends NaN statistics with its (good) update; partition 2 fails in the repair query.
Importable, because the Simulation Engine ships the ClientApp to Ray actors by reference.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from simulations.client_app import evaluate_handler, partition_handler, repair_handler, train_handler
from strategies.federated_repair import STATS_KEY

BAD_STATISTICS, FAILING_QUERY = 1, 2

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = train_handler(msg, context)
    if int(context.node_config["partition-id"]) == BAD_STATISTICS:
        stats = reply.content[STATS_KEY].to_torch_state_dict()
        first = next(k for k in stats if k.endswith("/sum"))
        stats[first][0] = float("nan")
        reply.content[STATS_KEY] = ArrayRecord(stats)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return evaluate_handler(msg, context)


@app.query("repair")
def repair(msg: Message, context: Context) -> Message:
    if int(context.node_config["partition-id"]) == FAILING_QUERY:
        raise RuntimeError("simulated failure in the repair query")
    return repair_handler(msg, context)


@app.query("partition")
def partition(msg: Message, context: Context) -> Message:
    return partition_handler(msg, context)
