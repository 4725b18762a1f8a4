"""``import fedmerge`` and a merge need none of the federated extra's packages.

A fresh ``pip install .`` without extras is checked by ``.ci/run``; here, in the development
environment where those packages are installed, a ``sys.meta_path`` finder refuses them in a
subprocess, which then runs the same check (``tests/core_install_check.py``).  An import of Flower,
Ray, TensorBoard, torchvision or Matplotlib added anywhere on the path of ``import fedmerge`` or
``fedmerge.merge`` makes this fail.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCKED_RUN = '''
import importlib.abc, runpy, sys

BLOCKED = ("flwr", "ray", "tensorboard", "torchvision", "matplotlib")

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked: {name}", name=name)
        return None

sys.meta_path.insert(0, Refuse())
check = runpy.run_path(sys.argv[1])["check"]
check(fresh_env=False)
try:
    import flwr  # noqa: F401
except ModuleNotFoundError as exc:
    assert "blocked" in str(exc)
else:
    raise AssertionError("the blocker let flwr through")
'''


def test_fedmerge_imports_and_merges_without_the_federated_extra():
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, str(ROOT / "tests" / "core_install_check.py")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "core install OK" in proc.stdout
