"""`flwr run .`: the same apps, declared in pyproject.toml, on Flower's managed local SuperLink.

The run uses a private FLWR_HOME and the SuperLink that `flwr run` starts (detached, it would
outlive the command) is stopped afterwards.  Runtime dependency installation is switched off:
the test runs in the environment that is already installed.  What pyproject.toml declares (the
apps, every configuration key and value) is checked without running anything in tests/test_config.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # starts a SuperLink and a Ray simulation

LOCAL_SUPERLINK_PORT = 39091  # flwr.cli.constant.LOCAL_SUPERLINK_HTTP_API_PORT


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop_superlink(home: Path) -> None:
    """Stop the detached SuperLink that `flwr run` started with FLWR_HOME=home (and wait for it)."""
    pattern = f"flower-superlink.*{home}"
    subprocess.run(["pkill", "-f", pattern], check=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode != 0:
            return
        time.sleep(0.5)
    subprocess.run(["pkill", "-9", "-f", pattern], check=False)


def test_flwr_run_runs_the_app_on_the_simulation_engine(tmp_path):
    flwr = Path(sys.executable).with_name("flwr")
    if not flwr.exists():
        pytest.skip("the flwr command is not installed next to this Python")
    if _port_in_use(LOCAL_SUPERLINK_PORT):
        pytest.skip(f"a SuperLink already listens on port {LOCAL_SUPERLINK_PORT}; not touching it")
    home, out = tmp_path / "flwr-home", tmp_path / "out"
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PATH=f"{flwr.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("FEDMERGE_SIM_CONFIG", None)
    cmd = [str(flwr), "run", ".", "--stream",
           "--federation-config", "num-supernodes=3 client-resources-num-cpus=1",
           "--run-config", f"num-clients=3 num-rounds=1 init='shared' max-train-samples=3000 "
                           f"max-test-samples=300 local-epochs=2 fraction-evaluate=0.67 out='{out}'"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    finally:
        _stop_superlink(home)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True and results["failures"] == []
    config = results["config"]
    assert config["progress"] is False  # pyproject.toml's value (the code's default is True)
    assert config["num-clients"] == 3 and config["num-rounds"] == 1 and config["init"] == "shared"  # overrides
    assert config["strategy"] == "c2m3" and config["out"] == str(out)
    (round1,) = results["rounds"]
    assert round1["clients_merged"] == 3 and round1["match_iterations"] >= 1 and round1["match_objective"] > 0
    assert results["final"]["test_accuracy"] > 0.5  # chance: 0.1
    # 2 of 3 clients evaluate: the partition query went through the deployment's SuperNodes too
    assert len(round1["evaluate_partitions"]) == 2 and round1["train_partitions"] == [0, 1, 2]
    logs = proc.stdout + proc.stderr  # --stream carries the ServerApp's log
    assert "aggregate_train" in logs and "sampling is not reproducible" not in logs
