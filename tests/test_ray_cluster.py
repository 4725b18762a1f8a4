"""simulations/run.py --ray-address: the simulation runs on a Ray cluster that is already up.

The slow test starts a one-node Ray head with ``ray start --head --block`` on 127.0.0.1 (free ports,
a private ``--temp-dir``, in a process group of its own), runs 2 rounds on it, checks from a second
driver that the run really was a job of *that* cluster (its driver pid and its client actors are in
the cluster's tables) and that the cluster is still up afterwards, then stops the head by its
process group -- never ``ray stop``, which would stop every Ray process of this user on the machine.
The fast tests check the address format, an unreachable address and the backend config.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `simulations` is not installed: import it from the repository root
    sys.path.insert(0, str(ROOT))

from simulations import run  # noqa: E402

RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    for key in ("FEDMERGE_SIM_CONFIG", "RAY_ADDRESS", "FEDMERGE_CLIENT_TRACE"):
        env.pop(key, None)
    return env


# ------------------------------------------------------------------------- fast tests


@pytest.mark.parametrize("address", ["localhost", "10.0.0.5:", "10.0.0.5:99999", "ray://10.0.0.5:10001",
                                     "host name:6379", ":6379"])
def test_bad_ray_address_is_a_one_line_error(address, run_error):
    assert "--ray-address" in run_error(["--ray-address", address])


def test_unreachable_cluster_is_a_one_line_error(run_error):
    port = _free_port()  # nothing listens there
    t0 = time.perf_counter()
    err = run_error(["--ray-address", f"127.0.0.1:{port}", "--clients", "3", "--max-train-samples", "600"])
    assert f"--ray-address 127.0.0.1:{port}: no Ray cluster answers there" in err
    assert time.perf_counter() - t0 < 30


def test_private_instance_resources_are_only_for_a_private_instance(run_error):
    err = run_error(["--ray-address", "127.0.0.1:6379", "--ray-num-gpus", "2"])
    assert "--ray-num-cpus/--ray-num-gpus" in err


def test_backend_config_maps_to_ray_init():
    parser = run.build_parser()
    private = run.backend_config(parser.parse_args([]))
    # "local": a private instance even when $RAY_ADDRESS is set or `ray start` ran on this machine
    assert private == {"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0}, "init_args": {"address": "local"}}
    joined = run.backend_config(parser.parse_args(["--ray-address", "10.0.0.5:6379", "--gpus-per-client", "0.5"]))
    assert joined == {"client_resources": {"num_cpus": 1.0, "num_gpus": 0.5},
                      "init_args": {"address": "10.0.0.5:6379"}}
    declared = run.backend_config(parser.parse_args(["--ray-num-cpus", "4", "--ray-num-gpus", "2"]))
    assert declared["init_args"] == {"address": "local", "num_cpus": 4, "num_gpus": 2}


# ------------------------------------------------------------------------- the cluster


def _stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the head's process group (``ray start --block`` then stops its children), SIGKILL leftovers."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)  # anyone left in the group?
            except ProcessLookupError:
                proc.wait(timeout=5)
                return
            proc.poll()  # reap the `ray start` process itself
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster on 127.0.0.1 (2 CPUs), started for this module and stopped after it."""
    if not RAY.exists() or not hasattr(os, "killpg"):
        pytest.skip("needs the `ray` CLI next to this Python and POSIX process groups")
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray puts Unix sockets under it
    port = _free_port()
    cmd = [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard=false", "--disable-usage-stats",
           "--temp-dir", temp_dir, "--ray-client-server-port", str(_free_port()),
           "--dashboard-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port())]
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in (Path(temp_dir) / "ray-start.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ray start failed:\n" + (Path(temp_dir) / "ray-start.log").read_text()[-3000:])
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        _stop_process_group(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


_INSPECT = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps({
    "nodes_alive": sum(1 for n in ray.nodes() if n["Alive"]),
    "jobs": [{"id": j["JobID"], "pid": j["DriverPid"], "entrypoint": j.get("Entrypoint", ""), "dead": j["IsDead"]}
             for j in state.jobs()],
    "actors": [{"class": a["ActorClassName"], "state": a["State"], "job": a["JobID"]}
               for a in state.actors().values()],
}))
"""


def _inspect(address: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _INSPECT, address], env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_simulation_runs_on_an_existing_cluster_and_leaves_it_up(ray_head, tmp_path):
    address, _ = ray_head
    out = tmp_path / "on-cluster"
    cmd = [sys.executable, str(ROOT / "simulations" / "run.py"), "--ray-address", address, "--strategy", "c2m3",
           "--clients", "3", "--rounds", "2", "--max-train-samples", "1500", "--max-test-samples", "300",
           "--max-iter", "5", "--init", "shared", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"run.py failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}"
    assert f"Ray: 2 clients at a time on the Ray cluster at {address} (1 node(s), 2 CPUs, 0 GPUs" in stdout

    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and len(results["rounds"]) == 2
    assert results["config"]["ray-address"] == address
    assert results["final"]["test_accuracy"] > results["initial"]["test_accuracy"]  # it learned

    seen = _inspect(address)
    assert seen["nodes_alive"] == 1  # run.py disconnected; the cluster it did not start is still up
    # run.py joined this cluster twice: to read its resources, then for the simulation
    jobs = [j for j in seen["jobs"] if j["pid"] == proc.pid]
    assert len(jobs) == 2 and all("simulations/run.py" in j["entrypoint"] and j["dead"] for j in jobs), seen
    client_actors = [a for a in seen["actors"] if a["class"] == "ClientAppActor"]
    assert len(client_actors) == 2, seen["actors"]  # 2 CPUs / 1 CPU per client, on this cluster
    assert {a["job"] for a in client_actors} <= {j["id"] for j in jobs}  # run.py's clients
    assert all(a["state"] == "DEAD" for a in client_actors)  # gone with their driver, the node stays
