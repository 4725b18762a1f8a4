"""The apps on Flower's Deployment Engine: a real SuperLink and SuperNodes on 127.0.0.1.

The tests marked ``slow`` start one ``flower-superlink`` and two ``flower-supernode`` processes
(free ports, a private FLWR_HOME for each process and one for the CLI, runtime dependency
installation off: everything runs in this environment), submit runs with ``flwr run . NAME
--stream`` and read each run's outcome from ``flwr ls``, since ``flwr run --stream`` exits 0 also
when the ServerApp fails.  Every process a test starts, and everything those started, is stopped
by PID in a ``finally``, and the test checks that none is left.

The deployment runs with TLS (a self-signed CA and server certificate made with ``openssl``)
and SuperNode authentication (``ssh-keygen`` ECDSA keys, ``--enable-supernode-auth``, ``flwr
supernode register``), or ``--insecure`` where those tools are missing.  On it:

* a run that fails: ``flwr run`` exits 0, ``flwr ls`` says ``finished:failed``, ``python -m
  simulations.deployment`` exits 1; its relative ``out`` lands in the SuperLink's working directory;
* a round of ``c2m3`` with ``num-clients = 3`` and 2 SuperNodes: the ServerApp waits
  ``node-wait`` seconds and runs with the 2; results.json, checkpoints and TensorBoard in ``out``
  (one round: a SuperNode starts a ``flwr-clientapp`` process, which imports torch, for every
  message; that later rounds keep waiting for nodes is unit-tested on the fake Grid).

The bounded wait for nodes and the node-config checks are unit-tested first, on a fake Grid.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `simulations` is not installed: import it from the repository root
    sys.path.insert(0, str(ROOT))

from simulations.client_app import node_partition  # noqa: E402
from simulations.config import DEFAULTS  # noqa: E402
from simulations.deployment import wait_finished  # noqa: E402
from simulations.grids import NodeWaitGrid, NotEnoughNodesError, wait_for_nodes  # noqa: E402
from simulations.server_app import fedavg_kwargs, min_nodes  # noqa: E402

BIN = Path(sys.executable).parent
SMALL = ("strategy='c2m3' max-train-samples=2000 max-test-samples=300 model-kwargs='{\"widths\": [64, 64]}' "
         "init='shared' local-epochs=1 threads=1")


# --------------------------------------------------------------------------- the bounded wait (unit)

class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeGrid:
    """``get_node_ids`` lists the nodes that connected by the clock's time (``{node: time}``)."""

    def __init__(self, clock: FakeClock, arrivals: dict[int, float]) -> None:
        self.clock, self.arrivals = clock, arrivals

    def get_node_ids(self) -> list[int]:
        return [n for n, t in self.arrivals.items() if t <= self.clock.now]


@pytest.fixture
def flwr_log():
    """The records of Flower's logger (which does not propagate to pytest's caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_wait_returns_as_soon_as_the_expected_nodes_are_connected():
    clock = FakeClock()
    grid = FakeGrid(clock, {1: 0.0, 2: 3.0, 3: 7.0})
    assert wait_for_nodes(grid, 3, 2, 60, clock=clock, sleep=clock.sleep) == [1, 2, 3]
    assert 7.0 <= clock.now < 9.0


def test_wait_runs_with_the_connected_nodes_after_the_timeout(flwr_log):
    clock = FakeClock()
    grid = FakeGrid(clock, {1: 0.0, 2: 1.0})
    assert wait_for_nodes(grid, 20, 2, 30, clock=clock, sleep=clock.sleep) == [1, 2]
    assert clock.now == pytest.approx(30.0)
    (warning,) = [r for r in flwr_log if r.levelno == logging.WARNING]
    assert "expected 20 nodes (num-clients), 2 connected after waiting 30 s (node-wait)" in warning.getMessage()


def test_wait_stops_with_the_numbers_when_too_few_nodes_connect():
    clock = FakeClock()
    grid = FakeGrid(clock, {1: 0.0, 2: 100.0})
    with pytest.raises(NotEnoughNodesError) as info:
        wait_for_nodes(grid, 3, 2, 12.5, clock=clock, sleep=clock.sleep)
    assert str(info.value).startswith("expected 3 nodes (num-clients), only 1 connected after waiting 12.5 s "
                                      "(node-wait), fewer than the minimum of 2 (min-clients)")
    assert clock.now == pytest.approx(12.5)


def test_minimum_is_capped_at_the_expected_count():
    clock = FakeClock()
    assert wait_for_nodes(FakeGrid(clock, {7: 0.0}), 1, 2, 5, clock=clock, sleep=clock.sleep) == [7]
    assert min_nodes({**DEFAULTS, "num-clients": 1}) == 1
    assert min_nodes(DEFAULTS) == DEFAULTS["min-clients"] == 2
    assert min_nodes({"num-clients": 5}) == DEFAULTS["min-clients"]
    assert fedavg_kwargs({**DEFAULTS, "num-clients": 3})["min_available_nodes"] == 3  # lowered after the wait
    clock = FakeClock()
    with pytest.raises(NotEnoughNodesError, match="only 0 connected"):
        wait_for_nodes(FakeGrid(clock, {}), 1, 0, 2, clock=clock, sleep=clock.sleep)  # at least one node


def test_node_wait_grid_bounds_later_waits_for_nodes():
    clock = FakeClock()
    inner = FakeGrid(clock, {1: 0.0, 2: 0.0})
    grid = NodeWaitGrid(inner, 2, 10, clock=clock)
    assert grid.get_node_ids() == [1, 2]
    inner.arrivals[2] = 1e9  # node 2 leaves
    assert grid.get_node_ids() == [1]  # FedAvg's sampler polls once a second
    clock.now = 9.0
    assert grid.get_node_ids() == [1]
    inner.arrivals[2] = 0.0  # back in time: the shortage ends and its clock restarts
    assert grid.get_node_ids() == [1, 2]
    inner.arrivals[2] = 1e9
    clock.now = 20.0
    grid.get_node_ids()
    clock.now = 30.0
    with pytest.raises(NotEnoughNodesError, match=r"only 1 nodes connected for 10 s .*minimum of 2"):
        grid.get_node_ids()
    assert grid.arrivals is inner.arrivals  # every other attribute is the wrapped grid's


def test_node_config_gives_the_partition_and_is_checked():
    assert node_partition(SimpleNamespace(node_config={"partition-id": 4, "num-partitions": 10})) == (4, 10)
    with pytest.raises(ValueError, match="partition-id 2 is out of range for num-partitions 2"):
        node_partition(SimpleNamespace(node_config={"partition-id": 2, "num-partitions": 2}))
    with pytest.raises(ValueError, match="must give integers partition-id and num-partitions"):
        node_partition(SimpleNamespace(node_config={"partition-id": 0}))


def test_a_supernodes_own_data_dir_wins_over_the_servers():
    from flwr.app import ConfigRecord

    from simulations.client_app import _read

    msg = SimpleNamespace(content=SimpleNamespace(config_records={
        "config": ConfigRecord({"data-dir": "/server/data", "num-clients": 20, "server-round": 2, "threads": 0})}))
    node = SimpleNamespace(node_config={"partition-id": 1, "num-partitions": 2, "data-dir": "/node/data"})
    cfg, pid, num_partitions, server_round = _read(msg, node)
    assert (cfg.data_dir, pid, num_partitions, server_round) == ("/node/data", 1, 2, 2)  # 2, not num-clients 20
    node.node_config.pop("data-dir")
    assert _read(msg, node)[0].data_dir == "/server/data"


# --------------------------------------------------------------------------- processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process, from /proc; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return int(fields[1]), fields[0], int(fields[19])


def _descendants(pids: set[int]) -> dict[int, int]:
    """``{pid: start time}`` of every live process below ``pids`` (Flower starts its helpers detached)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            children.setdefault(st[0], []).append(int(entry.name))
    found, todo = {}, list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found and (st := _stat(child)) is not None:
                found[child] = st[2]
                todo.append(child)
    return found


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[2] == start and st[1] != "Z"


class Deployment:
    """One SuperLink and ``nodes`` SuperNodes on 127.0.0.1, and the CLI connection ``NAME`` to them."""

    NAME = "fedmerge-test"

    def __init__(self, root: Path, nodes: int, *, tls: bool = False) -> None:
        self.root, self.num_nodes, self.tls = root, nodes, tls
        self.port = _free_port()
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.seen: dict[int, int] = {}  # every pid started, directly or below, and its start time
        self.left: list[int] = []
        self.env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        for key in [k for k in self.env if k.startswith("FLWR_INTERNAL_GRPC_")] + ["FEDMERGE_SIM_CONFIG"]:
            self.env.pop(key, None)  # no legacy gRPC servers on 0.0.0.0; flwr run's config only
        self.link_cwd = root / "superlink-cwd"
        self.link_cwd.mkdir(parents=True)
        self.cli_env = dict(self.env, FLWR_HOME=str(root / "home-cli"))
        self.certs = root / "certs"

    # ---- certificates and keys, as Flower's guides make them

    def make_certificates(self) -> None:
        d = self.certs
        d.mkdir()
        (d / "server.ext").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
        for cmd in (
            "openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=fedmerge-ca -keyout ca.key -out ca.crt",
            "openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout server.key -out server.csr",
            "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 "
            "-extfile server.ext -out server.pem",
        ):
            subprocess.run(cmd.split(), cwd=d, check=True, capture_output=True, timeout=60)
        for i in range(self.num_nodes):
            subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", f"supernode-{i}"],
                           cwd=d, check=True, capture_output=True, timeout=60)

    # ---- processes

    def _start(self, name: str, cmd: list[str], home: Path, cwd: Path) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, cwd=cwd, env=dict(self.env, FLWR_HOME=str(home)), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        self.seen[proc.pid] = _stat(proc.pid)[2] if _stat(proc.pid) else 0
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {name}.log\n" + (self.root / f"{name}.log").read_text()[-2500:]
                         for name, _ in self.procs)

    def start(self) -> "Deployment":
        tls = []
        if self.tls:
            self.make_certificates()
            tls = ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                   "--ssl-keyfile", str(self.certs / "server.key"), "--enable-supernode-auth"]
        self._start("superlink", [str(BIN / "flower-superlink"), *(tls or ["--insecure"]),
                                  "--disable-runtime-dependency-installation",
                                  "--host", "127.0.0.1", "--port", str(self.port)],
                    self.root / "home-superlink", self.link_cwd)
        self._write_connection()
        self._wait_for_port()
        for i in range(self.num_nodes):
            node_tls = ["--insecure"]
            if self.tls:
                self.cli("supernode", "register", str(self.certs / f"supernode-{i}.pub"), self.NAME)
                node_tls = ["--root-certificates", str(self.certs / "ca.crt"),
                            "--auth-supernode-private-key", str(self.certs / f"supernode-{i}")]
            self._start(f"supernode-{i}", [str(BIN / "flower-supernode"), *node_tls,
                                           "--superlink", f"127.0.0.1:{self.port}",
                                           "--host", "127.0.0.1", "--port", str(_free_port()),
                                           "--node-config", f"partition-id={i} num-partitions={self.num_nodes}"],
                        self.root / f"home-supernode-{i}", self.root)
        self._wait_for_nodes()
        return self

    def _write_connection(self) -> None:
        home = Path(self.cli_env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        security = (f'root-certificates = "{self.certs / "ca.crt"}"' if self.tls else "insecure = true")
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{self.NAME}"\n\n[superlink.{self.NAME}]\n'
                                          f'address = "127.0.0.1:{self.port}"\n{security}\n')

    def _wait_for_port(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.procs[0][1].poll() is None, "the SuperLink exited\n" + self.logs()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.5)
        raise AssertionError(f"the SuperLink did not listen on {self.port} within {timeout} s\n" + self.logs())

    def _wait_for_nodes(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        online = []
        while time.monotonic() < deadline:
            for name, proc in self.procs:
                assert proc.poll() is None, f"{name} exited\n" + self.logs()
            answer = json.loads(self.cli("supernode", "ls", self.NAME, "--format", "json").stdout)
            online = [n for n in answer.get("nodes", []) if n.get("status") == "online"]
            if len(online) >= self.num_nodes:
                return
            time.sleep(1)
        raise AssertionError(f"{len(online)} of {self.num_nodes} SuperNodes online after {timeout} s\n" + self.logs())

    def cli(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=self.cli_env, capture_output=True,
                              text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, f"flwr {' '.join(args)}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        return proc

    def stop(self) -> None:
        """Terminate, wait, kill: the SuperNodes, then the SuperLink, then anything they left behind."""
        self.seen.update(_descendants({p.pid for _, p in self.procs}))
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
        deadline = time.monotonic() + 15
        while (rest := [p for p, t in self.seen.items() if _alive(p, t)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in rest:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        self.left = [p for p, t in self.seen.items() if _alive(p, t)]


@pytest.fixture
def deployment_factory(tmp_path):
    """Start deployments; every process is stopped afterwards, also when the test fails."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("the process bookkeeping reads /proc (Linux)")
    if not (BIN / "flower-superlink").exists():
        pytest.skip("flower-superlink is not installed next to this Python")
    started: list[Deployment] = []

    def start(name: str, nodes: int, **kwargs) -> Deployment:
        dep = Deployment(tmp_path / name, nodes, **kwargs)
        started.append(dep)
        return dep.start()

    try:
        yield start
    finally:
        for dep in started:
            dep.stop()
    for dep in started:
        assert dep.left == [], f"processes left running: {dep.left}"


def _flwr_run(dep: Deployment, run_config: str) -> tuple[subprocess.CompletedProcess, int]:
    proc = dep.cli("run", ".", dep.NAME, "--stream", "--run-config", run_config, timeout=600)
    run_id = int(proc.stdout.split("Successfully started run ", 1)[1].split()[0])
    return proc, run_id


def _helper(dep: Deployment, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulations.deployment", dep.NAME, *args], cwd=ROOT,
                          env=dep.cli_env, capture_output=True, text=True, timeout=600)


def _check_results(out: Path, rounds: int, partitions: list[int]) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True and results["failures"] == []
    assert results["config"]["out"] == str(out)
    assert [r["round"] for r in results["rounds"]] == list(range(1, rounds + 1))
    for r in results["rounds"]:
        assert r["train_partitions"] == partitions and r["clients_merged"] == len(partitions)
        assert r["match_iterations"] >= 1
    assert results["final"]["test_accuracy"] > 0.5  # chance: 0.1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"round-{r}.pt" for r in range(rounds + 1)]
    assert any((out / "tensorboard").iterdir())
    return results


# --------------------------------------------------------------------------- the deployment

HAVE_TLS_TOOLS = all(shutil.which(tool) for tool in ("openssl", "ssh-keygen"))


@pytest.mark.slow
def test_deployment_engine_reports_failures_and_runs_c2m3_with_the_nodes_connected(deployment_factory, tmp_path):
    """One deployment (TLS + SuperNode authentication when openssl and ssh-keygen exist), two runs."""
    dep = deployment_factory("deployment", 2, tls=HAVE_TLS_TOOLS)
    if dep.tls:  # both registered keys authenticated; the CLI verified the SuperLink's certificate
        nodes = json.loads(dep.cli("supernode", "ls", dep.NAME, "--format", "json").stdout)["nodes"]
        assert sorted(n["status"] for n in nodes) == ["online", "online"]

    # 1. a ServerApp that fails: `flwr run --stream` still exits 0, `flwr ls` says failed
    proc, run_id = _flwr_run(dep, "strategy='no-such-strategy' out='relative/out'")
    assert proc.returncode == 0
    row = wait_finished(dep.NAME, run_id, env=dep.cli_env)  # `flwr ls NAME --run-id ID --format json`
    assert row["status"] == "finished:failed", row
    helper = _helper(dep, "--run-id", str(run_id))
    assert helper.returncode == 1 and "finished:failed" in helper.stderr, helper.stderr
    # a relative out is taken from the SuperLink's working directory (the ServerApp failed after creating it)
    assert (dep.link_cwd / "relative" / "out").is_dir()

    # 2. num-clients = 3, 2 SuperNodes: the ServerApp waits node-wait seconds, then runs a round with the 2
    out = tmp_path / "out-c2m3"
    helper = _helper(dep, "--run-config", f"{SMALL} num-clients=3 min-clients=2 node-wait=3.0 num-rounds=1 "
                                          f"out='{out}'")
    assert helper.returncode == 0, helper.stdout[-4000:] + helper.stderr[-3000:] + dep.logs()
    assert "finished:completed" in helper.stdout
    logs = helper.stdout
    assert "expected 3 nodes (num-clients), 2 connected after waiting 3 s (node-wait)" in logs, logs[-4000:]
    assert f"results, checkpoints and TensorBoard go to {out}" in logs
    _check_results(out, rounds=1, partitions=[0, 1])
