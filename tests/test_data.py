"""Tests for fedmerge.data: bundled MNIST offline, torchvision layouts on generated data."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmerge import data as fd


# ----------------------------------------------------------------------------- helpers


def _write_idx_images(path: Path, images: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    path.write_bytes(struct.pack(">IIII", 0x0803, n, h, w) + images.astype(np.uint8).tobytes())


def _write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes())


def _pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _expected(uint8_nchw: np.ndarray, name: str) -> torch.Tensor:
    spec = fd.DATASETS[name]
    x = torch.from_numpy(uint8_nchw.astype(np.float32) / 255.0)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (x - mean) / std


@pytest.fixture(autouse=True)
def _fresh_cache():
    fd.clear_cache()
    yield
    fd.clear_cache()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("fedmerge.data tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ------------------------------------------------------------------------ bundled MNIST


@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory):
    """A private, initially empty cache dir so the decompression path is exercised."""
    cache = tmp_path_factory.mktemp("fedmerge-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDMERGE_CACHE", str(cache))
        yield cache


def test_bundled_gzip_files_ship_with_package():
    names = sorted(p.name for p in fd.BUNDLED_MNIST_DIR.glob("*.gz"))
    assert names == sorted(f"{n}.gz" for n in fd.MNIST_SHA256)


def test_mnist_loads_offline_from_bundle(mnist_cache, no_network, monkeypatch):
    monkeypatch.setenv("FEDMERGE_CACHE", str(mnist_cache))
    train = fd.load_dataset("mnist")
    test = fd.load_dataset("mnist", train=False)

    assert len(train) == 60000 and len(test) == 10000
    for ds in (train, test):
        assert ds.images.dtype == torch.float32
        assert ds.labels.dtype == torch.int64
        assert ds.images.shape[1:] == (1, 28, 28)
        assert ds.input_shape == (1, 28, 28)
        assert ds.num_classes == 10
        assert int(ds.labels.min()) == 0 and int(ds.labels.max()) == 9
        assert torch.bincount(ds.labels, minlength=10).min() > 0
        x, y = ds[0]
        assert x.shape == (1, 28, 28) and y.dim() == 0
    assert train.labels[:5].tolist() == [5, 0, 4, 1, 9]  # the well-known first MNIST labels
    assert test.labels[:5].tolist() == [7, 2, 1, 0, 4]
    # normalised with MNIST's mean/std
    assert abs(float(train.images.mean())) < 0.01
    assert abs(float(train.images.std()) - 1.0) < 0.01

    # decompressed files are in the cache, verified, and no temp files are left behind
    raw = mnist_cache / "mnist" / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(fd.MNIST_SHA256)
    for name, digest in fd.MNIST_SHA256.items():
        assert hashlib.sha256((raw / name).read_bytes()).hexdigest() == digest

    # cached per process
    assert fd.load_dataset("mnist") is train
    assert fd.load_dataset("MNIST", data_dir="/nonexistent") is train


def test_damaged_cache_file_is_repaired(mnist_cache):
    root = fd.prepare_mnist(mnist_cache)
    target = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    target.write_bytes(b"garbage")
    fd.prepare_mnist(mnist_cache)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == fd.MNIST_SHA256[target.name]


def test_corrupted_bundle_raises_clear_error(tmp_path):
    bundled = tmp_path / "bundle"
    bundled.mkdir()
    with gzip.open(bundled / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"not mnist")
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match=r"corrupted.*SHA-256"):
        fd.prepare_mnist(cache, bundled_dir=bundled)
    raw = cache / "mnist" / "MNIST" / "raw"
    assert list(raw.iterdir()) == []  # neither the bad file nor a temp file is left


def test_missing_bundle_raises_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="bundled MNIST file"):
        fd.prepare_mnist(tmp_path / "cache", bundled_dir=tmp_path / "empty")


# ------------------------------------------------------------ generated torchvision data


def test_fashion_mnist_from_generated_idx(tmp_path, no_network):
    rng = np.random.default_rng(0)
    raw = tmp_path / "FashionMNIST" / "raw"
    tr_x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    tr_y = np.array([0, 3, 9, 1, 2])
    te_x = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    te_y = np.array([4, 5, 6])
    _write_idx_images(raw / "train-images-idx3-ubyte", tr_x)
    _write_idx_labels(raw / "train-labels-idx1-ubyte", tr_y)
    _write_idx_images(raw / "t10k-images-idx3-ubyte", te_x)
    _write_idx_labels(raw / "t10k-labels-idx1-ubyte", te_y)

    train = fd.load_dataset("fashion-mnist", data_dir=tmp_path)
    test = fd.load_dataset("fashion_mnist", data_dir=str(tmp_path), train=False)
    assert train.images.shape == (5, 1, 28, 28) and test.images.shape == (3, 1, 28, 28)
    assert train.labels.tolist() == tr_y.tolist() and test.labels.tolist() == te_y.tolist()
    assert train.num_classes == 10 and train.name == "fashion-mnist"
    torch.testing.assert_close(train.images, _expected(tr_x[:, None], "fashion-mnist"))
    assert fd.load_dataset("fashion-mnist", data_dir=tmp_path) is train


def test_emnist_letters_shifted_and_upright(tmp_path):
    rng = np.random.default_rng(1)
    raw = tmp_path / "EMNIST" / "raw"
    upright = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    labels = np.array([1, 2, 26, 13])  # EMNIST letters labels are 1..26
    # EMNIST stores each image transposed
    _write_idx_images(raw / "emnist-letters-train-images-idx3-ubyte", upright.transpose(0, 2, 1))
    _write_idx_labels(raw / "emnist-letters-train-labels-idx1-ubyte", labels)

    ds = fd.load_dataset("emnist", data_dir=tmp_path)
    assert ds.num_classes == 26
    assert ds.labels.tolist() == [0, 1, 25, 12]
    assert ds.classes[0] == "a" and len(ds.classes) == 26
    torch.testing.assert_close(ds.images, _expected(upright[:, None], "emnist"))

    # only the train files exist: the test split names what is missing
    with pytest.raises(FileNotFoundError, match="emnist-letters-test-images-idx3-ubyte"):
        fd.load_dataset("emnist", data_dir=tmp_path, train=False)


def test_emnist_rejects_wrong_split_labels(tmp_path):
    raw = tmp_path / "EMNIST" / "raw"
    _write_idx_images(raw / "emnist-letters-train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    _write_idx_labels(raw / "emnist-letters-train-labels-idx1-ubyte", np.array([0, 5]))
    with pytest.raises(ValueError, match="1..26"):
        fd.load_dataset("emnist", data_dir=tmp_path)


def _cifar_batch(rng, n, num_classes, label_key):
    x = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
    y = rng.integers(0, num_classes, n).tolist()
    batch = {"data": x, label_key: y}
    if label_key == "fine_labels":
        batch["coarse_labels"] = [v // 5 for v in y]
    return batch


def test_cifar10_from_generated_batches(tmp_path, no_network):
    rng = np.random.default_rng(2)
    base = tmp_path / "cifar-10-batches-py"
    batches = [_cifar_batch(rng, 2, 10, "labels") for _ in range(5)]
    for i, b in enumerate(batches, 1):
        _pickle(base / f"data_batch_{i}", b)
    test_batch = _cifar_batch(rng, 3, 10, "labels")
    _pickle(base / "test_batch", test_batch)
    _pickle(base / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})

    train = fd.load_dataset("cifar10", data_dir=tmp_path)
    test = fd.load_dataset("CIFAR-10", data_dir=tmp_path, train=False)
    assert train.images.shape == (10, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert train.input_shape == (3, 32, 32) and train.num_classes == 10
    assert train.labels.tolist() == sum((b["labels"] for b in batches), [])
    assert train.classes == [f"c{i}" for i in range(10)]
    # CIFAR rows are channel-major (R plane, G plane, B plane)
    expected = _expected(test_batch["data"].reshape(-1, 3, 32, 32), "cifar10")
    torch.testing.assert_close(test.images, expected)


def test_cifar100_from_generated_batches(tmp_path):
    rng = np.random.default_rng(3)
    base = tmp_path / "cifar-100-python"
    tr = _cifar_batch(rng, 4, 100, "fine_labels")
    te = _cifar_batch(rng, 2, 100, "fine_labels")
    _pickle(base / "train", tr)
    _pickle(base / "test", te)
    _pickle(base / "meta", {"fine_label_names": [f"f{i}" for i in range(100)]})

    train = fd.load_dataset("cifar100", data_dir=tmp_path)
    assert train.images.shape == (4, 3, 32, 32) and train.num_classes == 100
    assert train.labels.tolist() == tr["fine_labels"]
    torch.testing.assert_close(
        train.images, _expected(tr["data"].reshape(-1, 3, 32, 32), "cifar100")
    )
    assert fd.load_dataset("cifar100", data_dir=tmp_path, train=False).labels.tolist() == te["fine_labels"]


# ----------------------------------------------------------------------------- errors


def test_missing_files_name_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        fd.load_dataset("cifar10", data_dir=tmp_path)
    msg = str(exc.value)
    assert "cifar-10-batches-py/data_batch_1" in msg and "cifar-10-batches-py/batches.meta" in msg
    assert str(tmp_path) in msg

    with pytest.raises(FileNotFoundError, match="cifar-100-python/train"):
        fd.load_dataset("cifar100", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="FashionMNIST/raw/train-images-idx3-ubyte"):
        fd.load_dataset("fashion-mnist", data_dir=tmp_path)


def test_missing_data_dir_explains(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data_dir.*--data-dir"):
        fd.load_dataset("cifar10")


def test_gzip_only_copies_get_a_gunzip_hint(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="gunzip"):
        fd.load_dataset("fashion-mnist", data_dir=tmp_path)


@pytest.mark.parametrize("name", ["imagenet", "", "mnist2"])
def test_unknown_dataset_name(name):
    with pytest.raises(ValueError, match="unknown dataset.*supported: cifar10, cifar100, emnist"):
        fd.load_dataset(name)


def test_dataset_spec_without_loading(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("FEDMERGE_CACHE", str(tmp_path))
    assert fd.dataset_spec("EMNIST").num_classes == 26
    assert fd.dataset_spec("cifar-100").input_shape == (3, 32, 32)
    assert fd.dataset_spec("mnist").mean == (0.1307,)
    assert list(tmp_path.iterdir()) == []  # nothing was prepared or cached
    with pytest.raises(ValueError, match="unknown dataset"):
        fd.dataset_spec("imagenet")


def test_dataset_spec_describes_the_loaded_dataset():
    spec, ds = fd.dataset_spec("mnist"), fd.load_dataset("mnist", train=False)
    assert (spec.num_classes, spec.input_shape) == (ds.num_classes, ds.input_shape)
    raw = ds.images * spec.std[0] + spec.mean[0]  # undo the normalisation: pixel values in [0, 1]
    assert float(raw.min()) == pytest.approx(0.0, abs=1e-5) and float(raw.max()) == pytest.approx(1.0, abs=1e-5)
