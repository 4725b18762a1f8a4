"""Plain PyTorch training and evaluation helpers (no Flower).

Both functions take whole in-memory tensors (as returned by
:func:`fedmerge.data.load_dataset`) and work with models that output either
logits or log-probabilities (``log_softmax``): ``F.cross_entropy`` applies
``log_softmax`` first, and ``log_softmax`` is idempotent, so on log-probs it
equals ``nll_loss``.  Models that output *probabilities* (``softmax``) are not
supported.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["evaluate", "resolve_device", "train"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` -> ``cuda`` if available else ``cpu``; anything else -> ``torch.device(device)``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_inputs(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"images and labels differ in length: {images.shape[0]} vs {labels.shape[0]}"
        )
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D class indices, got shape {tuple(labels.shape)}")


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``model`` in place with SGD on cross-entropy.

    The model is moved to ``device`` (``None``: cuda if available, else cpu)
    and left there; the data tensors are moved to it as well.  Each epoch visits
    the examples in a fresh random order (last batch may be smaller).

    With ``seed`` set, the shuffling and any randomness inside the model
    (dropout, ...) are drawn from that seed without touching the global RNG
    state, so two calls with the same model weights, data and seed give the
    same result on CPU (on GPU, bit-identical results also need
    ``torch.use_deterministic_algorithms(True)``).  With ``seed=None`` the
    global RNG is used.

    Returns a dict: ``loss`` and ``accuracy`` (mean over the last epoch's
    training batches, measured while training), ``epoch_losses`` and
    ``epoch_accuracies`` (one per epoch), ``num_examples``, ``steps``
    (optimizer steps taken), ``epochs`` and ``device``.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_inputs(images, labels)
    n = int(images.shape[0])
    if n == 0:
        raise ValueError("cannot train on an empty dataset")

    dev = resolve_device(device)
    model.to(dev)
    x_all = images.to(dev)
    y_all = labels.to(dev, dtype=torch.long)

    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )

    if seed is not None:
        fork_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
        rng_ctx: contextlib.AbstractContextManager = torch.random.fork_rng(devices=fork_devices)
        generator: torch.Generator | None = torch.Generator().manual_seed(int(seed))
    else:
        rng_ctx = contextlib.nullcontext()
        generator = None

    epoch_losses: list[float] = []
    epoch_accuracies: list[float] = []
    steps = 0
    was_training = model.training
    num_batches = (n + batch_size - 1) // batch_size
    with rng_ctx:
        if seed is not None:
            torch.manual_seed(int(seed))
        model.train()
        bar = tqdm(
            total=epochs * num_batches, desc="train", unit="batch", disable=not progress, leave=False
        )
        try:
            for epoch in range(epochs):
                order = torch.randperm(n, generator=generator).to(dev)
                loss_sum = torch.zeros((), device=dev)
                correct = torch.zeros((), dtype=torch.long, device=dev)
                for start in range(0, n, batch_size):
                    idx = order[start : start + batch_size]
                    x, y = x_all[idx], y_all[idx]
                    optimizer.zero_grad(set_to_none=True)
                    out = model(x)
                    loss = F.cross_entropy(out, y)
                    loss.backward()
                    optimizer.step()
                    steps += 1
                    loss_sum += loss.detach() * y.shape[0]
                    correct += (out.detach().argmax(dim=1) == y).sum()
                    bar.update(1)
                epoch_losses.append(float(loss_sum) / n)
                epoch_accuracies.append(int(correct) / n)
                if progress:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_losses[-1]:.4f}")
        finally:
            bar.close()
            model.train(was_training)

    return {
        "loss": epoch_losses[-1] if epoch_losses else float("nan"),
        "accuracy": epoch_accuracies[-1] if epoch_accuracies else float("nan"),
        "epoch_losses": epoch_losses,
        "epoch_accuracies": epoch_accuracies,
        "num_examples": n,
        "steps": steps,
        "epochs": epochs,
        "device": str(dev),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 1000,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``images``/``labels``.

    Runs in eval mode (the model's previous mode is restored afterwards) on
    ``device`` (``None``: cuda if available, else cpu), moving the model there.
    Returns ``{"loss": float, "accuracy": float, "num_examples": int}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_inputs(images, labels)
    n = int(images.shape[0])
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")

    dev = resolve_device(device)
    model.to(dev)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    try:
        for start in range(0, n, batch_size):
            x = images[start : start + batch_size].to(dev)
            y = labels[start : start + batch_size].to(dev, dtype=torch.long)
            out = model(x)
            loss_sum += F.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(dim=1) == y).sum()
    finally:
        model.train(was_training)
    return {"loss": float(loss_sum) / n, "accuracy": int(correct) / n, "num_examples": n}
