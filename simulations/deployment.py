"""``flwr run`` on a Deployment Engine SuperLink, with an exit status that says whether the run succeeded.

``flwr run . NAME --stream`` exits 0 once the log stream ends, also when the ServerApp failed;
the run's outcome is only in the SuperLink's records (``flwr ls NAME --run-id ID``: ``status``
``finished:completed``, or ``finished:failed`` / ``finished:stopped``).  This runs ``flwr run``,
shows its output as it comes, takes the run id from it, waits until the SuperLink calls the run
finished and exits 0 only for ``finished:completed``::

    python -m simulations.deployment NAME --run-config "num-clients=2 num-rounds=2 out='/abs/dir'"
    python -m simulations.deployment NAME --run-id 1234567890     # the status of an earlier run

``NAME`` is a ``[superlink.NAME]`` connection of ``$FLWR_HOME/config.toml`` (README, "Real
Flower deployments").  In Python: :func:`flwr_run` and :func:`run_status`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["COMPLETED", "RunFailed", "flwr_run", "main", "run_status", "wait_finished"]

#: ``flwr ls``'s status of a run that ended without error.
COMPLETED = "finished:completed"

_STARTED = re.compile(r"Successfully started run (\d+)")


class RunFailed(RuntimeError):
    """The run did not end ``finished:completed`` (or never started)."""


def _flwr() -> str:
    here = Path(sys.executable).with_name("flwr")  # the flwr of this environment first
    return str(here) if here.exists() else (shutil.which("flwr") or "flwr")


def run_status(connection: str, run_id: int | str, *, env: Mapping[str, str] | None = None,
               timeout: float = 120.0) -> dict[str, Any]:
    """The run's row of ``flwr ls CONNECTION --run-id RUN_ID --format json`` (``status``, ``status-details``...)."""
    cmd = [_flwr(), "ls", connection, "--run-id", str(run_id), "--format", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=None if env is None else dict(env),
                          timeout=timeout)
    try:
        answer = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise RunFailed(f"`{' '.join(cmd)}` gave no JSON (exit {proc.returncode}): "
                        f"{(proc.stdout + proc.stderr).strip()[-2000:]}") from None
    runs = answer.get("runs") or []
    if not answer.get("success", False) or not runs:
        raise RunFailed(f"`{' '.join(cmd)}`: {answer}")
    return runs[0]


def wait_finished(connection: str, run_id: int | str, *, env: Mapping[str, str] | None = None,
                  timeout: float = 120.0, poll: float = 2.0) -> dict[str, Any]:
    """:func:`run_status` once the status is ``finished:...`` (raises :class:`RunFailed` after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        row = run_status(connection, run_id, env=env)
        if str(row.get("status", "")).startswith("finished"):
            return row
        if time.monotonic() > deadline:
            raise RunFailed(f"run {run_id} is still {row.get('status')!r} after {timeout:g} s")
        time.sleep(poll)


def flwr_run(connection: str, *, app: str | os.PathLike = ".", run_config: str | None = None,
             extra: Sequence[str] = (), env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
             echo: bool = True, timeout: float | None = None, check: bool = True) -> tuple[int, dict[str, Any], str]:
    """``flwr run APP CONNECTION --stream``; returns ``(run id, flwr ls row, output)``.

    With ``check`` (the default) raises :class:`RunFailed` unless the run ended ``finished:completed``.
    ``echo`` prints the output (the ServerApp's log) as it arrives.
    """
    cmd = [_flwr(), "run", str(app), connection, "--stream", *extra]
    if run_config:
        cmd += ["--run-config", run_config]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=None if env is None else dict(env), cwd=cwd)
    lines: list[str] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if echo:
                print(line, end="", flush=True)
            if deadline is not None and time.monotonic() > deadline:
                raise RunFailed(f"`flwr run` still streaming after {timeout:g} s")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines)
    match = _STARTED.search(output)
    if match is None:
        raise RunFailed(f"`flwr run` started no run (exit {proc.returncode}):\n{output[-3000:]}")
    run_id = int(match.group(1))
    row = wait_finished(connection, run_id, env=env)
    if check and row.get("status") != COMPLETED:
        raise RunFailed(f"run {run_id} ended {row.get('status')!r} (flwr run exited {proc.returncode}); "
                        f"see `flwr log {run_id} {connection} --show`")
    return run_id, row, output


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.deployment", description=__doc__.split("\n\n")[0])
    p.add_argument("connection", help="a [superlink.NAME] connection of $FLWR_HOME/config.toml")
    p.add_argument("--app", default=".", help="the app directory (default: .)")
    p.add_argument("--run-config", help="passed to flwr run --run-config")
    p.add_argument("--run-id", type=int, help="only report the status of this earlier run")
    args = p.parse_args(argv)
    try:
        if args.run_id is not None:
            row = wait_finished(args.connection, args.run_id)
            run_id = args.run_id
        else:
            run_id, row, _ = flwr_run(args.connection, app=args.app, run_config=args.run_config, check=False)
    except (RunFailed, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    status = row.get("status")
    print(f"run {run_id}: {status}" + (f" ({row['status-details']})" if row.get("status-details") else ""),
          file=sys.stderr if status != COMPLETED else sys.stdout)
    return 0 if status == COMPLETED else 1


if __name__ == "__main__":
    raise SystemExit(main())
