"""Benchmark (orthogonal): orthogonal alignment and spherical averaging, beside the papers' figures.

Three tables, each next to the figures of the paper it reproduces:

1. ``orthogonal-rebasin-mnist-mlp`` Table 1: two MLPs trained independently on MNIST, merged at
   α = 0.5 — naive (LERP and SLERP), permutation (Git Re-Basin weight matching; activation
   matching), orthogonal (activation Procrustes on every hidden group, a relaxation on ReLU units;
   weight Procrustes; the same projected back to permutations; Stiefel-manifold optimisation) and
   orthogonal + SLERP — with test accuracy and loss at α = 0.5, the LERP loss barrier, and the ReLU
   residual ``E_res`` and sign-change share of each map (mean over the hidden layers, on the
   calibration inputs).
2. ``spherical-barycenter-multi-model-merging``: 4 MLPs 784-128-64-10 and 4 logistic regressions,
   3 epochs of Adam (lr 1e-3) on the first 50 000 MNIST training images; the spherical
   (Karcher) barycenter unaligned (the whole model as one vector, as in the paper, with the log/exp
   iteration and with pymanopt's Riemannian trust regions; and per tensor), aligned (C²M³,
   MergeMany, orthogonal with ``relax=True``, activation matching on the units' cross-correlations)
   + spherical barycenter, REPAIR after it (the hidden layers on the held-out calibration images;
   every layer, logits included, on the training images), the C²M³ pipelines on a second set of
   four models (seeds 4-7), and the order independence of the barycenter (max difference between
   two merge orders).
3. ``orthogonal-rebasin-resnet20-cifar10`` (``--tables ...,resnet``) on MNIST, or on CIFAR-10 with
   ``--dataset cifar10 --data-dir DIR`` (the python batches, ``DIR/cifar-10-batches-py``; the
   paper's figures are shown beside ours only there): three BatchNorm ResNet-20s
   (interpolation between models 0 and 1, the third for the cycle errors); naive
   LERP/SLERP, Git Re-Basin, orthogonal (activation Procrustes searched over rotations, projected
   to permutations because BatchNorm channels may not rotate), each with BatchNorm statistics as
   interpolated, re-estimated (RESET) and REPAIRed (RESET, then REPAIR in one pass, at every α);
   the same with BatchNorm folded into the producing convs (``fedmerge.batchnorm``: no statistics,
   so rotations may be kept; REPAIR on the folded model, unfolded with re-estimated statistics);
   loss barrier (the paper's ``max_α L``), midpoint accuracy,
   linear CKA of the midpoint's embedding (pooled features) with model A's, the cycle error of
   three models' maps (ours, into a common space; independent pairwise ones) and the ReLU residual
   of the searched rotations before projection (RME).

Neither MLP paper gives a batch size: ``--batch-size auto`` (default; ``--tables batch`` prints the choice)
trains the four MLPs of table 2 at each of ``--batch-sizes`` and keeps the one whose endpoints score best on
validation images (training images after the first ``--train-size``, before the calibration images); tables 1
and 2 then train with it.

Run from the repository root::

    python -m simulations.benchmarks.orthogonal --threads 1
    python -m simulations.benchmarks.orthogonal --threads 1 --tables mlp,spherical,resnet --out orthogonal.json
    python -m simulations.benchmarks.orthogonal --threads 1 --tables resnet --dataset cifar10 --data-dir ~/data

Models are trained once and cached (``--cache-dir``).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make `simulations` importable from the repo root
    _root = str(Path(__file__).resolve().parents[2])
    if _root not in sys.path:
        sys.path.insert(0, _root)

import torch
import torch.nn.functional as F
from torch import nn

import fedmerge
from fedmerge import alignment_metrics as am
from fedmerge.data import DATASETS, load_dataset
from fedmerge.models import MLP, ResNet20
from simulations.benchmarks.cli import (add_common_arguments, ensure_stdout_utf8, parse_choice_list, parse_int_list,
                                        positive_int)
from simulations.benchmarks.environment import environment, format_environment, set_threads
from simulations.benchmarks.models import bench_cache_dir
from simulations.benchmarks.output import atomic_write, finish, markdown_table

MODULE = "simulations.benchmarks.orthogonal"
TABLES = ("batch", "mlp", "spherical", "resnet")
#: The Adam batch sizes ``--batch-size auto`` chooses from, and the validation images it chooses on: the
#: training images right after the first ``--train-size`` (never trained on, and before the calibration images).
BATCH_SIZES = (8, 16, 32, 64, 128)
VALIDATION = 5000

#: Table 1 of the MNIST orthogonal paper: accuracy at α = 0.5, E_res, sign change.
PAPER_MLP = {"naive": ("11.2%", "—", "—"), "permutation": ("97.8%", "0", "0%"),
             "orthogonal": ("98.1%", "1.2·10⁻²", "8.4%"), "orthogonal+slerp": ("98.3%", "1.2·10⁻²", "8.4%")}
#: The spherical-barycenter paper: 4 MLPs 784-128-64-10 and 4 logistic regressions, 3 epochs Adam 1e-3.
PAPER_SPHERICAL = {"mlp-endpoints": "96.13–96.77%", "mlp-unaligned": "9.12%", "mlp-unaligned-tr": "8.60%",
                   "logreg-endpoints": "91.18–91.52%", "logreg": "91.46%", "order": "< 1e-6"}
#: Tables 1-2 of the ResNet-20 orthogonal paper (CIFAR-10, 200 epochs): barrier, midpoint acc, CKA, cycle, RME.
PAPER_RESNET = {"orthogonal-kept": ("159.80", "10.0%", "0.302", "114.05", "0.0677"),
                "naive": ("2.18", "10.9%", "0.727", "N/A", "N/A"), "naive+slerp": ("3.55", "14.3%", "—", "—", "—"),
                "git-rebasin": ("6.20", "10.0%", "0.361", "N/A", "N/A")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", usage="%(prog)s [options]",
                                description="Orthogonal alignment and spherical averaging beside the papers.")
    p.add_argument("--widths", type=lambda s: parse_int_list(s, minimum=1), default=[128, 64],
                   help="MLP hidden widths for tables 1 and 2 (default: 128,64, the spherical paper's)")
    p.add_argument("--epochs", type=positive_int, default=3, help="Adam epochs per model (default: 3)")
    p.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="Adam batch size of the MLPs and logistic regressions of tables 1 and 2 (default: auto, "
                        "the one of --batch-sizes whose four endpoints, seeds 0-3, score best on the "
                        f"{VALIDATION} validation images after the training images: the papers do not give one)")
    p.add_argument("--batch-sizes", type=lambda s: parse_int_list(s, minimum=1), default=list(BATCH_SIZES),
                   help="the batch sizes that --batch-size auto chooses from (default: "
                        f"{','.join(map(str, BATCH_SIZES))})")
    p.add_argument("--train-size", type=positive_int, default=50_000,
                   help="train on the first N MNIST training images (default: 50000, the spherical paper's)")
    p.add_argument("--calibration", type=positive_int, default=5000,
                   help="training images used as calibration inputs for activations (default: 5000)")
    p.add_argument("--tables", type=parse_choice_list(TABLES), default=["mlp", "spherical"],
                   help=f"comma-separated subset of {','.join(TABLES)} (default: mlp,spherical; batch, the choice "
                        "of the batch size, is printed whenever --batch-size is auto; resnet trains three "
                        "ResNet-20s on the first run)")
    p.add_argument("--resnet-width", type=float, default=0.5, help="ResNet-20 width multiplier (default: 0.5)")
    p.add_argument("--resnet-epochs", type=positive_int, default=2, help="ResNet-20 epochs (default: 2)")
    p.add_argument("--resnet-train-size", type=positive_int, default=20_000,
                   help="ResNet-20 training images (default: 20000)")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mnist",
                   help="dataset of the ResNet-20 table (default: mnist, the stand-in; cifar10 is the paper's, "
                        "and only there are its figures shown); the MLP tables are MNIST's")
    p.add_argument("--data-dir", default=None,
                   help="directory holding the non-bundled datasets (CIFAR-10: DIR/cifar-10-batches-py)")
    add_common_arguments(p)
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    return p


# --------------------------------------------------------------------------- training (Adam, cached)
class LogisticRegression(nn.Module):
    """One linear layer on the flattened image: the spherical paper's convex baseline."""

    def __init__(self, input_shape=(1, 28, 28), num_classes=10):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(int(torch.tensor(input_shape).prod()), num_classes)

    def forward(self, x):
        return self.linear(self.flatten(x))


def _batch_size(text: str) -> int | str:
    """``--batch-size``: ``auto`` or a positive integer."""
    if text == "auto":
        return text
    return positive_int(text)


def _adam(make, name: str, seed: int, x, y, *, epochs: int, cache_dir, batch_size: int, lr: float = 1e-3,
          optimizer: str = "adam") -> dict[str, torch.Tensor]:
    path = bench_cache_dir(cache_dir) / f"{name}-{optimizer}-b{batch_size}-e{epochs}-n{len(x)}-seed{seed}.pt"
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    torch.manual_seed(seed)
    model = make()
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save(sd, f))
    print(f"trained {name} seed {seed} in {time.perf_counter() - start:.0f} s -> {path}", file=sys.stderr, flush=True)
    return sd


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


# --------------------------------------------------------------------------- table 1
def _relu_diagnostics(model, sd_b, maps, groups, modules, inputs) -> tuple[float | None, float | None]:
    """Mean over hidden layers of E_res (relative) and the sign-change share of model b's maps."""
    feats = am.features(model, sd_b, inputs, modules)
    res, sign = [], []
    for g, mod in zip(groups, modules):
        res.append(am.relu_residual(feats[mod], maps[g]))
        sign.append(am.sign_change_share(feats[mod], maps[g]))
    return statistics.fmean(res), statistics.fmean(sign)


def mlp_table(args, train, test, calib) -> tuple[str, list[dict]]:
    widths = tuple(args.widths)
    name = "mlp-" + "-".join(map(str, (784, *widths, 10)))

    def make():
        return MLP(train.input_shape, train.num_classes, widths=widths)

    x, y = train.images[:args.train_size], train.labels[:args.train_size]
    sds = [_adam(make, name, s, x, y, epochs=args.epochs, batch_size=args.batch_size, cache_dir=args.cache_dir)
           for s in range(2)]
    model = make()
    spec = model.permutation_spec()
    relaxed = fedmerge.relaxed_spec(spec)
    groups = list(spec.sizes)
    modules = [f"layers.{i}" for i in range(len(widths))]
    data = (test.images, test.labels)
    rows = []

    def row(method, label, maps_b, s, *, slerp=False, diag_maps=None, paper=None, spec_used=spec):
        aligned_b = sds[1] if maps_b is None else fedmerge.apply_transform(sds[1], spec_used, maps_b)
        mid = fedmerge.spherical_average([sds[0], aligned_b], [0.5, 0.5]) if slerp else \
            fedmerge.interpolate(sds[0], aligned_b, 0.5)
        r = am.evaluate(model, mid, data)
        end = am.evaluate(model, aligned_b, data)  # the aligned endpoint: model 1 itself only for exact maps
        barrier = am.loss_barrier(model, sds[0], aligned_b, data, alphas=11, method="slerp" if slerp else "lerp")
        e_res = sign = None
        if diag_maps is not None:
            e_res, sign = _relu_diagnostics(model, sds[1], diag_maps, groups, modules, calib)
        p = PAPER_MLP.get(paper, ("—", "—", "—"))
        rows.append({"method": method, "label": label, "accuracy": r["accuracy"], "loss": r["loss"],
                     "endpoint_accuracy": end["accuracy"],
                     "barrier": barrier, "e_res": e_res, "sign_change": sign, "seconds": s,
                     "paper_accuracy": p[0], "paper_e_res": p[1], "paper_sign": p[2]})
        print(f"  table 1, {label}: {_pct(r['accuracy'])}", file=sys.stderr, flush=True)

    ends = [am.evaluate(model, sd, data)["accuracy"] for sd in sds]
    row("naive", "naive (LERP)", None, 0.0, paper="naive")
    row("naive+slerp", "naive + SLERP", None, 0.0, slerp=True)

    def timed(**kw):
        start = time.perf_counter()
        out = fedmerge.match(sds, **kw)
        return out, time.perf_counter() - start

    res, s = timed(spec=spec, method="git-rebasin")
    row("permutation", "permutation (Git Re-Basin weight matching)", res.pairwise(1, 0), s,
        diag_maps=res.pairwise(1, 0), paper="permutation")
    start = time.perf_counter()
    act = fedmerge.matching.orthogonal.orthogonal_matching(sds, spec, inputs=calib, model=model)
    s = time.perf_counter() - start
    t = fedmerge.transforms.pairwise_map(act["transforms"], 1, 0)
    row("permutation-act", "permutation (activation matching)", t, s, diag_maps=t)
    start = time.perf_counter()
    orth = fedmerge.matching.orthogonal.orthogonal_matching(sds, relaxed, inputs=calib, model=model)
    s = time.perf_counter() - start
    q = fedmerge.transforms.pairwise_map(orth["transforms"], 1, 0)
    row("orthogonal", "orthogonal (activation Procrustes, relaxed)", q, s, diag_maps=q, paper="orthogonal",
        spec_used=relaxed)
    row("orthogonal+slerp", "orthogonal + SLERP", q, s, slerp=True, diag_maps=q, paper="orthogonal+slerp",
        spec_used=relaxed)
    res, s = timed(spec=relaxed, method="orthogonal")
    row("orthogonal-weights", "orthogonal (weight Procrustes, relaxed)", res.pairwise(1, 0), s,
        diag_maps=res.pairwise(1, 0), spec_used=relaxed)
    res, s = timed(spec=relaxed, method="orthogonal", init="permutation")
    row("orthogonal-weights-perm", "orthogonal (weight Procrustes from the permutation matching)",
        res.pairwise(1, 0), s, diag_maps=res.pairwise(1, 0), spec_used=relaxed)
    start = time.perf_counter()
    proj = fedmerge.matching.orthogonal.orthogonal_matching(sds, spec, inputs=calib, model=model, relax=True)
    s = time.perf_counter() - start
    row("orthogonal-projected", "orthogonal (activations) projected to permutations",
        fedmerge.transforms.pairwise_map(proj["transforms"], 1, 0), s,
        diag_maps=fedmerge.transforms.pairwise_map(proj["transforms"], 1, 0))
    start = time.perf_counter()
    st = fedmerge.matching.orthogonal.orthogonal_matching(sds, relaxed, inputs=calib, model=model, solver="stiefel")
    s = time.perf_counter() - start
    q = fedmerge.transforms.pairwise_map(st["transforms"], 1, 0)
    row("orthogonal-stiefel", "orthogonal (activations, Stiefel CG from the identity)", q, s, diag_maps=q,
        spec_used=relaxed)

    table = markdown_table(
        [{"label": r["label"], "acc": _pct(r["accuracy"]), "loss": f"{r['loss']:.4f}",
          "end": _pct(r["endpoint_accuracy"]),
          "barrier": f"{r['barrier']:.4f}", "e_res": None if r["e_res"] is None else f"{r['e_res']:.3g}",
          "sign": None if r["sign_change"] is None else _pct(r["sign_change"]),
          "s": f"{r['seconds']:.2f}", "pa": r["paper_accuracy"], "pe": r["paper_e_res"], "ps": r["paper_sign"]}
         for r in rows],
        [("label", "method"), ("acc", "acc α=0.5"), ("loss", "loss α=0.5"), ("end", "acc α=1 (aligned model 1)"),
         ("barrier", "barrier (LERP/SLERP)"),
         ("e_res", "E_res"), ("sign", "sign change"), ("s", "align s"), ("pa", "paper acc"), ("pe", "paper E_res"),
         ("ps", "paper sign")])
    head = (f"Two MLPs {name[4:]} on MNIST ({args.epochs} epochs Adam 1e-3, batch {args.batch_size}, first "
            f"{args.train_size} training images), "
            f"endpoint test accuracy {_pct(ends[0])}, {_pct(ends[1])}; calibration: {len(calib)} training images.")
    return head + "\n\n" + table, rows


# --------------------------------------------------------------------------- table 2 (and its batch size)
def _spherical_mlp(train) -> MLP:
    """The spherical paper's MLP 784-128-64-10 (a template: its weights are not used)."""
    return MLP(train.input_shape, train.num_classes, widths=(128, 64))


def _spherical_mlps(args, train, seeds, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The spherical paper's MLPs from ``seeds``: Adam 1e-3, ``args.epochs`` epochs (cached)."""
    x, y = train.images[:args.train_size], train.labels[:args.train_size]
    return [_adam(lambda: _spherical_mlp(train), "mlp-784-128-64-10", s, x, y, epochs=args.epochs,
                  batch_size=batch_size, cache_dir=args.cache_dir) for s in seeds]


def _validation(args, train) -> tuple[torch.Tensor, torch.Tensor]:
    """The :data:`VALIDATION` training images after the first ``args.train_size``: neither trained on nor used
    for calibration (``main`` checks that they end before the calibration images)."""
    lo, hi = args.train_size, args.train_size + VALIDATION
    return train.images[lo:hi], train.labels[lo:hi]


def batch_table(args, train, test) -> tuple[str, list[dict]]:
    """Choose the Adam batch size of tables 1 and 2, which neither paper gives, and set ``args.batch_size``.

    For each of ``args.batch_sizes`` the four MLPs of table 2 (seeds 0-3) are trained, and the batch size whose
    endpoints have the highest mean accuracy on the validation images wins (the smaller one on a tie). The test
    accuracy of the endpoints and of one merge (C²M³ + spherical barycenter + REPAIR of every layer) is shown
    beside it, but the choice reads the endpoints' validation accuracy only: no merge, no test image.  An explicit
    ``--batch-size`` is kept (the table then only shows which batch size validation would have chosen).
    """
    x = train.images[:args.train_size]
    val, data = _validation(args, train), (test.images, test.labels)
    mlp = _spherical_mlp(train)
    spec = mlp.permutation_spec()
    rows = []
    for batch_size in args.batch_sizes:
        sds = _spherical_mlps(args, train, range(4), batch_size)
        val_accs = [am.evaluate(mlp, sd, val)["accuracy"] for sd in sds]
        test_accs = [am.evaluate(mlp, sd, data)["accuracy"] for sd in sds]
        merged = fedmerge.merge(sds, spec=spec, model=mlp, align="c2m3", average="spherical", repair="repair",
                                repair_options={"inputs": x, "target": "variance", "modules": "all"})
        rows.append({"batch_size": batch_size, "validation": statistics.fmean(val_accs),
                     "test_min": min(test_accs), "test_max": max(test_accs), "test_mean": statistics.fmean(test_accs),
                     "merged_test": am.evaluate(mlp, merged, data)["accuracy"]})
        print(f"  batch size {batch_size}: endpoints' validation accuracy {_pct(rows[-1]['validation'])}",
              file=sys.stderr, flush=True)
    best = max(rows, key=lambda r: (r["validation"], -r["batch_size"]))
    if args.batch_size == "auto":
        args.batch_size = best["batch_size"]
    for r in rows:
        r["chosen"] = r is best
    table = markdown_table(
        [{"b": str(r["batch_size"]) + (" (best)" if r["chosen"] else ""), "val": _pct(r["validation"]),
          "test": f"{_pct(r['test_min'])}–{_pct(r['test_max'])}", "mean": _pct(r["test_mean"]),
          "merged": _pct(r["merged_test"])} for r in rows],
        [("b", "Adam batch size"), ("val", "endpoints: mean validation accuracy (the choice)"),
         ("test", "endpoints: test accuracy (min–max)"), ("mean", "endpoints: mean test accuracy"),
         ("merged", "C²M³ + spherical barycenter + REPAIR (every layer): test accuracy")])
    head = (f"The Adam batch size of tables 1 and 2 (neither paper gives one): four MLPs 784-128-64-10 (seeds 0-3), "
            f"{args.epochs} epochs Adam 1e-3 on the first {args.train_size} training images for each candidate; "
            f"the best is the one whose endpoints score highest on the {len(val[0])} training images after them "
            f"(validation); tables 1 and 2 use batch {args.batch_size}.")
    return head + "\n\n" + table, rows


def _repair_rows(add, label, sds, spec, mlp, inputs) -> None:
    """C²M³ + spherical barycenter + REPAIR of every layer (the logits too) on ``inputs``, both target rules."""
    for target in ("std", "variance"):
        sd = fedmerge.merge(sds, spec=spec, model=mlp, align="c2m3", average="spherical", repair="repair",
                            repair_options={"inputs": inputs, "target": target, "modules": "all"})
        add(f"{label} + REPAIR (target={target!r}, every layer, training images)", mlp, sd, "—")


def spherical_table(args, train, test) -> tuple[str, list[dict]]:
    x, y = train.images[:args.train_size], train.labels[:args.train_size]
    data = (test.images, test.labels)
    mlp = _spherical_mlp(train)
    mlps = _spherical_mlps(args, train, range(4), args.batch_size)
    lr = LogisticRegression(train.input_shape, train.num_classes)
    lrs = [_adam(lambda: LogisticRegression(train.input_shape, train.num_classes), "logreg-784-10", s, x, y,
                 epochs=args.epochs, batch_size=args.batch_size, cache_dir=args.cache_dir) for s in range(4)]
    rows = []

    def add(label, model, sd, paper=None, seconds=None):
        r = am.evaluate(model, sd, data)
        rows.append({"label": label, "accuracy": r["accuracy"], "loss": r["loss"], "paper": paper,
                     "seconds": seconds})
        print(f"  table 2, {label}: {_pct(r['accuracy'])}", file=sys.stderr, flush=True)

    accs = [am.evaluate(mlp, sd, data)["accuracy"] for sd in mlps]
    rows.append({"label": "4 MLP endpoints (min–max)", "accuracy": None,
                 "text": f"{_pct(min(accs))}–{_pct(max(accs))}", "paper": PAPER_SPHERICAL["mlp-endpoints"]})
    add("MLP, mean (no alignment)", mlp, fedmerge.merge(mlps, align=None))
    for gran, solver, key in (("model", "karcher", None), ("model", "trust-regions", None), ("tensor", "karcher", None)):
        start = time.perf_counter()
        sd = fedmerge.merge(mlps, align=None, average="spherical",
                            average_options={"granularity": gran, "solver": solver})
        add(f"MLP, spherical barycenter, no alignment ({gran}, {solver})", mlp, sd,
            PAPER_SPHERICAL.get(key) if key else None, time.perf_counter() - start)
    # the paper's recipe as written: the flattened models normalised, the unit-norm barycenter loaded as it is
    for solver, key in (("karcher", "mlp-unaligned"), ("trust-regions", "mlp-unaligned-tr")):
        sd = fedmerge.merge(mlps, align=None, average="spherical",
                            average_options={"granularity": "model", "solver": solver, "restore_norm": False})
        add(f"MLP, unit-norm spherical barycenter, no alignment (model, {solver}; norm not restored)", mlp, sd,
            PAPER_SPHERICAL[key])
    spec = mlp.permutation_spec()
    for align, opts in (("c2m3", {}), ("mergemany", {}), ("orthogonal", {"relax": True})):
        start = time.perf_counter()
        sd = fedmerge.merge(mlps, spec=spec, align=align, average="spherical", align_options=opts)
        label = f"MLP, {align}{' (relax=True)' if opts else ''} + spherical barycenter (tensor)"
        add(label, mlp, sd, "—", time.perf_counter() - start)
        sd = fedmerge.merge(mlps, spec=spec, align=align, align_options=opts)
        add(f"MLP, {align}{' (relax=True)' if opts else ''} + mean", mlp, sd, "—")
        if align == "c2m3":
            sd = fedmerge.merge(mlps, spec=spec, align=align, average="spherical-projection")
            add("MLP, c2m3 + spherical barycenter (tensor, restore_norm='projection')", mlp, sd, "—")
            for target in ("std", "variance"):
                sd = fedmerge.merge(mlps, spec=spec, model=mlp, align=align, average="spherical", repair="repair",
                                    repair_options={"inputs": train.images[-args.calibration:], "target": target})
                add(f"MLP, c2m3 + spherical barycenter (tensor) + REPAIR (target={target!r})", mlp, sd, "—")
            _repair_rows(add, "MLP, c2m3 + spherical barycenter (tensor)", mlps, spec, mlp, x)
    # activation matching (permutations; align="orthogonal" with inputs) on the units' cross-correlations
    start = time.perf_counter()
    sd = fedmerge.merge(mlps, spec=spec, model=mlp, align="orthogonal", average="spherical",
                        align_options={"inputs": train.images[-args.calibration:], "standardize": True})
    add("MLP, activation correlation matching + spherical barycenter (tensor)", mlp, sd, "—",
        time.perf_counter() - start)
    sd = fedmerge.merge(mlps, spec=spec, model=mlp, align="orthogonal", average="spherical", repair="repair",
                        align_options={"inputs": train.images[-args.calibration:], "standardize": True},
                        repair_options={"inputs": x, "target": "variance", "modules": "all"})
    add("MLP, activation correlation matching + spherical barycenter (tensor) + REPAIR (target='variance', "
        "every layer, training images)", mlp, sd, "—")
    # robustness: a second set of four models (seeds 4-7), the same recipe
    second = _spherical_mlps(args, train, range(4, 8), args.batch_size)
    accs2 = [am.evaluate(mlp, sd, data)["accuracy"] for sd in second]
    rows.append({"label": "second set (seeds 4–7): 4 MLP endpoints (min–max)", "accuracy": None,
                 "text": f"{_pct(min(accs2))}–{_pct(max(accs2))}", "paper": "—"})
    add("second set: MLP, c2m3 + spherical barycenter (tensor)", mlp,
        fedmerge.merge(second, spec=spec, align="c2m3", average="spherical"), "—")
    sd = fedmerge.merge(second, spec=spec, model=mlp, align="c2m3", average="spherical", repair="repair",
                        repair_options={"inputs": train.images[-args.calibration:], "target": "variance"})
    add("second set: MLP, c2m3 + spherical barycenter (tensor) + REPAIR (target='variance')", mlp, sd, "—")
    _repair_rows(add, "second set: MLP, c2m3 + spherical barycenter (tensor)", second, spec, mlp, x)
    accs = [am.evaluate(lr, sd, data)["accuracy"] for sd in lrs]
    rows.append({"label": "4 logistic regressions (min–max)", "accuracy": None,
                 "text": f"{_pct(min(accs))}–{_pct(max(accs))}", "paper": PAPER_SPHERICAL["logreg-endpoints"]})
    for gran in ("model", "tensor"):
        add(f"logistic regression, spherical barycenter ({gran})", lr,
            fedmerge.merge(lrs, align=None, average="spherical", average_options={"granularity": gran}),
            PAPER_SPHERICAL["logreg"] if gran == "model" else None)
    add("logistic regression, unit-norm spherical barycenter (model; norm not restored)", lr,
        fedmerge.merge(lrs, align=None, average="spherical",
                       average_options={"granularity": "model", "restore_norm": False}), PAPER_SPHERICAL["logreg"])
    # order independence: the barycenter of the 4 models in every order
    w = [0.1, 0.2, 0.3, 0.4]
    ref = fedmerge.spherical_average(lrs, w, granularity="model")
    worst = 0.0
    for order in itertools.permutations(range(4)):
        other = fedmerge.spherical_average([lrs[i] for i in order], [w[i] for i in order], granularity="model")
        worst = max(worst, max(float((other[k] - ref[k]).abs().max()) for k in ref))
    rows.append({"label": "order independence: max |Δ| over all 24 orders (4 logistic regressions, weighted)",
                 "accuracy": None, "text": f"{worst:.1e}", "paper": PAPER_SPHERICAL["order"]})
    table = markdown_table(
        [{"label": r["label"], "acc": r.get("text") or _pct(r["accuracy"]),
          "loss": f"{r['loss']:.4f}" if r.get("loss") is not None else None,
          "s": None if r.get("seconds") is None else f"{r['seconds']:.2f}", "paper": r["paper"]} for r in rows],
        [("label", "model / merge"), ("acc", "test accuracy"), ("loss", "test loss"), ("s", "merge s"),
         ("paper", "paper")])
    head = (f"4 MLPs 784-128-64-10 and 4 logistic regressions, {args.epochs} epochs Adam 1e-3 (batch "
            f"{args.batch_size}) on the "
            f"first {args.train_size} MNIST training images, evaluated on the 10 000 test images. REPAIR: the "
            f"hidden layers on the last {args.calibration} training images (held out), or every layer on the "
            f"{args.train_size} training images.")
    return head + "\n\n" + table, rows


# --------------------------------------------------------------------------- table 3
def _embedding(model, sd, inputs):
    """Globally pooled features before the classifier (the input of ``fc``)."""
    captured = []
    h = model.fc.register_forward_hook(lambda m, a, out: captured.append(a[0].detach()))
    try:
        am.features(model, sd, inputs, batch_size=500)
    finally:
        h.remove()
    return torch.cat(captured)


def resnet_table(args, train, test) -> tuple[str, list[dict]]:
    """Table 3 on ``train``/``test`` (MNIST or ``--dataset``); calibration: the last training images."""
    width = args.resnet_width
    paper_shown = args.dataset == "cifar10"

    def make():
        return ResNet20(train.input_shape, train.num_classes, width=width, norm="batchnorm")

    x, y = train.images[:args.resnet_train_size], train.labels[:args.resnet_train_size]
    name = f"resnet20-bn-w{width:g}" + ("" if args.dataset == "mnist" else f"-{args.dataset}")
    sds = [_adam(make, name, s, x, y, epochs=args.resnet_epochs, cache_dir=args.cache_dir, lr=0.05,
                 batch_size=128, optimizer="sgd") for s in range(3)]
    model = make()
    spec = model.permutation_spec()
    n_test = min(200 if args.smoke else 2000, len(test.images))
    data = (test.images[:n_test], test.labels[:n_test])
    calib = train.images[-args.calibration:][:2000]
    from fedmerge.repair import repair, reset_batchnorm as reset  # REPAIR; RESET of the BatchNorm statistics
    from fedmerge.batchnorm import fold_batchnorm
    feats_a = _embedding(model, sds[0], data[0])
    rows = []

    def curve(b, slerp, fix, folded=None):
        net, sp, a = (model, spec, sds[0]) if folded is None else (folded.model, folded.spec, folded.fold(sds[0]))
        losses, accs = [], []
        for t in (0.0, 0.25, 0.5, 0.75, 1.0):
            theta = fedmerge.spherical_average([a, b], [1 - t, t]) if slerp else fedmerge.interpolate(a, b, t)
            if fix == "reset" and 0 < t < 1:
                theta = reset(net, theta, calib)
            elif fix == "repair" and 0 < t < 1:  # a folded model has no BatchNorm to reset: REPAIR alone
                theta = repair(theta, [a, b], [1 - t, t], model=net, inputs=calib, spec=sp, reset=folded is None,
                               passes="single")
            if folded is not None:  # back in the BatchNorm architecture, statistics re-estimated (same function)
                theta = folded.unfold(theta, calib)
            r = am.evaluate(model, theta, data, batch_size=500)
            losses.append(r["loss"])
            accs.append(r["accuracy"])
            if t == 0.5:
                mid = theta
        return max(losses), accs[2], am.linear_cka(feats_a, _embedding(model, mid, data[0])), accs[-1]

    def add(key, label, b, *, slerp=False, cycle=None, pairwise_cycle=None, rme=None, seconds=None, folded=None):
        for fix in (None, "reset", "repair") if folded is None else (None, "repair"):
            barrier, acc, cka, end = curve(b, slerp, fix, folded)
            p = PAPER_RESNET.get(key, ("—",) * 5) if fix is None else ("—",) * 5
            suffix = {None: "", "reset": " + RESET", "repair": " + REPAIR"}[fix]
            rows.append({"label": label + suffix, "barrier": barrier, "acc": acc, "end": end,
                         "cka": cka, "cycle": cycle, "pairwise_cycle": pairwise_cycle, "rme": rme,
                         "seconds": seconds, "paper": p})
            print(f"  table 3, {rows[-1]['label']}: barrier {barrier:.3f}, acc {_pct(acc)}", file=sys.stderr,
                  flush=True)

    ends = [am.evaluate(model, sd, data, batch_size=500)["accuracy"] for sd in sds]
    add("naive", "naive (LERP)", sds[1])
    add("naive+slerp", "naive + SLERP", sds[1], slerp=True)
    start = time.perf_counter()
    gr = fedmerge.match(sds, spec, method="git-rebasin")
    s = time.perf_counter() - start
    loops = [gr.pairwise(0, 1), gr.pairwise(1, 2), gr.pairwise(2, 0)]
    add("git-rebasin", "Git Re-Basin (weights)", fedmerge.apply_transform(sds[1], spec, gr.pairwise(1, 0)),
        cycle=am.cycle_residual(sds[0], spec, loops), seconds=s)
    start = time.perf_counter()
    orth = fedmerge.matching.orthogonal.orthogonal_matching(sds, spec, inputs=calib, model=model, relax=True,
                                                            batch_size=250)
    s = time.perf_counter() - start
    ts = orth["transforms"]
    loops = [fedmerge.transforms.pairwise_map(ts, a, b) for a, b in ((0, 1), (1, 2), (2, 0))]
    pair = {}
    for a, b in ((0, 1), (1, 2), (2, 0)):
        r = fedmerge.matching.orthogonal.orthogonal_matching([sds[b], sds[a]], spec, inputs=calib, model=model,
                                                             relax=True, batch_size=250)
        pair[(a, b)] = r["transforms"][1]
    # RME: the ReLU residual of the searched rotations of model 1's units that a ReLU follows directly
    rot = fedmerge.transforms.pairwise_map(orth["rotations"], 1, 0)
    inner = [g for g in spec.sizes if g.endswith(".inner")]
    norms = [f"stage{g[5]}.{g.split('block')[1].split('.')[0]}.norm1" for g in inner]  # BN before the ReLU
    feats = am.features(model, sds[1], calib[:500], norms)
    rme = statistics.fmean(
        am.relu_residual(feats[m].reshape(feats[m].shape[0], spec.sizes[g], -1).movedim(1, -1)
                         .reshape(-1, spec.sizes[g]), rot[g]) for g, m in zip(inner, norms))
    add("orthogonal", "orthogonal (activation Procrustes, projected to permutations)",
        fedmerge.apply_transform(sds[1], spec, fedmerge.transforms.pairwise_map(ts, 1, 0)),
        cycle=am.cycle_residual(sds[0], spec, loops),
        pairwise_cycle=am.cycle_residual(sds[0], spec, [pair[(0, 1)], pair[(1, 2)], pair[(2, 0)]]),
        rme=rme, seconds=s)
    # the papers' recipe on BatchNorm: the searched rotations applied as they are (BN channels rotated, refused
    # by the aligner; applied here by hand to show why)
    kept = fedmerge.apply_transform(sds[1], fedmerge.relaxed_spec(spec), rot)
    add("orthogonal-kept", "orthogonal, rotations kept (BatchNorm rotated; refused by fedmerge)", kept)
    add("orthogonal+slerp", "orthogonal + SLERP",
        fedmerge.apply_transform(sds[1], spec, fedmerge.transforms.pairwise_map(ts, 1, 0)), slerp=True)
    # BatchNorm folded into the producing convs (fedmerge.batchnorm): no statistics left to forbid rotations
    folding = fold_batchnorm(model)
    fsds = [folding.fold(sd) for sd in sds]
    for key, label, fspec, opts in (
            ("folded-projected", "orthogonal, BN folded (activation Procrustes, projected to permutations)",
             folding.spec, {"relax": True}),
            ("folded-kept", "orthogonal, BN folded, rotations kept (activation Procrustes)",
             fedmerge.relaxed_spec(folding.spec), {})):
        start = time.perf_counter()
        fo = fedmerge.matching.orthogonal.orthogonal_matching(fsds, fspec, inputs=calib, model=folding.model,
                                                              batch_size=250, **opts)
        s = time.perf_counter() - start
        fts = fo["transforms"]
        loops = [fedmerge.transforms.pairwise_map(fts, a, b) for a, b in ((0, 1), (1, 2), (2, 0))]
        add(key, label, fedmerge.apply_transform(fsds[1], fspec, fedmerge.transforms.pairwise_map(fts, 1, 0)),
            cycle=am.cycle_residual(fsds[0], fspec, loops), seconds=s, folded=folding)
    if not paper_shown:  # the paper's figures are CIFAR-10's: beside ours only on CIFAR-10
        for r in rows:
            r["paper"] = None
    columns = [("label", "method"), ("barrier", "max loss (barrier)"), ("acc", "midpoint acc"),
               ("end", "acc α=1 (aligned model 1)"), ("cka", "CKA"),
               ("cycle", "E_cycle 0→1→2→0"), ("pcycle", "E_cycle pairwise"), ("rme", "RME")]
    if paper_shown:
        columns.append(("paper", "paper: barrier / acc / CKA / cycle / RME"))
    table = markdown_table(
        [{"label": r["label"], "barrier": f"{r['barrier']:.3f}", "acc": _pct(r["acc"]), "end": _pct(r["end"]),
          "cka": f"{r['cka']:.3f}",
          "cycle": None if r["cycle"] is None else f"{r['cycle']:.2g}",
          "pcycle": None if r["pairwise_cycle"] is None else f"{r['pairwise_cycle']:.3g}",
          "rme": None if r["rme"] is None else f"{r['rme']:.3g}",
          "paper": None if r["paper"] is None else " / ".join(r["paper"])} for r in rows], columns)
    dataset = {"mnist": "MNIST", "cifar10": "CIFAR-10"}.get(args.dataset, args.dataset)
    head = (f"Three BatchNorm ResNet-20s (width {width:g}) on {dataset} ({args.resnet_epochs} epochs SGD 0.05, "
            f"momentum 0.9, first {min(args.resnet_train_size, len(train.images))} training images); endpoint accuracy "
            f"{', '.join(_pct(a) for a in ends)} on the first {n_test} test images (all rows); interpolation "
            f"between models 0 and 1; calibration: {len(calib)} training images.")
    return head + "\n\n" + table, rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset != "mnist" and "resnet" not in args.tables:
        parser.error(f"--dataset {args.dataset} is the ResNet-20 table's: add resnet to --tables")
    if args.smoke:
        args.train_size, args.epochs, args.calibration, args.resnet_train_size = 2000, 1, 500, 500
        args.resnet_epochs = 1
    ensure_stdout_utf8()
    set_threads(args.threads)
    env = environment(MODULE, argv)
    tables, results = {}, {}
    adam_tables = {"batch", "mlp", "spherical"} & set(args.tables)
    if adam_tables or ("resnet" in args.tables and args.dataset == "mnist"):
        train = load_dataset("mnist", train=True)
        test = load_dataset("mnist", train=False)
    if adam_tables and args.train_size + VALIDATION > len(train.images) - args.calibration:
        parser.error(f"--train-size {args.train_size} leaves no room for the {VALIDATION} validation images before "
                     f"the last {args.calibration} (calibration) of the {len(train.images)} training images")
    calib = train.images[-args.calibration:] if "mlp" in args.tables else None  # held out from the first train_size
    if "batch" in args.tables or (args.batch_size == "auto" and adam_tables):
        tables["batch"], results["batch"] = batch_table(args, train, test)
    if "mlp" in args.tables:
        tables["mlp"], results["mlp"] = mlp_table(args, train, test, calib)
    if "spherical" in args.tables:
        tables["spherical"], results["spherical"] = spherical_table(args, train, test)
    if "resnet" in args.tables:
        if args.dataset != "mnist":
            train = load_dataset(args.dataset, data_dir=args.data_dir, train=True)
            test = load_dataset(args.dataset, data_dir=args.data_dir, train=False)
        tables["resnet"], results["resnet"] = resnet_table(args, train, test)
    print()
    print(format_environment(env))
    for key, text in tables.items():
        print()
        print(text)
    notes = ["E_res is Eq. 1 of the MNIST orthogonal paper divided by ||ReLU(A) Q||_F (relative), the mean over "
             "hidden layers; the sign-change share is our reading (the paper gives no formula): the share of entries "
             "where the ReLU gates of A Q and ReLU(A) Q disagree (fedmerge.alignment_metrics)."]
    result = {"benchmark": "orthogonal", "environment": env, "config": vars(args), "tables": tables,
              "results": results, "notes": notes}
    return finish(result, notes, args.out)


if __name__ == "__main__":
    main()
