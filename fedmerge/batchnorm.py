"""Folding BatchNorm into the layer that produces its input, and back: how BatchNorm networks get rotated.

In eval mode a BatchNorm that directly follows a ``Linear`` or ``Conv`` layer is an affine map per
channel, ``BN(y) = γ (y - μ) / sqrt(σ² + ε) + β``, so ``BN(W x + b) = W' x + b'`` with

    ``s = γ / sqrt(σ² + ε)``,  ``W' = s · W`` (per output channel),  ``b' = s (b - μ) + β``.

:func:`fold_batchnorm` finds those pairs on the template's ``torch.fx`` graph and returns a
:class:`BatchNormFolding`: a template without them (each producer given a bias, each such
BatchNorm replaced by ``nn.Identity``), its symmetry spec (the BatchNorm entries dropped, the new
biases added to the producer's group, the kinds kept) and ``fold``/``unfold`` of state_dicts.  A
folded model computes the eval-mode function of the BatchNorm model exactly (to rounding), and
carries no per-channel statistics, so a rotation of its channels is an ordinary change of basis of
the producer's outputs: what orthogonal alignment needs (a rotation of BatchNorm channels is not
a symmetry; :mod:`fedmerge.matching.orthogonal` refuses it).  Whether the rotation is a symmetry
of the *network* is still decided by what consumes the channels (a ReLU: no; see the spec's kinds).

``unfold`` puts a folded state_dict back into the BatchNorm architecture with the same eval-mode
function.  With calibration ``inputs`` it *re-estimates* the running statistics there (RESET):
``μ, σ²`` become the statistics of each BatchNorm's input on the inputs and ``γ = sqrt(σ² + ε)``,
``β = μ + b'``, so the function is unchanged and a train-mode pass over data like the inputs
computes (nearly) the same function as eval mode — the state a client can keep training from.
Without inputs the statistics are the identity (``μ = 0``, ``σ² = 1``, ``γ = sqrt(1 + ε)``), or,
data-free, ``statistics=`` estimates of them: :meth:`BatchNormFolding.merged_statistics` takes the
models' own running statistics, expressed in the folded producer's units (``s (μ - b)`` and
``s² σ²``), moves them with each model's alignment map and averages them with the merge weights.
The eval-mode function is exact whatever the statistics; they decide what train mode computes
(batch statistics replace them, ``γ`` and ``β`` stay), so a model that clients go on training
should get the closest estimate available.
A classic RESET of an *interpolated* BatchNorm model changes its function because the running
statistics of an interpolation are not the interpolation of running statistics; a merge of folded
models has no such statistics, so there is nothing to reset, and the variance collapse of
averaging is what REPAIR corrects (on the folded model, where its repair points are the
producers' outputs — the same units as the BatchNorm outputs of the original).

:func:`merge` is the whole pipeline: fold every model, :func:`fedmerge.merge` the folded models
(any ``align``/``average``/``repair``; REPAIR runs on the folded template), unfold (statistics
re-estimated on calibration inputs when given, otherwise the data-free estimate above).  The
federated strategies do the same when their alignment rotates BatchNorm channels
(``strategies.MergingStrategy``, ``fold_batchnorm=``).

A ``Linear`` followed by ``BatchNorm1d`` is folded on the assumption that its input is
``(batch, features)`` (BatchNorm1d on a 3-D input normalises axis 1, not the features).
BatchNorms that do not directly follow a producer called once (after an activation, a sum, on the
network's input, or a shared layer) cannot be folded and stay; their channels remain unrotatable.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .activations import calibration_batches, run_with_hooks
from .spec import SymmetrySpec

__all__ = ["BatchNormFolding", "fold_batchnorm", "merge"]

StateDict = Mapping[str, torch.Tensor]

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_FOR = {nn.Linear: nn.BatchNorm1d, nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d,
             nn.Conv3d: nn.BatchNorm3d}
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(producer, batchnorm)`` module names where the BatchNorm's only input is the producer's output."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - any tracing failure
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx to find BatchNorm layers to fold "
                         f"({exc})") from exc
    named = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    out = []
    for node in graph.nodes:
        if node.op != "call_module" or type(named[node.target]) not in _NORM_FOR or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op != "call_module" or not user.args or user.args[0] is not node:
            continue
        norm = named[user.target]
        if type(norm) is not _NORM_FOR[type(named[node.target])] or not norm.track_running_stats:
            continue
        if calls[node.target] > 1 or calls[user.target] > 1:
            continue  # a shared layer: one fold cannot serve two call sites
        out.append((node.target, user.target))
    return out


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _with_bias(layer: nn.Module) -> nn.Module:
    if layer.bias is not None:
        return copy.deepcopy(layer)
    if isinstance(layer, nn.Linear):
        new = nn.Linear(layer.in_features, layer.out_features, bias=True)
    else:
        new = type(layer)(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                          padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=True,
                          padding_mode=layer.padding_mode)
    new = new.to(device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        new.bias.zero_()
    return new


@dataclass
class BatchNormFolding:
    """The BatchNorm-free counterpart of a template (:func:`fold_batchnorm`) and the maps between the two.

    ``model``: the folded template (its ``permutation_spec()`` returns ``spec``); ``spec``: its
    symmetry spec (``None`` if none was given or derivable); ``pairs``: the folded
    ``(producer, batchnorm)`` module names; ``original``: the BatchNorm template.
    """

    original: nn.Module
    model: nn.Module
    spec: SymmetrySpec | None
    pairs: list[tuple[str, str]]
    _eps: dict[str, float] = field(default_factory=dict, repr=False)
    _had_bias: dict[str, bool] = field(default_factory=dict, repr=False)

    def _check(self, state_dict: StateDict, keys: Iterable[str], what: str) -> None:
        missing = [k for k in keys if k not in state_dict]
        if missing:
            raise ValueError(f"{what}: the state_dict has no {missing[0]!r} (is it a state_dict of the "
                             f"{'BatchNorm' if what == 'fold' else 'folded'} model?)")

    def fold(self, state_dict: StateDict) -> dict[str, torch.Tensor]:
        """The folded state_dict: the same eval-mode function without the folded BatchNorms."""
        keys = [f"{n}.{k}" for _, n in self.pairs for k in ("running_mean", "running_var")]
        self._check(state_dict, keys + [f"{p}.weight" for p, _ in self.pairs], "fold")
        out = dict(state_dict)
        for prod, norm in self.pairs:
            w = state_dict[f"{prod}.weight"]
            mean = state_dict[f"{norm}.running_mean"].double()
            var = state_dict[f"{norm}.running_var"].double()
            gamma = state_dict.get(f"{norm}.weight")
            beta = state_dict.get(f"{norm}.bias")
            s = (torch.ones_like(var) if gamma is None else gamma.double()) / (var + self._eps[norm]).sqrt()
            b = state_dict.get(f"{prod}.bias")
            b = torch.zeros_like(mean) if b is None else b.double()
            out[f"{prod}.weight"] = (w.double() * s.view(-1, *[1] * (w.dim() - 1))).to(w.dtype)
            out[f"{prod}.bias"] = (s * (b - mean) + (0 if beta is None else beta.double())).to(w.dtype)
            for k in _BN_KEYS:
                out.pop(f"{norm}.{k}", None)
        return {k: out[k] for k in self.model.state_dict()}

    def unfold(self, state_dict: StateDict, inputs: torch.Tensor | Iterable | None = None, *,
               statistics: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
               ) -> dict[str, torch.Tensor]:
        """A folded state_dict back in the BatchNorm architecture, computing the same eval-mode function.

        With calibration ``inputs`` the running statistics are those of each BatchNorm's input on
        them (RESET) and ``γ``, ``β`` compensate.  ``statistics`` (``{producer: (mean, var)}`` of
        ``W' x``, e.g. :meth:`merged_statistics`) gives them instead, without data; producers it
        leaves out, and every producer when neither is given, get the identity statistics.
        """
        self._check(state_dict, [f"{p}.{k}" for p, _ in self.pairs for k in ("weight", "bias")], "unfold")
        if inputs is not None and statistics is not None:
            raise ValueError("unfold: give calibration inputs or statistics, not both")
        template = self.original.state_dict()
        stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if inputs is not None:
            stats = self._input_statistics(state_dict, inputs)
        elif statistics is not None:
            stats = self._checked_statistics(statistics, state_dict)
        out = dict(state_dict)
        for prod, norm in self.pairs:
            w, bias = state_dict[f"{prod}.weight"], state_dict[f"{prod}.bias"].double()
            eps = self._eps[norm]
            if prod in stats:
                mean, var = stats[prod]
            else:
                mean, var = torch.zeros_like(bias), torch.ones_like(bias)
            out[f"{prod}.weight"] = w
            if self._had_bias[prod]:
                out[f"{prod}.bias"] = torch.zeros_like(state_dict[f"{prod}.bias"])
            else:
                del out[f"{prod}.bias"]
            # BN(y) = γ (y - μ) / sqrt(σ² + ε) + β = y + b'  with  γ = sqrt(σ² + ε), β = μ + b'
            out[f"{norm}.running_mean"] = mean.to(w.dtype)
            out[f"{norm}.running_var"] = var.to(w.dtype)
            gamma, beta = (var + eps).sqrt(), mean + bias
            if f"{norm}.weight" in template:
                out[f"{norm}.weight"] = gamma.to(w.dtype)
                out[f"{norm}.bias"] = beta.to(w.dtype)
            elif not (torch.allclose(gamma, torch.ones_like(gamma)) and torch.allclose(beta, torch.zeros_like(beta))):
                raise ValueError(f"BatchNorm {norm!r} has no affine parameters to carry the folded scale and "
                                 "shift; a folded state_dict of it cannot be unfolded")
            if f"{norm}.num_batches_tracked" in template:
                out[f"{norm}.num_batches_tracked"] = torch.zeros_like(template[f"{norm}.num_batches_tracked"])
        return {k: out[k] for k in template}

    def statistics(self, state_dict: StateDict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """A BatchNorm state_dict's running statistics in its folded producers' units, without data.

        ``{producer: (mean, var)}`` of ``W' x`` (the folded producer's output without its bias):
        ``s (μ - b)`` and ``s² σ²`` with ``s = γ / sqrt(σ² + ε)`` and ``b`` the producer's own bias
        (zero if it has none) — what the running statistics say about the folded model's units.
        """
        keys = [f"{n}.{k}" for _, n in self.pairs for k in ("running_mean", "running_var")]
        self._check(state_dict, keys, "statistics")
        out = {}
        for prod, norm in self.pairs:
            mean = state_dict[f"{norm}.running_mean"].double()
            var = state_dict[f"{norm}.running_var"].double()
            gamma = state_dict.get(f"{norm}.weight")
            s = (torch.ones_like(var) if gamma is None else gamma.double()) / (var + self._eps[norm]).sqrt()
            b = state_dict.get(f"{prod}.bias")
            b = torch.zeros_like(mean) if b is None else b.double()
            out[prod] = (s * (mean - b), s * s * var)
        return out

    def merged_statistics(self, state_dicts: Sequence[StateDict],
                          transforms: Sequence[Mapping[str, Any]] | None = None,
                          weights: Sequence[float] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """A data-free estimate of a merged folded model's statistics, for :meth:`unfold` (``statistics=``).

        Every BatchNorm model's :meth:`statistics`, moved into the common space with its map of
        ``transforms`` (one ``{group: element}`` per model on :attr:`spec`, as a merge of the
        folded models returns them; ``None``: the models' own space) and averaged with the
        ``weights``.  A map with matrix ``M`` moves the means exactly (``Mᵀ μ``) and the variances
        as if the units were uncorrelated (``(M ∘ M)ᵀ σ²``, exact for permutations).  These are the
        statistics of the merged model itself only as far as the merge keeps the models'
        statistics; calibration inputs (``unfold(sd, inputs)``) measure them instead.
        """
        from .validation import normalize_weights

        if not state_dicts:
            raise ValueError("merged_statistics: no state_dicts given")
        if transforms is not None and len(transforms) != len(state_dicts):
            raise ValueError(f"merged_statistics: {len(transforms)} transforms for {len(state_dicts)} state_dicts")
        if transforms is not None and self.spec is None:
            raise ValueError("merged_statistics: transforms act on the folded spec, and this folding has none")
        w = normalize_weights(weights, len(state_dicts))
        device = next(iter(state_dicts[0].values())).device
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, sd in enumerate(state_dicts):
            for prod, (mean, var) in self.statistics(sd).items():
                mean, var = mean.to(device), var.to(device)
                g = self.spec.axes[f"{prod}.weight"][0] if transforms is not None else None
                if g is not None and g in transforms[i]:
                    m = self.spec.group(g).matrix(transforms[i][g]).to(device=device, dtype=torch.float64)
                    mean, var = m.T @ mean, (m * m).T @ var
                if prod in out:
                    out[prod] = (out[prod][0] + w[i] * mean, out[prod][1] + w[i] * var)
                else:
                    out[prod] = (w[i] * mean, w[i] * var)
        return out

    def _checked_statistics(self, statistics: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                            state_dict: StateDict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if not isinstance(statistics, Mapping):
            raise TypeError(f"statistics must be a mapping {{producer: (mean, var)}}, got {type(statistics).__name__}")
        producers = {p for p, _ in self.pairs}
        out = {}
        for prod, value in statistics.items():
            if prod not in producers:
                raise ValueError(f"statistics: {prod!r} is not a folded producer (folded: {sorted(producers)})")
            try:
                mean, var = value
            except (TypeError, ValueError):
                raise ValueError(f"statistics[{prod!r}] must be a pair (mean, var)") from None
            d = state_dict[f"{prod}.bias"].shape[0]
            mean, var = torch.as_tensor(mean).double(), torch.as_tensor(var).double()
            if mean.shape != (d,) or var.shape != (d,):
                raise ValueError(f"statistics[{prod!r}]: expected mean and var of shape ({d},), got "
                                 f"{tuple(mean.shape)} and {tuple(var.shape)}")
            if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all()) and bool((var >= 0).all())):
                raise ValueError(f"statistics[{prod!r}]: the mean must be finite and the variance finite and >= 0")
            device = state_dict[f"{prod}.bias"].device
            out[prod] = (mean.to(device), var.to(device))
        return out

    def _input_statistics(self, state_dict: StateDict, inputs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per folded producer, the mean and (population) variance of ``W' x`` (its output without the bias)."""
        sums: dict[str, list] = {}
        modules = dict(self.model.named_modules())

        def hook_for(prod):
            def hook(module, args, output):
                bias = state_dict[f"{prod}.bias"].to(output.dtype)
                dim = -1 if isinstance(modules[prod], nn.Linear) else 1
                y = output.detach().movedim(dim, -1).double() - bias.double()
                y = y.reshape(-1, y.shape[-1])
                acc = sums.setdefault(prod, [0, 0.0, 0.0])
                acc[0] += y.shape[0]
                acc[1] = acc[1] + y.sum(0)
                acc[2] = acc[2] + (y * y).sum(0)
            return hook

        run_with_hooks(self.model, state_dict, calibration_batches(inputs), {p: hook_for(p) for p, _ in self.pairs})
        out = {}
        for prod, (n, s, sq) in sums.items():
            mean = s / n
            out[prod] = (mean, (sq / n - mean ** 2).clamp_min(0.0))
        return out


def _folded_spec(spec: SymmetrySpec, pairs: Sequence[tuple[str, str]], model: nn.Module) -> SymmetrySpec:
    axes = dict(spec.axes)
    for prod, norm in pairs:
        wax = axes.get(f"{prod}.weight")
        if wax is None:
            raise ValueError(f"the spec has no entry {prod + '.weight'!r}")
        nax = axes.get(f"{norm}.running_mean", (None,))
        if nax[0] != wax[0]:
            raise ValueError(f"the spec puts {norm!r} in group {nax[0]!r} but its producer {prod!r} in {wax[0]!r}")
        for k in _BN_KEYS:
            axes.pop(f"{norm}.{k}", None)
        axes[f"{prod}.bias"] = (wax[0],)
    keys = list(model.state_dict())
    return SymmetrySpec({k: axes[k] for k in keys}, spec.sizes, spec.kinds)


def fold_batchnorm(model: nn.Module, spec: SymmetrySpec | None = None) -> BatchNormFolding:
    """The folding of every BatchNorm of ``model`` that directly follows a Linear/Conv layer.

    ``spec`` (default: the model's hand-written ``permutation_spec()``) is carried over to the
    folded model, kinds included; a model without either gets the spec traced from the folded
    model (:func:`fedmerge.spec_from_module`), whose kinds are those of the folded architecture:
    units between a folded ``Linear``/``Conv`` and a linear consumer become orthogonal.  Raises
    ``ValueError`` if there is no such BatchNorm, or the model cannot be traced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    pairs = _pairs(model)
    if not pairs:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer directly after a Linear/Conv layer to fold")
    folded = copy.deepcopy(model)
    eps, had_bias = {}, {}
    for prod, norm in pairs:
        layer = model.get_submodule(prod)
        had_bias[prod] = layer.bias is not None
        eps[norm] = float(model.get_submodule(norm).eps)
        _set_module(folded, prod, _with_bias(layer))
        _set_module(folded, norm, nn.Identity())
    fspec = None
    if spec is not None or callable(getattr(model, "permutation_spec", None)):
        fspec = _folded_spec(spec if spec is not None else model.permutation_spec(), pairs, folded)
    else:  # traced: the folded architecture's own kinds (a group between two linear maps becomes orthogonal)
        from .tracing import spec_from_module
        try:
            fspec = spec_from_module(folded)
        except Exception:  # noqa: BLE001 - no spec: folding alone is still useful
            fspec = None
    if fspec is not None:
        folded.permutation_spec = lambda: fspec  # spec_for(folded) and merge(model=folded) find it
    return BatchNormFolding(model, folded, fspec, pairs, eps, had_bias)


def merge(state_dicts: Sequence[StateDict], *, model: nn.Module, spec: SymmetrySpec | None = None,
          unfold_inputs: torch.Tensor | Iterable | None = None, full_output: bool = False,
          **merge_options: Any):
    """:func:`fedmerge.merge` of BatchNorm models through their folded forms; the result in the BatchNorm architecture.

    Every model is folded (:func:`fold_batchnorm`), the folded models are merged with
    ``merge_options`` (``align``, ``average``, ``repair``, ``align_options``, ...; ``spec`` given
    here is the BatchNorm model's and is folded too; a spec in ``align_options`` must be the
    folded one), and the merged state_dict is unfolded, its running statistics re-estimated on
    ``unfold_inputs`` if given (otherwise on REPAIR's calibration inputs if ``repair`` has them,
    otherwise estimated without data from the models' own running statistics, moved by their maps
    and averaged with the merge weights: :meth:`BatchNormFolding.merged_statistics`).
    ``full_output=True`` also returns the :class:`MatchResult` (its transforms act on the folded
    models) and the :class:`BatchNormFolding`.
    """
    from .api import merge as merge_folded

    if merge_options.get("repair") == "reset":
        raise ValueError("repair='reset': a folded model has no BatchNorm statistics to reset; they are "
                         "re-estimated when it is unfolded (unfold_inputs=). Use repair='repair' for REPAIR")
    folding = fold_batchnorm(model, spec)
    folded = [folding.fold(sd) for sd in state_dicts]
    kwargs = dict(merge_options)
    if folding.spec is not None:
        kwargs["spec"] = folding.spec
    merged, result = merge_folded(folded, model=folding.model, full_output=True, **kwargs)
    if unfold_inputs is None:
        repair = merge_options.get("repair")
        if repair is not None and not isinstance(repair, str) and not callable(repair):
            unfold_inputs = repair
        else:
            unfold_inputs = (merge_options.get("repair_options") or {}).get("inputs")
    if unfold_inputs is not None:
        out = folding.unfold(merged, unfold_inputs)
    else:
        transforms = result.transforms if result.transforms and folding.spec is not None else None
        out = folding.unfold(merged, statistics=folding.merged_statistics(state_dicts, transforms,
                                                                          merge_options.get("weights")))
    return (out, result, folding) if full_output else out
