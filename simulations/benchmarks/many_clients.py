"""Benchmark: hundreds of simulated clients with a fixed number sampled per round.

For each registered-client count N (``--clients 100,500``) and strategy, this runs the real
simulation, ``simulations/run.py`` (through its ``main``, in a subprocess of its own so that every
run starts a fresh Ray and its memory is its own), with ``--fraction`` chosen so that Flower's
FedAvg samples exactly ``--sample`` clients per round (it trains ``int(fraction * N)`` clients, at
least ``min_train_nodes``; the benchmark passes ``(sample + 0.5) / N``), and the same for
``--fraction-evaluate`` with ``--eval-sample``.  It measures:

* wall time per round: ``round_seconds`` of results.json (from one centralised evaluation of the
  global model to the next: sampling, messages, client training, aggregation, evaluation,
  checkpoint), the aggregation seconds, and the start-up before round 1 (the partition query to
  all N nodes and the initial evaluation);
* memory: the peak RSS of the server process (the run.py process: it holds the ServerApp, the
  strategy and Flower's in-memory SuperLink; ``getrusage`` in that process at the end), and, read
  from ``/proc`` every ``--interval`` seconds, the RSS of every process below it: Ray's worker
  processes (``ray::ClientAppActor``, ``ray::IDLE``: their peak is ``VmHWM``), Ray's own services
  (raylet, GCS...), and the proportional set size (PSS) of the whole tree, which counts shared
  pages (Ray's object store) once;
* memory per round: the same figures each time results.json shows a newly evaluated round, so a
  growth with the rounds shows as a rising column, and a growth with the registered clients as a
  difference between the N rows at the same sample size.

Linux only (``/proc``).  Run from the repository root::

    python -m simulations.benchmarks.many_clients --clients 100,500 --sample 20 --rounds 5 --out many_clients.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make `simulations` importable from the repo root
    _root = str(Path(__file__).resolve().parents[2])
    if _root not in sys.path:
        sys.path.insert(0, _root)

from simulations.benchmarks.cli import int_at_least, parse_choice_list, parse_int_list, positive_float, positive_int
from simulations.benchmarks.environment import environment, format_environment
from simulations.benchmarks.output import finish, markdown_table, write_json

MODULE = "simulations.benchmarks.many_clients"
ROOT = Path(__file__).resolve().parents[2]
STRATEGY_NAMES = ("fedavg", "git-rebasin", "mergemany", "c2m3")
CHILD_FLAG = "--_child-rusage"  # internal: run simulations/run.py's main here, then write getrusage
MIB = 1024 * 1024

__all__ = ["build_parser", "fraction_for", "main"]


def fraction_for(sample: int, num_clients: int) -> float:
    """A fraction for which Flower's ``int(fraction * num_clients)`` is exactly ``sample``."""
    if sample >= num_clients:
        return 1.0
    fraction = (sample + 0.5) / num_clients
    assert int(fraction * num_clients) == sample, (sample, num_clients, fraction)
    return fraction


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", usage="%(prog)s [options]",
                                description="Round time and memory with hundreds of registered clients, "
                                            "a fixed number sampled per round.")
    p.add_argument("--clients", type=parse_int_list, default=[100, 500],
                   help="registered client counts, comma-separated (default: 100,500)")
    p.add_argument("--sample", type=positive_int, default=20, help="clients trained per round (default: 20)")
    p.add_argument("--eval-sample", type=int_at_least(0), default=None,
                   help="clients evaluating per round (default: --sample; 0: no client evaluation)")
    p.add_argument("--rounds", type=positive_int, default=5)
    p.add_argument("--strategies", type=parse_choice_list(STRATEGY_NAMES), default=["c2m3"],
                   help="comma-separated, e.g. c2m3,fedavg (default: c2m3)")
    p.add_argument("--init", choices=("shared", "independent"), default="shared",
                   help="run.py's --init (default: shared, classic FL: with sampling, the clients first "
                        "sampled after round 1 start from the global model anyway)")
    p.add_argument("--model", default="mlp")
    p.add_argument("--widths", default=None, help="run.py's --widths (default: the paper's MLP)")
    p.add_argument("--max-iter", type=int_at_least(0), default=0, help="run.py's --max-iter (0: strategy default)")
    p.add_argument("--max-train-samples", type=int_at_least(0), default=0,
                   help="run.py's --max-train-samples (0: the whole training set)")
    p.add_argument("--max-test-samples", type=int_at_least(0), default=0,
                   help="run.py's --max-test-samples (0: the whole test set)")
    p.add_argument("--interval", type=positive_float, default=0.5,
                   help="seconds between /proc samples (PSS: every 4th sample and at each round's end)")
    p.add_argument("--runs-dir", default=None,
                   help="keep each run's output (results.json, run.log) under this directory "
                        "(default: a temporary directory, deleted)")
    p.add_argument("--timeout", type=positive_float, default=3600.0, help="seconds allowed per run")
    p.add_argument("--out", default=None, help="write all results as JSON to this file")
    return p


# --------------------------------------------------------------------------- /proc


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:  # the process ended, or is not ours
        return None


def _status_kib(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = _read(f"/proc/{name}/stat")
        if not stat:
            continue
        try:
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def _descendants(root: int) -> list[int]:
    kids, out, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        for child in kids.get(pid, []):
            out.append(child)
            todo.append(child)
    return out


def _cpu_seconds(pid: int) -> float:
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _kind(pid: int, server_pid: int) -> tuple[str, str]:
    if pid == server_pid:
        return "server", "run.py"
    raw = _read(f"/proc/{pid}/cmdline") or ""
    cmd = raw.replace("\0", " ").strip()
    if cmd.startswith(("ray::ClientAppActor", "ray::IDLE")):  # Ray workers: the client actors, idle ones
        return "worker", cmd.split()[0].split(".")[0]  # "ray::ClientAppActor.run" while it runs a method
    if cmd.startswith("ray::"):  # ray::DashboardAgent, ray::RuntimeEnvAgent
        return "ray-system", cmd.split()[0]
    name = (_read(f"/proc/{pid}/comm") or "?").strip()
    return "ray-system", name


def _snapshot(server_pid: int, *, pss: bool) -> dict[str, Any]:
    """RSS (and peak RSS, CPU seconds, optionally PSS) of the server process and all its descendants."""
    procs = []
    for pid in [server_pid, *_descendants(server_pid)]:
        status = _read(f"/proc/{pid}/status")
        if not status:
            continue
        kind, name = _kind(pid, server_pid)
        entry = {"pid": pid, "kind": kind, "name": name, "rss": _status_kib(status, "VmRSS") / 1024,
                 "hwm": _status_kib(status, "VmHWM") / 1024, "anon": _status_kib(status, "RssAnon") / 1024,
                 "shmem": _status_kib(status, "RssShmem") / 1024, "cpu_s": _cpu_seconds(pid)}
        if pss:
            rollup = _read(f"/proc/{pid}/smaps_rollup")
            entry["pss"] = _status_kib(rollup, "Pss") / 1024 if rollup else 0.0
        procs.append(entry)
    return {"t": time.perf_counter(), "procs": procs}


def _loadavg() -> float | None:
    text = _read("/proc/loadavg")
    return float(text.split()[0]) if text else None


class Sampler(threading.Thread):
    """Samples the process tree of ``server_pid`` and, at every newly evaluated round in
    ``results_path``, records a per-round snapshot."""

    def __init__(self, server_pid: int, results_path: Path, interval: float) -> None:
        super().__init__(daemon=True)
        self.server_pid, self.results_path, self.interval = server_pid, results_path, interval
        self.stop = threading.Event()
        self.peak: dict[int, dict[str, Any]] = {}  # pid -> what it is, its maxima (VmHWM, private, CPU)
        self.max_total_rss = self.max_total_pss = 0.0
        self.rounds: list[dict[str, Any]] = []
        self.loads: list[float] = []
        self._seen = -1
        self._count = 0
        self.cpu_seconds = 0.0  # this thread's own CPU time: the cost of measuring

    def _evaluated_rounds(self) -> int:
        text = _read(str(self.results_path))
        if not text:
            return -1
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return self._seen
        n = sum(1 for r in data.get("rounds", []) if r.get("test_accuracy") is not None)
        return n if n or data.get("initial", {}).get("test_accuracy") is not None else -1

    def sample(self) -> None:
        evaluated = self._evaluated_rounds()
        new_round = evaluated > self._seen
        self._count += 1
        # PSS (smaps_rollup walks the page tables: the costly read) every 4th sample and at round ends
        snap = _snapshot(self.server_pid, pss=new_round or self._count % 4 == 1)
        procs = snap["procs"]
        for p in procs:
            before = self.peak.get(p["pid"])
            if before is None:
                self.peak[p["pid"]] = {**p, "max_anon": p["anon"], "max_shmem": p["shmem"]}
                continue
            if p["kind"] == "worker" and (before["kind"] == "ray-system" or before["name"] == "ray::IDLE"):
                before["kind"], before["name"] = p["kind"], p["name"]  # an idle worker became an actor
            # an exiting process has lost its cmdline and memory: keep what it was and its maxima
            before["hwm"] = max(before["hwm"], p["hwm"])
            before["cpu_s"] = max(before["cpu_s"], p["cpu_s"])
            before["max_anon"] = max(before["max_anon"], p["anon"])  # the peak of private memory
            before["max_shmem"] = max(before["max_shmem"], p["shmem"])
        self.max_total_rss = max(self.max_total_rss, sum(p["rss"] for p in procs))
        if all("pss" in p for p in procs):
            self.max_total_pss = max(self.max_total_pss, sum(p["pss"] for p in procs))
        load = _loadavg()
        if load is not None:
            self.loads.append(load)
        if new_round:
            self._seen = evaluated
            server = next((p for p in procs if p["kind"] == "server"), None)
            workers = sorted((p for p in procs if p["kind"] == "worker" and p["name"] != "ray::IDLE"),
                             key=lambda p: p["pid"])
            self.rounds.append({
                "round": evaluated,
                "server_rss_mib": server["rss"] if server else None,
                "server_anon_mib": server["anon"] if server else None,
                "worker_rss_mib": [round(p["rss"], 1) for p in workers],
                "worker_anon_mib": [round(p["anon"], 1) for p in workers],
                "ray_system_rss_mib": sum(p["rss"] for p in procs if p["kind"] == "ray-system"),
                "total_pss_mib": sum(p.get("pss", 0.0) for p in procs),
            })

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a process vanishing mid-read must not end the sampling
                pass
            self.cpu_seconds = time.thread_time()
            self.stop.wait(self.interval)


# --------------------------------------------------------------------------- one run


def _child(argv: Sequence[str]) -> None:
    """``--_child-rusage PATH RUN_ARGS...``: run.py's main with RUN_ARGS, then its getrusage to PATH."""
    path, run_args = argv[0], list(argv[1:])
    from simulations import run
    t0 = time.perf_counter()
    run.main(run_args)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    Path(path).write_text(json.dumps({"ru_maxrss_mib": usage.ru_maxrss / 1024, "wall_s": time.perf_counter() - t0,
                                      "cpu_s": usage.ru_utime + usage.ru_stime}))


def run_args_for(args: argparse.Namespace, strategy: str, num_clients: int, out_dir: Path) -> list[str]:
    eval_sample = args.sample if args.eval_sample is None else args.eval_sample
    run_args = ["--strategy", strategy, "--clients", str(num_clients), "--rounds", str(args.rounds),
                "--fraction", repr(fraction_for(args.sample, num_clients)),
                "--fraction-evaluate", repr(fraction_for(eval_sample, num_clients) if eval_sample else 0.0),
                "--init", args.init, "--model", args.model, "--no-progress", "--out", str(out_dir)]
    if args.widths:
        run_args += ["--widths", args.widths]
    for flag, value in (("--max-train-samples", args.max_train_samples), ("--max-test-samples", args.max_test_samples)):
        if value:
            run_args += [flag, str(value)]
    if args.max_iter and strategy != "fedavg":
        run_args += ["--max-iter", str(args.max_iter)]
    return run_args


def _sum_by_name(procs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Peak RSS (MiB) of Ray's own processes, summed over processes of the same name."""
    out: dict[str, float] = {}
    for p in procs:
        out[p["name"]] = round(out.get(p["name"], 0.0) + p["hwm"], 1)
    return out


def measure(args: argparse.Namespace, strategy: str, num_clients: int, out_dir: Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    run_args = run_args_for(args, strategy, num_clients, out_dir)
    rusage_path = out_dir / "rusage.json"
    for stale in (rusage_path, out_dir / "results.json"):
        stale.unlink(missing_ok=True)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    cmd = [sys.executable, "-m", MODULE, CHILD_FLAG, str(rusage_path), *run_args]
    print(f"\n== {strategy}, {num_clients} registered clients: python simulations/run.py {shlex.join(run_args)}",
          flush=True)
    load_before = _loadavg()
    t0 = time.perf_counter()
    with open(out_dir / "run.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid, out_dir / "results.json", args.interval)
        sampler.start()
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        finally:
            sampler.stop.set()
            sampler.join()
    wall = time.perf_counter() - t0
    if rc != 0 or not rusage_path.is_file():
        tail = (out_dir / "run.log").read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"error: the run exited with {rc} after {wall:.0f} s; last lines of its log:\n"
                         + "\n".join(tail))
    usage = json.loads(rusage_path.read_text())
    results = json.loads((out_dir / "results.json").read_text())
    rounds = results["rounds"]
    per_round_mem = {r["round"]: r for r in sampler.rounds}
    workers = sorted((p for p in sampler.peak.values() if p["kind"] == "worker" and p["name"] != "ray::IDLE"),
                     key=lambda p: p["pid"])
    idle = [p for p in sampler.peak.values() if p["kind"] == "worker" and p["name"] == "ray::IDLE"]
    system = [p for p in sampler.peak.values() if p["kind"] == "ray-system"]
    round_s = [r["round_seconds"] for r in rounds]
    steady = round_s[1:] or round_s
    per_round = []
    for r in rounds:
        mem = per_round_mem.get(r["round"], {})
        per_round.append({"round": r["round"], "round_seconds": r["round_seconds"],
                          "aggregation_seconds": r.get("aggregation_seconds"),
                          "train_replies": r.get("train_replies"), "evaluate_replies": r.get("evaluate_replies"),
                          "test_accuracy": r.get("test_accuracy"), **{k: v for k, v in mem.items() if k != "round"}})
    after_init = per_round_mem.get(0, {})
    return {
        "strategy": strategy, "num_clients": num_clients, "sample": args.sample,
        "command": "python simulations/run.py " + shlex.join(run_args),
        "fraction": fraction_for(args.sample, num_clients),
        "train_replies": [r.get("train_replies") for r in rounds],
        "evaluate_replies": [r.get("evaluate_replies") for r in rounds],
        "setup_seconds": rounds[0]["elapsed_seconds"] - rounds[0]["round_seconds"],
        "round_seconds": round_s, "steady_round_seconds": sum(steady) / len(steady),
        "aggregation_seconds": [r.get("aggregation_seconds") for r in rounds],
        "run_wall_seconds": wall, "server_peak_rss_mib": usage["ru_maxrss_mib"], "server_cpu_seconds": usage["cpu_s"],
        "server_rss_after_initial_mib": after_init.get("server_rss_mib"),
        "worker_names": [p["name"] for p in workers],
        "worker_peak_rss_mib": [round(p["hwm"], 1) for p in workers],
        "worker_peak_anon_mib": [round(p["max_anon"], 1) for p in workers],
        "worker_peak_shmem_mib": [round(p["max_shmem"], 1) for p in workers],
        "server_peak_anon_mib": next((p["max_anon"] for p in sampler.peak.values() if p["kind"] == "server"), None),
        "worker_cpu_seconds": [round(p["cpu_s"], 1) for p in workers],
        "idle_worker_peak_rss_mib": [round(p["hwm"], 1) for p in idle],
        "ray_system_peak_rss_mib": _sum_by_name(system),
        "ray_system_cpu_seconds": round(sum(p["cpu_s"] for p in system), 1),
        "sampler_cpu_seconds": round(sampler.cpu_seconds, 1),
        "max_total_rss_mib": sampler.max_total_rss, "max_total_pss_mib": sampler.max_total_pss,
        "per_round": per_round,
        "final_test_accuracy": results["final"]["test_accuracy"],
        "loadavg_before": load_before,
        "loadavg_mean": sum(sampler.loads) / len(sampler.loads) if sampler.loads else None,
        "loadavg_max": max(sampler.loads) if sampler.loads else None,
    }


# --------------------------------------------------------------------------- tables


def _f(x: Any, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def summary_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        rows.append({
            "strategy": r["strategy"], "registered": r["num_clients"],
            "sampled": f"{r['sample']} (fraction {r['fraction']:.4g})",
            "start-up s": _f(r["setup_seconds"]), "round 1 s": _f(r["round_seconds"][0]),
            "later rounds s": _f(r["steady_round_seconds"]),
            "agg s (mean)": _f(sum(a or 0 for a in r["aggregation_seconds"]) / len(r["aggregation_seconds"]), ".2f"),
            "server peak RSS MiB": _f(r["server_peak_rss_mib"], ".0f"),
            "worker peak RSS MiB (private)": ", ".join(
                f"{x:.0f} ({a:.0f})" for x, a in zip(r["worker_peak_rss_mib"], r["worker_peak_anon_mib"])) or "—",
            "Ray services RSS MiB": _f(sum(r["ray_system_peak_rss_mib"].values()), ".0f"),
            "all processes peak PSS MiB": _f(r["max_total_pss_mib"], ".0f"),
            "CPU s server / workers / Ray": f"{r['server_cpu_seconds']:.0f} / "
                                            f"{' + '.join(f'{c:.0f}' for c in r['worker_cpu_seconds'])} / "
                                            f"{r['ray_system_cpu_seconds']:.0f}",
            "wall s": _f(r["run_wall_seconds"], ".0f"),
            "load avg before / during": f"{_f(r['loadavg_before'], '.1f')} / {_f(r['loadavg_mean'], '.1f')}",
        })
    return rows


SUMMARY_COLUMNS = ["strategy", "registered", "sampled", "start-up s", "round 1 s", "later rounds s", "agg s (mean)",
                   "server peak RSS MiB", "worker peak RSS MiB (private)", "Ray services RSS MiB",
                   "all processes peak PSS MiB", "CPU s server / workers / Ray", "wall s",
                   "load avg before / during"]


def round_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        for pr in r["per_round"]:
            rows.append({"strategy": r["strategy"], "registered": r["num_clients"], "round": pr["round"],
                         "clients (train/eval)": f"{pr['train_replies']}/{pr['evaluate_replies']}",
                         "round s": _f(pr["round_seconds"]), "agg s": _f(pr["aggregation_seconds"], ".2f"),
                         "server RSS MiB (private)": f"{_f(pr.get('server_rss_mib'), '.0f')} "
                                                     f"({_f(pr.get('server_anon_mib'), '.0f')})",
                         "worker RSS MiB (private)": ", ".join(
                             f"{x:.0f} ({a:.0f})" for x, a in zip(pr.get("worker_rss_mib", []),
                                                                  pr.get("worker_anon_mib", []))) or "—",
                         "all processes PSS MiB": _f(pr.get("total_pss_mib"), ".0f"),
                         "test acc": _f(pr["test_accuracy"], ".4f")})
    return rows


ROUND_COLUMNS = ["strategy", "registered", "round", "clients (train/eval)", "round s", "agg s",
                 "server RSS MiB (private)", "worker RSS MiB (private)", "all processes PSS MiB", "test acc"]


def _slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against their index (per round)."""
    n = len(values)
    mx, my = (n - 1) / 2, sum(values) / n
    den = sum((i - mx) ** 2 for i in range(n))
    return sum((i - mx) * (v - my) for i, v in enumerate(values)) / den if den else 0.0


def _trend(values: Sequence[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f} MiB, slope {_slope(values):+.1f} MiB/round"


def notes_for(runs: Sequence[dict[str, Any]]) -> list[str]:
    notes = []
    for r in runs:
        later = [pr for pr in r["per_round"][1:] if pr.get("server_anon_mib") is not None]  # round 1: first merge
        if len(later) >= 2:
            workers = list(zip(*(pr["worker_anon_mib"] for pr in later)))
            notes.append(f"{r['strategy']}, {r['num_clients']} clients, rounds 2-{later[-1]['round']}: server private "
                         f"{_trend([pr['server_anon_mib'] for pr in later])}; workers' private "
                         + "; ".join(_trend(w) for w in workers)
                         + f"; all processes PSS {_trend([pr['total_pss_mib'] for pr in later])}")
        notes.append(f"{r['strategy']}, {r['num_clients']} clients: server CPU {r['server_cpu_seconds']:.0f} s, "
                     f"workers' CPU {', '.join(f'{c:.0f}' for c in r['worker_cpu_seconds'])} s, Ray services' CPU "
                     f"{r['ray_system_cpu_seconds']:.0f} s, this benchmark's /proc sampling "
                     f"{r.get('sampler_cpu_seconds', 0):.0f} s, in {r['run_wall_seconds']:.0f} s of wall time")
    by_strategy: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_strategy.setdefault(r["strategy"], []).append(r)
    for strategy, rs in by_strategy.items():
        rs = sorted(rs, key=lambda r: r["num_clients"])
        lo, hi = rs[0], rs[-1]
        if hi["num_clients"] > lo["num_clients"] and lo["server_rss_after_initial_mib"] and hi["server_rss_after_initial_mib"]:
            d = hi["server_rss_after_initial_mib"] - lo["server_rss_after_initial_mib"]
            n = hi["num_clients"] - lo["num_clients"]
            notes.append(f"{strategy}: server RSS before round 1 (after the partition query and the initial "
                         f"evaluation) {lo['server_rss_after_initial_mib']:.0f} MiB with {lo['num_clients']} clients, "
                         f"{hi['server_rss_after_initial_mib']:.0f} MiB with {hi['num_clients']}: "
                         f"{d * 1024 / n:+.1f} KiB per registered client")
    return notes


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == CHILD_FLAG:
        _child(argv[1:])
        return {}
    args = build_parser().parse_args(argv)
    if sys.platform != "linux":
        raise SystemExit("error: this benchmark reads /proc (Linux only)")
    env = environment(MODULE, argv)
    print(format_environment(env))
    total_mem = _status_kib(_read("/proc/meminfo") or "", "MemTotal") / MIB
    print(f"memory: {total_mem:.1f} GiB; load average before: {_read('/proc/loadavg').strip()}")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.runs_dir).expanduser() if args.runs_dir else Path(tmp)
        for strategy in args.strategies:
            for n in args.clients:
                run = measure(args, strategy, n, base / f"{strategy}-{n}")
                runs.append(run)
                print(f"   round s {', '.join(f'{s:.1f}' for s in run['round_seconds'])}; server peak RSS "
                      f"{run['server_peak_rss_mib']:.0f} MiB; workers' peak RSS "
                      f"{', '.join(f'{x:.0f}' for x in run['worker_peak_rss_mib'])} MiB", flush=True)
                if args.out:  # keep what is measured so far
                    write_json(args.out, {"benchmark": "many_clients", "environment": env, "runs": runs,
                                          "complete": False})
    print()
    print(markdown_table(summary_rows(runs), SUMMARY_COLUMNS))
    print()
    print(markdown_table(round_rows(runs), ROUND_COLUMNS))
    notes = notes_for(runs)
    notes.append("start-up s: from the ServerApp's start to the initial evaluation's end (the partition query to "
                 "every registered node, then the global model on the test set); round s: results.json's "
                 "round_seconds; worker: a Ray actor process (ray::ClientAppActor); private: RssAnon (RSS less "
                 "file-backed pages and shared memory such as Ray's object store); PSS counts shared pages once")
    result = {"benchmark": "many_clients", "environment": env, "memory_gib": total_mem, "runs": runs,
              "complete": True, "notes": notes}
    return finish(result, notes, args.out)


if __name__ == "__main__":
    main()
