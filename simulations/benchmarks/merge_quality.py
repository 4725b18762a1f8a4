"""Benchmark (b): how good is the merged model?

Trains 20 MLPs 784-256-512-512-256-10 on MNIST from seeds 0..19 (cached, see
:func:`simulations.benchmarks.models.trained_mlps`), reports the endpoints' test accuracy
(mean/min/max), then for n in ``--sizes`` (default 5, 20) merges the first n models with the
plain mean (``align=None``, FedAvg's aggregation), MergeMany, C²M³ and Git Re-Basin to model 0,
and reports the merged model's MNIST test accuracy and loss and the merge's wall seconds, next to
the C²M³ paper's reference numbers where they exist.

Run from the repository root::

    python -m simulations.benchmarks.merge_quality --threads 1 --out merge_quality.json
    python simulations/benchmarks/merge_quality.py --sizes 5,20 --epochs 3

It prints the environment (exact command, torch version, threads, CPU) and markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make `simulations` importable from the repo root
    _root = str(Path(__file__).resolve().parents[2])
    if _root not in sys.path:
        sys.path.insert(0, _root)

import fedmerge
from fedmerge.data import load_dataset
from fedmerge.models import MLP
from fedmerge.training import evaluate
from simulations.benchmarks.cli import (add_common_arguments, parse_choice_list, parse_int_list,
                                        positive_int, torch_device)
from simulations.benchmarks.environment import begin, format_environment
from simulations.benchmarks.models import PAPER_WIDTHS, method_call, mlp_name, trained_mlps, warmup
from simulations.benchmarks.output import finish, markdown_table

MODULE = "simulations.benchmarks.merge_quality"
METHODS = ("mean", "mergemany", "c2m3", "git-rebasin", "c2m3+refine")
DEFAULT_METHODS = ("mean", "mergemany", "c2m3", "git-rebasin")
METHOD_LABELS = {"mean": "mean (no alignment)", "mergemany": "MergeMany", "c2m3": "C²M³",
                 "c2m3+refine": "C²M³ + block-coordinate refinement",
                 "git-rebasin": "Git Re-Basin (to model 0)"}

#: Reference numbers of the C²M³ paper (Crisostomi et al., NeurIPS 2024) for MLPs on MNIST,
#: keyed by (number of models, method).  Only shown for the paper's architecture on full MNIST.
PAPER_REFERENCE = {
    (20, "c2m3"): "≥ 98%",
    (20, "mean"): "~10%",
}
PAPER_SOURCE = ("C²M³ paper (Crisostomi et al., NeurIPS 2024), 20 MLPs on MNIST: C²M³ merge stays ≥ 98% test "
                "accuracy, the naive mean collapses to ~10%; its training recipe may differ from this one.")

SMOKE = {"count": 2, "sizes": [2], "widths": [32], "train_size": 500, "test_size": 1000, "epochs": 1}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", usage="%(prog)s [options]",
        description="Benchmark (b): test accuracy/loss of MLPs merged by mean, MergeMany, C²M³, Git Re-Basin.")
    p.add_argument("--sizes", type=lambda s: parse_int_list(s, minimum=2), default=[5, 20],
                   help="numbers of models to merge (the first n), comma-separated (default: 5,20)")
    p.add_argument("--methods", type=parse_choice_list(METHODS), default=list(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--epochs", type=positive_int, default=3, help="training epochs per model (default: 3)")
    p.add_argument("--count", type=positive_int, default=None,
                   help="how many endpoints to train and report (default: max(20, largest size))")
    p.add_argument("--widths", type=lambda s: parse_int_list(s, minimum=1), default=list(PAPER_WIDTHS),
                   help="MLP hidden widths (default: 256,512,512,256, the paper's)")
    p.add_argument("--train-size", type=positive_int, default=None,
                   help="train on the first N MNIST training images only (default: all 60000)")
    p.add_argument("--test-size", type=positive_int, default=None,
                   help="evaluate on the first N MNIST test images only (default: all 10000)")
    p.add_argument("--max-iter", type=positive_int, default=None,
                   help="iteration cap passed to every matcher as max_iter (default: each method's own)")
    p.add_argument("--device", type=torch_device, default=None,
                   help="device for training and evaluation (default: cuda if available, else cpu); "
                        "merging always runs on the CPU")
    add_common_arguments(p)
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # 2 tiny MLPs, 500 images, 1 epoch
    return p


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.count is None:
        args.count = max(20, max(args.sizes))
    if args.count < max(args.sizes):
        parser.error(f"--count {args.count} is smaller than the largest --sizes value {max(args.sizes)}")
    return args


def _evaluate(state_dict, widths, test, device) -> dict[str, float]:
    model = MLP(test.input_shape, test.num_classes, widths=widths)
    model.load_state_dict(state_dict)
    stats = evaluate(model, test.images, test.labels, device=device)
    return {"accuracy": float(stats["accuracy"]), "loss": float(stats["loss"])}


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, argv, env = begin(MODULE, _parse, argv)
    widths = tuple(args.widths)
    name = mlp_name(widths)
    paper_setting = widths == PAPER_WIDTHS and args.train_size is None and args.test_size is None
    notes = []
    if not paper_setting:
        notes.append("Not the paper's setting (architecture or data subset differ): no paper reference numbers shown.")

    test = load_dataset("mnist", train=False)
    if args.test_size is not None:
        from fedmerge.data import LoadedDataset
        test = LoadedDataset(test.images[:args.test_size], test.labels[:args.test_size], name=test.name,
                             num_classes=test.num_classes, train=False)

    models = trained_mlps(args.count, epochs=args.epochs, cache_dir=args.cache_dir, progress=args.progress,
                          widths=widths, train_size=args.train_size, device=args.device)
    endpoints = [_evaluate(sd, widths, test, args.device) for sd in models]
    accs = [e["accuracy"] for e in endpoints]
    endpoint_summary = {"count": len(endpoints), "accuracy": _summary(accs),
                        "loss": _summary([e["loss"] for e in endpoints])}

    spec = MLP(test.input_shape, test.num_classes, widths=widths).permutation_spec()
    warmup(args.methods)
    options = {} if args.max_iter is None else {"max_iter": args.max_iter}
    rows: list[dict] = []
    for n in sorted(args.sizes):
        first = endpoints[:n]
        rows.append({"n": n, "method": "endpoints", "method_label": f"endpoints (mean of the {n} models)",
                     "kind": "endpoints", "accuracy": statistics.fmean(e["accuracy"] for e in first),
                     "loss": statistics.fmean(e["loss"] for e in first), "seconds": None,
                     "paper": None})
        for method in args.methods:
            align, variant = (None, {}) if method == "mean" else method_call(method)
            extra = {} if align is None else {**options, **variant, "progress": args.progress}
            start = time.perf_counter()
            merged, info = fedmerge.merge(models[:n], align=align, spec=spec, full_output=True, **extra)
            seconds = time.perf_counter() - start
            quality = _evaluate(merged, widths, test, args.device)
            row = {"n": n, "method": method, "method_label": METHOD_LABELS[method], "kind": "merge", **quality,
                   "seconds": seconds, "match_seconds": float(info.seconds), "nit": int(info.nit),
                   "converged": bool(info.converged), "objective": float(info.objective),
                   "cycle_error": float(info.cycle_error),
                   "paper": PAPER_REFERENCE.get((n, method)) if paper_setting else None}
            rows.append(row)
            print(f"  n={n}, {METHOD_LABELS[method]}: accuracy {quality['accuracy']:.2%}, loss {quality['loss']:.4f}, "
                  f"{seconds:.2f} s", file=sys.stderr, flush=True)

    endpoint_table = markdown_table(
        [{"models": f"{name[4:]} (MNIST, {args.epochs} ep)", "count": len(endpoints),
          "mean": f"{endpoint_summary['accuracy']['mean']:.2%}", "min": f"{endpoint_summary['accuracy']['min']:.2%}",
          "max": f"{endpoint_summary['accuracy']['max']:.2%}",
          "loss": f"{endpoint_summary['loss']['mean']:.4f}"}],
        [("models", "endpoint MLPs"), ("count", "count"), ("mean", "test acc mean"), ("min", "min"), ("max", "max"),
         ("loss", "test loss mean")])
    columns = [("n", "n"), ("method", "method"), ("accuracy", "test accuracy"), ("loss", "test loss"),
               ("seconds", "merge s")]
    if paper_setting:
        columns.append(("paper", "paper"))
    table = markdown_table(
        [{"n": r["n"], "method": r["method_label"], "accuracy": f"{r['accuracy']:.2%}", "loss": f"{r['loss']:.4f}",
          "seconds": None if r["seconds"] is None else f"{r['seconds']:.2f}", "paper": r["paper"]} for r in rows],
        columns)

    print()
    print(format_environment(env))
    print()
    print(endpoint_table)
    print()
    print(table)
    if paper_setting:
        notes.append(f"paper column: {PAPER_SOURCE}")
    result = {"benchmark": "merge_quality", "environment": env, "config": vars(args), "notes": notes,
              "endpoints": {**endpoint_summary, "per_model": endpoints}, "results": rows,
              "tables": {"endpoints": endpoint_table, "merges": table}}
    return finish(result, notes, args.out)


if __name__ == "__main__":
    main()
