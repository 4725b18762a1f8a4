"""Fixtures shared by several test modules (module code must not import each other)."""

from __future__ import annotations

import os

import pytest
import torch

from fedmerge.data import load_dataset
from fedmerge.models import MLP
from fedmerge.training import train


# Under pytest-xdist (the README's `-n auto`) the workers share the cores: each worker's torch gets its share of them.
# With torch's default of one thread per core, a worker's parallel kernels wait for threads that another worker's
# Ray actors have descheduled (the reason `run_simulation_script` runs its driver on one thread).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def _random_models(make, count, seed=0):
    """``count`` state dicts of ``make()``, the ``i``-th built after ``torch.manual_seed(seed + i)``:
    independently initialised models."""
    out = []
    for i in range(count):
        torch.manual_seed(seed + i)
        out.append(make().state_dict())
    return out


@pytest.fixture(scope="session")
def random_models():
    """``random_models(make, count, seed=0)``: ``count`` independently initialised state dicts of
    ``make()`` (the ``i``-th after ``torch.manual_seed(seed + i)``)."""
    return _random_models


@pytest.fixture(scope="session")
def mnist_subset():
    ds = load_dataset("mnist")
    return ds.images[:3000], ds.labels[:3000]


@pytest.fixture(scope="session")
def trained_mlp(mnist_subset):
    """A small MLP really trained on MNIST: its units are distinct, as in the paper's setting."""
    images, labels = mnist_subset
    torch.manual_seed(0)
    model = MLP(widths=(64, 128, 64))
    train(model, images, labels, epochs=1, batch_size=64, lr=0.05, seed=0, device="cpu")
    return model


@pytest.fixture
def run_error(capsys):
    """``run_error(argv)``: run ``simulations/run.py`` with ``argv``, check it fails with one line and exit
    status 2 (argparse's usage error, no traceback), and return that line."""
    import sys
    from pathlib import Path
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # `simulations` is not installed: import it from the repository root
        sys.path.insert(0, root)
    from simulations import run

    def fails(argv) -> str:
        with pytest.raises(SystemExit) as info:
            run.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("python simulations/run.py: error: "), err
        return err
    return fails


def run_simulation_script(script: str, out):
    """Run ``script`` (Python source that calls ``run_simulation``) in a fresh interpreter, with the
    repository root and ``out`` as its ``sys.argv[1:]`` and telemetry off; fail the test with its
    stderr if it fails; returns the ``CompletedProcess``.  One process for several simulations: Python
    and Flower are imported once.

    The driver (where the ServerApp matches, merges and evaluates) runs torch on one thread
    (``OMP_NUM_THREADS=1``), as the client actors do (``threads`` 1): on a 2-core machine whose cores
    the two client actors, or another job, already hold, torch's default of one thread per core makes
    every parallel kernel wait for a descheduled thread (measured: C²M³ on four MLPs 8 times slower)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="1", OMP_NUM_THREADS="1")
    env.pop("FEDMERGE_SIM_CONFIG", None)
    proc = subprocess.run([sys.executable, "-c", script, str(root), str(out)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"simulations failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="session")
def simulate():
    """:func:`run_simulation_script` as a fixture (test modules must not import each other)."""
    return run_simulation_script


@pytest.fixture
def train_reply():
    """``train_reply(node, model, records, n)``: a client's train reply as the SuperLink delivers it,
    the model's weights and ``num-examples`` ``n`` plus the extra ArrayRecords ``{key: record}``."""
    import time
    from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    def reply(node: int, model: torch.nn.Module, records=None, n: int = 100) -> Message:
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"num-examples": n, "partition-id": node})})
        for key, record in (records or {}).items():
            content[key] = record
        metadata = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0,
                            reply_to_message_id=f"ins-{node}", group_id="1", created_at=time.time(), ttl=3600.0,
                            message_type="train")
        return Message(content, metadata=metadata)
    return reply


@pytest.fixture
def bn_resnet():
    """Factory ``bn_resnet(seed=0)``: a small BatchNorm ResNet-20 (1×12×12 inputs, 5 classes) whose
    running statistics and affine parameters are random, not BatchNorm's identity defaults."""
    from torch import nn

    from fedmerge.models import ResNet20

    def build(seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = ResNet20(input_shape=(1, 12, 12), num_classes=5, width=0.5, norm="batchnorm")
        g = torch.Generator().manual_seed(100 + seed)
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
                mod.weight.data.uniform_(0.5, 1.5, generator=g)
                mod.bias.data.normal_(0, 0.2, generator=g)
        return model

    return build
