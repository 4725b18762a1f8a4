"""Dataset loading for fedmerge simulations.

Every dataset is returned whole, as normalised tensors held in memory
(``images``: float32, NCHW; ``labels``: int64), in a :class:`LoadedDataset`,
which is also a :class:`torch.utils.data.TensorDataset`.

* ``"mnist"`` needs nothing outside the package: fedmerge ships the four
  original MNIST IDX files (gzip) in ``fedmerge/datasets/MNIST/raw/``.  The
  first use decompresses them once into a cache directory (``$FEDMERGE_CACHE``,
  default ``~/.cache/fedmerge``), checks their SHA-256 and loads them with
  ``torchvision.datasets.MNIST(..., download=False)``.
* ``"fashion-mnist"``, ``"emnist"`` (the *letters* split, labels shifted to
  0..25), ``"cifar10"`` and ``"cifar100"`` are read through torchvision from a
  directory you provide (``data_dir``), never downloaded.  See
  :data:`EXPECTED_LAYOUT` for the files each one needs.

Results are cached per process, so repeated calls are free.  The returned
tensors are shared between callers: do not modify them in place (``clone()``
first).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import TensorDataset

__all__ = [
    "DATASETS",
    "EXPECTED_LAYOUT",
    "DatasetSpec",
    "LoadedDataset",
    "MNIST_SHA256",
    "cache_dir",
    "clear_cache",
    "dataset_spec",
    "load_dataset",
    "prepare_mnist",
]


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a supported dataset (available without loading it)."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,)),
    "fashion-mnist": DatasetSpec("fashion-mnist", 10, (1, 28, 28), (0.2860,), (0.3530,)),
    "emnist": DatasetSpec("emnist", 26, (1, 28, 28), (0.1722,), (0.3309,)),
    "cifar10": DatasetSpec(
        "cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    "cifar100": DatasetSpec(
        "cifar100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    ),
}

_ALIASES = {
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "emnist-letters": "emnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
}

#: Files each dataset needs, relative to ``data_dir`` (torchvision's on-disk layout).
EXPECTED_LAYOUT: dict[str, tuple[str, ...]] = {
    "fashion-mnist": (
        "FashionMNIST/raw/train-images-idx3-ubyte",
        "FashionMNIST/raw/train-labels-idx1-ubyte",
        "FashionMNIST/raw/t10k-images-idx3-ubyte",
        "FashionMNIST/raw/t10k-labels-idx1-ubyte",
    ),
    "emnist": (
        "EMNIST/raw/emnist-letters-train-images-idx3-ubyte",
        "EMNIST/raw/emnist-letters-train-labels-idx1-ubyte",
        "EMNIST/raw/emnist-letters-test-images-idx3-ubyte",
        "EMNIST/raw/emnist-letters-test-labels-idx1-ubyte",
    ),
    "cifar10": (
        "cifar-10-batches-py/data_batch_1",
        "cifar-10-batches-py/data_batch_2",
        "cifar-10-batches-py/data_batch_3",
        "cifar-10-batches-py/data_batch_4",
        "cifar-10-batches-py/data_batch_5",
        "cifar-10-batches-py/test_batch",
        "cifar-10-batches-py/batches.meta",
    ),
    "cifar100": (
        "cifar-100-python/train",
        "cifar-100-python/test",
        "cifar-100-python/meta",
    ),
}

_HINTS = {
    "fashion-mnist": "uncompressed IDX files (gunzip the .gz downloads)",
    "emnist": "uncompressed IDX files of the EMNIST 'letters' split (from the NIST gzip.zip, gunzipped)",
    "cifar10": "the extracted CIFAR-10 python version (cifar-10-python.tar.gz)",
    "cifar100": "the extracted CIFAR-100 python version (cifar-100-python.tar.gz)",
}

#: SHA-256 of the *uncompressed* bundled MNIST files.
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

#: Where the gzip copies shipped with the package live.
BUNDLED_MNIST_DIR = Path(__file__).resolve().parent / "datasets" / "MNIST" / "raw"


class LoadedDataset(TensorDataset):
    """A whole dataset as in-memory tensors.

    ``dataset[i]`` gives ``(image, label)`` as with any ``TensorDataset``;
    ``images`` (float32, N×C×H×W, normalised) and ``labels`` (int64, N) give
    the full tensors.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        name: str,
        num_classes: int,
        train: bool,
        classes: Sequence[str] | None = None,
    ) -> None:
        super().__init__(images, labels)
        self.name = name
        self.num_classes = num_classes
        self.train = train
        self.classes = list(classes) if classes is not None else None

    @property
    def images(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors[1]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return (
            f"LoadedDataset(name={self.name!r}, split={split!r}, n={len(self)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def _canonical_name(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; supported: {', '.join(sorted(DATASETS))}"
        )
    return key


def dataset_spec(name: str) -> DatasetSpec:
    """Return the :class:`DatasetSpec` (classes, shape, mean/std) of ``name``."""
    return DATASETS[_canonical_name(name)]


def cache_dir() -> Path:
    """The fedmerge cache directory: ``$FEDMERGE_CACHE`` or ``~/.cache/fedmerge``."""
    env = os.environ.get("FEDMERGE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedmerge"


# --------------------------------------------------------------------------- MNIST


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _extract_verified(src: Path, dst: Path, expected: str) -> None:
    """Gunzip ``src`` to ``dst`` atomically (temp file + rename), checking SHA-256."""
    if not src.is_file():
        raise FileNotFoundError(
            f"bundled MNIST file {src} is missing; the fedmerge installation is "
            f"incomplete (reinstall it, or restore fedmerge/datasets/MNIST/raw/ from git)"
        )
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, gzip.open(src, "rb") as inp:
            for chunk in iter(lambda: inp.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        digest = h.hexdigest()
        if digest != expected:
            raise RuntimeError(
                f"bundled MNIST file {src} is corrupted: SHA-256 of its decompressed "
                f"content is {digest}, expected {expected}. Reinstall fedmerge or "
                f"restore fedmerge/datasets/MNIST/raw/ from git."
            )
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def prepare_mnist(
    cache: str | os.PathLike | None = None,
    *,
    bundled_dir: str | os.PathLike | None = None,
) -> Path:
    """Make the bundled MNIST available uncompressed and return a torchvision root.

    The files land in ``<cache>/mnist/MNIST/raw/`` (``cache`` defaults to
    :func:`cache_dir`).  Cached files are checked against :data:`MNIST_SHA256`
    and re-extracted when missing or damaged; a damaged *bundled* file raises
    ``RuntimeError``.  Safe to run from several processes at once.
    """
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    root = root / "mnist"
    raw = root / "MNIST" / "raw"
    src_dir = Path(bundled_dir) if bundled_dir is not None else BUNDLED_MNIST_DIR
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(
            f"cannot create the fedmerge cache directory {raw} ({exc}); "
            f"set FEDMERGE_CACHE to a writable directory"
        ) from exc
    for fname, expected in MNIST_SHA256.items():
        dst = raw / fname
        if dst.is_file() and _sha256(dst) == expected:
            continue
        _extract_verified(src_dir / f"{fname}.gz", dst, expected)
    return root


# --------------------------------------------------------------------- other sets


def _require_files(name: str, data_dir: str | None, needed: Sequence[str]) -> Path:
    layout = "\n".join(f"    <data_dir>/{p}" for p in EXPECTED_LAYOUT[name])
    if data_dir is None:
        raise FileNotFoundError(
            f"dataset {name!r} is not bundled with fedmerge and is never downloaded: "
            f"pass data_dir (CLI: --data-dir) pointing to a directory holding "
            f"{_HINTS[name]} laid out as:\n{layout}"
        )
    root = Path(data_dir).expanduser()
    missing = [p for p in needed if not (root / p).is_file()]
    if missing:
        gz = [p for p in missing if (root / f"{p}.gz").is_file()]
        extra = f"\n(found gzip copies of {', '.join(gz)}: decompress them with gunzip)" if gz else ""
        raise FileNotFoundError(
            f"dataset {name!r}: missing {', '.join(missing)} under {root}. Expected "
            f"{_HINTS[name]} laid out as:\n{layout}{extra}"
        )
    return root


def _normalise(images_uint8: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """uint8 N×C×H×W -> float32 normalised with the dataset's mean/std."""
    x = images_uint8.to(torch.float32).div_(255.0)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


def _torchvision_datasets():
    """``torchvision.datasets``, or an ImportError that says which install brings it."""
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        raise ImportError("fedmerge.data reads datasets through torchvision, which the core install does not "
                          "bring: pip install \"fedmerge[federated]\" (or pip install torchvision)") from e
    return tvd


def _cifar_classes():
    tvd = _torchvision_datasets()
    CIFAR10, CIFAR100 = tvd.CIFAR10, tvd.CIFAR100

    class _NoMD5:
        """torchvision's CIFAR readers, with the md5 checks replaced by existence checks.

        The on-disk format is unchanged; this lets re-packed or generated copies load.
        """

        def _check_integrity(self) -> bool:  # type: ignore[override]
            return all(
                os.path.isfile(os.path.join(self.root, self.base_folder, f))
                for f, _ in self.train_list + self.test_list
            )

        def _load_meta(self) -> None:  # type: ignore[override]
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
            self.classes = data[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    class _CIFAR10(_NoMD5, CIFAR10):
        pass

    class _CIFAR100(_NoMD5, CIFAR100):
        pass

    return _CIFAR10, _CIFAR100


def _load_uncached(name: str, data_dir: str | None, train: bool, cache: str | None) -> LoadedDataset:
    tvd = _torchvision_datasets()

    spec = DATASETS[name]
    if name == "mnist":
        root = prepare_mnist(cache)
        ds = tvd.MNIST(str(root), train=train, download=False)
        images, labels, classes = ds.data.unsqueeze(1), ds.targets, ds.classes
    elif name == "fashion-mnist":
        root = _require_files(name, data_dir, EXPECTED_LAYOUT[name])
        ds = tvd.FashionMNIST(str(root), train=train, download=False)
        images, labels, classes = ds.data.unsqueeze(1), ds.targets, ds.classes
    elif name == "emnist":
        split_files = [p for p in EXPECTED_LAYOUT[name] if ("-train-" in p) == train]
        root = _require_files(name, data_dir, split_files)
        ds = tvd.EMNIST(str(root), split="letters", train=train, download=False)
        # EMNIST stores images transposed; flip them upright.
        images = ds.data.transpose(1, 2).unsqueeze(1)
        labels = ds.targets.to(torch.int64)
        if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > 26):
            raise ValueError(
                f"EMNIST letters labels must lie in 1..26, got "
                f"{int(labels.min())}..{int(labels.max())}; is this the 'letters' split?"
            )
        labels = labels - 1
        classes = list(ds.classes[1:])  # drop torchvision's "N/A" placeholder
    else:  # cifar10 / cifar100
        root = _require_files(name, data_dir, EXPECTED_LAYOUT[name])
        cifar10_cls, cifar100_cls = _cifar_classes()
        cls = cifar10_cls if name == "cifar10" else cifar100_cls
        ds = cls(str(root), train=train, download=False)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # NHWC -> NCHW
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
        classes = ds.classes
    images = _normalise(images, spec)
    labels = labels.to(torch.int64).contiguous()
    if tuple(images.shape[1:]) != spec.input_shape:
        raise ValueError(
            f"dataset {name!r}: images have shape {tuple(images.shape[1:])}, "
            f"expected {spec.input_shape}"
        )
    return LoadedDataset(
        images, labels, name=name, num_classes=spec.num_classes, train=train, classes=classes
    )


@functools.lru_cache(maxsize=None)
def _load_cached(name: str, data_dir: str | None, train: bool, cache: str | None) -> LoadedDataset:
    return _load_uncached(name, data_dir, train, cache)


def load_dataset(
    name: str = "mnist",
    *,
    data_dir: str | os.PathLike | None = None,
    train: bool = True,
) -> LoadedDataset:
    """Load a whole dataset split as normalised in-memory tensors.

    Args:
        name: ``"mnist"`` (bundled, offline), ``"fashion-mnist"``, ``"emnist"``
            (letters, 26 classes, labels 0..25), ``"cifar10"`` or ``"cifar100"``.
        data_dir: directory holding the non-bundled datasets in torchvision's
            on-disk layout (see :data:`EXPECTED_LAYOUT`); ignored for MNIST.
        train: the training split if true, else the test split.

    Returns:
        A :class:`LoadedDataset` with ``images`` (float32, N×C×H×W),
        ``labels`` (int64), ``num_classes`` and ``input_shape``.  The object is
        cached per process and shared: do not modify its tensors in place.

    Raises:
        ValueError: unknown dataset name.
        FileNotFoundError: files missing (the message gives the expected layout).
        RuntimeError: the bundled MNIST copy fails its SHA-256 check.
    """
    key = _canonical_name(name)
    if key == "mnist":
        return _load_cached(key, None, bool(train), str(cache_dir()))
    ddir = str(Path(data_dir).expanduser().resolve()) if data_dir is not None else None
    return _load_cached(key, ddir, bool(train), None)


def clear_cache() -> None:
    """Forget the per-process cache of loaded datasets."""
    _load_cached.cache_clear()
