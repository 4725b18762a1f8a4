"""Run a federated-learning simulation through Flower's Simulation Engine (Ray backend).

Example (from the repository root)::

    python simulations/run.py --strategy c2m3 --clients 20     # then --strategy fedavg to compare
    python simulations/run.py --strategy fedavg --init shared --clients 50 --partition dirichlet \\
        --alpha 0.3 --rounds 10 --model cnn --out runs/fedavg-dirichlet

By default (``--init independent``) every client's first round starts from its own random init,
the setting in which aligning before averaging matters; ``--init shared`` is classic FL.

The ServerApp (``simulations/server_app.py``) and ClientApp (``simulations/client_app.py``) are
started with ``flwr.simulation.run_simulation``: each simulated client runs in a Ray actor with
``--cpus-per-client``/``--gpus-per-client`` resources, on a private Ray instance or, with
``--ray-address``, on a Ray cluster that is already running (never stopped by this script).
The whole configuration reaches the ServerApp through the environment variable
``FEDMERGE_SIM_CONFIG`` (JSON) and the clients through the ConfigRecord of every message.  Outputs land in ``--out`` (``results.json``, ``tensorboard/``,
``checkpoints/round-{r}.pt``); a table of the rounds is printed at the end.

Bad input exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# Ray hides GPUs from actors that ask for none (CUDA_VISIBLE_DEVICES=""), so --gpus-per-client 0
# means CPU clients.  Ray 2.5x warns that a future version will stop doing so unless this is set;
# keep today's behaviour explicitly and silence the FutureWarning it prints at ray.init().
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "1")
warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `simulations` is not installed; Ray workers inherit this via PYTHONPATH
    sys.path.insert(0, str(ROOT))

from fedmerge import AVERAGERS  # noqa: E402
from fedmerge.data import DATASETS  # noqa: E402
from fedmerge.models import MODELS  # noqa: E402
from fedmerge.partition import PARTITIONS  # noqa: E402
from simulations.config import (CLIENT_EVAL_MODES, CONFIG_ENV, DEFAULTS, INIT_MODES,  # noqa: E402
                                RESOURCE_DEFAULTS, default_out)
from strategies import STRATEGIES  # noqa: E402
from strategies.federated_repair import REPAIR_MODES  # noqa: E402

__all__ = ["backend_config", "build_parser", "clients_that_fit", "failure_summary", "format_table", "main"]

RUN_SIMULATION_NOTE = (
    "note: this script calls flwr.simulation.run_simulation on purpose (one command, plain CLI "
    "flags, no SuperLink); Flower marks it deprecated in favour of `flwr run .`, which is the "
    "alternative once the app is declared in pyproject.toml. Its deprecation warning is hidden."
)


class _HideRunSimulationDeprecation(logging.Filter):
    """Drop Flower's 'run_simulation is deprecated' warning; we print RUN_SIMULATION_NOTE instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # pragma: no cover - a malformed record is not ours to judge
            return True
        return not ("DEPRECATED FEATURE" in text and "run_simulation" in text)


# --------------------------------------------------------------------------- parsing


def _int_at_least(low: int, what: str):
    """An argparse type: an integer ``>= low`` (``what`` names it in the one-line error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {lo}{low}, {high}{hi}, got {text!r}") from None
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not ok or value != value:
            raise argparse.ArgumentTypeError(f"expected a number in {lo}{low}, {high}{hi}, got {text!r}")
        return value

    return parse


_positive_float = _float_in(0.0, float("inf"), low_open=True, high_open=True)
_non_negative_float = _float_in(0.0, float("inf"), high_open=True)


def _ray_address(text: str) -> str:
    """An argparse type: ``HOST:PORT`` of a Ray head node (its GCS), ``auto`` or ``""`` (none)."""
    text = text.strip()
    if text in ("", "auto"):
        return text
    if "://" in text:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT of a Ray head node (as `ray start --head` prints it) or auto, got {text!r}: "
            "Ray Client addresses (ray://) are not supported, run this script on a machine of the cluster")
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if (not sep or not host or not port.isdigit() or not 0 < int(port) < 65536
            or any(c.isspace() or c in "/[]" for c in host)):
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT of a Ray head node, e.g. 10.0.0.5:6379, or auto, got {text!r}")
    return text


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


#: Flag (argparse ``dest``) -> configuration key, for the flags whose name is not the key's.
FLAG_KEYS: dict[str, str] = {"clients": "num-clients", "rounds": "num-rounds"}


def build_parser() -> argparse.ArgumentParser:
    """The command line; every default of a configuration key is :data:`simulations.config.DEFAULTS`'."""
    d = {**DEFAULTS, **RESOURCE_DEFAULTS}
    p = _Parser(
        prog="python simulations/run.py",
        description="Federated learning on simulated clients with Flower's Simulation Engine (Ray).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--strategy", choices=sorted(STRATEGIES), default=d["strategy"], help="server strategy")
    p.add_argument("--clients", type=_positive_int, default=d["num-clients"], help="number of simulated clients")
    p.add_argument("--rounds", type=_positive_int, default=d["num-rounds"], help="federated rounds")
    p.add_argument("--local-epochs", type=_positive_int, default=d["local-epochs"], help="local epochs per round")
    p.add_argument("--batch-size", type=_positive_int, default=d["batch-size"], help="local SGD batch size")
    p.add_argument("--lr", type=_positive_float, default=d["lr"], help="local SGD learning rate")
    p.add_argument("--momentum", type=_float_in(0.0, 1.0, high_open=True), default=d["momentum"],
                   help="local SGD momentum")
    p.add_argument("--model", choices=MODELS, default=d["model"],
                   help="zoo model (mlp: the C2M3 paper's 784-256-512-512-256-10 MLP)")
    p.add_argument("--widths", type=_int_list, default=None,
                   help="mlp: hidden widths, e.g. 256,512,512,256; cnn: conv channels, e.g. 32,64")
    p.add_argument("--width", type=_positive_float, default=None, help="vgg*/resnet*: width multiplier")
    p.add_argument("--dataset", choices=sorted(DATASETS), default=d["dataset"],
                   help="mnist is bundled; the others are read from --data-dir")
    p.add_argument("--data-dir", default=d["data-dir"],
                   help="directory holding the non-bundled datasets (see README)")
    p.add_argument("--partition", choices=PARTITIONS, default=d["partition"], help="how the training set is split")
    p.add_argument("--alpha", type=_positive_float, default=d["alpha"],
                   help="Dirichlet concentration (--partition dirichlet)")
    p.add_argument("--init", choices=INIT_MODES, default=d["init"],
                   help="shared: all clients start from the global model; independent: in round 1 each "
                        "client starts from its own random init (the one-shot merging setting)")
    p.add_argument("--fraction", type=_float_in(0.0, 1.0, low_open=True), default=d["fraction"],
                   help="fraction of clients trained per round")
    p.add_argument("--fraction-evaluate", type=_float_in(0.0, 1.0), default=d["fraction-evaluate"],
                   help="fraction of clients evaluating the global model per round (0: none)")
    p.add_argument("--seed", type=_non_negative_int, default=d["seed"], help="seed of the init, partition and training")
    p.add_argument("--out", default=d["out"],
                   help="output directory (empty: runs/<strategy>-<dataset>-<model>-<time>)")
    p.add_argument("--cpus-per-client", type=_positive_float, default=d["cpus-per-client"],
                   help="Ray CPUs per client actor, and the torch threads of each client")
    p.add_argument("--gpus-per-client", type=_non_negative_float, default=d["gpus-per-client"],
                   help="Ray GPUs per client actor; fractions pack several clients on one GPU (0.5: two per "
                        "GPU) and clients spread over every GPU Ray has")
    ray_group = p.add_argument_group("Ray")
    ray_group.add_argument("--ray-address", type=_ray_address, default=d["ray-address"], metavar="ADDRESS",
                           help="run on the Ray cluster already running at ADDRESS (HOST:PORT of its head node, "
                                "as `ray start --head` prints it; auto: $RAY_ADDRESS or the latest cluster "
                                "started on this machine) instead of a private Ray instance (empty: private); "
                                "the cluster is left running")
    ray_group.add_argument("--ray-num-cpus", type=_non_negative_int, default=d["ray-num-cpus"], metavar="N",
                           help="CPUs declared to the private Ray instance (0: this machine's)")
    ray_group.add_argument("--ray-num-gpus", type=_non_negative_int, default=d["ray-num-gpus"], metavar="N",
                           help="GPUs declared to the private Ray instance (0: the CUDA GPUs torch sees); Ray "
                                "gives each client actor its share and sets its CUDA_VISIBLE_DEVICES")
    adv = p.add_argument_group("advanced")
    adv.add_argument("--max-train-samples", type=_non_negative_int, default=d["max-train-samples"],
                     help="use a seeded random subset of the training set (0: all)")
    adv.add_argument("--max-test-samples", type=_non_negative_int, default=d["max-test-samples"],
                     help="use a seeded random subset of the test set (0: all)")
    adv.add_argument("--holdout-fraction", type=_float_in(0.0, 1.0, high_open=True), default=d["holdout-fraction"],
                     help="share of each client's data held out for client-side evaluation")
    adv.add_argument("--client-eval", choices=CLIENT_EVAL_MODES, default=d["client-eval"],
                     help="data of client-side evaluation: held-out share or an IID share of the test set")
    adv.add_argument("--device", default=d["device"],
                     help="torch device of clients and server (auto: cuda if available)")
    adv.add_argument("--max-iter", type=_non_negative_int, default=d["max-iter"],
                     help="matching iterations per round: C2M3 Frank-Wolfe iterations, MergeMany sweeps, "
                          "Git Re-Basin passes (0: the strategy's default)")
    p.add_argument("--average", choices=sorted(AVERAGERS), default=d["average"],
                   help="how the aligned models are averaged: the weighted mean, spherical (SLERP for two "
                        "models, the weighted Karcher mean for more, norms restored), or regmean (each layer "
                        "fitted by least squares on the clients' layer inputs, from Gram matrices every client "
                        "sends with its update)")
    p.add_argument("--repair", choices=REPAIR_MODES, default=d["repair"],
                   help="REPAIR of the merged model each round: from per-unit statistics the clients send "
                        "(federated; one extra round trip), on --repair-samples training samples held by the "
                        "server (server), or not (none)")
    adv.add_argument("--repair-samples", type=_positive_int, default=d["repair-samples"],
                     help="--repair server: calibration samples drawn from the training set")
    adv.add_argument("--stop-on-failure", action=argparse.BooleanOptionalAction, default=d["stop-on-failure"],
                     help="stop the run at the first failed or malformed client reply (otherwise: leave the "
                          "client out of that round and record why in results.json)")
    adv.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d["progress"],
                     help="tqdm bars over rounds and over the replies of each round")
    adv.add_argument("--verbose", action="store_true", help="show Flower's INFO log")
    return p


def _model_kwargs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if args.widths is not None:
        if args.model == "mlp":
            kwargs["widths"] = list(args.widths)
        elif args.model == "cnn":
            kwargs["channels"] = list(args.widths)
        else:
            parser.error(f"--widths applies to mlp and cnn, not {args.model} (use --width for a multiplier)")
    if args.width is not None:
        if not args.model.startswith(("vgg", "resnet")):
            parser.error(f"--width applies to vgg*/resnet* models, not {args.model} (use --widths)")
        kwargs["width"] = args.width
    return kwargs


def _one_line(exc: BaseException) -> str:
    """The first line of an error message (fedmerge's data errors append a multi-line file layout)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    first = lines[0].rstrip(":")
    first = first[: -len(" laid out as")] if first.endswith(" laid out as") else first
    return f"{first}, laid out as README.md (section Data) shows"


def make_config(parser: argparse.ArgumentParser, args: argparse.Namespace,
                argv: Sequence[str] | None) -> dict[str, Any]:
    """Validate everything that can be checked before Ray starts; ``parser.error`` (exit 2) otherwise."""
    import torch

    from fedmerge.data import clear_cache, load_dataset
    from simulations.config import ClientConfig
    from simulations.task import build_global_model, client_partitions

    if args.max_iter and args.strategy == "fedavg":
        parser.error("--max-iter sets the matching of git-rebasin, mergemany, c2m3 and orthogonal; "
                     "fedavg does no matching")
    if args.ray_address and (args.ray_num_cpus or args.ray_num_gpus):
        parser.error("--ray-num-cpus/--ray-num-gpus declare the resources of a private Ray instance; with "
                     "--ray-address each node declares its own (`ray start --num-cpus N --num-gpus N`)")
    if args.client_eval == "holdout" and args.holdout_fraction == 0 and args.fraction_evaluate > 0:
        parser.error("--client-eval holdout needs --holdout-fraction > 0 (or --client-eval test, "
                     "or --fraction-evaluate 0)")
    threads = max(1, int(args.cpus_per_client))  # as many torch threads as the client's Ray CPUs
    config: dict[str, Any] = {
        **DEFAULTS,  # the keys without a flag (round-timeout), and out until it is resolved below
        "strategy": args.strategy,
        "num-clients": args.clients,
        "num-rounds": args.rounds,
        "fraction": args.fraction,
        "fraction-evaluate": args.fraction_evaluate,
        "dataset": args.dataset,
        "data-dir": str(Path(args.data_dir).expanduser().resolve()) if args.data_dir else "",
        "model": args.model,
        "model-kwargs": json.dumps(_model_kwargs(parser, args), sort_keys=True),
        "partition": args.partition,
        "alpha": args.alpha,
        "seed": args.seed,
        "local-epochs": args.local_epochs,
        "batch-size": args.batch_size,
        "lr": args.lr,
        "momentum": args.momentum,
        "init": args.init,
        "max-train-samples": args.max_train_samples,
        "max-test-samples": args.max_test_samples,
        "holdout-fraction": args.holdout_fraction,
        "client-eval": args.client_eval,
        "device": args.device,
        "threads": threads,
        "cpus-per-client": args.cpus_per_client,
        "gpus-per-client": args.gpus_per_client,
        "ray-address": args.ray_address,
        "ray-num-cpus": args.ray_num_cpus,
        "ray-num-gpus": args.ray_num_gpus,
        "stop-on-failure": args.stop_on_failure,
        "max-iter": args.max_iter,
        "average": args.average,
        "repair": args.repair,
        "repair-samples": args.repair_samples,
        "progress": args.progress,
        "command": "python simulations/run.py " + shlex.join(list(sys.argv[1:] if argv is None else argv)),
    }
    out = args.out or default_out(config, ROOT / "runs")
    config["out"] = str(Path(out).expanduser().resolve())
    try:
        cfg = ClientConfig.from_mapping(config)
        if args.device != "auto":
            torch.device(args.device)
        build_global_model(cfg)
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad setting
        parser.error(_one_line(exc))
    try:
        load_dataset(args.dataset, data_dir=config["data-dir"] or None, train=False)
        parts = client_partitions(cfg.dataset, cfg.data_dir, cfg.max_train_samples, cfg.partition, cfg.alpha,
                            args.clients, cfg.seed)
    except (OSError, ValueError, RuntimeError) as exc:
        parser.error(_one_line(exc))
    finally:  # the server process needs neither copy from here on: do not keep the training set in it
        clear_cache()
    smallest = min(len(p) for p in parts)
    if args.holdout_fraction > 0 and smallest < 2:
        parser.error(f"a client gets only {smallest} training sample(s): nothing left after the hold-out; "
                     "use fewer clients, more samples or --holdout-fraction 0 --client-eval test")
    if args.ray_address:  # last: the only check that talks to another process
        _check_client_fits(parser, args, _cluster_nodes(parser, args.ray_address),
                           f"the Ray cluster at {args.ray_address}")
    else:
        declared = args.ray_num_cpus or args.ray_num_gpus
        _check_client_fits(parser, args, [_local_node(args)],
                           "the private Ray instance" if declared else "this machine")
    return config


# --------------------------------------------------------------------------- Ray


def _local_node(args: argparse.Namespace) -> dict[str, float]:
    """The CPUs and GPUs the private Ray instance will have (declared, else detected as Ray would)."""
    import torch

    return {"CPU": float(args.ray_num_cpus or os.cpu_count() or 1),
            "GPU": float(args.ray_num_gpus or torch.cuda.device_count())}


def _cluster_nodes(parser: argparse.ArgumentParser, address: str) -> list[dict[str, float]]:
    """The resources of every alive node of the Ray cluster at ``address`` (connects once, then disconnects).

    Disconnecting (``ray.shutdown()`` in a driver that joined a running cluster) leaves the cluster
    up, as does Flower's RayBackend when the simulation ends.
    """
    if address != "auto":
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as exc:
            parser.error(f"--ray-address {address}: no Ray cluster answers there ({exc.strerror or exc}); "
                         f"start one with `ray start --head --port {port}` or give the address it printed")
    import ray

    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes()
                 if n.get("Alive") and n.get("Resources")]
    except Exception as exc:  # noqa: BLE001 - version mismatch, not a GCS, no cluster for "auto", ...
        parser.error(f"--ray-address {address}: cannot join the Ray cluster: {_one_line(exc)}")
    finally:
        if ray.is_initialized():
            ray.shutdown()  # a driver's disconnect: the cluster keeps running
    return nodes


def clients_that_fit(nodes: Sequence[dict[str, float]], cpus: float, gpus: float) -> int:
    """How many client actors Flower's RayBackend places on ``nodes`` (its ``pool_size_from_resources``)."""
    total = 0
    for node in nodes:
        n = int(node.get("CPU", 0.0) / cpus)
        if gpus > 0:
            n = min(n, int(node.get("GPU", 0.0) / gpus))
        total += n
    return total


def _check_client_fits(parser: argparse.ArgumentParser, args: argparse.Namespace,
                       nodes: Sequence[dict[str, float]], where: str) -> None:
    """Exit 2 unless Ray can place at least one client on ``nodes``; note the client parallelism."""
    cpus, gpus = args.cpus_per_client, args.gpus_per_client
    total_cpus = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpus = sum(n.get("GPU", 0.0) for n in nodes)
    if gpus > 0 and total_gpus == 0:
        if args.ray_address:
            parser.error(f"--gpus-per-client {gpus:g} but {where} has no GPU (a node declares its GPUs at "
                         "`ray start --num-gpus N`, or Ray detects them)")
        parser.error(f"--gpus-per-client {gpus:g} but no GPU is available: torch sees no CUDA GPU and none "
                     "is declared with --ray-num-gpus")
    fit = clients_that_fit(nodes, cpus, gpus)
    if fit == 0:
        if gpus > 0 and not any(n.get("GPU", 0.0) >= gpus for n in nodes):
            parser.error(f"--gpus-per-client {gpus:g} exceeds the GPUs of every node of {where} "
                         f"(at most {max(n.get('GPU', 0.0) for n in nodes):g}): Ray could not place a single client")
        parser.error(f"--cpus-per-client {cpus:g} exceeds the {max(n.get('CPU', 0.0) for n in nodes):g} CPUs "
                     f"of {'every node of ' if len(nodes) > 1 else ''}{where}"
                     f"{' that has the GPUs' if gpus > 0 else ''}: Ray could not place a single client")
    if args.ray_address or gpus > 0 or args.ray_num_cpus or args.ray_num_gpus:
        print(f"Ray: {fit} clients at a time on {where} ({len(nodes)} node(s), {total_cpus:g} CPUs, "
              f"{total_gpus:g} GPUs; {cpus:g} CPUs and {gpus:g} GPUs per client)", flush=True)


# --------------------------------------------------------------------------- output


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of the rounds in ``results`` (the content of results.json)."""
    header = ["round", "test acc", "test loss", "train loss", "client acc", "clients", "match it", "agg s",
              "round s"]
    rows = [["0", _fmt(results["initial"].get("test_accuracy"), ".4f"),
             _fmt(results["initial"].get("test_loss"), ".4f"), "-", "-", "-", "-", "-", "-"]]
    for r in results["rounds"]:
        replies = r.get("train_replies")
        used = r.get("clients_merged", None if replies is None else replies - r.get("train_failures", 0))
        rows.append([str(r["round"]), _fmt(r.get("test_accuracy"), ".4f"), _fmt(r.get("test_loss"), ".4f"),
                     _fmt(r.get("train_loss"), ".4f"), _fmt(r.get("client_eval_accuracy"), ".4f"),
                     f"{used}/{replies}" if replies is not None else "-", _fmt(r.get("match_iterations"), "d"),
                     _fmt(r.get("aggregation_seconds"), ".2f"), _fmt(r.get("round_seconds"), ".1f")])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def failure_summary(results: dict[str, Any]) -> list[str]:
    """Warning lines for left-out clients and rounds that kept the previous global model."""
    lines = []
    failures = results.get("failures", [])
    if failures:
        reasons = sorted({f["reason"] for f in failures})
        lines.append(f"warning: {len(failures)} client replies were left out ({len(reasons)} distinct reasons, "
                     f"all in results.json 'failures'); first: {reasons[0]}")
    kept = [r["round"] for r in results["rounds"] if r.get("global_model_kept")]
    if kept:
        lines.append(f"warning: no usable client update in round(s) {', '.join(map(str, kept))}: "
                     "the global model was kept unchanged there")
    return lines


# ----------------------------------------------------------------------------- main


def backend_config(args: argparse.Namespace) -> dict[str, Any]:
    """Flower's Ray backend config: ``client_resources`` per actor, ``init_args`` for ``ray.init``.

    Without ``--ray-address``, ``address="local"`` makes ``ray.init`` start a private instance even
    when ``$RAY_ADDRESS`` is set or a cluster was started on this machine with ``ray start`` (which
    ``ray.init()`` would otherwise join).  With it, ``ray.init(address=...)`` joins that cluster; at
    the end Flower's backend calls ``ray.shutdown()``, which only disconnects this driver from it.
    """
    init_args: dict[str, Any] = {"address": args.ray_address or "local"}
    if args.ray_num_cpus:
        init_args["num_cpus"] = args.ray_num_cpus
    if args.ray_num_gpus:
        init_args["num_gpus"] = args.ray_num_gpus
    return {"client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": args.gpus_per_client},
            "init_args": init_args}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, run the simulation, print the table; returns the content of results.json."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = make_config(parser, args, argv)

    from flwr.simulation import run_simulation

    from simulations import client_app, server_app

    flwr_logger = logging.getLogger("flwr")
    deprecation_filter = _HideRunSimulationDeprecation()
    flwr_logger.addFilter(deprecation_filter)
    old_level = flwr_logger.level
    if not args.verbose:
        flwr_logger.setLevel(logging.WARNING)
    os.environ[CONFIG_ENV] = json.dumps(config)
    out_dir = Path(config["out"])
    results_path = out_dir / "results.json"
    if results_path.exists():
        results_path.unlink()  # never report a previous run's results
    print(RUN_SIMULATION_NOTE, flush=True)
    print(f"{args.strategy}: {args.clients} clients, {args.rounds} rounds, {args.model} on {args.dataset} "
          f"({args.partition}); output in {out_dir}", flush=True)
    t0 = time.perf_counter()
    try:
        run_simulation(
            server_app=server_app.app,
            client_app=client_app.app,
            num_supernodes=args.clients,
            backend_name="ray",
            backend_config=backend_config(args),
            verbose_logging=False,  # True would switch Flower to DEBUG; --verbose keeps INFO
        )
    finally:
        flwr_logger.removeFilter(deprecation_filter)
        flwr_logger.setLevel(old_level)
        os.environ.pop(CONFIG_ENV, None)
    wall = time.perf_counter() - t0
    if not results_path.is_file():
        raise SystemExit(f"error: the simulation ended without writing {results_path}")
    results = json.loads(results_path.read_text())
    if not results.get("complete"):
        raise SystemExit(f"error: the simulation stopped early; partial results in {results_path}")
    final = results["final"]
    print()
    print(format_table(results))
    print(f"\nfinal test accuracy {final['test_accuracy']:.4f} (loss {final['test_loss']:.4f}) after "
          f"{final['round']} rounds; wall time {wall:.1f} s; results in {out_dir}")
    for line in failure_summary(results):
        print(line, file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
