"""One source of defaults: simulations/config.py, read by run.py, the ServerApp, the ClientApp and
repeated (value by value) in pyproject.toml's ``[tool.flwr.app.config]``."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `simulations` is not installed: import it from the repository root
    sys.path.insert(0, str(ROOT))

from simulations import run  # noqa: E402
from simulations.config import (CLIENT_DEFAULTS, CONFIG_ENV, DEFAULTS, RESOURCE_DEFAULTS,  # noqa: E402
                                SERVER_DEFAULTS, ClientConfig, load_config)

#: Keys whose pyproject value differs from DEFAULTS on purpose (the pyproject comment says why):
#: a ServerApp under `flwr run` writes to a log, not a terminal, so no progress bars there.
PYPROJECT_DIFFERS = {"progress": False}

#: Configuration keys without a run.py flag of their own, and why.
NO_FLAG = {
    "model-kwargs": "built from --widths / --width",
    "threads": "derived from --cpus-per-client",
    "round-timeout": "no flag; flwr run --run-config sets it",
    "node-wait": "deployment setting (how long to wait for SuperNodes); flwr run --run-config sets it",
    "min-clients": "deployment setting; flwr run --run-config sets it",
}
#: run.py flags that are no configuration key.
CLI_ONLY = {"widths", "width", "verbose"}


def _flwr_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]


def test_pyproject_declares_the_apps():
    flwr = _flwr_table()
    assert "federations" not in flwr  # `flwr run` would move it into ~/.flwr/config.toml
    assert flwr["app"]["components"] == {"serverapp": "simulations.server_app:app",
                                         "clientapp": "simulations.client_app:app"}


def test_pyproject_config_holds_every_default_value():
    table = _flwr_table()["app"]["config"]
    assert set(table) == set(DEFAULTS)  # `--run-config` may only override these
    expected = {**DEFAULTS, **PYPROJECT_DIFFERS}
    for key, value in table.items():
        assert value == expected[key] and type(value) is type(expected[key]), (key, value, expected[key])
    for key, value in PYPROJECT_DIFFERS.items():
        assert DEFAULTS[key] != value, f"{key} no longer differs: drop it from PYPROJECT_DIFFERS"


def test_defaults_split_into_client_and_server_keys():
    assert set(CLIENT_DEFAULTS) & set(SERVER_DEFAULTS) == set()
    assert DEFAULTS == {**CLIENT_DEFAULTS, **SERVER_DEFAULTS}
    assert DEFAULTS["strategy"] == "c2m3"  # README's main command: run.py --strategy c2m3 --clients 20
    assert ClientConfig.from_mapping({}).as_dict() == CLIENT_DEFAULTS


def test_run_py_flags_default_to_the_single_source():
    parser = run.build_parser()
    args = vars(parser.parse_args([]))
    keys = {dest: run.FLAG_KEYS.get(dest, dest.replace("_", "-")) for dest in args if dest not in CLI_ONLY}
    sources = {**DEFAULTS, **RESOURCE_DEFAULTS}
    assert set(keys.values()) - set(sources) == set(), "a run.py flag is neither a config key nor CLI_ONLY"
    assert set(DEFAULTS) - set(keys.values()) == set(NO_FLAG)
    for dest, key in keys.items():
        assert args[dest] == sources[key] and type(args[dest]) is type(sources[key]), (dest, args[dest], sources[key])


def test_run_py_config_without_flags_is_the_defaults():
    """What run.py hands the ServerApp when given no flag: DEFAULTS (``out`` resolved to a new directory)."""
    parser = run.build_parser()
    config = run.make_config(parser, parser.parse_args([]), [])
    assert {k: config[k] for k in DEFAULTS if k != "out"} == {k: v for k, v in DEFAULTS.items() if k != "out"}
    out = Path(config["out"])
    assert out.is_absolute() and out.parent == ROOT / "runs" and out.name.startswith("c2m3-mnist-mlp-")
    assert {k: config[k] for k in RESOURCE_DEFAULTS} == RESOURCE_DEFAULTS


def test_server_config_starts_from_the_defaults(monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    config = load_config()
    assert {k: v for k, v in config.items() if k != "out"} == {k: v for k, v in DEFAULTS.items() if k != "out"}
    assert Path(config["out"]).name.startswith("c2m3-mnist-mlp-")  # "" means a new directory per run
    monkeypatch.setenv(CONFIG_ENV, '{"strategy": "fedavg", "out": "x"}')
    assert load_config()["strategy"] == "fedavg" and load_config()["out"] == "x"
    monkeypatch.setenv(CONFIG_ENV, '{"num-clients": 0}')
    with pytest.raises(ValueError, match="num-clients"):
        load_config()
