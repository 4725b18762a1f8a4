"""Compare strategies (and settings) side by side: one ``simulations/run.py`` run per combination.

Example (from the repository root)::

    python simulations/compare.py --clients 20
    python simulations/compare.py --strategies fedavg c2m3 --inits shared independent \\
        --partitions iid dirichlet --out runs/compare -- --rounds 5 --alpha 0.5

Every combination of ``--strategies`` x ``--inits`` x ``--partitions`` runs as its own
``simulations/run.py`` process (a fresh Ray each time, so one run cannot disturb the next) with the
same other flags (everything after ``--`` is passed through), in ``OUT/<strategy>-<init>-<partition>``.
A combination whose ``results.json`` is already complete with the same command is not run again,
so an interrupted comparison resumes where it stopped.  A run that fails does not stop the others:
its error is printed when it fails, the table is built from the runs that completed, and the
command then exits with status 1, naming every failed run (run it again to retry just those).  The
table (markdown) is printed and written to ``OUT/comparison.md``, the numbers to
``OUT/comparison.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedmerge.partition import PARTITIONS  # noqa: E402
from simulations.config import DEFAULTS, INIT_MODES  # noqa: E402
from strategies import STRATEGIES  # noqa: E402

__all__ = ["main", "markdown_table"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python simulations/compare.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--strategies", nargs="+", choices=sorted(STRATEGIES),
                   default=["fedavg", "git-rebasin", "mergemany", "c2m3"])
    p.add_argument("--inits", nargs="+", choices=INIT_MODES, default=["shared", "independent"])
    p.add_argument("--partitions", nargs="+", choices=PARTITIONS, default=["iid", "dirichlet"])
    p.add_argument("--clients", type=int, default=DEFAULTS["num-clients"])
    p.add_argument("--out", default=str(ROOT / "runs" / "compare"), help="directory of all runs and the table")
    p.add_argument("run_args", nargs=argparse.REMAINDER,
                   help="after --: flags passed to every simulations/run.py call (e.g. -- --rounds 5)")
    return p


def _run_args(extra: Sequence[str]) -> list[str]:
    extra = list(extra)
    if extra and extra[0] == "--":
        extra = extra[1:]
    for flag in ("--strategy", "--init", "--partition", "--clients", "--out"):
        if flag in extra:
            raise SystemExit(f"python simulations/compare.py: error: {flag} is set by compare.py itself")
    return extra


def _row(name: str, results: dict[str, Any]) -> dict[str, Any]:
    rounds = results["rounds"]
    cfg = results["config"]
    return {
        "run": name, "strategy": cfg["strategy"], "init": cfg["init"], "partition": cfg["partition"],
        "round1_accuracy": rounds[0]["test_accuracy"], "final_accuracy": results["final"]["test_accuracy"],
        "rounds": len(rounds),
        "mean_aggregation_seconds": sum(r.get("aggregation_seconds", 0.0) for r in rounds) / len(rounds),
        "wall_seconds": results["final"]["wall_seconds"],
        "left_out": len(results.get("failures", [])),
    }


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("| strategy | init | partition | acc. round 1 | acc. last round | rounds | mean aggregation s "
              "| wall s | left out |")
    lines = [header, "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['init']} | {r['partition']} | {r['round1_accuracy']:.4f} | "
                     f"{r['final_accuracy']:.4f} | {r['rounds']} | {r['mean_aggregation_seconds']:.2f} | "
                     f"{r['wall_seconds']:.0f} | {r['left_out']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = _parser().parse_args(argv)
    extra = _run_args(args.run_args)
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    combos = list(itertools.product(args.inits, args.partitions, args.strategies))
    rows, failed = [], []
    for k, (init, part, strategy) in enumerate(combos, 1):
        name = f"{strategy}-{init}-{part}"
        run_dir = out / name
        cmd = [sys.executable, str(ROOT / "simulations" / "run.py"), "--strategy", strategy, "--init", init,
               "--partition", part, "--clients", str(args.clients), "--out", str(run_dir), "--no-progress", *extra]
        command = "python simulations/run.py " + shlex.join(cmd[2:])
        results_path = run_dir / "results.json"
        done = results_path.is_file() and json.loads(results_path.read_text()).get("complete") and \
            (run_dir / "command.txt").is_file() and (run_dir / "command.txt").read_text().strip() == command
        if not done:
            print(f"[{k}/{len(combos)}] {command}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"    run {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr,
                      flush=True)
                failed.append(name)
                continue
            (run_dir / "command.txt").write_text(command + "\n")
            print(f"    done in {time.perf_counter() - t0:.0f} s", flush=True)
        else:
            print(f"[{k}/{len(combos)}] {name}: complete, not run again", flush=True)
        rows.append(_row(name, json.loads(results_path.read_text())))
        (out / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = markdown_table(rows)
    (out / "comparison.md").write_text(table + "\n")
    print()
    print(table)
    if failed:
        raise SystemExit(f"{len(failed)} of {len(combos)} runs failed: {', '.join(failed)} (their errors are above; "
                         "run the same command again to retry them, completed runs are kept)")
    return rows


if __name__ == "__main__":
    main()
