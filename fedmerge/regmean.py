"""RegMean: merge each linear layer by least squares on every model's own layer inputs.

Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models" (ICLR 2023).  For a
layer ``y = W x + b`` and models ``i`` with weights ``w_i`` (normalised to sum to one), the merged
layer is the one whose outputs are closest, in the mean square, to every model's own outputs on
that model's own inputs:

    W* = argmin_W  Σ_i w_i E_{x ~ model i}[ ||W x̃ − W_i x̃||² ],   x̃ = (x, 1)   (the bias is fitted too)
       = (Σ_i w_i G̃_i)⁻¹ Σ_i w_i G̃_i W_iᵀ          (transposed),   G_i = E[x̃ x̃ᵀ]

where the expectation is over model ``i``'s inputs to the layer (its activations on its data).
With ``w_i`` proportional to sample counts this is the paper's sum of Gram matrices.  The paper's
regularisation shrinks the off-diagonal entries, ``G̃ = α G + (1 − α) diag(G)`` (``alpha``;
``alpha=1`` is the plain least-squares fit).  Inputs that never vary (always-zero pixels, dead
units) leave directions of ``W`` undetermined; a small ridge pulls those towards the weighted mean
of the models: ``(A + λ I) W = B + λ W̄``, ``λ = ridge · trace(A) / dim``.  Convolutions are the
same regression on their unfolded input patches (``groups=1``, zero padding).  Every other tensor
(normalisation layers, BatchNorm buffers, layers without a Gram) is the weighted mean.

Alignment first: RegMean compares units across models, so the models must be in a common space.
:func:`input_grams` on an *aligned* state_dict gives Gram matrices in that space; a federated
client computes them on its *own* model and the server moves them with :func:`map_grams`, using
that client's alignment (Grams move as ``M G Mᵀ`` on the input units; every group of
:mod:`fedmerge.symmetry` is orthogonal, so this is exact for permutations and rotations alike).

Only second moments of layer inputs are needed: no samples leave their owner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .activations import calibration_batches, run_with_hooks
from .averaging import weighted_average
from .spec import SymmetrySpec
from .validation import normalize_weights

__all__ = ["DEFAULT_ALPHA", "DEFAULT_MAX_INPUTS", "DEFAULT_RIDGE", "InputGram", "input_grams", "map_grams", "regmean_average",
           "regmean_layers"]

StateDict = Mapping[str, torch.Tensor]

#: RegMean's off-diagonal scaling ``α`` (the paper's regularisation; measured in BENCHMARKS.md (e)).
DEFAULT_ALPHA = 0.9
#: Relative ridge towards the weighted mean for directions the inputs do not determine.
DEFAULT_RIDGE = 1e-6
#: Layers with more inputs than this are averaged, not fitted: a Gram matrix holds ``d²`` numbers per
#: model (VGG's 25088-input classifier: 5 GB in float64), and a server keeps one per client.
DEFAULT_MAX_INPUTS = 4096


@dataclass
class InputGram:
    """Sums over a layer's input rows ``x`` (float64): ``count``, ``Σ x xᵀ`` (``xx``) and ``Σ x`` (``x``).

    A row is one sample for a ``Linear`` layer and one patch position of one sample for a
    convolution.  ``a + b`` pools two sets of rows exactly.
    """

    count: float
    xx: torch.Tensor
    x: torch.Tensor

    def __add__(self, other: "InputGram") -> "InputGram":
        if self.xx.shape != other.xx.shape:
            raise ValueError(f"cannot pool Gram matrices of shapes {tuple(self.xx.shape)} and "
                             f"{tuple(other.xx.shape)}")
        dev = self.xx.device
        return InputGram(self.count + other.count, self.xx + other.xx.to(dev), self.x + other.x.to(dev))

    def matrix(self, bias: bool) -> torch.Tensor:
        """``E[x̃ x̃ᵀ]`` with ``x̃ = (x, 1)`` when ``bias``, else ``E[x xᵀ]``."""
        g = self.xx / self.count
        if not bias:
            return g
        m = (self.x / self.count).unsqueeze(1)
        top = torch.cat([g, m], 1)
        bottom = torch.cat([m.T, torch.ones(1, 1, dtype=g.dtype, device=g.device)], 1)
        return torch.cat([top, bottom], 0)


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def regmean_layers(model: nn.Module, *, max_inputs: int | None = DEFAULT_MAX_INPUTS) -> list[str]:
    """Names of the layers RegMean fits, in module order (a client and a server building the same
    model agree): every ``nn.Linear`` and every ``nn.Conv2d`` with ``groups=1`` and numeric zero
    padding whose input rows have at most ``max_inputs`` entries (in-features, or in-channels ×
    kernel positions; ``None``: no limit).  The other layers are averaged by the weighted mean."""
    return [name for name, module in model.named_modules()
            if name and _supported(module) and (max_inputs is None or module.weight[0].numel() <= max_inputs)]


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The regression rows of a layer's input: samples (Linear) or unfolded patches (Conv2d)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                       stride=module.stride)  # (N, C·kh·kw, L), channel-major like the weight's flattening
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def input_grams(model: nn.Module, state_dict: StateDict, inputs: torch.Tensor | Iterable, *,
                layers: Sequence[str] | None = None) -> dict[str, InputGram]:
    """Sums of every RegMean layer's inputs for the model ``state_dict`` on ``inputs``.

    ``inputs`` is a tensor or an iterable of batches (tensors or ``(inputs, targets)`` pairs);
    ``layers`` defaults to :func:`regmean_layers` (with its default ``max_inputs``).  Forward passes go through
    ``torch.func.functional_call``; the model itself is not changed.
    """
    names = regmean_layers(model) if layers is None else list(layers)
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules or not _supported(modules[name]):
            raise ValueError(f"{name!r} is not a layer RegMean can fit; choose among "
                             f"{regmean_layers(model, max_inputs=None)}")
    batches = calibration_batches(inputs)
    grams: dict[str, InputGram] = {}

    def hook_for(name: str):
        def hook(module, args, output):
            rows = _rows(module, args[0].detach()).double()
            g = InputGram(float(rows.shape[0]), rows.T @ rows, rows.sum(0))
            grams[name] = g if name not in grams else grams[name] + g
        return hook

    run_with_hooks(model, state_dict, batches, {n: hook_for(n) for n in names})
    missing = [n for n in names if n not in grams]
    if missing:
        raise ValueError(f"layers {missing} never ran in the model's forward pass")
    return grams


def _input_group(spec: SymmetrySpec, name: str) -> str | None:
    axes = spec.axes.get(f"{name}.weight")
    if axes is None:
        raise ValueError(f"{name + '.weight'!r} is not in the spec")
    return axes[1] if len(axes) > 1 else None


def map_grams(grams: Mapping[str, InputGram], spec: SymmetrySpec | None, transform: Mapping[str, Any]
              ) -> dict[str, InputGram]:
    """A model's Gram matrices moved into the common space by its alignment ``transform``.

    The aligned model's inputs to a layer are the model's, moved by the transform of the
    layer's input group, so ``Σ x xᵀ`` is acted on along both axes and ``Σ x`` along its one
    (block-wise where the axis is a flattened ``channels × positions`` axis).  An empty
    ``transform`` (no alignment) needs no ``spec``.
    """
    if not transform:
        return dict(grams)
    if spec is None:
        raise ValueError("map_grams needs the spec of the transform's groups")
    out = {}
    for name, g in grams.items():
        group = _input_group(spec, name)
        element = transform.get(group) if group is not None else None
        if element is None:
            out[name] = g
            continue
        act = spec.group(group).act
        out[name] = InputGram(g.count, act(act(g.xx, 0, element), 1, element), act(g.x, 0, element))
    return out


def _fit(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None, grams: Sequence[InputGram],
         w: Sequence[float], alpha: float, ridge: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The RegMean solution for one layer (weights flattened to ``(out, dim)``)."""
    shape, dtype = weights[0].shape, weights[0].dtype
    bias = biases is not None
    a = b = mean = 0
    for i, (weight, g, wi) in enumerate(zip(weights, grams, w)):
        wa = weight.reshape(shape[0], -1).double()
        if wa.shape[1] != g.xx.shape[0]:
            raise ValueError(f"model {i}: the Gram matrix is {tuple(g.xx.shape)} for a layer with "
                             f"{wa.shape[1]} inputs")
        if bias:
            wa = torch.cat([wa, biases[i].double().reshape(-1, 1)], 1)
        gm = g.matrix(bias).to(wa.device)
        gm = alpha * gm + (1.0 - alpha) * torch.diag(torch.diagonal(gm))
        a = a + wi * gm
        b = b + wi * gm @ wa.T
        mean = mean + wi * wa
    dim = a.shape[0]
    lam = ridge * float(torch.diagonal(a).sum()) / dim
    eye = torch.eye(dim, dtype=a.dtype, device=a.device)
    fitted = torch.linalg.solve(a + lam * eye, b + lam * mean.T).T
    if not torch.isfinite(fitted).all():
        raise ValueError("the RegMean system has no finite solution (increase ridge)")
    if bias:
        return fitted[:, :-1].reshape(shape).to(dtype), fitted[:, -1].to(dtype)
    return fitted.reshape(shape).to(dtype), None


def regmean_average(state_dicts: Sequence[StateDict], weights: Sequence[float] | None = None, *,
                    model: nn.Module | None = None, inputs: torch.Tensor | Iterable | None = None,
                    model_inputs: Sequence[torch.Tensor | Iterable] | None = None,
                    grams: Sequence[Mapping[str, InputGram]] | None = None, alpha: float = DEFAULT_ALPHA,
                    ridge: float = DEFAULT_RIDGE, max_inputs: int | None = DEFAULT_MAX_INPUTS
                    ) -> dict[str, torch.Tensor]:
    """The ``average="regmean"`` stage of :func:`fedmerge.merge` (see the module docstring).

    Parameters
    ----------
    state_dicts, weights:
        The models, already in a common space (aligned), and their weights (uniform if None).
    model:
        Template ``nn.Module`` of the architecture (it names the layers and runs the forward
        passes; :func:`fedmerge.merge` passes its own).
    inputs, model_inputs, grams:
        Exactly one: ``inputs``, one calibration set run through every model; ``model_inputs``,
        one per model (each model's own data, RegMean's setting); or ``grams``, one
        ``{layer: InputGram}`` per model, already in the common space (a federated server's
        :func:`map_grams` of its clients' Grams).  Layers missing from a model's ``grams`` are
        averaged by the weighted mean.
    alpha:
        Off-diagonal scaling of the Gram matrices, in ``[0, 1]`` (1: plain least squares).
    ridge:
        Relative ridge towards the weighted mean (``>= 0``).
    max_inputs:
        With ``inputs``/``model_inputs``: fit the layers of :func:`regmean_layers` with this
        limit on their input size (``None``: every supported layer).  Memory: one ``d × d``
        float64 Gram matrix per model and fitted layer.
    """
    n = len(state_dicts)
    if n == 0:
        raise ValueError("RegMean needs at least one model")
    given = [k for k, v in (("inputs", inputs), ("model_inputs", model_inputs), ("grams", grams)) if v is not None]
    if len(given) != 1:
        raise ValueError("RegMean needs exactly one of inputs= (a calibration set), model_inputs= (one set per "
                         f"model) or grams= (one {{layer: InputGram}} per model); got {given or 'none'}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not float(ridge) >= 0.0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    w = normalize_weights(weights, n)
    if grams is None:
        if model is None:
            raise ValueError("RegMean on calibration inputs needs model=<template nn.Module> to run forward passes")
        if model_inputs is not None and len(model_inputs) != n:
            raise ValueError(f"model_inputs: expected one calibration set per model ({n}), got {len(model_inputs)}")
        sets = [inputs] * n if inputs is not None else list(model_inputs)
        layers = regmean_layers(model, max_inputs=max_inputs)
        grams = [input_grams(model, sd, x, layers=layers) for sd, x in zip(state_dicts, sets)]
    elif len(grams) != n:
        raise ValueError(f"grams: expected one mapping per model ({n}), got {len(grams)}")
    merged = weighted_average(state_dicts, w, check=False)
    names = set(grams[0])
    for i, g in enumerate(grams):
        if set(g) != names:
            raise ValueError(f"grams: model {i} has layers {sorted(g)}, model 0 has {sorted(names)}")
    for name in sorted(names):
        key = f"{name}.weight"
        if key not in merged:
            raise ValueError(f"grams of {name!r}, but the models have no {key!r}")
        bias_key = f"{name}.bias"
        biases = [sd[bias_key] for sd in state_dicts] if bias_key in merged else None
        weight, bias = _fit([sd[key] for sd in state_dicts], biases, [g[name] for g in grams], w,
                            float(alpha), float(ridge))
        merged[key] = weight
        if bias is not None:
            merged[bias_key] = bias
    return merged
