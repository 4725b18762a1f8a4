"""Benchmark (a), issue 11 items 3 and 4: how C²M³'s cost grows with clients and with model size.

Every measurement runs in its own subprocess, so that its peak memory is its own: the tables give
the resident set size after the models are built (``RSS models``) and the process's peak
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, ``peak RSS``); their difference is what matching
added on top of the input models.  ``|θ|`` is the number of floating-point entries a group acts on,
so ``n·|θ|·4`` bytes is one float32 copy of all the models.

``mlp``: 5, 20, 50, 100 MLPs 784-256-512-512-256-10, *random initialisations* (the cost of an
iteration does not depend on training; the iteration count does, so end-to-end rows with trained
models are benchmark (a)'s other tables).  Per-iteration seconds are the median wall time between
two Frank-Wolfe callbacks; ``--max-iter`` fixes the iteration count so that rows compare::

    python -m simulations.benchmarks.c2m3_scaling mlp --sizes 5,20,50,100 --methods c2m3-paper,c2m3 \\
        --max-iter 10 --refine 5 --threads 1

``torchvision``: 3 and 5 copies of torchvision's ``vgg11_bn`` / ``resnet18`` (10 classes, CIFAR-
sized 3x32x32 inputs, spec from :func:`fedmerge.spec_for`), either *permuted* copies of one model
(model 0 the original, the others hidden random permutations of it, randomised BatchNorm
statistics) or *independent* initialisations (seeds 0, 1, ...); Git Re-Basin and C²M³ (default) on
the same models in the same run, with the ratio of their wall times::

    python -m simulations.benchmarks.c2m3_scaling torchvision --archs vgg11_bn,resnet18 --counts 3,5 \\
        --kinds permuted,independent --threads 1

On permuted copies the table also says whether the merge is the original model (largest
relative difference of the merged model's parameters from the original's).  Wall seconds are the
aligner's own (``MatchResult.seconds``).  Methods: ``git-rebasin``, ``c2m3`` (default),
``c2m3-paper`` (``paper=True``), ``c2m3-confirm`` (``confirm=True``: a certified start is
confirmed by one Frank-Wolfe iteration) and ``c2m3-no-fw`` (``max_iter=0``: the
sequential match, refined, without Frank-Wolfe).

``--device cuda`` moves the models to the GPU before matching (the products run there, the LAPs stay
on the CPU threads) and adds the GPU's peak memory above the models
(``torch.cuda.max_memory_allocated``), in float32 copies of the n models, to the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make `simulations` importable from the repo root
    _root = str(Path(__file__).resolve().parents[2])
    if _root not in sys.path:
        sys.path.insert(0, _root)

MODULE = "simulations.benchmarks.c2m3_scaling"
VARIANTS = {"c2m3": ("c2m3", {}), "c2m3-paper": ("c2m3", {"paper": True}), "git-rebasin": ("git-rebasin", {}),
            "c2m3-confirm": ("c2m3", {"confirm": True}), "c2m3-no-fw": ("c2m3", {"max_iter": 0})}
LABELS = {"c2m3": "C²M³ (default)", "c2m3-paper": "C²M³, paper's Algorithm 1",
          "git-rebasin": "Git Re-Basin (to model 0)", "c2m3-confirm": "C²M³ (default, confirm=True)",
          "c2m3-no-fw": "C²M³ (default, max_iter=0)"}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


# ------------------------------------------------------------------ models

def _mlps(n: int, widths):
    from fedmerge.models import MLP
    from simulations.benchmarks.models import random_models
    make = lambda: MLP((1, 28, 28), 10, widths=widths)  # noqa: E731
    return random_models(make, n), make().permutation_spec(), None


def _torchvision(arch: str, n: int, kind: str):
    import torch
    import torchvision

    import fedmerge
    make = lambda: getattr(torchvision.models, arch)(num_classes=10)  # noqa: E731

    def built(seed):
        torch.manual_seed(seed)
        model = make()
        model.train()  # non-trivial BatchNorm running statistics
        with torch.no_grad():
            model(torch.randn(4, 3, 32, 32) * 2 + 0.5)
        return model.eval()

    model = built(0)
    spec = fedmerge.spec_for(model)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if kind == "permuted":
        sds = [base] + [fedmerge.apply_permutation(base, spec, fedmerge.random_permutation(spec, 10 + i))
                        for i in range(n - 1)]
        return sds, spec, base
    del model
    return [base] + [{k: v.detach().clone() for k, v in built(i).state_dict().items()} for i in range(1, n)], spec, None


# ------------------------------------------------------------------ one measurement (in a subprocess)

def worker(config: dict) -> dict:
    import torch

    import fedmerge
    from fedmerge import assignment
    torch.set_num_threads(config["threads"])
    if config["family"] == "mlp":
        sds, spec, base = _mlps(config["n"], tuple(config["widths"]))
    else:
        sds, spec, base = _torchvision(config["arch"], config["n"], config["kind"])
    theta = sum(sds[0][k].numel() for k in spec.permuted_keys if torch.is_floating_point(sds[0][k]))
    device = torch.device(config.get("device", "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        sds = [{k: v.to(device) for k, v in sd.items()} for sd in sds]
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        gpu_models = torch.cuda.memory_allocated(device)
    rss_models = _current_rss_mib()
    name, extra = VARIANTS[config["method"]]
    options = dict(extra)
    if config.get("max_iter") is not None and "max_iter" not in extra:  # c2m3-no-fw keeps its 0
        options["max_iter"] = config["max_iter"]
    if config.get("refine") is not None and name == "c2m3" and not options.get("paper"):  # a C²M³ option only
        options["refine"] = config["refine"]
    stamps: list[tuple[str, float]] = []
    progress = config.get("progress", False)

    def watch(info):
        stamps.append((str(info.get("phase")), time.perf_counter()))
        if progress:
            print(f"    [{config['method']}] {info.get('phase')} {info.get('nit')}/{info.get('max_iter')} "
                  f"at {stamps[-1][1] - start:.1f} s", file=sys.stderr, flush=True)

    assignment.reset_stats()
    start = time.perf_counter()
    res = fedmerge.match(sds, spec, method=name, callback=watch, **options)
    seconds = float(res.seconds)  # the aligner's own time (match() then also computes diagnostics)
    stats = assignment.reset_stats()
    fw = [t for phase, t in stamps if phase == "frank-wolfe"]
    per_iter = statistics.median(b - a for a, b in zip(fw, fw[1:])) if len(fw) > 2 else None
    out = {**config, "theta": theta, "seconds": seconds, "per_iteration_s": per_iter, "nit": int(res.nit),
           "sweeps": res.get("sweeps"), "laps": stats["calls"], "lap_seconds": stats["seconds"],
           "objective": float(res.objective), "converged": bool(res.converged), "message": str(res.message),
           "rss_models_mib": rss_models, "peak_rss_mib": _rss_mib(), "cycle_error": float(res.cycle_error)}
    if cuda:  # the GPU's peak above the models, in float32 copies of the n models
        out["gpu_peak_extra"] = (torch.cuda.max_memory_allocated(device) - gpu_models) / (config["n"] * theta * 4)
    if base is not None:  # permuted copies: is the merge the original model?
        merged = fedmerge.merge(sds, align=lambda s, sp, callback=None: {"transforms": res.transforms}, spec=spec)
        out["merge_rel_error"] = max(float((merged[k].float().cpu() - base[k].float()).abs().max()
                                           / max(float(base[k].float().abs().max()), 1e-30))
                                     for k in base if torch.is_floating_point(base[k]))
    return out


def _run(config: dict) -> dict:
    cmd = [sys.executable, "-m", MODULE, "worker", json.dumps(config)]
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env,
                          cwd=str(Path(__file__).resolve().parents[2]))
    if proc.returncode != 0:
        return {**config, "error": f"worker exited with {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ tables

def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def _table(rows: Sequence[dict], family: str) -> str:
    from simulations.benchmarks.output import markdown_table
    disp = []
    for r in rows:
        if "error" in r:
            disp.append({"what": r.get("arch", "MLP"), "n": r["n"], "method": LABELS[r["method"]],
                         "seconds": r["error"]})
            continue
        one_copy = r["n"] * r["theta"] * 4 / 2**20
        d = {"what": f"{r['arch']} {r['kind']}" if family == "torchvision" else "MLP (random init)",
             "n": r["n"], "method": LABELS[r["method"]], "seconds": _fmt(r["seconds"], ".2f"),
             "vs": _fmt(r.get("vs_ref"), ".2f"), "per_iter": _fmt(r["per_iteration_s"], ".3f"),
             "nit": r["nit"], "sweeps": r["sweeps"], "laps": r["laps"], "lap_s": _fmt(r["lap_seconds"], ".1f"),
             "objective": _fmt(r["objective"], ".6g"), "models_mib": _fmt(r["rss_models_mib"], ".0f"),
             "peak_mib": _fmt(r["peak_rss_mib"], ".0f"),
             "extra": _fmt((r["peak_rss_mib"] - r["rss_models_mib"]) / one_copy, ".1f")}
        if "merge_rel_error" in r:
            d["merge_err"] = _fmt(r["merge_rel_error"], ".1e")
        if "gpu_peak_extra" in r:
            d["gpu_extra"] = _fmt(r["gpu_peak_extra"], ".1f")
        disp.append(d)
    cols = [("what", "models"), ("n", "n"), ("method", "method"), ("seconds", "wall s"),
            ("vs", "wall / reference" if family == "mlp" else "wall / Git Re-Basin"),
            ("per_iter", "s per FW iteration"), ("nit", "FW iterations"), ("sweeps", "refinement sweeps"),
            ("laps", "LAPs"), ("lap_s", "LAP s"), ("objective", "objective (Eq. 4)"), ("models_mib", "RSS models MiB"),
            ("peak_mib", "peak RSS MiB"), ("extra", "(peak − models) / (n·|θ|·4 B)")]
    if any("merge_err" in d for d in disp):
        cols.append(("merge_err", "merged vs original (rel.)"))
    if any("gpu_extra" in d for d in disp):
        cols.append(("gpu_extra", "GPU peak above models / (n·|θ|·4 B)"))
    return markdown_table(disp, cols)


def build_parser() -> argparse.ArgumentParser:
    from simulations.benchmarks.cli import parse_int_list, positive_int, torch_device
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="family", required=True)
    m = sub.add_parser("mlp", help="cost against the number of clients (random-init MLPs)")
    m.add_argument("--sizes", type=lambda s: parse_int_list(s, minimum=2), default=[5, 20, 50, 100])
    m.add_argument("--widths", type=lambda s: parse_int_list(s, minimum=1), default=[256, 512, 512, 256])
    m.add_argument("--methods", default="c2m3-paper,c2m3",
                   help="comma-separated subset of " + ",".join(VARIANTS))
    m.add_argument("--max-iter", type=int, default=10,
                   help="Frank-Wolfe iterations (default 10; 0 = each method's own default, i.e. end to end)")
    m.add_argument("--refine", type=int, default=None,
                   help="refinement sweeps of the default C²M³ (default: to a fixed point; a number fixes the work)")
    t = sub.add_parser("torchvision", help="vgg11_bn / resnet18, permuted or independent copies")
    t.add_argument("--archs", default="vgg11_bn,resnet18")
    t.add_argument("--counts", type=lambda s: parse_int_list(s, minimum=2), default=[3, 5])
    t.add_argument("--kinds", default="permuted,independent")
    t.add_argument("--methods", default="git-rebasin,c2m3",
                   help="comma-separated subset of " + ",".join(VARIANTS) + " (default: git-rebasin,c2m3)")
    t.add_argument("--max-iter", type=positive_int, default=None, help="C²M³'s Frank-Wolfe cap (default: its own)")
    for q in (m, t):
        q.add_argument("--threads", type=positive_int, default=1, help="torch threads in each worker (default 1)")
        q.add_argument("--device", type=torch_device, default="cpu",
                       help="where the models are matched: cpu (default) or a CUDA device (cuda, cuda:1)")
        q.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                       help="print each iteration's callback to stderr (default: on)")
        q.add_argument("--out", default=None, help="write the rows as JSON to this file")
    w = sub.add_parser("worker", help=argparse.SUPPRESS)
    w.add_argument("config")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.family == "worker":
        print(json.dumps(worker(json.loads(args.config))))
        return {}
    import torch
    kind = torch.device(args.device).type
    if kind not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: give cpu or a CUDA device (cuda, cuda:1)")
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    from simulations.benchmarks.cli import ensure_stdout_utf8
    from simulations.benchmarks.environment import environment, format_environment
    from simulations.benchmarks.output import write_json
    ensure_stdout_utf8()
    env = environment(MODULE, argv)
    env["threads"] = args.threads
    methods = [s for s in args.methods.split(",") if s]
    rows: list[dict] = []
    common = {"family": args.family, "threads": args.threads, "progress": args.progress, "device": args.device}
    if args.family == "mlp":
        configs = [[{**common, "n": n, "widths": args.widths, "method": meth,
                     "max_iter": args.max_iter or None, "refine": args.refine} for meth in methods] for n in args.sizes]
    else:
        configs = [[{**common, "arch": a, "n": n, "kind": k, "method": meth, "max_iter": args.max_iter}
                    for meth in methods]
                   for a in args.archs.split(",") for k in args.kinds.split(",") for n in args.counts]
    for group in configs:
        done = []
        for config in group:
            r = _run(config)
            print(f"  {json.dumps({k: v for k, v in r.items() if k not in ('message', 'progress')})}",
                  file=sys.stderr, flush=True)
            done.append(r)
        if args.family == "torchvision":
            ref = next((r["seconds"] for r in done if r["method"] == "git-rebasin" and "error" not in r), None)
            for r in done:
                if ref and "error" not in r:
                    r["vs_ref"] = r["seconds"] / ref
        rows += done
    if args.family == "mlp":  # time of each method relative to its own run on the second-smallest size (20)
        for meth in methods:
            mine = [r for r in rows if r["method"] == meth and "error" not in r]
            ref = next((r for r in mine if r["n"] == 20), mine[0] if mine else None)
            for r in mine:
                r["vs_ref"] = r["seconds"] / ref["seconds"]
    table = _table(rows, args.family)
    print()
    print(format_environment(env))
    print()
    print(table)
    result = {"benchmark": "c2m3_scaling", "environment": env, "config": vars(args), "results": rows, "table": table}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
