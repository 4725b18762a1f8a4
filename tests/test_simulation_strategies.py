"""The fedmerge strategies through Flower's real Simulation Engine (Ray): one process, several runs.

The module fixture runs, in one subprocess (Python and Flower imported once; Ray starts per run),
a 2-round simulation with 4 clients (a 784-128-128-10 MLP) on an MNIST subset for each merging strategy, under
``init "independent"`` (round 1 merges independently initialised models: the setting alignment
is for), two C²M³ runs sampling half of the clients with the same seed, and a C²M³ run (shared
init) whose ClientApp has a crashing client and a client sending NaN weights.
"""

from __future__ import annotations

import json
import re

import pytest

CLIENTS, ROUNDS = 4, 2
#: The clients' MLP (784-128-128-10): the paper's 256-512-512-256 made every independent round-1 matching
#: take tens of seconds on 2 cores; what these tests check (every strategy aligns and merges the
#: replies of independently initialised clients, failures, sampling) does not depend on the width.
WIDTHS = (128, 128)

pytestmark = pytest.mark.slow  # every test reads the simulations of the module fixture
MERGING = ("git-rebasin", "mergemany", "c2m3", "orthogonal")

_RUNS = """
import json, os, sys
root, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
from flwr.simulation import run_simulation
from simulations import client_app, config as sim_config, server_app
from tests import faulty_client_app

runs = [(name, client_app.app, {{}}) for name in {merging!r}]
# half the clients sampled per round, twice with the same seed: the same partitions must be drawn
sampled = {{"strategy": "c2m3", "init": "shared", "fraction": 0.5, "fraction-evaluate": 0.5}}
runs += [("sampled-a", client_app.app, sampled), ("sampled-b", client_app.app, {{**sampled, "progress": True}})]
# the faulty run checks failure handling, so its clients share the initial model: its accuracy then
# does not hinge on a one-shot merge of 2 independently initialised models
runs.append(("faulty", faulty_client_app.app, {{"strategy": "c2m3", "init": "shared"}}))
for name, app, extra in runs:
    config = {{"strategy": name, "num-clients": {clients}, "num-rounds": {rounds}, "init": "independent",
              "max-train-samples": 4000, "max-test-samples": 1000, "local-epochs": 2, "seed": 5,
              "model-kwargs": json.dumps({{"widths": {widths!r}}}),
              "out": os.path.join(out, name), "progress": False, "threads": 1, **extra}}
    os.environ[sim_config.CONFIG_ENV] = json.dumps(config)
    run_simulation(server_app=server_app.app, client_app=app, num_supernodes={clients},
                   backend_config={{"client_resources": {{"num_cpus": 1, "num_gpus": 0.0}}}})

# stop-on-failure: the same faulty clients stop the run, with the client's own message
os.environ[sim_config.CONFIG_ENV] = json.dumps({{**config, "out": os.path.join(out, "strict"),
                                                "stop-on-failure": True, "num-rounds": 1}})
try:
    run_simulation(server_app=server_app.app, client_app=faulty_client_app.app, num_supernodes={clients},
                   backend_config={{"client_resources": {{"num_cpus": 1, "num_gpus": 0.0}}}})
except Exception as exc:
    open(os.path.join(out, "strict-error.txt"), "w").write(f"{{type(exc).__name__}}: {{exc}}")
""".format(merging=MERGING, clients=CLIENTS, rounds=ROUNDS, widths=list(WIDTHS))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, simulate):
    out = tmp_path_factory.mktemp("strategies")
    proc = simulate(_RUNS, out)
    return {name: json.loads((out / name / "results.json").read_text())
            for name in (*MERGING, "faulty", "sampled-a", "sampled-b")}, proc, out


@pytest.mark.parametrize("strategy", MERGING)
def test_each_strategy_runs_on_the_simulation_engine(runs, strategy):
    results = runs[0][strategy]
    assert results["complete"] is True and results["failures"] == []
    assert results["config"]["strategy"] == strategy and results["config"]["init"] == "independent"
    assert results["config"]["model-kwargs"] == json.dumps({"widths": list(WIDTHS)})
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for r in rounds:
        assert r["train_replies"] == CLIENTS and r["clients_merged"] == CLIENTS and r["train_failures"] == 0
        assert r["match_iterations"] >= 1 and r["match_objective"] > 0
        assert 0 < r["match_seconds"] <= r["aggregation_seconds"]
        assert 0 <= r["test_accuracy"] <= 1 and r["client_eval_accuracy"] > 0
    assert results["final"]["test_accuracy"] > 0.3, results["final"]  # chance: 0.1
    assert results["final"]["test_accuracy"] == rounds[-1]["test_accuracy"]


def test_stop_on_failure_stops_the_run_with_the_reason(runs):
    error = runs[2] / "strict-error.txt"
    assert error.is_file(), "the run with stop-on-failure did not raise"
    text = error.read_text()
    assert "stop-on-failure is set" in text and "simulated crash of client 1" in text and "NaN" in text
    results = json.loads((runs[2] / "strict" / "results.json").read_text())
    assert results["complete"] is False and results["final"]["round"] == 0  # no round was completed
    assert {f["reason"] for f in results["failures"]} == {
        "client error: simulated crash of client 1", "update: key 'layers.0.weight' contains NaN values"}


def test_bad_clients_are_left_out_and_recorded(runs):
    results = runs[0]["faulty"]
    assert results["complete"] is True
    failures = results["failures"]
    assert len(failures) == 2 * ROUNDS  # the crashing client and the NaN client, every round
    by_partition = {}
    for f in failures:
        assert f["phase"] == "train" and f["node_id"] > 0
        by_partition.setdefault(f["partition_id"], set()).add(f["reason"])
    crash = by_partition.pop(None, set()) | by_partition.pop(1, set())  # a crashed client never told its id
    assert crash == {"client error: simulated crash of client 1"}
    assert by_partition == {2: {"update: key 'layers.0.weight' contains NaN values"}}
    for r in results["rounds"]:
        assert r["train_replies"] == CLIENTS and r["clients_merged"] == CLIENTS - 2
        assert r["train_failures"] == 2 and len(r["failures"]) == 2
    assert results["final"]["test_accuracy"] > 0.3


def test_sampling_a_fraction_of_clients_is_reproducible(runs):
    """Node ids are random per run; with the same seed the same partitions train and evaluate."""
    first, second = runs[0]["sampled-a"], runs[0]["sampled-b"]
    assert first["complete"] is True and second["complete"] is True
    for a, b in zip(first["rounds"], second["rounds"], strict=True):
        assert len(a["train_partitions"]) == CLIENTS // 2 and len(a["evaluate_partitions"]) == CLIENTS // 2
        assert a["train_partitions"] == b["train_partitions"]
        assert a["evaluate_partitions"] == b["evaluate_partitions"]
        assert a["test_accuracy"] == b["test_accuracy"]
    assert len(first["rounds"]) == ROUNDS


def test_progress_bars_follow_the_replies_inside_each_round(runs):
    """With progress on (run "sampled-b"), a bar counts the clients' replies of every round."""
    stderr = runs[1].stderr
    half = CLIENTS // 2  # the sampled half, all replied (the rounds bar would also show "2/2": match the label)
    for kind in ("train", "evaluate"):
        assert re.search(rf"{kind} replies: 100%\|[^|]*\| {half}/{half}", stderr), stderr[-2000:]
