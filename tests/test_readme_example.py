"""The README's "strategies in your own Flower app" example, run as written with a ClientApp of a user's own.

The ServerApp code is taken from README.md (the python block after the
``<!-- example: own-serverapp`` marker) and written to ``my_server.py``; the ClientApp below is what
a user would write (no fedmerge simulation code): it trains on its own shard of MNIST and replies
as it would to Flower's FedAvg.  Both run on Flower's Simulation Engine with Ray.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # a Flower simulation on Ray

USER_CLIENT = '''
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmerge.data import load_dataset
from fedmerge.models import MLP
from fedmerge.training import evaluate, train

app = ClientApp()


def _shard(context):
    ds = load_dataset("mnist")
    pid, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    idx = torch.arange(pid, 3000, n)
    return ds.images[idx], ds.labels[idx]


def _model(msg):
    model = MLP(widths=(128, 128))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.train()
def fit(msg: Message, context: Context) -> Message:
    model = _model(msg)
    images, labels = _shard(context)
    stats = train(model, images, labels, epochs=2, lr=float(msg.content["config"]["lr"]), device="cpu")
    metrics = MetricRecord({"train_loss": float(stats["loss"]), "num-examples": int(stats["num_examples"])})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def check(msg: Message, context: Context) -> Message:
    images, labels = _shard(context)
    stats = evaluate(_model(msg), images, labels, device="cpu")
    metrics = MetricRecord({"eval_accuracy": float(stats["accuracy"]), "num-examples": int(stats["num_examples"])})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
'''

DRIVER = '''
import my_client, my_server
from flwr.simulation import run_simulation
run_simulation(server_app=my_server.app, client_app=my_client.app, num_supernodes=3,
               backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
'''


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- example: own-serverapp.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its own-serverapp example"
    return match.group(1)


def test_readme_serverapp_example_runs_with_a_users_clientapp(tmp_path):
    (tmp_path / "my_server.py").write_text(_readme_example())
    (tmp_path / "my_client.py").write_text(USER_CLIENT)
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", DRIVER], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "left out: {}" in proc.stdout + proc.stderr
    state_dict = torch.load(tmp_path / "global_model.pt", weights_only=True)
    from fedmerge.data import load_dataset
    from fedmerge.models import MLP
    from fedmerge.training import evaluate

    model = MLP(widths=(128, 128))
    model.load_state_dict(state_dict)
    test = load_dataset("mnist", train=False)
    accuracy = evaluate(model, test.images[:1000], test.labels[:1000], device="cpu")["accuracy"]
    assert accuracy > 0.6, accuracy  # 2 rounds on 3000 samples; chance is 0.1
