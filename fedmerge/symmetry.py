"""Symmetry groups: the transformations that may act on a group of hidden units.

A :class:`~fedmerge.spec.SymmetrySpec` says which axes of which tensors a *group* of hidden units
occupies; the group's **kind** says which transformations of those units leave the network's
function unchanged:

``"permutation"``
    Reordering the units.  Exact for units followed by any elementwise nonlinearity (ReLU, GELU,
    per-channel normalisation, max pooling...).  An element is a ``LongTensor`` ``index`` of shape
    ``(d,)``: unit ``i`` of the result is unit ``index[i]`` of the input.
``"signed-permutation"``
    Reordering and flipping the sign of units.  Exact for units followed only by *odd* elementwise
    functions (``tanh``, ``sin``, ``Hardtanh``...).  An element is a :class:`SignedPermutation`
    ``(index, signs)``: unit ``i`` of the result is ``signs[i]`` times unit ``index[i]``.
``"orthogonal"``
    Any rotation or reflection ``Q ∈ O(d)`` of the units.  Exact when no elementwise nonlinearity
    sits between the layer that produces the units and the layers that consume them (an
    ``nn.Identity`` activation, a linear bottleneck).  An element is a float matrix ``Q`` of shape
    ``(d, d)``; the result is ``Qᵀ x`` along the axis.

Each kind implements one small protocol, :class:`Group`.  Every element has a matrix form ``M``
(``M[k, i]`` = weight of input unit ``k`` in output unit ``i``, so acting is ``Mᵀ x`` along the
axis), and the operations agree with it: ``act(act(t, a), b) == act(t, compose(a, b))``,
``M(compose(a, b)) = M(a) M(b)``, ``M(inverse(a)) = M(a)ᵀ``.  Code written against the protocol —
applying a transform to a state_dict, inverting, composing, drawing a random element for
:func:`~fedmerge.check_spec`, and the best response of an aligner to a score matrix — serves every
kind.  Permutations are a subgroup of both other kinds, so a permutation is a valid element of a
signed-permutation or orthogonal group too (the aligners of :mod:`fedmerge.matching` rely on
that only through :meth:`Group.best_response`).

A group may act on an axis of length ``k·d`` (a flattened ``(d, k)`` pair, as after ``flatten``
of a ``(C, H, W)`` feature map): the axis is then read as ``d`` blocks of ``k`` consecutive
entries and each block moves as one unit.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch

from .assignment import solve_lap

__all__ = ["KINDS", "Group", "Orthogonal", "Permutation", "SignedPermutation", "SignedPermutationGroup",
           "group", "group_of_element"]


class SignedPermutation(NamedTuple):
    """An element of a signed-permutation group: unit ``i`` becomes ``signs[i] * unit[index[i]]``."""

    index: torch.Tensor  # LongTensor (d,)
    signs: torch.Tensor  # float tensor (d,) of ±1

    def to(self, device) -> "SignedPermutation":
        return SignedPermutation(self.index.to(device), self.signs.to(device))


class Group(Protocol):
    """The operations on the elements of one kind of symmetry group."""

    kind: str

    def identity(self, d: int, device: Any = None) -> Any:
        """The element that changes nothing."""

    def act(self, t: torch.Tensor, axis: int, g: Any) -> torch.Tensor:
        """Transform the units of ``t`` along ``axis`` (block-wise when the axis is ``k·d`` long)."""

    def inverse(self, g: Any) -> Any:
        """The element that undoes ``g``."""

    def compose(self, first: Any, second: Any) -> Any:
        """The element equal to acting with ``first``, then with ``second``."""

    def random(self, d: int, generator: torch.Generator | None = None, device: Any = None) -> Any:
        """A random element (uniform: Haar measure for rotations)."""

    def from_permutation(self, index: torch.Tensor) -> Any:
        """The element of this group that is the permutation ``index`` (every kind contains them)."""

    def best_response(self, score: torch.Tensor) -> Any:
        """``argmax_g <score, M(g)>``: ``score[k, i]`` rates sending input unit ``k`` to unit ``i``."""

    def matrix(self, g: Any) -> torch.Tensor:
        """The element's ``(d, d)`` matrix form ``M`` (acting is ``Mᵀ x``)."""

    def score(self, score: torch.Tensor, g: Any) -> float:
        """``<score, M(g)>`` without forming ``M(g)`` where the kind allows (what a best response maximises)."""

    def equal(self, a: Any, b: Any) -> bool:
        """Whether two elements are the same, exactly."""

    def validate(self, g: Any, d: int, name: str) -> None:
        """Raise ``ValueError`` (starting with ``name``) unless ``g`` is an element of this group of size ``d``."""

    def defect(self, g: Any) -> float:
        """How far ``g`` is from the identity, in units: ``||M(g) - I||_F² / 2``.

        For a permutation this is the number of units it moves; for rotations and sign flips it
        is the same measure of the matrix form.
        """


def _blocked(t: torch.Tensor, axis: int, d: int) -> tuple[torch.Tensor, int]:
    """``t`` viewed with ``axis`` split into ``(d, k)``; returns the view and the unit axis."""
    n = t.shape[axis]
    if n % d:
        raise ValueError(f"axis {axis} of length {n} cannot be transformed in blocks of a group of size {d}")
    if n == d:
        return t, axis
    return t.reshape(*t.shape[:axis], d, n // d, *t.shape[axis + 1:]), axis


def _permute(t: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    v, a = _blocked(t, axis, index.numel())
    return v.index_select(a, index.to(t.device)).reshape(t.shape)


def _unit_shape(t: torch.Tensor, axis: int, d: int) -> list[int]:
    """A shape that broadcasts a length-``d`` vector over the units of ``_blocked(t, axis, d)``."""
    v, a = _blocked(t, axis, d)
    shape = [1] * v.dim()
    shape[a] = d
    return shape


def _check_index(index: Any, d: int, name: str) -> None:
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: expected an integer index tensor, got {type(index).__name__}"
                         + (f" of dtype {index.dtype}" if isinstance(index, torch.Tensor) else ""))
    if index.shape != (d,):
        raise ValueError(f"{name}: expected an index of shape ({d},), got {tuple(index.shape)}")
    if not torch.equal(torch.sort(index.cpu()).values, torch.arange(d)):
        raise ValueError(f"{name}: the index is not a permutation of 0..{d - 1}")


class Permutation:
    """Reordering of units; elements are ``LongTensor`` index vectors."""

    kind = "permutation"

    def identity(self, d, device=None):
        return torch.arange(d, device=device)

    def act(self, t, axis, g):
        return _permute(t, axis, g)

    def inverse(self, g):
        return torch.argsort(g)

    def compose(self, first, second):
        return first[second.to(first.device)]

    def random(self, d, generator=None, device=None):
        return torch.randperm(d, generator=generator).to(device)

    def from_permutation(self, index):
        return index

    def best_response(self, score):
        return solve_lap(score)

    def matrix(self, g):
        d = g.numel()
        m = torch.zeros(d, d, device=g.device)
        m[g, torch.arange(d, device=g.device)] = 1.0
        return m

    def score(self, score, g):
        return float(score[g.to(score.device), torch.arange(score.shape[1], device=score.device)].sum())

    def equal(self, a, b):
        return bool(torch.equal(a, b.to(a.device)))

    def validate(self, g, d, name):
        _check_index(g, d, name)

    def defect(self, g):
        return float((g.cpu() != torch.arange(g.numel())).sum())


class SignedPermutationGroup:
    """Reordering and sign flips of units; elements are :class:`SignedPermutation`."""

    kind = "signed-permutation"

    def identity(self, d, device=None):
        return SignedPermutation(torch.arange(d, device=device), torch.ones(d, device=device))

    def act(self, t, axis, g):
        index, signs = g
        d = index.numel()
        out = _permute(t, axis, index)
        return (_blocked(out, axis, d)[0] * signs.to(t).reshape(_unit_shape(t, axis, d))).reshape(t.shape)

    def inverse(self, g):
        inv = torch.argsort(g.index)
        return SignedPermutation(inv, g.signs[inv])

    def compose(self, first, second):
        idx = second.index.to(first.index.device)
        return SignedPermutation(first.index[idx], second.signs.to(first.signs) * first.signs[idx])

    def random(self, d, generator=None, device=None):
        index = torch.randperm(d, generator=generator)
        signs = torch.randint(0, 2, (d,), generator=generator).mul(2).sub(1).float()
        return SignedPermutation(index.to(device), signs.to(device))

    def from_permutation(self, index):
        return SignedPermutation(index, torch.ones(index.numel(), device=index.device))

    def best_response(self, score):
        index = solve_lap(score.abs())
        matched = score[index, torch.arange(score.shape[1], device=score.device)]
        signs = torch.where(matched < 0, -1.0, 1.0).to(score.device)
        return SignedPermutation(index, signs)

    def matrix(self, g):
        d = g.index.numel()
        m = torch.zeros(d, d, device=g.index.device)
        m[g.index, torch.arange(d, device=g.index.device)] = g.signs.float()
        return m

    def score(self, score, g):
        cols = torch.arange(score.shape[1], device=score.device)
        return float((score[g.index.to(score.device), cols] * g.signs.to(score)).sum())

    def equal(self, a, b):
        return bool(torch.equal(a.index, b.index.to(a.index.device))
                    and torch.equal(a.signs, b.signs.to(a.signs.device)))

    def validate(self, g, d, name):
        if not isinstance(g, SignedPermutation):
            raise ValueError(f"{name}: expected a SignedPermutation(index, signs), got {type(g).__name__}")
        _check_index(g.index, d, name)
        if g.signs.shape != (d,) or not bool((g.signs.abs() == 1).all()):
            raise ValueError(f"{name}: signs must be a tensor of {d} values, each +1 or -1")

    def defect(self, g):
        moved = (g.index.cpu() != torch.arange(g.index.numel()))
        flipped = (g.signs.cpu() < 0) & ~moved
        return float(moved.sum() + 2 * flipped.sum())


class Orthogonal:
    """Rotations and reflections of units; elements are ``(d, d)`` orthogonal matrices."""

    kind = "orthogonal"

    def identity(self, d, device=None):
        return torch.eye(d, device=device)

    def act(self, t, axis, g):
        d = g.shape[0]
        v, a = _blocked(t, axis, d)
        q = g.to(device=t.device, dtype=t.dtype if t.is_floating_point() else g.dtype)
        out = torch.tensordot(v.movedim(a, -1), q, dims=([v.dim() - 1], [0]))  # (…, i) = sum_k x_k Q[k, i]
        return out.movedim(-1, a).reshape(t.shape)

    def inverse(self, g):
        return g.transpose(0, 1).clone()

    def compose(self, first, second):
        return first @ second.to(first)

    def random(self, d, generator=None, device=None):
        # Haar-distributed: QR of a Gaussian matrix with the signs of R's diagonal moved into Q
        z = torch.randn(d, d, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(z)
        q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(d, dtype=torch.float64))
        return q.float().to(device)

    def from_permutation(self, index):
        return KINDS["permutation"].matrix(index)

    def best_response(self, score):
        # orthogonal Procrustes: max_Q <S, Q> = tr(Sᵀ Q) is attained at Q = U Vᵀ for S = U Σ Vᵀ
        u, _, vh = torch.linalg.svd(score.double())
        return (u @ vh).to(score.dtype if score.is_floating_point() else torch.float32)

    def matrix(self, g):
        return g

    def score(self, score, g):
        return float((score * g.to(score)).sum())

    def equal(self, a, b):
        return bool(torch.equal(a, b.to(a.device)))

    def validate(self, g, d, name):
        if not isinstance(g, torch.Tensor) or not g.is_floating_point():
            raise ValueError(f"{name}: expected a float (d, d) orthogonal matrix, got {type(g).__name__}")
        if g.shape != (d, d):
            raise ValueError(f"{name}: expected a ({d}, {d}) matrix, got {tuple(g.shape)}")
        err = float((g.double().T @ g.double() - torch.eye(d, dtype=torch.float64, device=g.device)).abs().max())
        if not err <= 1e-3:
            raise ValueError(f"{name}: the matrix is not orthogonal (|QᵀQ - I| = {err:.2g})")

    def defect(self, g):
        return float(((g.double() - torch.eye(g.shape[0], dtype=torch.float64, device=g.device)) ** 2).sum() / 2)


#: Every kind of symmetry group, by the name a spec uses.
KINDS: dict[str, Group] = {k.kind: k for k in (Permutation(), SignedPermutationGroup(), Orthogonal())}


def group(kind: str) -> Group:
    """The :class:`Group` of a kind name (``"permutation"``, ``"signed-permutation"``, ``"orthogonal"``)."""
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown symmetry kind {kind!r}; choose one of {', '.join(KINDS)}") from None


def group_of_element(g: Any) -> Group:
    """The group an element belongs to, from its type: index vector, :class:`SignedPermutation` or matrix."""
    if isinstance(g, SignedPermutation):
        return KINDS["signed-permutation"]
    if isinstance(g, torch.Tensor):
        if g.dim() == 1 and not g.is_floating_point():
            return KINDS["permutation"]
        if g.dim() == 2 and g.is_floating_point():
            return KINDS["orthogonal"]
    raise ValueError(f"not a group element: {type(g).__name__}"
                     + (f" of shape {tuple(g.shape)}, dtype {g.dtype}" if isinstance(g, torch.Tensor) else ""))
