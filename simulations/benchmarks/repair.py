"""Benchmark (e): REPAIR — the C²M³ paper's Table 1 rows, REPAIR's two-model MLP, the one-shot federated goal.

Sections (``--sections``, comma-separated):

``table1``
    5 of the paper's MLPs (784-256-512-512-256-10, trained on MNIST from seeds 0-4, the models of
    benchmark (a)) merged by the plain mean, MergeMany and C²M³, each without and with REPAIR (†),
    train/test accuracy and loss — the paper's Table 1 MLP column is EMNIST, which is not on this
    machine; MNIST stands in.  Then REPAIR's variants on the C²M³ merge: target rule (``std``,
    ``variance``, ``pooled``), schedule (``sequential``, ``single``), hidden layers only or the
    logits too, and the number of calibration samples.
``table1-cnn``
    The same rows for 5 ResNet-20 (BatchNorm, so C²M³† is REPAIR after RESET, and RESET alone is
    shown too) and, with ``--cnn-models resnet20,vgg16``, 5 VGG-16 on ``--dataset`` (CIFAR-10 wherever ``--data-dir`` holds it; MNIST,
    bundled, stands in here), trained from seeds 0-4 on ``--cnn-train-samples`` samples for
    ``--cnn-epochs`` epochs (SGD, cached under the bench cache) — far from the paper's 250-epoch
    CIFAR-10 models, so the figures measure the mechanism, not the paper's accuracies.
``two-models``
    REPAIR's reference MLP (8 hidden layers of 128 units) on MNIST: two models aligned by Git
    Re-Basin weight matching, averaged, then REPAIRed.
``one-shot``
    The one-shot federated goal: one round from independent inits, 20 clients of the simulation's
    partitions (IID, then Dirichlet α = 0.5), 5 local epochs of the simulation's own local training
    (:mod:`simulations.task`, SGD; the trained clients are cached under the bench cache), the
    paper's MLP.  Best client, mean client, ensemble (mean of
    the clients' softmax outputs), plain averaging, C²M³ with the C2M3 strategy's options and with
    more matching effort, and C²M³ + federated REPAIR computed by the protocol's own functions
    (:mod:`strategies.federated_repair`: clients' sums mapped and pooled, one corrected pass per
    client over its own data, the fold), its layer-by-layer variant (one round trip per layer),
    server-side REPAIR on held samples, and federated RegMean (:mod:`fedmerge.regmean`: every
    layer fitted by least squares from the Gram matrices of the clients' own layer inputs, mapped by
    their alignments; :mod:`strategies.federated_regmean`), alone and followed by federated REPAIR.  The simulation's run of the same setting
    (``simulations/run.py ... --repair federated``) gives the same global model.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

import torch

import fedmerge
import fedmerge.regmean
from fedmerge.data import load_dataset
from fedmerge.matching.c2m3 import PAPER_STOP
from fedmerge.models import MLP
from fedmerge.repair import PASSES, TARGETS, find_repair_points, fold_repair, unit_statistics
from fedmerge.training import evaluate, train

from .cli import add_common_arguments, parse_choice_list, parse_int_list
from .environment import begin, format_environment
from .models import PAPER_WIDTHS, trained_mlps
from .output import markdown_table, write_json

MODULE = "simulations.benchmarks.repair"
SECTIONS = ("table1", "table1-cnn", "two-models", "one-shot")
EFFORTS = ("strategy", "library")
#: table1-cnn: default SGD learning rate per architecture.
CNN_LR = {"resnet20": 0.05, "vgg16": 0.01}

#: The C²M³ paper's Table 1, MLP column (EMNIST; 5 models): test accuracy.
PAPER_TABLE1 = {"naive": 0.03, "mergemany": 0.86, "mergemany+repair": 0.86, "c2m3": 0.87, "c2m3+repair": 0.87}
#: The C²M³ paper's Table 1, CIFAR-10 test accuracy of 5 merged models (ResNet-20 and VGG-16 columns).
PAPER_TABLE1_CNN = {"resnet20": {"naive": 0.10, "mergemany": 0.37, "c2m3": 0.40, "c2m3+repair": 0.69},
                    "vgg16": {"naive": 0.10, "mergemany": 0.10, "mergemany+repair": 0.57, "c2m3": 0.11,
                              "c2m3+repair": 0.62}}
#: Table 1's C²M³ (MLP and CNN sections): the default, with Frank-Wolfe run to the authors' stopping rule as in the
#: paper's runs (the default's own rule stops it earlier, before its refinement to a fixed point).
TABLE1_C2M3 = dict(PAPER_STOP)
#: REPAIR's reference notebook, MNIST MLP of 8×128 units, two models: accuracy of the midpoint.
PAPER_TWO_MODELS = {"aligned": 0.717, "aligned+repair": 0.830}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", usage="%(prog)s [options]",
                                description="Benchmark (e): REPAIR and federated REPAIR.")
    p.add_argument("--sections", type=parse_choice_list(SECTIONS), default=list(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--calibration", type=lambda s: parse_int_list(s, minimum=1), default=[50, 200, 1000, 5000],
                   help="calibration sizes measured in table1 (default: 50,200,1000,5000)")
    p.add_argument("--dataset", default="mnist", help="table1-cnn dataset (default: mnist, the stand-in)")
    p.add_argument("--data-dir", default=None, help="table1-cnn: directory of the non-bundled datasets")
    p.add_argument("--cnn-models", type=parse_choice_list(("resnet20", "vgg16")), default=["resnet20"],
                   help="table1-cnn architectures, resnet20 and/or vgg16 (default: resnet20; training 5 VGG-16 "
                        "takes about half an hour on 2 cores)")
    p.add_argument("--cnn-train-samples", type=int, default=10000,
                   help="table1-cnn: training samples per model (default: 10000)")
    p.add_argument("--cnn-epochs", type=int, default=2, help="table1-cnn: training epochs (default: 2)")
    p.add_argument("--cnn-width", type=float, default=0.5, help="table1-cnn: width multiplier (default: 0.5)")
    p.add_argument("--cnn-lr", type=float, default=None,
                   help="table1-cnn: SGD learning rate (default: 0.05 for resnet20, 0.01 for vgg16, which has no "
                        "normalisation and does not train at 0.05)")
    p.add_argument("--partitions", type=parse_choice_list(("iid", "dirichlet")), default=["iid", "dirichlet"],
                   help="one-shot partitions (default: iid,dirichlet)")
    p.add_argument("--clients", type=int, default=20, help="one-shot clients (default: 20)")
    p.add_argument("--local-epochs", type=int, default=5, help="one-shot local epochs (default: 5)")
    p.add_argument("--seed", type=int, default=0,
                   help="one-shot: the simulation's seed (partitions, client inits, local training; default: 0)")
    p.add_argument("--efforts", type=parse_choice_list(EFFORTS), default=list(EFFORTS),
                   help="one-shot: C²M³ with the C2M3 strategy's options (strategy) and/or the library's "
                        "defaults (library) (default: strategy,library)")
    p.add_argument("--max-train-samples", type=int, default=0,
                   help="one-shot: the simulation's max-train-samples (default: 0, the whole set)")
    add_common_arguments(p)
    return p


def _accuracy(model: torch.nn.Module, sd, images, labels) -> dict[str, float]:
    model.load_state_dict(sd)
    s = evaluate(model, images, labels, device="cpu")
    return {"accuracy": float(s["accuracy"]), "loss": float(s["loss"])}


def _both(model, sd, train_set, test) -> dict[str, float]:
    tr = _accuracy(model, sd, train_set[0], train_set[1])
    te = _accuracy(model, sd, test.images, test.labels)
    return {"train_acc": tr["accuracy"], "test_acc": te["accuracy"], "train_loss": tr["loss"], "test_loss": te["loss"]}


def table1(args, progress) -> dict[str, Any]:
    train_full = load_dataset("mnist")
    test = load_dataset("mnist", train=False)
    g = torch.Generator().manual_seed(0)
    calib_index = torch.randperm(train_full.images.shape[0], generator=g)
    calib = train_full.images[calib_index[:1000]]
    eval_train = (train_full.images[calib_index[-10000:]], train_full.labels[calib_index[-10000:]])
    sds = trained_mlps(5, epochs=3, cache_dir=args.cache_dir, progress=args.progress)
    model = MLP(widths=PAPER_WIDTHS)
    rows = []
    aligned_by = {}
    for method, align in (("naive", None), ("mergemany", "mergemany"), ("c2m3", "c2m3")):
        t = time.perf_counter()
        merged, result = fedmerge.merge(sds, align=align, model=model, full_output=True,
                                        align_options=TABLE1_C2M3 if align == "c2m3" else None)
        seconds = time.perf_counter() - t
        aligned_by[method] = (merged, result)
        rows.append({"method": method, "repair": "—", **_both(model, merged, eval_train, test),
                     "paper_test_acc": PAPER_TABLE1[method], "seconds": seconds})
        progress(f"table1 {method}: {rows[-1]['test_acc']:.4f}")
        aligned = sds if align is None else [fedmerge.apply_transform(sd, model.permutation_spec(), tr)
                                             for sd, tr in zip(sds, result.transforms)]
        t = time.perf_counter()
        repaired = fedmerge.repair.repair(merged, aligned, model=model, inputs=calib)
        rows.append({"method": f"{method}†", "repair": "std, sequential, 1000", **_both(model, repaired, eval_train, test),
                     "paper_test_acc": PAPER_TABLE1.get(f"{method}+repair"),
                     "seconds": time.perf_counter() - t})
        progress(f"table1 {method}+repair: {rows[-1]['test_acc']:.4f}")
    # REPAIR variants on the C²M³ merge
    merged, result = aligned_by["c2m3"]
    spec = model.permutation_spec()
    aligned = [fedmerge.apply_transform(sd, spec, tr) for sd, tr in zip(sds, result.transforms)]
    variants = []
    for target in TARGETS:
        for passes in PASSES:
            for modules in ("hidden", "all"):
                out = fedmerge.repair.repair(merged, aligned, model=model, inputs=calib, target=target,
                                             passes=passes, modules=modules)
                variants.append({"target": target, "passes": passes, "layers": modules, "calibration": 1000,
                                 **_both(model, out, eval_train, test)})
    for size in args.calibration:
        out = fedmerge.repair.repair(merged, aligned, model=model, inputs=train_full.images[calib_index[:size]])
        variants.append({"target": "std", "passes": "sequential", "layers": "hidden", "calibration": size,
                         **_both(model, out, eval_train, test)})
    progress("table1 variants done")
    return {"rows": rows, "variants": variants}


def _trained_cnns(name: str, args, train_set, progress) -> list[dict]:
    """5 models ``name`` trained from seeds 0-4 (cached under the bench cache)."""
    from fedmerge.models import build_model
    from .models import bench_cache_dir
    kwargs = {"width": args.cnn_width, **({"norm": "batchnorm"} if name == "resnet20" else {})}
    lr = args.cnn_lr if args.cnn_lr is not None else CNN_LR[name]
    tag = "" if lr == 0.05 else f"-lr{lr:g}"  # (the first caches were all trained at 0.05)
    out = []
    for seed in range(5):
        path = bench_cache_dir(args.cache_dir) / (f"{name}-w{args.cnn_width:g}-{train_set.name}-n{args.cnn_train_samples}"
                                                  f"-e{args.cnn_epochs}{tag}-seed{seed}.pt")
        if path.exists():
            out.append(torch.load(path, weights_only=True))
            continue
        torch.manual_seed(seed)
        model = build_model(name, input_shape=train_set.input_shape, num_classes=train_set.num_classes, **kwargs)
        index = torch.randperm(train_set.images.shape[0], generator=torch.Generator().manual_seed(seed))
        index = index[:args.cnn_train_samples]
        train(model, train_set.images[index], train_set.labels[index], epochs=args.cnn_epochs, batch_size=64,
              lr=lr, momentum=0.9, seed=seed, device="cpu")
        sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(sd, path)
        out.append(sd)
        progress(f"table1-cnn: {name} seed {seed} trained")
    return out


def table1_cnn(args, progress) -> list[dict[str, Any]]:
    from fedmerge.models import build_model
    from fedmerge.repair import reset_batchnorm
    train_set = load_dataset(args.dataset, data_dir=args.data_dir)
    test = load_dataset(args.dataset, data_dir=args.data_dir, train=False)
    calib = train_set.images[torch.randperm(train_set.images.shape[0], generator=torch.Generator().manual_seed(9))[:1000]]
    rows = []
    for name in args.cnn_models:
        kwargs = {"width": args.cnn_width, **({"norm": "batchnorm"} if name == "resnet20" else {})}
        model = build_model(name, input_shape=train_set.input_shape, num_classes=train_set.num_classes, **kwargs)
        spec = model.permutation_spec()
        sds = _trained_cnns(name, args, train_set, progress)
        ends = [_accuracy(model, sd, test.images, test.labels)["accuracy"] for sd in sds]
        rows.append({"model": name, "method": "endpoints (mean)", "test_acc": sum(ends) / len(ends)})
        paper = PAPER_TABLE1_CNN[name] if args.dataset == "cifar10" else {}
        for method, align in (("naive", None), ("mergemany", "mergemany"), ("c2m3", "c2m3")):
            t = time.perf_counter()
            merged, result = fedmerge.merge(sds, align=align, model=model, full_output=True,
                                            align_options=TABLE1_C2M3 if align == "c2m3" else None)
            seconds = time.perf_counter() - t
            rows.append({"model": name, "method": method, "test_acc": _accuracy(model, merged, test.images, test.labels)["accuracy"],
                         "paper_test_acc": paper.get(method), "seconds": seconds})
            aligned = sds if align is None else [fedmerge.apply_transform(sd, spec, tr) for sd, tr in zip(sds, result.transforms)]
            if name == "resnet20":
                reset = reset_batchnorm(model, merged, calib)
                rows.append({"model": name, "method": f"{method} + RESET",
                             "test_acc": _accuracy(model, reset, test.images, test.labels)["accuracy"]})
            repaired = fedmerge.repair.repair(merged, aligned, model=model, inputs=calib, reset=name == "resnet20")
            rows.append({"model": name, "method": f"{method}†", "test_acc": _accuracy(model, repaired, test.images, test.labels)["accuracy"],
                         "paper_test_acc": paper.get(f"{method}+repair")})
            progress(f"table1-cnn {name} {method}: {rows[-2]['test_acc']:.4f} -> {rows[-1]['test_acc']:.4f}")
            if align is None:
                continue
            # RegMean (each layer fitted on the aligned models' inputs to it, on the calibration images)
            fitted = fedmerge.regmean.regmean_average(aligned, model=model, inputs=calib)
            if name == "resnet20":
                rows.append({"model": name, "method": f"{method} + RegMean + RESET",
                             "test_acc": _accuracy(model, reset_batchnorm(model, fitted, calib), test.images,
                                                   test.labels)["accuracy"]})
            fitted = fedmerge.repair.repair(fitted, aligned, model=model, inputs=calib, reset=name == "resnet20")
            rows.append({"model": name, "method": f"{method} + RegMean†",
                         "test_acc": _accuracy(model, fitted, test.images, test.labels)["accuracy"]})
    return rows


def two_models(args, progress) -> dict[str, Any]:
    widths = (128,) * 8
    train_full = load_dataset("mnist")
    test = load_dataset("mnist", train=False)
    sds = trained_mlps(2, epochs=3, cache_dir=args.cache_dir, progress=args.progress, widths=widths)
    model = MLP(widths=widths)
    spec = model.permutation_spec()
    calib = train_full.images[torch.randperm(60000, generator=torch.Generator().manual_seed(0))[:1000]]
    ends = [_accuracy(model, sd, test.images, test.labels)["accuracy"] for sd in sds]
    rows = [{"model": "endpoints (mean)", "test_acc": sum(ends) / 2}]
    naive = fedmerge.merge(sds, align=None)
    rows.append({"model": "midpoint, no alignment", "test_acc": _accuracy(model, naive, test.images, test.labels)["accuracy"]})
    rows.append({"model": "midpoint, no alignment + REPAIR",
                 "test_acc": _accuracy(model, fedmerge.repair.repair(naive, sds, model=model, inputs=calib),
                                       test.images, test.labels)["accuracy"]})
    merged, result = fedmerge.merge(sds, align="git-rebasin", model=model, full_output=True)
    aligned = [fedmerge.apply_transform(sd, spec, t) for sd, t in zip(sds, result.transforms)]
    rows.append({"model": "midpoint, Git Re-Basin", "test_acc": _accuracy(model, merged, test.images, test.labels)["accuracy"],
                 "paper_test_acc": PAPER_TWO_MODELS["aligned"]})
    for target in TARGETS:
        out = fedmerge.repair.repair(merged, aligned, model=model, inputs=calib, target=target)
        rows.append({"model": f"midpoint, Git Re-Basin + REPAIR ({target})",
                     "test_acc": _accuracy(model, out, test.images, test.labels)["accuracy"],
                     "paper_test_acc": PAPER_TWO_MODELS["aligned+repair"] if target == "std" else None})
    progress("two-models done")
    return {"rows": rows}


def _federated_repair(model, merged, clients, transforms, spec, *, modules="hidden", layerwise=False):
    """The protocol of strategies.federated_repair, run in this process on the clients' own data."""
    from strategies import federated_repair as fr
    points = find_repair_points(model, spec, modules=modules)
    own = [unit_statistics(model, c["state_dict"], c["images"], points) for c in clients]
    targets = fr.targets_from_clients(own, transforms, points, spec)
    if not layerwise:  # one round trip: every client's corrected single pass
        stats = [unit_statistics(model, merged, c["images"], points, targets=targets) for c in clients]
        return fold_repair(merged, points, fr.pool(stats), targets)
    out = merged
    for point in points:  # one round trip per layer: exact
        stats = [unit_statistics(model, out, c["images"], [point]) for c in clients]
        out = fold_repair(out, [point], fr.pool(stats), targets)
    return out


def one_shot(args, progress, partition: str) -> dict[str, Any]:
    from simulations.config import ClientConfig
    from simulations.task import (build_global_model, client_data, independent_init_seed, server_test_set,
                                  train_seed)
    from strategies import C2M3
    cfg = ClientConfig.from_mapping({"num-clients": args.clients, "local-epochs": args.local_epochs,
                                     "partition": partition, "init": "independent", "seed": args.seed,
                                     "max-train-samples": args.max_train_samples, "threads": 0})
    from .models import bench_cache_dir
    cache = bench_cache_dir(args.cache_dir) / (f"oneshot-{partition}-c{args.clients}-e{args.local_epochs}"
                                               f"-n{args.max_train_samples}-seed{cfg.seed}.pt")
    trained = torch.load(cache, weights_only=True) if cache.exists() else None
    clients = []
    t = time.perf_counter()
    for pid in range(args.clients):
        data = client_data(cfg, pid, args.clients)
        if trained is None or pid >= len(trained):
            model = build_global_model(cfg, seed=independent_init_seed(cfg.seed, pid))
            train(model, data.train_images, data.train_labels, epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                  lr=cfg.lr, momentum=cfg.momentum, seed=train_seed(cfg.seed, 1, pid), device="cpu")
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            progress(f"one-shot {partition}: client {pid + 1}/{args.clients} trained")
        else:
            state = trained[pid]
        clients.append({"state_dict": state, "images": data.train_images, "n": int(data.train_images.shape[0])})
    if trained is None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save([c["state_dict"] for c in clients], cache)  # the clients' training is deterministic
    train_seconds = time.perf_counter() - t
    images, labels = server_test_set(cfg)
    model = build_global_model(cfg)
    spec = model.permutation_spec()
    weights = [c["n"] for c in clients]
    sds = [c["state_dict"] for c in clients]
    accs = [_accuracy(model, sd, images, labels)["accuracy"] for sd in sds]
    with torch.no_grad():
        probs = 0
        for sd in sds:
            probs = probs + torch.func.functional_call(model, sd, (images,)).exp()
    ensemble = float((probs.argmax(1) == labels).float().mean())
    rows = [{"model": "best client", "test_acc": max(accs)}, {"model": "mean client", "test_acc": sum(accs) / len(accs)},
            {"model": "ensemble of the clients (mean softmax)", "test_acc": ensemble}]
    plain = fedmerge.merge(sds, align=None, weights=weights)
    rows.append({"model": "plain averaging (FedAvg)", "test_acc": _accuracy(model, plain, images, labels)["accuracy"]})
    from fedmerge.regmean import DEFAULT_ALPHA, input_grams, map_grams, regmean_average
    from strategies import federated_regmean as frm
    from strategies.federated_repair import record_bytes
    own_grams = [input_grams(model, c["state_dict"], c["images"]) for c in clients]  # each client's own
    grams_bytes = record_bytes(frm.encode_grams(own_grams[0]))
    unaligned = regmean_average(sds, weights, grams=own_grams)
    rows.append({"model": f"RegMean without alignment (α={DEFAULT_ALPHA:g})",
                 "test_acc": _accuracy(model, unaligned, images, labels)["accuracy"]})
    strategy_options = C2M3(model=model).match_options
    calib = load_dataset("mnist").images[torch.randperm(60000, generator=torch.Generator().manual_seed(1))[:1000]]
    efforts = {"strategy": ("C2M3 strategy options", strategy_options), "library": ("library defaults", {})}
    for effort, options in (efforts[e] for e in args.efforts):
        t = time.perf_counter()
        merged, result = fedmerge.merge(sds, align="c2m3", model=model, weights=weights, full_output=True,
                                        align_options=options)
        match_seconds = time.perf_counter() - t
        label = f"C²M³ ({effort}: {result.nit} it)"
        rows.append({"model": label, "test_acc": _accuracy(model, merged, images, labels)["accuracy"],
                     "seconds": match_seconds})
        for name, kwargs in (("federated REPAIR", {}), ("federated REPAIR, logits too", {"modules": "all"}),
                             ("federated REPAIR, layer by layer", {"layerwise": True})):
            t = time.perf_counter()
            out = _federated_repair(model, merged, clients, result.transforms, spec, **kwargs)
            rows.append({"model": f"{label} + {name}", "test_acc": _accuracy(model, out, images, labels)["accuracy"],
                         "seconds": time.perf_counter() - t})
        aligned = [fedmerge.apply_transform(sd, spec, tr) for sd, tr in zip(sds, result.transforms)]
        mapped = [map_grams(g, spec, tr) for g, tr in zip(own_grams, result.transforms)]
        for alpha in (DEFAULT_ALPHA, 1.0):  # the clients' Grams, mapped by their alignments (no extra round trip)
            t = time.perf_counter()
            fitted = regmean_average(aligned, weights, grams=mapped, alpha=alpha)
            rows.append({"model": f"{label} + federated RegMean (α={alpha:g})",
                         "test_acc": _accuracy(model, fitted, images, labels)["accuracy"],
                         "seconds": time.perf_counter() - t})
            if alpha == DEFAULT_ALPHA:
                t = time.perf_counter()
                out = _federated_repair(model, fitted, clients, result.transforms, spec)
                rows.append({"model": f"{label} + federated RegMean (α={alpha:g}) + federated REPAIR",
                             "test_acc": _accuracy(model, out, images, labels)["accuracy"],
                             "seconds": time.perf_counter() - t})
        for target in TARGETS:
            out = fedmerge.repair.repair(merged, aligned, weights, model=model, inputs=calib, target=target)
            rows.append({"model": f"{label} + server REPAIR (1000 samples, {target})",
                         "test_acc": _accuracy(model, out, images, labels)["accuracy"]})
        progress(f"one-shot {partition}: {effort} done")
    return {"partition": partition, "rows": rows, "client_train_seconds": train_seconds,
            "regmean_grams_bytes_per_client": grams_bytes}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, argv, env = begin(MODULE, build_parser().parse_args, argv)
    progress = (lambda text: print(text, file=sys.stderr, flush=True)) if args.progress else (lambda text: None)
    out: dict[str, Any] = {"environment": env}
    print(format_environment(env))
    if "table1" in args.sections:
        out["table1"] = table1(args, progress)
        print("\n5 MLPs (MNIST), merged; † = REPAIR (std targets, sequential, 1000 calibration samples)\n")
        print(markdown_table(out["table1"]["rows"], ["method", "train_acc", "test_acc", "train_loss", "test_loss",
                                                     ("paper_test_acc", "paper (EMNIST) test acc"), "seconds"]))
        print("\nREPAIR variants on the C²M³ merge of the 5 MLPs\n")
        print(markdown_table(out["table1"]["variants"], ["target", "passes", "layers", "calibration", "train_acc",
                                                         "test_acc", "test_loss"]))
    if "table1-cnn" in args.sections:
        out["table1_cnn"] = table1_cnn(args, progress)
        print(f"\n5 CNNs ({args.dataset}, {args.cnn_train_samples} samples, {args.cnn_epochs} epochs, width "
              f"{args.cnn_width:g}), merged; † = REPAIR (after RESET for the BatchNorm ResNet-20)\n")
        print(markdown_table(out["table1_cnn"], ["model", "method", "test_acc",
                                                 ("paper_test_acc", "paper (CIFAR-10) test acc"), "seconds"]))
    if "two-models" in args.sections:
        out["two_models"] = two_models(args, progress)
        print("\nTwo MLPs of 8×128 units (MNIST), midpoint\n")
        print(markdown_table(out["two_models"]["rows"], ["model", "test_acc", ("paper_test_acc", "REPAIR notebook")]))
    if "one-shot" in args.sections:
        out["one_shot"] = [one_shot(args, progress, p) for p in args.partitions]
        for block in out["one_shot"]:
            print(f"\nOne-shot federated merge: {args.clients} clients ({block['partition']}), "
                  f"{args.local_epochs} local epochs, independent inits, seed {args.seed}\n")
            print(markdown_table(block["rows"], ["model", "test_acc", "seconds"]))
            print(f"\nRegMean: {block['regmean_grams_bytes_per_client']} bytes of Gram matrices per client")
    if args.out:
        write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
