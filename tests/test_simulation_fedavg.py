"""FedAvg through Flower's real Simulation Engine (Ray backend): simulations/run.py end to end.

One module-scoped simulation (Ray start-up is slow; the tests reading it are marked ``slow``): 4
clients, 2 rounds, a 4000-sample MNIST subset, run as a subprocess exactly as a user would run
it.  The other tests are fast: bad
command lines exit with status 2 and a one-line message, and the strategy registry/config helpers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `simulations` is not installed: import it from the repository root
    sys.path.insert(0, str(ROOT))

from simulations import run  # noqa: E402
from simulations.config import ClientConfig, config_record  # noqa: E402
from simulations.server_app import STRATEGIES, make_strategy  # noqa: E402
from simulations.task import build_global_model, used_test_indices  # noqa: E402
from strategies import C2M3, FedAvg  # noqa: E402

CLIENTS, ROUNDS, TRAIN, TEST = 4, 2, 4000, 1000


def _env() -> dict[str, str]:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1")
    env.pop("FEDMERGE_SIM_CONFIG", None)
    return env


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "fedavg"
    cmd = [sys.executable, str(ROOT / "simulations" / "run.py"), "--strategy", "fedavg", "--init", "shared",
           "--clients", str(CLIENTS), "--rounds", str(ROUNDS), "--max-train-samples", str(TRAIN),
           "--max-test-samples", str(TEST), "--local-epochs", "2", "--seed", "3", "--no-progress",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"run.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return out, json.loads((out / "results.json").read_text()), proc


@pytest.mark.slow
def test_results_json(simulation):
    out, results, _ = simulation
    assert results["complete"] is True
    cfg = results["config"]
    assert cfg["strategy"] == "fedavg" and cfg["num-clients"] == CLIENTS and cfg["num-rounds"] == ROUNDS
    assert cfg["dataset"] == "mnist" and cfg["model"] == "mlp" and cfg["partition"] == "iid"
    assert cfg["max-train-samples"] == TRAIN and cfg["max-test-samples"] == TEST and cfg["seed"] == 3
    assert cfg["out"] == str(out.resolve()) and cfg["command"].startswith("python simulations/run.py")
    assert results["num_test_samples"] == TEST
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["train_replies"] == CLIENTS and r["train_failures"] == 0
        assert r["evaluate_replies"] == CLIENTS and r["evaluate_failures"] == 0
        assert r["aggregation_seconds"] > 0 and r["round_seconds"] > 0
        assert 0 <= r["train_accuracy"] <= 1 and r["train_loss"] > 0
        assert 0 <= r["client_eval_accuracy"] <= 1 and r["client_eval_loss"] > 0
        assert 0 <= r["test_accuracy"] <= 1 and r["test_loss"] > 0
        assert "partition-id" not in r  # used to order replies, dropped from the aggregates
    final = results["final"]
    assert final["round"] == ROUNDS
    assert final["test_accuracy"] == rounds[-1]["test_accuracy"] and final["test_loss"] == rounds[-1]["test_loss"]
    assert final["test_accuracy"] > 0.5, final  # chance is 0.1
    assert final["test_accuracy"] > results["initial"]["test_accuracy"]
    assert final["wall_seconds"] > 0


@pytest.mark.slow
def test_checkpoints_reproduce_the_reported_accuracy(simulation):
    out, results, _ = simulation
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [f"round-{r}.pt" for r in range(ROUNDS + 1)]
    ckpt = torch.load(out / "checkpoints" / f"round-{ROUNDS}.pt", weights_only=True)
    assert ckpt["round"] == ROUNDS and ckpt["model"] == "mlp" and ckpt["strategy"] == "fedavg"
    cfg = ClientConfig.from_mapping(results["config"])
    model = build_global_model(cfg)
    model.load_state_dict(ckpt["state_dict"])
    from fedmerge.data import load_dataset
    from fedmerge.training import evaluate

    test = load_dataset("mnist", train=False)
    idx = used_test_indices("mnist", "", TEST, cfg.seed)
    stats = evaluate(model, test.images[idx], test.labels[idx], device="cpu")
    assert stats["accuracy"] == pytest.approx(results["final"]["test_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_tensorboard_scalars(simulation):
    out, _, _ = simulation
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("test/accuracy")] == list(range(ROUNDS + 1))
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, ROUNDS + 1))
    assert "time/aggregation_seconds" in acc.Tags()["scalars"]


@pytest.mark.slow
def test_terminal_output(simulation):
    _, results, proc = simulation
    assert "warning:" not in proc.stderr  # no client was left out
    assert "run_simulation on purpose" in proc.stdout and "flwr run ." in proc.stdout
    assert "DEPRECATED FEATURE" not in proc.stdout + proc.stderr
    assert "test acc" in proc.stdout and f"final test accuracy {results['final']['test_accuracy']:.4f}" in proc.stdout


# ------------------------------------------------------------------------- fast tests


@pytest.mark.parametrize("argv, fragment", [
    (["--clients", "0"], "--clients"),
    (["--rounds", "-1"], "--rounds"),
    (["--strategy", "nope"], "invalid choice"),
    (["--model", "nope"], "invalid choice"),
    (["--fraction", "1.5"], "--fraction"),
    (["--alpha", "0"], "--alpha"),
    (["--lr", "nan"], "--lr"),
    (["--widths", "64,x"], "--widths"),
    (["--width", "0.5"], "--width applies"),
    (["--strategy", "fedavg", "--max-iter", "3"], "--max-iter"),
    (["--max-iter", "-2"], "--max-iter"),
    (["--dataset", "cifar10"], "--data-dir"),
    (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "missing"),
    (["--cpus-per-client", "4096"], "--cpus-per-client"),
    (["--partition", "dirichlet", "--alpha", "0.001", "--clients", "500", "--max-train-samples", "600"], "no data"),
    (["--client-eval", "holdout", "--holdout-fraction", "0"], "--holdout-fraction"),
])
def test_bad_input_exits_2_with_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        run.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python simulations/run.py: error: "), err
    assert fragment in err


def test_bad_input_from_the_command_line():
    proc = subprocess.run([sys.executable, str(ROOT / "simulations" / "run.py"), "--partition", "random"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "--partition" in proc.stderr


def test_strategy_registry_and_client_config():
    assert set(STRATEGIES) == {"fedavg", "git-rebasin", "mergemany", "c2m3", "orthogonal"}
    base = {"strategy": "fedavg", "num-clients": 10, "fraction": 0.3, "fraction-evaluate": 0.0}
    strategy = make_strategy(base)
    assert type(strategy) is FedAvg and strategy.fraction_train == 0.3  # Flower's own, the baseline
    assert strategy.min_available_nodes == 10
    c2m3 = make_strategy({**base, "strategy": "c2m3", "max-iter": 7, "model": "mlp", "device": "cpu"})
    assert isinstance(c2m3, C2M3) and c2m3.match_options["max_iter"] == 7 and c2m3.fraction_train == 0.3
    assert c2m3.spec == build_global_model(ClientConfig.from_mapping(base)).permutation_spec()
    assert make_strategy({**base, "strategy": "mergemany"}).match_options["max_iter"] == 5  # its default
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy({**base, "strategy": "nope"})
    record = config_record({"model": "mlp", "model-kwargs": '{"widths": [8]}', "seed": 4, "other": 1})
    assert record["model"] == "mlp" and record["seed"] == 4 and "other" not in record
    cfg = ClientConfig.from_mapping(record)
    assert cfg.kwargs() == {"widths": [8]} and hash(cfg) == hash(ClientConfig.from_mapping(dict(record)))
    with pytest.raises(ValueError, match="init"):
        ClientConfig.from_mapping({"init": "random"})


def test_table_and_warnings_show_left_out_clients():
    results = {"initial": {"test_accuracy": 0.1, "test_loss": 2.3},
               "rounds": [{"round": 1, "test_accuracy": 0.8, "train_replies": 4, "clients_merged": 3,
                           "match_iterations": 12, "aggregation_seconds": 1.5},
                          {"round": 2, "test_accuracy": 0.8, "train_replies": 4, "clients_merged": 0,
                           "global_model_kept": True}],
               "failures": [{"reason": "client error: boom"}] + [{"reason": "update: key 'w' contains NaN values"}] * 4}
    table = run.format_table(results)
    assert "3/4" in table and "0/4" in table and "12" in table
    lines = run.failure_summary(results)
    assert lines[0].startswith("warning: 5 client replies were left out (2 distinct reasons")
    assert "round(s) 2" in lines[1]
    assert run.failure_summary({"rounds": [{"round": 1}], "failures": []}) == []


def test_compare_builds_its_table_and_refuses_flags_it_sets():
    from simulations import compare

    row = {"strategy": "c2m3", "init": "independent", "partition": "iid", "round1_accuracy": 0.64,
           "final_accuracy": 0.88, "rounds": 3, "mean_aggregation_seconds": 7.5, "wall_seconds": 58.0,
           "left_out": 0}
    table = compare.markdown_table([row]).splitlines()
    assert table[0].startswith("| strategy | init | partition | acc. round 1 | acc. last round")
    assert table[2] == "| c2m3 | independent | iid | 0.6400 | 0.8800 | 3 | 7.50 | 58 | 0 |"
    assert compare._run_args(["--", "--rounds", "5"]) == ["--rounds", "5"]
    with pytest.raises(SystemExit, match="--strategy is set by compare.py"):
        compare._run_args(["--", "--strategy", "fedavg"])


def test_compare_goes_on_past_a_failed_run_and_names_every_failure(tmp_path, capsys):
    from simulations import compare

    # run.py refuses --rounds 0 before Ray starts: two real runs that fail fast
    with pytest.raises(SystemExit, match="2 of 2 runs failed: fedavg-shared-iid, c2m3-shared-iid"):
        compare.main(["--strategies", "fedavg", "c2m3", "--inits", "shared", "--partitions", "iid", "--clients", "2",
                      "--out", str(tmp_path), "--", "--rounds", "0"])
    err = capsys.readouterr().err
    assert err.count("failed (exit 2)") == 2 and "argument --rounds" in err
    assert (tmp_path / "comparison.md").read_text().splitlines()[0].startswith("| strategy | init")


def test_fedma_command_is_accepted_with_cifar10_in_data_dir(tmp_path):
    """The FedMA-setting command of BENCHMARKS.md passes every check run.py makes before Ray starts
    (CIFAR-10 replaced by generated batches in the real on-disk format)."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (64, 3 * 32 * 32), dtype=np.uint8),
                 "labels": rng.integers(0, 10, 64).tolist()}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    argv = ["--strategy", "c2m3", "--init", "shared", "--clients", "16", "--model", "vgg9", "--dataset", "cifar10",
            "--data-dir", str(tmp_path), "--partition", "dirichlet", "--alpha", "0.5", "--rounds", "20",
            "--local-epochs", "5", "--lr", "0.01", "--out", str(tmp_path / "out")]
    parser = run.build_parser()
    config = run.make_config(parser, parser.parse_args(argv), argv)
    assert config["model"] == "vgg9" and config["dataset"] == "cifar10" and config["num-clients"] == 16
    strategy = make_strategy(config)
    assert isinstance(strategy, C2M3) and "features.0" in strategy.spec.sizes


def test_partition_ordered_grid_lists_nodes_by_partition_and_samples_reproducibly():
    """What Flower's FedAvg sees: node ids sorted by partition (unknown ones last), and the same
    ``random.sample`` after each listing whatever the node ids are, for the same seed."""
    import random

    from simulations.grids import PartitionOrderedGrid

    class Nodes:  # the one Grid method the wrapper changes, plus one it must pass through
        def __init__(self, ids):
            self.ids = ids

        def get_node_ids(self):
            return list(self.ids)

        def get_run_id(self):
            return 7

    def draws(ids, partition_of, seed):
        grid = PartitionOrderedGrid(Nodes(ids), partition_of, seed)
        out = []
        for _ in range(3):  # as FedAvg: list the nodes, then sample from the list
            nodes = grid.get_node_ids()
            out.append(sorted(partition_of.get(n, -1) for n in random.sample(nodes, 2)))
        return out, nodes, grid

    first, nodes, grid = draws([90, 11, 55, 23], {90: 0, 11: 3, 55: 1}, seed=4)
    assert nodes == [90, 55, 11, 23] and grid.get_run_id() == 7
    # other node ids, same partitions: the same draws
    second, _, _ = draws([5, 800, 77, 3], {5: 0, 800: 3, 77: 1}, seed=4)
    assert first == second
