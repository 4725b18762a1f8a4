"""Clients over GPUs: fractional ``--gpus-per-client`` packs clients on a GPU and spreads them over all GPUs.

No real GPU is needed: ``--ray-num-gpus 2`` declares two GPUs to run.py's private Ray instance, Ray
schedules the declared resources and sets ``CUDA_VISIBLE_DEVICES`` of every client actor to the GPU
it assigned.  The slow test runs 8 clients with 0.5 GPU and 0.25 CPU each (so GPUs, not the 2
declared CPUs, bind: 4 actors) and reads the per-call trace the clients write under
``$FEDMERGE_CLIENT_TRACE``: at most 4 clients train at once, each actor sees one GPU id, GPUs "0"
and "1" both serve exactly two actors, and, as torch has no CUDA here, every client logs that it
falls back to the CPU.  The fast tests: the one-line errors, the fallback itself, and run.py's
count of clients that fit against Flower's own.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `simulations` is not installed: import it from the repository root
    sys.path.insert(0, str(ROOT))

from simulations import run, task  # noqa: E402
from simulations.client_app import TRACE_ENV  # noqa: E402
from simulations.config import ClientConfig  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a usable CUDA GPU")


# ------------------------------------------------------------------------- fast tests


@no_cuda
def test_gpus_with_none_present_or_declared_is_a_one_line_error(run_error):
    err = run_error(["--gpus-per-client", "0.5"])
    assert "--gpus-per-client 0.5 but no GPU is available" in err and "--ray-num-gpus" in err


def test_more_gpus_per_client_than_a_node_has_is_a_one_line_error(run_error):
    err = run_error(["--gpus-per-client", "3", "--ray-num-gpus", "2"])
    assert "--gpus-per-client 3 exceeds the GPUs" in err


@pytest.mark.parametrize("nodes, cpus, gpus", [
    ([{"CPU": 2.0, "GPU": 2.0}], 0.25, 0.5),
    ([{"CPU": 2.0, "GPU": 2.0}], 1.0, 0.5),
    ([{"CPU": 16.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 4.0}, {"CPU": 4.0}], 1.0, 0.25),
    ([{"CPU": 16.0, "GPU": 1.0}, {"CPU": 3.0}], 2.0, 0.0),
])
def test_clients_that_fit_is_flowers_actor_pool_size(nodes, cpus, gpus, monkeypatch):
    from flwr.simulation.ray_transport import ray_actor

    monkeypatch.setattr(ray_actor.ray, "nodes", lambda: [{"Resources": n} for n in nodes])
    resources = {"num_cpus": cpus, "num_gpus": gpus}
    assert run.clients_that_fit(nodes, cpus, gpus) == ray_actor.pool_size_from_resources(resources)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def flwr_warnings():
    handler = _Records()
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    task._usable_device.cache_clear()
    yield handler.messages
    logger.removeHandler(handler)
    task._usable_device.cache_clear()


def test_a_client_given_an_unusable_gpu_falls_back_to_the_cpu(monkeypatch, flwr_warnings):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # what Ray sets in an actor it gave GPU 1
    assert task.assigned_gpus() == ["1"]
    assert task.device_of(ClientConfig.from_mapping({"device": "auto"})) == torch.device("cpu")
    assert task.device_of(ClientConfig.from_mapping({"device": "auto"})) == torch.device("cpu")
    assert len(flwr_warnings) == 1 and "Ray assigned GPU 1" in flwr_warnings[0]  # once per process
    assert "training on the CPU" in flwr_warnings[0]
    assert task.device_of(ClientConfig.from_mapping({"device": "cuda"})) == torch.device("cpu")
    assert "'cuda' is not usable" in flwr_warnings[-1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # Ray's value for an actor without GPUs: no warning
    assert task.assigned_gpus() == []
    assert task.device_of(ClientConfig.from_mapping({"device": "cpu"})) == torch.device("cpu")
    assert len(flwr_warnings) == 2


# ------------------------------------------------------------------------- the simulation

CLIENTS, ROUNDS = 8, 2


def _max_overlap(intervals) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])  # ends first on ties
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.slow
@no_cuda
def test_half_gpu_clients_run_four_at_a_time_over_two_declared_gpus(tmp_path):
    trace = tmp_path / "trace"
    trace.mkdir()
    out = tmp_path / "gpus"
    cmd = [sys.executable, str(ROOT / "simulations" / "run.py"), "--strategy", "fedavg", "--init", "shared",
           "--clients", str(CLIENTS), "--rounds", str(ROUNDS), "--max-train-samples", "6000",
           "--max-test-samples", "300", "--fraction-evaluate", "0", "--no-progress", "--out", str(out),
           "--gpus-per-client", "0.5", "--cpus-per-client", "0.25", "--ray-num-gpus", "2", "--ray-num-cpus", "2"]
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1", **{TRACE_ENV: str(trace)})
    for key in ("FEDMERGE_SIM_CONFIG", "RAY_ADDRESS", "CUDA_VISIBLE_DEVICES"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"run.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "Ray: 4 clients at a time on the private Ray instance (1 node(s), 2 CPUs, 2 GPUs" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and [r["train_replies"] for r in results["rounds"]] == [CLIENTS] * ROUNDS

    calls = [json.loads(line) for f in trace.glob("client-*.jsonl") for line in f.read_text().splitlines()]
    train_calls = [c for c in calls if c["handler"] == "train"]
    assert sorted((c["round"], c["partition-id"]) for c in train_calls) == [
        (r, p) for r in range(1, ROUNDS + 1) for p in range(CLIENTS)]
    # the GPU(s) each actor process saw: Ray's assignment and CUDA_VISIBLE_DEVICES agree, one GPU each
    gpus_of = defaultdict(set)
    for c in train_calls:
        assert c["cuda-visible-devices"] == ",".join(c["gpu-ids"]) and len(c["gpu-ids"]) == 1, c
        assert c["device"] == "cpu"  # declared GPUs only: the fallback
        gpus_of[c["pid"]].add(c["gpu-ids"][0])
    assert all(len(ids) == 1 for ids in gpus_of.values()), gpus_of
    actors_per_gpu = Counter(next(iter(ids)) for ids in gpus_of.values())
    assert set(actors_per_gpu) == {"0", "1"}, actors_per_gpu  # spread over both GPUs
    assert max(actors_per_gpu.values()) <= 2 and len(gpus_of) <= 4, actors_per_gpu  # 0.5 GPU: two per GPU
    peak = _max_overlap([(c["start"], c["end"]) for c in train_calls])
    assert 2 <= peak <= 4, peak  # several at once, never more than the 4 the GPUs hold
    assert "Ray assigned GPU" in proc.stderr and "training on the CPU" in proc.stderr  # each client warned
