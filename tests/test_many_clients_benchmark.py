"""Smoke tests of simulations/benchmarks/many_clients.py (hundreds of clients, a few sampled per round).

The fast tests check the fraction that makes Flower sample exactly ``--sample`` clients and the
``/proc`` sampling; the ``slow`` one runs the benchmark end to end on Ray with tiny settings (6
registered clients, 2 sampled, 1 round, a 16-16 MLP on an MNIST subset).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `simulations` is not installed: import it from the repository root
    sys.path.insert(0, str(ROOT))

from simulations.benchmarks import many_clients  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the benchmark reads /proc")


@pytest.mark.parametrize("sample", [1, 2, 5, 20, 50])
def test_fraction_samples_exactly_that_many_clients(sample):
    for n in range(sample + 1, 5001):
        fraction = many_clients.fraction_for(sample, n)
        assert 0 < fraction < 1 and int(fraction * n) == sample  # Flower's FedAvg: int(fraction * nodes)
    assert many_clients.fraction_for(sample, sample) == 1.0


def test_sampler_sees_the_process_tree_and_the_rounds(tmp_path):
    results = tmp_path / "results.json"
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(30)"])
    try:
        sampler = many_clients.Sampler(child.pid, results, interval=0.05)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until the child has its 64 MiB
            sampler.sample()
            peak = sampler.peak.get(child.pid)
            if peak and peak["hwm"] > 64:
                break
            time.sleep(0.05)
        assert peak["kind"] == "server" and peak["hwm"] > 64 and peak["pss"] > 0
        assert sampler.rounds == []  # no results.json yet: no round snapshot
        results.write_text(json.dumps({"initial": {"test_accuracy": 0.1}, "rounds": []}))
        sampler.sample()
        results.write_text(json.dumps({"initial": {"test_accuracy": 0.1}, "rounds": [{"test_accuracy": 0.5}]}))
        sampler.sample()
        sampler.sample()  # no new round: no new snapshot
        assert [r["round"] for r in sampler.rounds] == [0, 1]
        assert all(r["server_rss_mib"] > 64 for r in sampler.rounds)
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_many_clients_end_to_end(tmp_path, capsys):
    out = tmp_path / "many.json"
    result = many_clients.main([
        "--clients", "6", "--sample", "2", "--eval-sample", "1", "--rounds", "1", "--widths", "16,16",
        "--max-train-samples", "600", "--max-test-samples", "200", "--interval", "0.2",
        "--runs-dir", str(tmp_path / "runs"), "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["complete"] and data["benchmark"] == "many_clients"
    assert data["environment"]["command"].startswith("python -m simulations.benchmarks.many_clients")
    (run,) = result["runs"]
    assert run["num_clients"] == 6 and run["train_replies"] == [2] and run["evaluate_replies"] == [1]
    assert "--fraction 0.4166" in run["command"] and "--clients 6" in run["command"]
    assert run["server_peak_rss_mib"] > 100 and len(run["round_seconds"]) == 1
    assert run["worker_peak_rss_mib"] and all(x > 50 for x in run["worker_peak_rss_mib"])
    assert set(run["worker_names"]) == {"ray::ClientAppActor"}
    assert [r["round"] for r in run["per_round"]] == [1] and run["per_round"][0]["server_rss_mib"] > 100
    assert (tmp_path / "runs" / "c2m3-6" / "results.json").is_file()
    printed = capsys.readouterr().out
    assert "| strategy | registered" in printed and "server peak RSS MiB" in printed
