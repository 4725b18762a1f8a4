"""Derive a :class:`~fedmerge.spec.SymmetrySpec` automatically, by tracing a module with torch.fx.

Writing a spec by hand is error-prone (a forgotten bias or BatchNorm buffer silently breaks the
symmetry), and users' models have no hand-written spec at all.  But the spec follows mechanically
from the dataflow: a layer that *produces* features (Linear, Conv) starts a new group on its
output axis; layers that act on each feature separately (norms, activations, pooling) carry the
group through and have their per-feature parameters transformed by it; a layer that *consumes*
features has its input axis transformed by the incoming group; a residual addition forces both
of its operands to share one transformation, so their groups are merged (union-find); and
whatever reaches the network output must keep its order, so those groups are dropped (``None``).

:func:`spec_from_module` walks the torch.fx graph once, applying exactly those rules, and refuses
(with an error naming the module) anything it does not understand, rather than guessing: a wrong
spec would make merging silently produce a broken model.  When in doubt a group may always be made
``None`` (no transformation is always a valid symmetry), which the rules use where a tensor would
need two transformed axes.

Kinds
-----
Each group also gets the most general *kind* of transformation ``Q`` (acting on the units as
``x -> Qᵀx``) that leaves the network's function unchanged.  It starts as ``"orthogonal"`` at the
producing layer, whose weight rows absorb any ``Q`` (as the consumer's weight columns do), and
every operation the units pass through on the way keeps it only if it commutes with ``Q``,
``f(Qᵀx) = Qᵀf(x)``; otherwise it lowers the group to the most general kind it does commute with,
in the chain orthogonal ⊃ signed-permutation ⊃ permutation.  Joined groups (a residual addition, a
layer called twice) take the lower of their kinds.

=========================================================  =====================  =========================
operation on the units                                     keeps                  why
=========================================================  =====================  =========================
Linear/Conv/ConvTranspose consuming them                   orthogonal             weight absorbs ``Q``
Identity, ``-x``, ``x * c``, ``x / c`` (c constant on       orthogonal             linear, same on every unit
the units), avg/adaptive-avg pooling, Upsample/
interpolate, zero/reflect/replicate padding, flatten,
view/reshape/permute/transpose/(un)squeeze, ``.to``,
``.contiguous``, ``.clone``, sum/mean over other axes,
``x + y`` / ``x - y`` of two tensors in the same group
odd functions: tanh, softsign, tanhshrink, hard/soft       signed-permutation     ``f(-x) = -f(x)``
shrink, Hardtanh/clamp with bounds ``-a, a``, sin, sinh,
asinh, atan, erf, sign, ``c / x``; Dropout (an
elementwise mask commutes with sign flips and, in
distribution, with permutations, not with rotations)
any other elementwise function (ReLU, GELU, sigmoid,       permutation            acts on each unit alike
softplus, exp, abs, square, x ** c, clamp, softmax,
AlphaDropout), max/LP pooling, amax/amin, BatchNorm,
InstanceNorm, LayerNorm, GroupNorm, PReLU, depthwise
convs (per-unit statistics or parameters), sums and
means over the units, ``x * y``, ``x / y``, max of two
tensors in the group, ``x + c``, ``x - c`` (``Qᵀ`` must
fix the constant vector), constant padding by ``c ≠ 0``
=========================================================  =====================  =========================

So an MLP with ReLU (every zoo model) traces to permutation groups only, one with Tanh to signed
permutations, and one with ``nn.Identity`` activations (a linear bottleneck) to orthogonal groups.

Layout: :mod:`.tables` (which torch operations are elementwise, odd, spatial, binary...),
:mod:`.groups` (union-find over unit groups with their sizes and kinds), :mod:`.values` (what
flows along the graph, argument normalisation), :mod:`.analysis` (the pass over the graph),
:mod:`.modules` and :mod:`.functions` (the rules for module calls and for functions and methods),
:mod:`.shapes` (axis bookkeeping shared by both), :mod:`.tracer` (torch.fx tracing, the entry
points).
"""

from .errors import TracingError, UnsupportedModuleError, UntraceableModuleError
from .tables import SUPPORTED
from .tracer import spec_for, spec_from_module

__all__ = ["spec_from_module", "spec_for", "TracingError", "UnsupportedModuleError", "UntraceableModuleError",
           "SUPPORTED"]
