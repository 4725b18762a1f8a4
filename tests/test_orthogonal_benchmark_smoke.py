"""Smoke test of simulations/benchmarks/orthogonal.py's ResNet-20 table on CIFAR-10 (a tiny generated copy)."""

from __future__ import annotations

import json
import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `simulations` is not installed: import it from the repository root
    sys.path.insert(0, str(ROOT))

from simulations.benchmarks import orthogonal  # noqa: E402


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """The script calls torch.set_num_threads; give other tests their thread count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _write_cifar10(root: Path, per_batch: int, test: int) -> None:
    """CIFAR-10's python batches (five training batches, a test batch, the metadata) of random images."""
    rng = np.random.default_rng(0)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)

    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                "labels": rng.integers(0, 10, n).tolist()}

    for i in range(1, 6):
        (base / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per_batch)))
    (base / "test_batch").write_bytes(pickle.dumps(batch(test)))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def test_resnet_table_on_cifar10_from_data_dir(tmp_path, capsys):
    _write_cifar10(tmp_path / "data", per_batch=8, test=12)
    out = tmp_path / "orthogonal.json"
    orthogonal.main(["--tables", "resnet", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                     "--resnet-width", "0.25", "--resnet-epochs", "1", "--resnet-train-size", "32",
                     "--calibration", "8", "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
                     "--no-progress", "--out", str(out)])
    cached = sorted(p.name for p in (tmp_path / "cache" / "bench").iterdir())
    assert cached == [f"resnet20-bn-w0.25-cifar10-sgd-e1-n32-seed{s}.pt" for s in range(3)]
    data = json.loads(out.read_text())
    assert data["config"]["dataset"] == "cifar10" and list(data["tables"]) == ["resnet"]
    rows = data["results"]["resnet"]
    labels = [r["label"] for r in rows]
    assert labels[:3] == ["naive (LERP)", "naive (LERP) + RESET", "naive (LERP) + REPAIR"]
    assert "orthogonal, BN folded, rotations kept (activation Procrustes) + REPAIR" in labels
    for r in rows:
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["end"] <= 1.0
    by_label = {r["label"]: r for r in rows}
    for label in ("naive (LERP)", "Git Re-Basin (weights)", "orthogonal (activation Procrustes, projected to permutations)"):
        assert math.isfinite(by_label[label]["barrier"])
    # exact maps: the aligned model 1 is model 1 (its accuracy at α = 1 is the unaligned one's)
    assert by_label["Git Re-Basin (weights)"]["end"] == by_label["naive (LERP)"]["end"]
    assert by_label["Git Re-Basin (weights)"]["cycle"] == 0
    # the paper's CIFAR-10 figures are shown beside ours on CIFAR-10
    assert by_label["naive (LERP)"]["paper"] == list(orthogonal.PAPER_RESNET["naive"])
    table = data["tables"]["resnet"]
    assert "on CIFAR-10" in table and "first 32 training images" in table and "12 test images" in table
    assert "paper: barrier / acc / CKA / cycle / RME" in table
    assert "| method" in capsys.readouterr().out


def test_the_dataset_option_belongs_to_the_resnet_table(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        orthogonal.main(["--tables", "mlp", "--dataset", "cifar10", "--data-dir", str(tmp_path)])
    assert info.value.code == 2 and "add resnet to --tables" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        orthogonal.main(["--tables", "resnet", "--dataset", "imagenet"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):  # an empty --data-dir says what it lacks
        orthogonal.main(["--tables", "resnet", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                         "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--no-progress"])
