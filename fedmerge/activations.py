"""Forward passes over a state_dict with hooks: how fedmerge looks at a model's activations.

Everything that needs activations (REPAIR's statistics, RESET of BatchNorm statistics) runs the
architecture given by a template ``nn.Module`` on a *state_dict* with
:func:`torch.func.functional_call`, so the template's own parameters are never read or changed.
Hooks are registered on the template's submodules for the duration of one pass and removed
afterwards, and the template's train/eval mode is restored: nothing of this is visible to the
caller.

Calibration inputs are a tensor (split into batches), or an iterable of batches, each a tensor or
an ``(inputs, targets)`` pair as a ``DataLoader`` yields; targets are ignored.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

__all__ = ["calibration_batches", "check_fits", "run_with_hooks"]

#: Batch size used to split a calibration *tensor* into batches.
DEFAULT_BATCH_SIZE = 500


def _batch_inputs(batch: Any, index: int) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"calibration batch {index} is a {type(batch).__name__}; expected a tensor or an "
                    "(inputs, targets) pair of tensors")


def calibration_batches(inputs: torch.Tensor | Iterable, *, batch_size: int = DEFAULT_BATCH_SIZE
                        ) -> list[torch.Tensor]:
    """The input tensors of a calibration set, as a list of batches (so that it can be read many times).

    ``inputs`` is a tensor (its first axis is the sample axis; it is split into ``batch_size``
    chunks) or an iterable of batches: tensors, or ``(inputs, targets)`` pairs.  A one-shot
    iterator is read once here.  Raises ``ValueError`` for an empty set and ``TypeError`` for
    anything else.
    """
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            raise ValueError(f"inputs: expected a non-empty batch of calibration inputs, got shape "
                             f"{tuple(inputs.shape)}")
        return list(torch.split(inputs, int(batch_size)))
    if isinstance(inputs, (str, bytes, Mapping)) or not isinstance(inputs, Iterable):
        raise TypeError(f"calibration inputs must be a tensor or an iterable of batches, got {type(inputs).__name__}")
    batches = [_batch_inputs(b, i) for i, b in enumerate(inputs)]
    batches = [b for b in batches if b.shape[0] > 0] if batches and batches[0].dim() > 0 else batches
    if not batches:
        raise ValueError("the calibration inputs are empty")
    if any(b.dim() == 0 for b in batches):
        raise ValueError("calibration batches must have a sample axis; got a 0-d tensor")
    return batches


def check_fits(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``state_dict`` has exactly the keys and shapes of ``model``'s.

    ``functional_call`` itself would run any tensors whose shapes happen to compose.
    """
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or extra:
        raise ValueError(f"the state_dict does not fit {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for key, value in own.items():
        if tuple(state_dict[key].shape) != tuple(value.shape):
            raise ValueError(f"the state_dict does not fit {type(model).__name__}: {key} has shape "
                             f"{tuple(state_dict[key].shape)}, the model's {tuple(value.shape)}")


@contextlib.contextmanager
def _hooked(model: nn.Module, hooks: Mapping[str, Callable], train: bool) -> Iterator[None]:
    modules = dict(model.named_modules())
    missing = sorted(set(hooks) - set(modules))
    if missing:
        raise ValueError(f"the model has no submodules {missing}")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    if train:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    handles = [modules[name].register_forward_hook(fn) for name, fn in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode


def run_with_hooks(model: nn.Module, state_dict: Mapping[str, torch.Tensor], batches: Sequence[torch.Tensor],
                   hooks: Mapping[str, Callable[[nn.Module, tuple, torch.Tensor], Any]], *,
                   train: bool = False) -> None:
    """Run ``model``'s forward on every batch with the weights of ``state_dict`` and forward ``hooks``.

    ``hooks`` maps submodule names to ``hook(module, args, output)`` (``nn.Module`` forward-hook
    semantics: returning a tensor replaces the output).  Runs without autograd, in eval mode;
    with ``train``, BatchNorm layers (only they: dropout stays off) run in train mode, normalising
    with batch statistics and updating the running statistics *of the tensors in* ``state_dict``
    (pass copies).  ``state_dict`` must hold every parameter and buffer of ``model``.  Batches are
    moved to the state_dict's device.
    """
    check_fits(model, state_dict)
    device = next(iter(state_dict.values())).device
    tensors = dict(state_dict)
    with _hooked(model, hooks, train), torch.no_grad():
        for x in batches:
            torch.func.functional_call(model, tensors, (x.to(device),), strict=True)
