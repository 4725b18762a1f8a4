"""What the ServerApp and the ClientApp say to each other: record keys, the partition query, its answer.

Train and evaluate messages use the record keys of Flower's FedAvg (``arrayrecord_key`` /
``configrecord_key``).  Every reply of our ClientApp carries the client's partition id in its
MetricRecord: node ids are random in every simulation run, partition ids are not.
"""

from __future__ import annotations

from flwr.app import Message

__all__ = ["ARRAYS_KEY", "CONFIG_KEY", "METRICS_KEY", "PARTITION_KEY", "PARTITION_QUERY", "partition_id"]

#: Record keys: the same as Flower's FedAvg uses (``arrayrecord_key``/``configrecord_key``).
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"

#: Key of the client's partition id in its reply MetricRecord.
PARTITION_KEY = "partition-id"

#: ``message_type`` of the server's question "which partition are you?".
PARTITION_QUERY = "query.partition"


def partition_id(msg: Message) -> int | None:
    """The partition id a (non-error) reply of our ClientApp carries, if any."""
    if msg.has_error():
        return None
    for record in msg.content.metric_records.values():
        if PARTITION_KEY in record:
            return int(record[PARTITION_KEY])
    return None
