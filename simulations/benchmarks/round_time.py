"""Benchmark: the wall time of one federated round through Flower + Ray vs a plain sequential loop.

Both do the same work per round with the same functions and data: every client trains the global
model on its partition (``fedmerge.training.train``, same seeds), the server averages the updates
(FedAvg), every client evaluates the new global model on its held-out share, and the server
evaluates it on the test set.  The Flower side is ``simulations/run.py --strategy fedavg`` (its
``round_seconds`` in results.json: from one centralised evaluation to the next); the loop is a
``for`` over clients in this process with torch's default threads.  Round 1 includes Ray's
actor start-up and each process's data loading, so the steady state is the mean of rounds 2..R.

Run from the repository root (on an otherwise idle machine)::

    python -m simulations.benchmarks.round_time --clients 20 --rounds 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make `simulations` importable from the repo root
    _root = str(Path(__file__).resolve().parents[2])
    if _root not in sys.path:
        sys.path.insert(0, _root)

import torch

import fedmerge
from fedmerge.training import evaluate, train
from simulations import run
from simulations.benchmarks.cli import add_common_arguments, positive_int
from simulations.benchmarks.environment import environment, format_environment
from simulations.benchmarks.output import finish, markdown_table
from simulations.config import ClientConfig
from simulations.task import build_global_model, client_data, server_test_set, train_seed

MODULE = "simulations.benchmarks.round_time"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", usage="%(prog)s [options]",
                                description="Wall time of a FedAvg round: Flower + Ray vs a sequential loop.")
    p.add_argument("--clients", type=positive_int, default=20)
    p.add_argument("--rounds", type=positive_int, default=4, help="rounds (>= 2: round 1 includes start-up)")
    p.add_argument("--model", default="mlp")
    p.add_argument("--max-train-samples", type=int, default=0, help="0: the whole training set")
    add_common_arguments(p)
    return p


def sequential_rounds(cfg: ClientConfig, num_clients: int, rounds: int) -> tuple[list[float], float]:
    """Seconds of each round of the same FedAvg work done by a plain loop in this process, and the
    final test accuracy (which matches the Flower run's: same data, seeds and updates)."""
    model = build_global_model(cfg)
    global_sd = {k: v.clone() for k, v in model.state_dict().items()}
    test_images, test_labels = server_test_set(cfg)
    times = []
    for server_round in range(1, rounds + 1):
        start = time.perf_counter()
        updates, counts = [], []
        for pid in range(num_clients):
            data = client_data(cfg, pid, num_clients)
            model.load_state_dict(global_sd)
            stats = train(model, data.train_images, data.train_labels, epochs=cfg.local_epochs,
                          batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                          seed=train_seed(cfg.seed, server_round, pid), device="cpu")
            updates.append({k: v.clone() for k, v in model.state_dict().items()})
            counts.append(stats["num_examples"])
        global_sd = fedmerge.merge(updates, align=None, weights=counts)
        model.load_state_dict(global_sd)
        for pid in range(num_clients):
            data = client_data(cfg, pid, num_clients)
            evaluate(model, data.eval_images, data.eval_labels, device="cpu")
        accuracy = evaluate(model, test_images, test_labels, device="cpu")["accuracy"]
        times.append(time.perf_counter() - start)
    return times, float(accuracy)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    env = environment(MODULE, sys.argv[1:] if argv is None else argv)
    print(format_environment(env))
    with tempfile.TemporaryDirectory() as tmp:
        flower = run.main(["--strategy", "fedavg", "--init", "shared", "--clients", str(args.clients),
                           "--rounds", str(args.rounds), "--model", args.model, "--no-progress",
                           "--max-train-samples", str(args.max_train_samples), "--out", tmp])
    flower_times = [r["round_seconds"] for r in flower["rounds"]]
    cfg = ClientConfig.from_mapping(flower["config"])
    if args.threads:
        torch.set_num_threads(args.threads)
    loop_times, loop_accuracy = sequential_rounds(cfg, args.clients, args.rounds)

    def steady(xs: list[float]) -> float:
        rest = xs[1:] or xs
        return sum(rest) / len(rest)

    steady_header = f"rounds 2..{args.rounds} mean s"
    rows = [{"": "Flower + Ray (run_simulation, 1 CPU per client)", "round 1 s": f"{flower_times[0]:.2f}",
             steady_header: f"{steady(flower_times):.2f}"},
            {"": f"sequential loop ({torch.get_num_threads()} torch threads)", "round 1 s": f"{loop_times[0]:.2f}",
             steady_header: f"{steady(loop_times):.2f}"}]
    ratio = steady(flower_times) / steady(loop_times)
    print()
    print(markdown_table(rows, ["", "round 1 s", steady_header]))
    print(f"\nsteady-state ratio Flower+Ray / loop: {ratio:.2f} (goal <= 1.2)")
    print(f"final test accuracy: Flower {flower['final']['test_accuracy']:.4f}, loop {loop_accuracy:.4f} "
          "(the same work: equal up to float rounding in the averaging)")
    result = {"environment": env, "flower_round_seconds": flower_times, "loop_round_seconds": loop_times,
              "steady_ratio": ratio, "flower_accuracy": flower["final"]["test_accuracy"],
              "loop_accuracy": loop_accuracy, "config": flower["config"]}
    return finish(result, [], args.out)


if __name__ == "__main__":
    main()
