"""Smoke tests of the benchmark scripts in simulations/benchmarks, in-process with tiny settings."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `simulations` is not installed: import it from the repository root
    sys.path.insert(0, str(ROOT))

from simulations.benchmarks import matching_speed, merge_quality, models, orthogonal, output  # noqa: E402


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """The scripts call torch.set_num_threads; give other tests their thread count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _check_environment(env: dict) -> None:
    assert env["command"].startswith("python -m simulations.benchmarks.")
    assert env["torch"] == torch.__version__ and env["threads"] == 1 and env["cpu"]


def test_matching_speed_smoke(tmp_path, capsys):
    out = tmp_path / "speed.json"
    result = matching_speed.main([
        "--sizes", "2,3", "--models", "random", "--widths", "16,16", "--resnet-count", "2", "--resnet-width", "0.25",
        "--methods", "c2m3,mergemany,git-rebasin,pairwise", "--max-iter", "10", "--seed", "1", "--threads", "1", "--no-progress",
        "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "matching_speed" and data["results"] == json.loads(json.dumps(result["results"]))
    _check_environment(data["environment"])
    rows = data["results"]
    # n=2: three methods (pairwise needs a 3-cycle); n=3: four; 2 ResNets: three
    assert [(r["kind"], r["n"], r["method"]) for r in rows] == [
        ("mlp", 2, "c2m3"), ("mlp", 2, "mergemany"), ("mlp", 2, "git-rebasin"),
        ("mlp", 3, "c2m3"), ("mlp", 3, "mergemany"), ("mlp", 3, "git-rebasin"), ("mlp", 3, "pairwise"),
        ("resnet20", 2, "c2m3"), ("resnet20", 2, "mergemany"), ("resnet20", 2, "git-rebasin")]
    for r in rows:
        assert r["seconds"] > 0
        if r["method"] == "pairwise":
            assert r["objective"] is None and r["nit"] is None
            # independent pairwise matchings of random models do not compose around the 3-cycle
            assert 0.5 < r["cycle_error"] <= 1.0
        else:
            assert math.isfinite(r["objective"]) and 1 <= r["nit"] <= 10 and isinstance(r["converged"], bool)
            assert r["cycle_error"] == 0.0  # reported as computed: 0 for maps through a common space
    assert any("CIFAR-10" in note for note in data["notes"])
    printed = capsys.readouterr().out
    assert "| models" in printed and "C²M³" in printed and "command: python -m" in printed


def test_merge_quality_smoke_and_cache(tmp_path, capsys):
    out = tmp_path / "quality.json"
    argv = ["--smoke", "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--no-progress", "--out", str(out)]
    result = merge_quality.main(argv)
    assert "trained mlp-784-32-10 seed 1" in capsys.readouterr().out
    cached = sorted(p.name for p in (tmp_path / "cache" / "bench").iterdir())
    assert cached == ["mlp-784-32-10-e1-n500-seed0.pt", "mlp-784-32-10-e1-n500-seed1.pt"]

    data = json.loads(out.read_text())
    assert data["benchmark"] == "merge_quality"
    _check_environment(data["environment"])
    ends = data["endpoints"]
    assert ends["count"] == 2 and len(ends["per_model"]) == 2
    assert 0.0 <= ends["accuracy"]["min"] <= ends["accuracy"]["mean"] <= ends["accuracy"]["max"] <= 1.0
    assert ends["accuracy"]["max"] > 0.2  # beats chance even after 4 SGD steps
    rows = data["results"]
    assert [(r["n"], r["method"]) for r in rows] == [
        (2, "endpoints"), (2, "mean"), (2, "mergemany"), (2, "c2m3"), (2, "git-rebasin")]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 and r["paper"] is None
        if r["kind"] == "merge":
            assert r["seconds"] > 0
        if r["method"] in ("mergemany", "c2m3", "git-rebasin"):
            assert math.isfinite(r["objective"]) and r["objective"] > 0  # a matching ran and was reported
    assert rows[1]["objective"] is None  # the plain mean has no matching objective (NaN -> null)

    # second run: every model comes from the cache, with identical results
    again = merge_quality.main(argv)
    assert "trained mlp" not in capsys.readouterr().out
    assert [r["accuracy"] for r in again["results"]] == [r["accuracy"] for r in result["results"]]


def test_cache_path_and_helpers(tmp_path):
    path = models.mlp_cache_path(7, epochs=3, cache_dir=tmp_path)
    assert path == tmp_path / "bench" / "mlp-784-256-512-512-256-10-e3-seed7.pt"
    table = output.markdown_table([{"a": 1.5, "b": None}, {"a": float("nan"), "b": True}], ["a", ("b", "B")])
    assert table.splitlines() == ["| a   | B   |", "|-----|-----|", "| 1.5 | —   |", "| —   | yes |"]
    written = output.write_json(tmp_path / "x" / "r.json", {"v": float("nan"), "t": torch.tensor([1, 2])})
    assert json.loads(written.read_text()) == {"v": None, "t": [1, 2]}
    sds = models.random_models(lambda: torch.nn.Linear(3, 2), 2)
    assert not torch.equal(sds[0]["weight"], sds[1]["weight"])
    assert torch.equal(sds[0]["weight"], models.random_models(lambda: torch.nn.Linear(3, 2), 1)[0]["weight"])


@pytest.mark.parametrize("module, argv", [
    (matching_speed, ["--sizes", "1"]),
    (matching_speed, ["--methods", "c2m3,nope"]),
    (matching_speed, ["--models", "pretrained"]),
    (merge_quality, ["--sizes", "5", "--count", "3"]),
    (merge_quality, ["--epochs", "0"]),
])
def test_bad_cli_input_exits_with_usage_error(module, argv, capsys):
    with pytest.raises(SystemExit) as info:
        module.main(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_script_mode_finds_the_repository(tmp_path):
    """`python simulations/benchmarks/matching_speed.py` works from any directory."""
    script = ROOT / "simulations" / "benchmarks" / "matching_speed.py"
    done = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--sizes" in done.stdout


def test_round_time_sequential_loop_does_the_federated_work():
    """The loop the Flower+Ray round is compared with runs the same rounds (timed per round)."""
    from simulations.benchmarks import round_time
    from simulations.config import ClientConfig

    cfg = ClientConfig.from_mapping({"init": "shared", "max-train-samples": 1200, "max-test-samples": 200,
                                     "model-kwargs": '{"widths": [32]}'})
    times, accuracy = round_time.sequential_rounds(cfg, num_clients=3, rounds=2)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert accuracy > 0.5  # it really trains and averages (chance: 0.1)
    assert "--clients" in round_time.build_parser().format_help()


def test_c2m3_scaling_smoke(tmp_path, capsys):
    """Each row runs in its own worker process; none may fail, and memory and counts are reported."""
    from simulations.benchmarks import c2m3_scaling
    out = tmp_path / "scaling.json"
    c2m3_scaling.main(["mlp", "--sizes", "2,3", "--widths", "16,16", "--methods", "git-rebasin,c2m3,c2m3-paper",
                       "--max-iter", "3", "--refine", "2", "--no-progress", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [(r["n"], r["method"]) for r in rows] == [(n, m) for n in (2, 3) for m in ("git-rebasin", "c2m3",
                                                                                       "c2m3-paper")]
    for r in rows:
        assert "error" not in r, r
        assert 1 <= r["nit"] <= 3 and math.isfinite(r["objective"]) and r["laps"] > 0
        assert r["peak_rss_mib"] >= r["rss_models_mib"] > 0
        assert r["cycle_error"] == 0.0
    assert "Git Re-Basin (to model 0)" in capsys.readouterr().out


@pytest.mark.parametrize("device, message", [("meta", "give cpu or a CUDA device"),
                                             ("cuda", "torch sees no CUDA device here")])
def test_c2m3_scaling_refuses_a_device_it_cannot_use(device, message, capsys):
    """A device the worker would not move the models to, or CUDA on a host without it: refused before any run."""
    from simulations.benchmarks import c2m3_scaling
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    with pytest.raises(SystemExit):
        c2m3_scaling.main(["mlp", "--sizes", "2", "--widths", "8", "--device", device, "--no-progress"])
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_c2m3_scaling_on_the_gpu(tmp_path):
    """The models are matched on the GPU and the table reports the GPU's peak memory above them."""
    from simulations.benchmarks import c2m3_scaling
    out = tmp_path / "scaling.json"
    c2m3_scaling.main(["mlp", "--sizes", "2,3", "--widths", "16,16", "--methods", "git-rebasin,c2m3",
                       "--max-iter", "3", "--refine", "2", "--device", "cuda", "--no-progress", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    for r in rows:
        assert "error" not in r, r
        assert r["gpu_peak_extra"] > 0 and r["cycle_error"] == 0.0


# --------------------------------------------------------------------------- orthogonal.py on CIFAR-10
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
    assert cached == [f"resnet20-bn-w0.25-cifar10-sgd-b128-e1-n32-seed{s}.pt" for s in range(3)]
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


# --------------------------------------------------------------------------- orthogonal.py: the Adam batch size
def test_batch_size_is_chosen_by_the_endpoints_validation_accuracy(tmp_path):
    out = tmp_path / "orthogonal.json"
    orthogonal.main(["--tables", "batch", "--smoke", "--batch-sizes", "128,512", "--cache-dir", str(tmp_path / "cache"),
                     "--threads", "1", "--no-progress", "--out", str(out)])
    data = json.loads(out.read_text())
    rows = data["results"]["batch"]
    assert [r["batch_size"] for r in rows] == [128, 512]
    best = max(rows, key=lambda r: r["validation"])
    assert rows[0]["validation"] != rows[1]["validation"]  # else the tie rule, not the accuracy, would choose
    assert [r["chosen"] for r in rows] == [r is best for r in rows]
    assert data["config"]["batch_size"] == best["batch_size"]  # what tables 1 and 2 then train with
    for r in rows:
        assert 0.0 <= r["test_min"] <= r["test_mean"] <= r["test_max"] <= 1.0 and 0.0 <= r["merged_test"] <= 1.0
    cached = sorted(p.name for p in (tmp_path / "cache" / "bench").iterdir())
    assert cached == sorted(f"mlp-784-128-64-10-adam-b{b}-e1-n2000-seed{s}.pt" for b in (128, 512) for s in range(4))
    assert f"tables 1 and 2 use batch {best['batch_size']}" in data["tables"]["batch"]


def test_an_explicit_batch_size_is_kept_and_bad_ones_are_refused(tmp_path, capsys):
    out = tmp_path / "orthogonal.json"
    orthogonal.main(["--tables", "batch", "--smoke", "--batch-sizes", "128,512", "--batch-size", "256",
                     "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--no-progress", "--out", str(out)])
    assert json.loads(out.read_text())["config"]["batch_size"] == 256
    for bad in (["--batch-size", "0"], ["--batch-size", "many"], ["--batch-sizes", "16,0"]):
        with pytest.raises(SystemExit) as info:
            orthogonal.main(["--tables", "batch", *bad])
        assert info.value.code == 2 and "--batch-size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # the validation images must end before the calibration images
        orthogonal.main(["--tables", "spherical", "--train-size", "52000", "--cache-dir", str(tmp_path / "cache")])
    assert info.value.code == 2 and "validation images" in capsys.readouterr().err
