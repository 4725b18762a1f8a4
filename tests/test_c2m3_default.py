"""C²M³ is right by default: permuted copies of one model are recovered exactly, for any number of copies.

The paper's Frank-Wolfe from identity matrices stalls on the midpoint of two labellings of the
universe (e.g. 4 permuted copies of a small MLP); the default (a sequential start, Frank-Wolfe,
refinement to a fixed point) must not, and ``paper=True`` must still be the paper's algorithm.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import fedmerge
from fedmerge import apply_permutation, random_permutation
from fedmerge.models import MLP, build_model

# Every zoo architecture (fedmerge.models.MODELS), at sizes that keep the file fast.
ZOO = {
    "mlp": lambda: build_model("mlp", input_shape=(1, 8, 8), num_classes=10, widths=(37, 23)),
    "cnn": lambda: build_model("cnn", input_shape=(1, 8, 8), num_classes=10, channels=(6, 10), hidden=16),
    "vgg9": lambda: build_model("vgg9", input_shape=(3, 8, 8), num_classes=10, width=0.125, hidden=16),
    "vgg11": lambda: build_model("vgg11", input_shape=(3, 8, 8), num_classes=10, width=0.125, hidden=16),
    "vgg11-bn": lambda: build_model("vgg11-bn", input_shape=(3, 8, 8), num_classes=10, width=0.125, hidden=16),
    "vgg11-ln": lambda: build_model("vgg11-ln", input_shape=(3, 8, 8), num_classes=10, width=0.125, hidden=16),
    "vgg16": lambda: build_model("vgg16", input_shape=(3, 8, 8), num_classes=10, width=0.125, hidden=16),
    "vgg16-bn": lambda: build_model("vgg16-bn", input_shape=(3, 8, 8), num_classes=10, width=0.125, hidden=16),
    "vgg16-ln": lambda: build_model("vgg16-ln", input_shape=(3, 8, 8), num_classes=10, width=0.125, hidden=16),
    "resnet20": lambda: build_model("resnet20", input_shape=(3, 8, 8), num_classes=10, width=0.375),
    "resnet20-bn": lambda: build_model("resnet20-bn", input_shape=(3, 8, 8), num_classes=10, width=0.375),
}


#: Architectures whose blocks the fast ones already cover (VGG-9 and VGG-11-BN: VGG without and with
#: BatchNorm; ResNet-20 with LayerNorm and BatchNorm): run with the slow tests.
SLOW = {"vgg11", "vgg11-ln", "vgg16", "vgg16-bn", "vgg16-ln"}


def test_the_zoo_list_is_complete():
    assert set(ZOO) == set(fedmerge.models.MODELS)


def _model(make, seed=0):
    torch.manual_seed(seed)
    model = make()
    model.train()  # non-trivial BatchNorm running statistics: buffers must follow their channels
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *model.input_shape) * 2 + 0.5)
    return model.eval()


def _outputs(model, state_dict, x):
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return model.eval()(x)


def _copies(model, count, seed):
    spec = model.permutation_spec()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    copies = []
    for i in range(count):
        for t in itertools.count():  # a hidden permutation that moves units in every group
            hidden = random_permutation(spec, seed + i + 1000 * t)
            if all(not torch.equal(hidden[g], torch.arange(d)) for g, d in spec.sizes.items()):
                break
        copies.append(apply_permutation(base, spec, hidden))
    return spec, base, copies


def _assert_same_function(model, merged, base, x):
    expected = _outputs(model, base, x)
    got = _outputs(model, merged, x)
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=1e-5)


def _assert_maps_bring_copies_onto_each_other(result, copies, spec):
    for i, j in itertools.combinations(range(len(copies)), 2):
        moved = apply_permutation(copies[i], spec, result.pairwise(i, j))
        for k in copies[j]:
            assert torch.equal(moved[k], copies[j][k]), (i, j, k)


@pytest.mark.parametrize("count", [2, 3, 4, 5])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(ZOO)])
def test_default_recovers_any_number_of_permuted_copies(name, count):
    """Every copy is permuted (none is the original), so nothing is aligned before matching."""
    model = _model(ZOO[name], seed=count)
    spec, base, copies = _copies(model, count, seed=100 * count)
    merged, result = fedmerge.merge(copies, align="c2m3", spec=spec, full_output=True)
    x = torch.randn(16, *model.input_shape, generator=torch.Generator().manual_seed(count))
    _assert_same_function(model, merged, base, x)
    _assert_maps_bring_copies_onto_each_other(result, copies, spec)
    assert result.cycle_error == 0.0
    best = fedmerge.match([base] * count, spec, method="identity").objective
    assert result.objective == pytest.approx(best, rel=1e-6)
    assert result.converged and "global optimum" in result.message


@pytest.mark.parametrize("count", [4])
def test_match_default_recovers_copies_where_the_paper_stalls(count):
    """The issue's case: permuted copies of a 64-37-23-10 ReLU MLP.  The paper's algorithm stalls on
    them (its objective stays well below the copies' own), the default reaches it."""
    make = lambda: MLP((64,), 10, widths=(37, 23))  # noqa: E731
    model = _model(make, seed=1)
    spec, base, copies = _copies(model, count, seed=100)
    best = fedmerge.match([base] * count, spec, method="identity").objective
    paper = fedmerge.match(copies, spec, method="c2m3", paper=True)
    default = fedmerge.match(copies, spec, method="c2m3")
    assert paper.objective < 0.99 * best
    assert default.objective == pytest.approx(best, rel=1e-6)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    _assert_same_function(model, fedmerge.merge(copies, align="c2m3", spec=spec), base, x)
    stalled = fedmerge.merge(copies, align=lambda sds, spec, callback=None: dict(paper), spec=spec)
    assert (_outputs(model, stalled, x) - _outputs(model, base, x)).abs().max() > 1e-2


def test_two_factorised_copies_the_swap_saddle():
    """Why the paper's start fails: from identity matrices, two factorised copies swap orders in
    the first step and the line search stops half-way between the two labellings."""
    model = _model(lambda: MLP((64,), 10, widths=(37, 23)), seed=0)
    spec, base, copies = _copies(model, 2, seed=7)
    best = fedmerge.match([base] * 2, spec, method="identity").objective
    paper = fedmerge.match(copies, spec, method="c2m3", paper=True, factorize=True, max_iter=20)
    assert paper.objective < 0.5 * best
    default = fedmerge.match(copies, spec, method="c2m3", factorize=True)
    assert default.objective == pytest.approx(best, rel=1e-6)


def test_paper_option_is_the_papers_algorithm():
    make = lambda: MLP((64,), 10, widths=(32, 24))  # noqa: E731
    models = [_model(make, seed=s).state_dict() for s in range(4)]
    spec = make().permutation_spec()
    paper = fedmerge.match(models, spec, method="c2m3", paper=True, max_iter=30)
    # identity start, Frank-Wolfe, rounding: no start phase, no refinement sweep
    assert paper.sweeps == 0 and "refinement" not in paper.message and "start" not in paper.message
    assert paper.history[0] == pytest.approx(fedmerge.match(models, spec, method="identity").objective, rel=1e-6)
    assert paper.laps == (paper.nit + 1) * 4 * len(spec.sizes)  # one LAP per model and group per iteration, + rounding
    same = fedmerge.match(models, spec, method="c2m3", init="identity", refine=0, max_iter=30)
    assert same.history == paper.history and same.objective == paper.objective
    # the default starts elsewhere and polishes: at least as high an objective on these models
    default = fedmerge.match(models, spec, method="c2m3", max_iter=30)
    assert default.sweeps >= 1 and "refinement sweep" in default.message and default.converged
    assert default.objective >= paper.objective
    with pytest.raises(ValueError, match="paper=True"):
        fedmerge.match(models, spec, method="c2m3", paper=True, refine=True)
    with pytest.raises(ValueError, match="paper=True"):
        fedmerge.match(models, spec, method="c2m3", paper=True, init="sequential")
    with pytest.raises(ValueError, match="init"):
        fedmerge.match(models, spec, method="c2m3", init="random")


@pytest.mark.parametrize("count", [2, 4, 5])
def test_identity_start_with_refinement_also_recovers_copies(count):
    """Without the sequential match: Frank-Wolfe from identity matrices stalls on the copies, and the
    refinement sweeps (one model at a time against the others' hard permutations) recover them."""
    make = lambda: MLP((64,), 10, widths=(37, 23))  # noqa: E731
    model = _model(make, seed=1)
    spec, base, copies = _copies(model, count, seed=100)
    best = fedmerge.match([base] * count, spec, method="identity").objective
    result = fedmerge.match(copies, spec, method="c2m3", init="identity", max_iter=20, factorize=True)
    assert result.objective == pytest.approx(best, rel=1e-6)
    assert result.sweeps >= 1 and result.converged


def _teacher_trained(seed, widths, steps=300):
    """A small MLP trained (Adam) on a fixed random linear teacher: units with structure, as training gives."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(512, 64, generator=g)
    y = (x @ torch.randn(64, 10, generator=g)).argmax(1)
    torch.manual_seed(seed)
    model = MLP((64,), 10, widths=widths)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _independent(case):
    if case == "trained":  # structured units: Frank-Wolfe's rounding beats the sequential match
        return ([_teacher_trained(s, (48, 32)).state_dict() for s in range(4)],
                MLP((64,), 10, widths=(48, 32)).permutation_spec())
    # random initialisations: the sequential match beats Frank-Wolfe's rounding; with wide inputs ("weak")
    # it stays ahead of the refined rounding too
    make = (lambda: MLP((256,), 10, widths=(64, 64))) if case == "weak" else (lambda: MLP((64,), 10, widths=(32, 24)))
    return [_model(make, seed=s).state_dict() for s in range(4)], make().permutation_spec()


@pytest.mark.parametrize("case", ["trained", "random", "weak"])
def test_independent_models_keep_the_better_of_the_sequential_match_and_frank_wolfe(case):
    """On models that are not copies the default runs both searches: the sequential match (every model
    placed) and Frank-Wolfe from identity matrices (the paper's iterates).  Without refinement it keeps the
    better of the sequential match and Frank-Wolfe's rounding; with refinement it refines the rounding first
    (far from a fixed point, it gains the most) and refines the sequential match instead only where that is
    still ahead."""
    models, spec = _independent(case)
    sequential = fedmerge.match(models, spec, method="c2m3", init="sequential", max_iter=0, refine=0)
    rounded = fedmerge.match(models, spec, method="c2m3", init="identity", max_iter=10, refine=0)
    refined = fedmerge.match(models, spec, method="c2m3", init="identity", max_iter=10)
    # the case each parameter is for
    assert (rounded.objective > sequential.objective) == (case == "trained")
    assert (refined.objective > sequential.objective) == (case != "weak")

    unrefined = fedmerge.match(models, spec, method="c2m3", max_iter=10, refine=0)
    kept = rounded if case == "trained" else sequential
    assert unrefined.history == rounded.history and "not copies" in unrefined.message
    assert unrefined.objective == pytest.approx(kept.objective, rel=1e-9)
    for mine, theirs in zip(unrefined.transforms, kept.transforms):
        assert all(torch.equal(mine[g], theirs[g]) for g in spec.sizes)
    # every LAP of both searches is counted (each block's rounding included)
    assert unrefined.laps == sequential.laps + rounded.laps

    auto = fedmerge.match(models, spec, method="c2m3", max_iter=10)
    assert auto.converged and auto.history == rounded.history
    if case == "weak":  # the sequential match, refined: above both
        assert "refined instead" in auto.message
        assert auto.objective >= sequential.objective > refined.objective
    else:  # the refined rounding, exactly (the same visiting orders as with init="identity")
        assert "is kept" in auto.message and auto.sweeps == refined.sweeps
        assert auto.objective == pytest.approx(refined.objective, rel=1e-9)
        for mine, theirs in zip(auto.transforms, refined.transforms):
            assert all(torch.equal(mine[g], theirs[g]) for g in spec.sizes)


def test_max_iter_zero_refines_the_sequential_match():
    """``max_iter=0`` skips Frank-Wolfe: on models that are not copies the sequential match is refined."""
    make = lambda: MLP((64,), 10, widths=(32, 24))  # noqa: E731
    models = [_model(make, seed=s).state_dict() for s in range(4)]
    spec = make().permutation_spec()
    auto = fedmerge.match(models, spec, method="c2m3", max_iter=0)
    sequential = fedmerge.match(models, spec, method="c2m3", init="sequential", max_iter=0)
    assert auto.nit == 0 and auto.history == [] and "kept (max_iter=0)" in auto.message
    assert auto.objective == pytest.approx(sequential.objective, rel=1e-9)
    unrefined = fedmerge.match(models, spec, method="c2m3", init="sequential", max_iter=0, refine=0)
    assert auto.sweeps >= 2 and auto.objective > unrefined.objective


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_recovers_permuted_copies_of_a_deep_narrow_chain(seed):
    """16 hidden layers of 8 units, 5 copies: placing a copy needs as many passes as the chain carries the
    input side's certainty forward.  A start capped at 5 passes in random group orders gave up on most such
    models (and Frank-Wolfe plus refinement then ended elsewhere); the default must return the model itself."""
    make = lambda: MLP((16,), 5, widths=(8,) * 16)  # noqa: E731
    model = _model(make, seed=seed)
    spec, base, copies = _copies(model, 4, seed=100 * seed)
    merged, result = fedmerge.merge([base] + copies, spec=spec, align="c2m3", full_output=True)
    assert "global optimum" in result.message
    for k in base:
        torch.testing.assert_close(merged[k], base[k], rtol=1e-5, atol=1e-5)


def test_converged_means_a_fixed_point_with_refinement():
    """With refinement, ``converged`` says the last sweep changed nothing: true for the strategy's
    20 Frank-Wolfe iterations on copies (an optimum), false when the sweep cap cut it short."""
    make = lambda: MLP((64,), 10, widths=(32, 24))  # noqa: E731
    model = _model(make, seed=3)
    spec, base, copies = _copies(model, 4, seed=30)
    result = fedmerge.match(copies, spec, method="c2m3", max_iter=20)
    assert result.converged and "global optimum" in result.message  # certified: copies coincide
    models = [_model(make, seed=s).state_dict() for s in range(5)]
    free = fedmerge.match(models, spec, method="c2m3", init="identity", max_iter=3)
    assert free.converged and free.sweeps > 1  # needed more than one sweep to reach its fixed point
    capped = fedmerge.match(models, spec, method="c2m3", init="identity", max_iter=3, refine=1)
    assert not capped.converged and "1 refinement sweep: reached 1" in capped.message
    assert capped.objective <= free.objective + 1e-9 * abs(free.objective)


def test_refinement_fixed_point_no_single_permutation_improves():
    """At the returned fixed point, re-solving any one (model, group) block gives nothing better."""
    from fedmerge.matching._stack import Stack, stack_permutations
    from fedmerge.matching.block_ascent import BlockAscent
    make = lambda: MLP((64,), 10, widths=(32, 24))  # noqa: E731
    models = [_model(make, seed=s).state_dict() for s in range(4)]
    spec = make().permutation_spec()
    result = fedmerge.match(models, spec, method="c2m3", max_iter=5)
    stack = Stack.from_state_dicts(models, spec)
    ascent = BlockAscent(stack, stack_permutations(result.perms, "cpu"))
    assert ascent.objective() == pytest.approx(result.objective, rel=1e-9)
    assert not any(ascent.step(p, g) for p in range(4) for g in spec.sizes)


@pytest.mark.slow
@pytest.mark.parametrize("count", [3])  # other counts: the zoo test above (2 to 5 copies of every architecture)
@pytest.mark.parametrize("name", ["resnet18"])  # vgg11_bn (a 25088x4096 classifier): minutes per copy, not here
def test_default_recovers_permuted_copies_of_torchvision_models(name, count):
    torchvision = pytest.importorskip("torchvision")
    make = lambda: getattr(torchvision.models, name)(num_classes=10)  # noqa: E731
    torch.manual_seed(0)
    model = make()
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32) * 2 + 0.5)
    model.eval()
    from fedmerge.tracing import spec_for
    spec = spec_for(model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    copies = [base] + [apply_permutation(base, spec, random_permutation(spec, 10 + i)) for i in range(count - 1)]
    merged, result = fedmerge.merge(copies, align="c2m3", spec=spec, full_output=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _assert_same_function(make(), merged, base, x)
    assert result.converged and result.cycle_error == 0.0


def test_block_ascent_updates_match_a_fresh_start_and_a_fixed_point_costs_no_lap():
    """The refinement updates U, the float64 sum and its float32 copy in place, on the moved units
    only; after many accepted steps they equal those of a fresh start at the same permutations, every
    step raised the objective, and once a sweep changes nothing the next one solves no LAP (every
    block's inputs are unchanged since it was last solved)."""
    from fedmerge.matching._stack import Stack
    from fedmerge.matching.block_ascent import BlockAscent
    make = lambda: MLP((64,), 10, widths=(32, 24))  # noqa: E731
    models = [_model(make, seed=s).state_dict() for s in range(4)]
    spec = make().permutation_spec()
    stack = Stack.from_state_dicts(models, spec)
    ascent = BlockAscent(stack, {g: torch.arange(d).expand(4, -1).clone() for g, d in spec.sizes.items()})
    objectives, accepted = [ascent.objective()], 0
    for _ in range(50):
        changed = 0
        for p in range(4):
            for g in spec.sizes:
                changed += ascent.step(p, g)
                objectives.append(ascent.objective())
        accepted += changed
        if not changed:
            break
    assert changed == 0 and accepted > 4
    assert all(b > a or b == a for a, b in zip(objectives, objectives[1:]))
    fresh = BlockAscent(stack, ascent.perms)
    for k in stack.weights:
        assert torch.equal(ascent.u[k], fresh.u[k])
        torch.testing.assert_close(ascent.total[k], fresh.total[k], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ascent.total32[k], fresh.total32[k], rtol=1e-6, atol=1e-7)
    laps = ascent.laps
    assert not any(ascent.step(p, g) for p in range(4) for g in spec.sizes)
    assert ascent.laps == laps


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_soft_and_hard_contractions_match_a_dense_reference(axis):
    """The gathers and sparse gather-adds that map models into the universe equal ``P^T @ M`` along
    the axis, on every axis of a stacked conv-like weight (units leading, in the middle, last)."""
    from fedmerge.matching import _stack
    gen = torch.Generator().manual_seed(axis)
    n, shape = 3, (6, 5, 4)
    t = torch.randn(n, *shape, generator=gen)
    d = shape[axis]
    perm = torch.stack([torch.randperm(d, generator=gen) for _ in range(n)])
    hard = torch.zeros(n, d, d).scatter_(1, perm.unsqueeze(1), 1.0)  # hard[p, perm[p, i], i] = 1

    def dense(matrix):  # P^T along the axis, moved to the front and back
        moved = t.movedim(axis + 1, 1)
        return torch.einsum("nki,nk...->ni...", matrix, moved).movedim(1, axis + 1)
    assert torch.equal(_stack.contract_hard(t, axis, perm), dense(hard))
    other = torch.stack([torch.randperm(d, generator=gen) for _ in range(n)])
    soft = 0.75 * hard + 0.25 * torch.zeros(n, d, d).scatter_(1, other.unsqueeze(1), 1.0)
    for density in (1.0, 0.0):  # the sparse gather-add and the dense product
        old = _stack.SPARSE_DENSITY
        _stack.SPARSE_DENSITY = density
        try:
            got = _stack.SoftPermutation(soft).apply(t, axis)
        finally:
            _stack.SPARSE_DENSITY = old
        torch.testing.assert_close(got, dense(soft), rtol=1e-6, atol=1e-6)


def test_the_start_reports_each_placed_model_and_a_callback_can_stop_it():
    from fedmerge.progress import STOPPED
    model = _model(lambda: MLP((64,), 10, widths=(37, 23)), seed=1)
    spec, base, copies = _copies(model, 4, seed=100)
    seen = []
    done = fedmerge.match(copies, spec, method="c2m3", callback=lambda info: seen.append((info.phase, info.nit)))
    assert seen == [("start", 1), ("start", 2), ("start", 3)]  # the certificate alone: no Frank-Wolfe
    assert done.converged and done.nit == 0 and "global optimum" in done.message
    checked = fedmerge.match(copies, spec, method="c2m3", confirm=True,
                             callback=lambda info: seen.append((info.phase, info.nit)))
    assert seen[-1] == ("frank-wolfe", 1)  # the confirming iteration
    assert checked.converged and checked.nit == 1 and checked.history[-1] == checked.history[0]  # step size 0
    assert checked.objective == done.objective
    assert all(torch.equal(a[g], b[g]) for a, b in zip(checked.perms, done.perms) for g in spec.sizes)
    stopped = fedmerge.match(copies, spec, method="c2m3", callback=lambda info: info.nit >= 2)
    assert stopped.message == STOPPED and not stopped.converged and stopped.nit == 0
    assert stopped.objective < done.objective  # model 3 was not placed
