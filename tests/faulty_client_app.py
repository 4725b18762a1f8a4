"""A ClientApp for the failure tests: fedmerge's own, except that two clients go wrong.

Partition 1 raises in training (a crashed client) and partition 2 sends NaN weights (a malformed
update).  It lives in an importable module because the Simulation Engine ships the ClientApp to
Ray actors by reference.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from simulations.client_app import ARRAYS_KEY, evaluate_handler, train_handler

CRASHING, POISONING = 1, 2

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    if partition_id == CRASHING:
        raise RuntimeError(f"simulated crash of client {partition_id}")
    reply = train_handler(msg, context)
    if partition_id == POISONING:
        state_dict = reply.content[ARRAYS_KEY].to_torch_state_dict()
        first = next(iter(state_dict))
        state_dict[first].view(-1)[0] = float("nan")
        reply.content[ARRAYS_KEY] = ArrayRecord(state_dict)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return evaluate_handler(msg, context)
