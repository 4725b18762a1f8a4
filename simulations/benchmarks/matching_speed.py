"""Benchmark (a): how fast fedmerge matches n models, and how well.

For n in ``--sizes`` (default 2, 5, 20) MLPs 784-256-512-512-256-10 (trained on MNIST by
default, or seeded random inits with ``--models random``) and for 5 ResNet-20-2× with LayerNorm
(3x32x32 input, 10 classes; *random init*, since CIFAR-10 is not available offline), run
``fedmerge.match(..., method=...)`` and report wall seconds, iterations (``nit``: Frank-Wolfe steps
for C²M³, sweeps for MergeMany, the most coordinate-descent sweeps of one weight matching for
Git Re-Basin), ``converged``, the Eq. 4 ``objective`` (higher = better aligned; comparable across
methods on the same models) and ``cycle_error``.  ``--methods pairwise`` adds plain pairwise
Git Re-Basin (n(n-1)/2 matchings, :func:`fedmerge.pairwise_cycle_error`) for its cycle error.

Run from the repository root::

    python -m simulations.benchmarks.matching_speed --threads 1 --out matching_speed.json
    python simulations/benchmarks/matching_speed.py --methods c2m3,mergemany,git-rebasin

It prints the environment (exact command, torch version, threads, CPU) and a markdown table with,
per method: wall seconds and their ratio to Git Re-Basin's in the same run (when ``git-rebasin``
is among the methods), Frank-Wolfe iterations, refinement sweeps, LAPs solved, seconds in the LAP
solver and in the rest (products, gathers, line search), the objective and its ratio to the
paper's algorithm (``c2m3-paper``), and with ``--accuracy`` the MNIST test accuracy of the merged
MLP.  ``c2m3-paper``, ``c2m3-fwK`` (K in :data:`FW_ITERATIONS`), ``c2m3-sequential`` and ``c2m3-no-fw`` are C²M³
with ``paper=True``, ``init="identity", max_iter=K`` (K Frank-Wolfe iterations from identity
matrices, then refinement), ``init="sequential"`` and ``max_iter=0`` (the default's sequential
match, refined, without Frank-Wolfe); ``c2m3-pfwK`` the same with ``frank_wolfe="pairwise"``, and
``c2m3-pfw-paper`` pairwise Frank-Wolfe to the paper's stopping rule from identity matrices,
rounded, without refinement; ``c2m3-pfwK-tol`` (K = 20, 40) K pairwise iterations and refinement
stopped by ``refine_tol=1e-5``, ``c2m3-fw20-tol`` the same with the paper's steps; ``c2m3-fw30-pR`` (R in
:data:`PERTURBATION_ROUNDS`) ``c2m3-fw30`` followed by R rounds of iterated local search
(``perturbations=R``); ``c2m3-paper-stop`` the default with Frank-Wolfe run to the paper's stopping rule; ``--first-seed
20`` takes the trained MLPs of
seeds 20, 21, ... (a second set of models).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make `simulations` importable from the repo root
    _root = str(Path(__file__).resolve().parents[2])
    if _root not in sys.path:
        sys.path.insert(0, _root)

import torch

import fedmerge
from fedmerge.matching.c2m3 import PAPER_STOP
from fedmerge.models import MLP, ResNet20
from simulations.benchmarks.cli import (add_common_arguments, int_at_least, parse_choice_list,
                                        parse_int_list, positive_float, positive_int, torch_device)
from simulations.benchmarks.environment import begin, format_environment
from simulations.benchmarks.models import PAPER_WIDTHS, method_call, mlp_name, random_models, trained_mlps, warmup
from simulations.benchmarks.output import finish, markdown_table

MODULE = "simulations.benchmarks.matching_speed"
#: Frank-Wolfe iteration counts of the ``c2m3-fw{K}`` variants (K iterations from identity, rounding, refinement).
FW_ITERATIONS = (20, 30, 40, 45, 60, 80, 100)
#: Rounds of iterated local search (``perturbations``) of the ``c2m3-fw30-p{R}`` variants, after 30 iterations.
PERTURBATION_ROUNDS = (2, 8, 24)
METHOD_LABELS = {"c2m3": "C²M³ (default: auto start, Frank-Wolfe, refinement to a fixed point)",
                 "c2m3-paper-stop": "C²M³ (default, Frank-Wolfe to the paper's stopping rule)",
                 "c2m3-paper": "C²M³, paper's Algorithm 1 (paper=True)",
                 **{f"c2m3-fw{k}": f"C²M³, {k} Frank-Wolfe iterations from identity + refinement"
                    for k in FW_ITERATIONS},
                 **{f"c2m3-pfw{k}": f"C²M³, {k} pairwise Frank-Wolfe iterations from identity + refinement"
                    for k in (20, 40, 60)},
                 **{f"c2m3-fw30-p{r}": f"C²M³, 30 Frank-Wolfe iterations from identity + refinement + {r} "
                                       "perturbation rounds" for r in PERTURBATION_ROUNDS},
                 "c2m3-pfw-paper": "C²M³, pairwise Frank-Wolfe from identity matrices, rounding (no refinement)",
                 "c2m3-fw20-tol": "C²M³, 20 Frank-Wolfe iterations from identity + refinement to refine_tol=1e-5",
                 **{f"c2m3-pfw{k}-tol": f"C²M³, {k} pairwise Frank-Wolfe iterations from identity + refinement to "
                                        "refine_tol=1e-5" for k in (20, 40)},
                 "c2m3-sequential": "C²M³, full sequential start + Frank-Wolfe + refinement",
                 "c2m3-no-fw": "C²M³ (default, max_iter=0): sequential match + refinement",
                 "c2m3+refine": "C²M³ + block-coordinate refinement", "mergemany": "MergeMany",
                 "git-rebasin": "Git Re-Basin (to model 0)", "pairwise": "pairwise Git Re-Basin"}
#: Variants of the C²M³ aligner this benchmark compares (fixed options; ``--max-iter`` does not override them).
#: The K-iteration variants start from identity matrices: on these independently trained models the default's
#: sequential match only adds its cost (Frank-Wolfe's rounding scores higher).  They stop by the paper's rule, not by
#: the default's earlier one, so that K iterations run; ``c2m3-paper-stop`` is the default with the paper's rule.
C2M3_VARIANTS = {"c2m3-paper": {"paper": True},
                 "c2m3-paper-stop": dict(PAPER_STOP),
                 **{f"c2m3-fw{k}": {"init": "identity", "max_iter": k, **PAPER_STOP} for k in FW_ITERATIONS},
                 **{f"c2m3-pfw{k}": {"init": "identity", "max_iter": k, "frank_wolfe": "pairwise", **PAPER_STOP}
                    for k in (20, 40, 60)},
                 **{f"c2m3-fw30-p{r}": {"init": "identity", "max_iter": 30, "perturbations": r, **PAPER_STOP}
                    for r in PERTURBATION_ROUNDS},
                 "c2m3-pfw-paper": {"init": "identity", "refine": 0, "frank_wolfe": "pairwise"},
                 "c2m3-fw20-tol": {"init": "identity", "max_iter": 20, "refine_tol": 1e-5, **PAPER_STOP},
                 **{f"c2m3-pfw{k}-tol": {"init": "identity", "max_iter": k, "frank_wolfe": "pairwise",
                                         "refine_tol": 1e-5, **PAPER_STOP} for k in (20, 40)},
                 "c2m3-sequential": {"init": "sequential"},
                 "c2m3-no-fw": {"max_iter": 0}}
METHODS = ("c2m3", *C2M3_VARIANTS, "c2m3+refine", "mergemany", "git-rebasin", "pairwise")
RESNET_NOTE = ("ResNet-20 models are random initialisations (CIFAR-10 is not available offline): their rows "
               "measure matching cost on real ResNet shapes, not the alignment of trained networks.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", usage="%(prog)s [options]",
        description="Benchmark (a): wall time, iterations, objective and cycle error of fedmerge.match.")
    p.add_argument("--sizes", type=lambda s: parse_int_list(s, minimum=2), default=[2, 5, 20],
                   help="numbers of MLPs to match, comma-separated (default: 2,5,20)")
    p.add_argument("--methods", type=parse_choice_list(METHODS), default=["c2m3"],
                   help=f"comma-separated subset of {','.join(METHODS)} (default: c2m3); "
                        "'pairwise' = independent pairwise Git Re-Basin, for its cycle error")
    p.add_argument("--models", choices=("trained", "random"), default="trained",
                   help="MLPs trained on MNIST (cached, see --cache-dir) or seeded random inits (default: trained)")
    p.add_argument("--epochs", type=positive_int, default=3, help="training epochs of the trained MLPs (default: 3)")
    p.add_argument("--widths", type=lambda s: parse_int_list(s, minimum=1), default=list(PAPER_WIDTHS),
                   help="MLP hidden widths (default: 256,512,512,256, the paper's)")
    p.add_argument("--resnet", action=argparse.BooleanOptionalAction, default=True,
                   help="also match ResNet-20 models (random init; default: on)")
    p.add_argument("--resnet-count", type=int_at_least(2), default=5,
                   help="how many ResNet-20 models (default: 5)")
    p.add_argument("--resnet-width", type=positive_float, default=2.0, help="ResNet-20 width multiplier (default: 2)")
    p.add_argument("--max-iter", type=positive_int, default=None,
                   help="iteration cap passed to every method as max_iter (C²M³: Frank-Wolfe steps, default 200; "
                        "MergeMany: sweeps, default 100; Git Re-Basin: coordinate-descent sweeps, default 100)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the matchers' random visiting orders (default: each matcher's own, 0)")
    p.add_argument("--device", type=torch_device, default="cpu", help="device the matching runs on (default: cpu)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="trained MLPs: use the models of seeds first-seed, first-seed+1, ... (default: 0)")
    p.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=False,
                   help="also report the MNIST test accuracy of each merged MLP (default: off)")
    add_common_arguments(p)
    return p


def run_method(method: str, state_dicts: list, spec: fedmerge.PermutationSpec, *, max_iter: int | None,
               progress: bool, seed: int | None = None) -> dict[str, Any]:
    """One timed matching; returns the fields of a results row.

    ``laps`` and ``lap_seconds`` are the LAPs solved and the wall seconds spent in the LAP solver
    (:data:`fedmerge.assignment.STATS`); ``other_seconds`` is the rest of the wall time (the
    products, gathers and line searches).
    """
    from fedmerge import assignment
    n = len(state_dicts)
    options = {} if max_iter is None else {"max_iter": max_iter}
    if method == "pairwise":
        start = time.perf_counter()
        err = fedmerge.pairwise_cycle_error(state_dicts, spec, **options)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "nit": None, "converged": None, "objective": None, "cycle_error": err,
                "message": f"{n * (n - 1) // 2} independent pairwise weight matchings"}
    if method in C2M3_VARIANTS:
        name, extra = "c2m3", dict(C2M3_VARIANTS[method])
        options = {k: v for k, v in options.items() if k not in extra}
    else:
        name, extra = method_call(method)
    if seed is not None:
        options["seed"] = seed
    assignment.reset_stats()
    res = fedmerge.match(state_dicts, spec, method=name, progress=progress, **options, **extra)
    stats = assignment.reset_stats()
    return {"seconds": float(res.seconds), "nit": int(res.nit), "converged": bool(res.converged),
            "objective": float(res.objective), "cycle_error": float(res.cycle_error), "message": str(res.message),
            "sweeps": res.get("sweeps"), "laps": stats["calls"], "lap_seconds": stats["seconds"],
            "other_seconds": float(res.seconds) - stats["seconds"], "transforms": res.transforms}


def _bench_group(label: str, kind: str, state_dicts: list, spec, sizes: Sequence[int], args,
                 accuracy=None) -> list[dict]:
    rows = []
    for n in sizes:
        models = state_dicts[:n]
        for method in args.methods:
            if method == "pairwise" and n < 3:
                continue  # a cycle needs three models
            out = run_method(method, models, spec, max_iter=args.max_iter, progress=args.progress, seed=args.seed)
            transforms = out.pop("transforms", None)
            if accuracy is not None and transforms is not None:
                out["accuracy"] = accuracy(models, transforms)
            row = {"models": label, "kind": kind, "n": n, "method": method,
                   "method_label": METHOD_LABELS[method], **out}
            rows.append(row)
            print(f"  {label}, n={n}, {METHOD_LABELS[method]}: {out['seconds']:.2f} s, nit={out['nit']}, "
                  f"sweeps={out.get('sweeps')}, laps={out.get('laps')}, objective={out['objective']}, "
                  f"accuracy={out.get('accuracy')}, cycle_error={out['cycle_error']}", file=sys.stderr, flush=True)
        ref = next((r["objective"] for r in rows if r["n"] == n and r["method"] == "c2m3"), None)
        paper = next((r["objective"] for r in rows if r["n"] == n and r["method"] == "c2m3-paper"), None)
        gr = next((r["seconds"] for r in rows if r["n"] == n and r["method"] == "git-rebasin"), None)
        for r in rows:
            if r["n"] == n and r["objective"] is not None and ref:
                r["objective_vs_c2m3"] = r["objective"] / ref
            if r["n"] == n and r["objective"] is not None and paper:
                r["objective_vs_paper"] = r["objective"] / paper
            if r["n"] == n and gr:
                r["seconds_vs_git_rebasin"] = r["seconds"] / gr
    return rows


def _display(row: dict) -> dict:
    def fmt(value, spec):
        return None if value is None else format(value, spec)
    return {
        "models": row["models"], "n": row["n"], "method": row["method_label"],
        "seconds": fmt(row["seconds"], ".3f"), "vs_gr": fmt(row.get("seconds_vs_git_rebasin"), ".2f"),
        "nit": row["nit"], "sweeps": row.get("sweeps"), "laps": row.get("laps"),
        "lap_s": fmt(row.get("lap_seconds"), ".1f"), "other_s": fmt(row.get("other_seconds"), ".1f"),
        "converged": row["converged"],
        "objective": fmt(row["objective"], ".6g"), "obj_ratio": fmt(row.get("objective_vs_c2m3"), ".4f"),
        "obj_paper": fmt(row.get("objective_vs_paper"), ".5f"),
        "accuracy": fmt(row.get("accuracy"), ".2%"), "cycle_error": fmt(row["cycle_error"], ".3g"),
    }


COLUMNS = [("models", "models"), ("n", "n"), ("method", "method"), ("seconds", "wall s"),
           ("vs_gr", "wall / Git Re-Basin"), ("nit", "iterations (nit)"), ("sweeps", "refinement sweeps"),
           ("laps", "LAPs"), ("lap_s", "LAP s"), ("other_s", "other s (products, gathers)"),
           ("converged", "converged"), ("objective", "objective (Eq. 4)"), ("obj_ratio", "objective / C²M³"),
           ("obj_paper", "objective / paper's"), ("accuracy", "test accuracy"), ("cycle_error", "cycle error")]


def _mnist_accuracy(widths, device):
    """``accuracy(state_dicts, transforms)``: MNIST test accuracy of the mean of the aligned MLPs."""
    from fedmerge.data import load_dataset
    from fedmerge.training import evaluate
    test = load_dataset("mnist", train=False)

    def accuracy(state_dicts, transforms):
        spec = MLP((1, 28, 28), 10, widths=widths).permutation_spec()
        aligned = [fedmerge.apply_transform(sd, spec, t) for sd, t in zip(state_dicts, transforms)]
        merged = {k: torch.stack([a[k].float() for a in aligned]).mean(0) for k in aligned[0]}
        model = MLP((1, 28, 28), 10, widths=widths)
        model.load_state_dict({k: v.cpu() for k, v in merged.items()})
        return float(evaluate(model, test.images, test.labels, device="cpu")["accuracy"])
    return accuracy


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, argv, env = begin(MODULE, build_parser().parse_args, argv)
    device = torch.device(args.device)
    widths = tuple(args.widths)
    name = mlp_name(widths)
    notes = []

    rows: list[dict] = []
    warmup(sorted({'c2m3' if m in C2M3_VARIANTS else m for m in args.methods}), args.device)
    count = max(args.sizes)
    if args.models == "trained":
        mlps = trained_mlps(args.first_seed + count, epochs=args.epochs, cache_dir=args.cache_dir,
                            progress=args.progress, widths=widths)[args.first_seed:]
        seeds = f", seeds {args.first_seed}-{args.first_seed + count - 1}" if args.first_seed else ""
        label = f"MLP {name[4:]} (MNIST, {args.epochs} ep{seeds})"
    else:
        mlps = random_models(lambda: MLP((1, 28, 28), 10, widths=widths), count)
        label = f"MLP {name[4:]} (random init)"
        notes.append("MLPs are seeded random initialisations (--models random), not trained models.")
    mlps = [{k: v.to(device) for k, v in sd.items()} for sd in mlps]
    mlp_spec = MLP((1, 28, 28), 10, widths=widths).permutation_spec()
    acc = _mnist_accuracy(widths, device) if args.accuracy and args.models == "trained" else None
    rows += _bench_group(label, "mlp", mlps, mlp_spec, sorted(args.sizes), args, accuracy=acc)
    del mlps

    if args.resnet:
        make = lambda: ResNet20((3, 32, 32), 10, width=args.resnet_width, norm="layernorm")  # noqa: E731
        resnets = [{k: v.to(device) for k, v in sd.items()} for sd in random_models(make, args.resnet_count)]
        width = f"{args.resnet_width:g}×"
        rows += _bench_group(f"ResNet-20-{width} LN (random init)", "resnet20", resnets, make().permutation_spec(),
                             [args.resnet_count], args)
        notes.append(RESNET_NOTE)

    drop = set()
    if not ("c2m3" in args.methods and len(args.methods) > 1):
        drop.add("obj_ratio")
    if "c2m3-paper" not in args.methods:
        drop.add("obj_paper")
    if "git-rebasin" not in args.methods:
        drop.add("vs_gr")
    if acc is None:
        drop.add("accuracy")
    columns = [c for c in COLUMNS if c[0] not in drop]
    table = markdown_table([_display(r) for r in rows], columns)
    print()
    print(format_environment(env))
    print()
    print(table)
    result = {"benchmark": "matching_speed", "environment": env, "config": vars(args), "notes": notes,
              "results": rows, "table": table}
    return finish(result, notes, args.out)


if __name__ == "__main__":
    main()
