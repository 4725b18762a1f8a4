"""Matchers and the public API: hidden permutations are recovered, cycles close, merges are faithful."""

from __future__ import annotations

import itertools

import pytest
import torch

import fedmerge
from fedmerge import apply_permutation, compose_permutations, invert_permutation, random_permutation
from fedmerge.models import MLP, SmallCNN, ResNet20


def _outputs(model: torch.nn.Module, state_dict, x):
    model.load_state_dict(state_dict)
    model.eval()
    with torch.no_grad():
        return model(x)


def _assert_non_trivial(perm, spec):
    """A hidden permutation that moves no unit would make any recovery test pass on the identity."""
    for g, d in spec.sizes.items():
        assert not torch.equal(perm[g].cpu(), torch.arange(d)), g


def _assert_maps_bring_copies_onto_each_other(result, copies, spec):
    """On the tensors: ``pairwise(i, j)`` puts copy ``i``'s units in copy ``j``'s order, exactly."""
    for i, j in itertools.permutations(range(len(copies)), 2):
        moved = apply_permutation(copies[i], spec, result.pairwise(i, j))
        for k in copies[j]:
            assert torch.equal(moved[k], copies[j][k]), (i, j, k)


@pytest.mark.parametrize("count", [2, 5])
@pytest.mark.parametrize("method", ["git-rebasin", "mergemany", "c2m3"])
def test_hidden_permutation_is_recovered_exactly(trained_mlp, mnist_subset, method, count):
    spec = trained_mlp.permutation_spec()
    base = {k: v.clone() for k, v in trained_mlp.state_dict().items()}
    hidden = [random_permutation(spec, 100 + i) for i in range(count - 1)]
    for h in hidden:
        _assert_non_trivial(h, spec)
    copies = [base] + [apply_permutation(base, spec, h) for h in hidden]
    hidden = [fedmerge.identity_permutation(spec)] + hidden
    merged, result = fedmerge.merge(copies, align=method, spec=spec, full_output=True)
    for i, j in itertools.permutations(range(len(copies)), 2):
        expected = compose_permutations(invert_permutation(hidden[i]), hidden[j])
        got = result.pairwise(i, j)
        for g in spec.sizes:
            assert torch.equal(got[g], expected[g]), (method, i, j, g)
    _assert_maps_bring_copies_onto_each_other(result, copies, spec)
    # the merge lives in the common space, whose unit order is arbitrary: compare functions
    x = mnist_subset[0][:256]
    model = MLP(widths=(64, 128, 64))
    torch.testing.assert_close(_outputs(model, merged, x), _outputs(model, base, x), atol=1e-5, rtol=0)
    # and a merge that did not align would not compute it: the plain mean of the copies does not
    plain = fedmerge.merge(copies, align=None)
    assert (_outputs(model, plain, x) - _outputs(model, base, x)).abs().max() > 1e-2


@pytest.mark.parametrize("make", [lambda: SmallCNN(channels=(8, 16), hidden=32),
                                  lambda: ResNet20(width=1, norm="batchnorm")],
                         ids=["cnn-flatten", "resnet20-bn"])
def test_c2m3_recovers_permutations_of_conv_nets(make):
    torch.manual_seed(0)
    model = make()
    # non-trivial BatchNorm statistics, so that running buffers must follow their channels
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *model.input_shape) * 2 + 0.5)
    spec = model.permutation_spec()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    hidden = [random_permutation(spec, s) for s in range(3)]
    for h in hidden:
        _assert_non_trivial(h, spec)
    copies = [apply_permutation(base, spec, h) for h in hidden]
    merged, result = fedmerge.merge(copies, align="c2m3", spec=spec, full_output=True)
    _assert_maps_bring_copies_onto_each_other(result, copies, spec)  # running BatchNorm buffers included
    x = torch.randn(8, *model.input_shape)
    torch.testing.assert_close(_outputs(make(), merged, x), _outputs(make(), base, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["git-rebasin", "mergemany", "c2m3"])
def test_documented_guarantee_maps_through_a_common_space_are_cycle_consistent(method, random_models):
    """A documented guarantee of the factorised form, not a finding: every result maps each model into
    one common space, ``pairwise(i, j) = P_i P_j^{-1}``, so ``cycle_error`` is 0 by construction
    (the one place the suite asserts it).  Checked on the tensors as well: a model sent around
    a -> b -> c -> a comes back unit for unit, which fails if ``pairwise`` or ``apply_permutation`` is
    wrong.  Where cycle consistency can fail, see the pairwise Git Re-Basin tests below."""
    make = lambda: MLP(widths=(16, 32))  # noqa: E731
    models = random_models(make, 4)
    spec = make().permutation_spec()
    result = fedmerge.match(models, spec, method=method)
    assert result.cycle_error == 0.0
    for a, b, c in itertools.permutations(range(4), 3):
        assert not fedmerge.permutation.is_identity(result.pairwise(a, b))  # independent models: maps move units
        there = apply_permutation(models[a], spec, result.pairwise(a, b))
        there = apply_permutation(there, spec, result.pairwise(b, c))
        back = apply_permutation(there, spec, result.pairwise(c, a))
        for k in models[a]:
            assert torch.equal(back[k], models[a][k]), (method, a, b, c, k)


def _pairwise_weight_matching(models, spec, seed=0):
    """Plain pairwise Git Re-Basin: ``maps[(a, b)]`` puts model ``a`` in model ``b``'s order."""
    from fedmerge.matching.weight_matching import weight_matching
    maps = {}
    for a, b in itertools.combinations(range(len(models)), 2):
        maps[(a, b)], _, _ = weight_matching(models[b], models[a], spec, seed=seed)
    return maps


@pytest.mark.parametrize("seed", [0, 1])
def test_independent_pairwise_git_rebasin_is_not_cycle_consistent(seed, random_models):
    """The failure C²M³ removes: independently initialised models matched one pair at a time disagree
    around a 3-cycle (on these models, 0.9 to 0.98 of the units do not come back)."""
    make = lambda: MLP(widths=(16, 32))  # noqa: E731
    models = random_models(make, 3, seed=10 * seed)
    spec = make().permutation_spec()
    maps = _pairwise_weight_matching(models, spec)
    error = fedmerge.cycle_error(maps, 3)
    assert error > 0.5
    assert fedmerge.pairwise_cycle_error(models, spec) == pytest.approx(error)
    # on the tensors: model 0 sent 0 -> 1 -> 2 -> 0 does not come back
    there = apply_permutation(models[0], spec, maps[(0, 1)])
    there = apply_permutation(there, spec, maps[(1, 2)])
    back = apply_permutation(there, spec, invert_permutation(maps[(0, 2)]))
    assert any(not torch.equal(back[k], models[0][k]) for k in models[0])


def test_pairwise_cycle_error_is_zero_for_permuted_copies(trained_mlp):
    """Pairwise matching can be cycle-consistent without a universe: when every pair is recovered exactly."""
    spec = trained_mlp.permutation_spec()
    base = trained_mlp.state_dict()
    hidden = [random_permutation(spec, s) for s in range(4)]
    for h in hidden:
        _assert_non_trivial(h, spec)
    copies = [apply_permutation(base, spec, h) for h in hidden]
    maps = _pairwise_weight_matching(copies, spec)
    for (a, b), perm in maps.items():
        expected = compose_permutations(invert_permutation(hidden[a]), hidden[b])
        assert all(torch.equal(perm[g], expected[g]) for g in spec.sizes), (a, b)
    assert fedmerge.cycle_error(maps, 4) == 0.0
    assert fedmerge.pairwise_cycle_error(copies, spec) == 0.0


def test_merging_identical_models_returns_the_model():
    model = ResNet20(width=1, norm="layernorm")
    sd = model.state_dict()
    for method in (None, "git-rebasin", "mergemany", "c2m3"):
        merged = fedmerge.merge([sd, sd, sd], align=method, spec=model.permutation_spec())
        for k in sd:
            assert torch.equal(merged[k], sd[k]), (method, k)


def test_weights_are_respected(trained_mlp, mnist_subset, random_models):
    spec = trained_mlp.permutation_spec()
    a = trained_mlp.state_dict()
    b = random_models(lambda: MLP(widths=(64, 128, 64)), 1, seed=7)[0]
    c = random_models(lambda: MLP(widths=(64, 128, 64)), 1, seed=8)[0]
    plain = fedmerge.merge([a, b], align=None, weights=[30, 10])
    for k in a:
        torch.testing.assert_close(plain[k], 0.75 * a[k] + 0.25 * b[k])
    x = mnist_subset[0][:128]
    model = MLP(widths=(64, 128, 64))
    for method in ("git-rebasin", "mergemany", "c2m3"):
        merged = fedmerge.merge([b, a, c], align=method, spec=spec, weights=[0, 5, 0])
        torch.testing.assert_close(_outputs(model, merged, x), _outputs(model, a, x), atol=1e-5, rtol=0)


def test_frank_wolfe_objective_increases_and_beats_identity(random_models):
    make = lambda: MLP(widths=(32, 64, 32))  # noqa: E731
    models = random_models(make, 4, seed=3)
    spec = make().permutation_spec()
    result = fedmerge.match(models, spec, method="c2m3")
    history = result.history
    assert len(history) >= 2
    assert all(b >= a - 1e-6 * abs(a) for a, b in zip(history, history[1:]))
    identity = fedmerge.match(models, spec, method="identity").objective
    assert result.objective > identity
    assert result.objective == pytest.approx(fedmerge.matching_objective(models, spec, result.perms), rel=1e-9)
    for method in ("git-rebasin", "mergemany"):
        assert fedmerge.match(models, spec, method=method).objective > identity


def test_two_models_use_the_pairwise_objective_with_the_first_model_fixed(random_models):
    make = lambda: MLP(widths=(16, 32))  # noqa: E731
    models = random_models(make, 2, seed=11)
    result = fedmerge.match(models, make().permutation_spec(), method="c2m3")
    assert fedmerge.permutation.is_identity(result.perms[0])
    assert not fedmerge.permutation.is_identity(result.perms[1])


def test_iteration_cap_and_tolerance_are_honoured(random_models):
    """Frank-Wolfe's own stopping rules, on the paper's algorithm (no refinement after it)."""
    make = lambda: MLP(widths=(32, 64, 32))  # noqa: E731
    models = random_models(make, 3, seed=5)
    spec = make().permutation_spec()
    capped = fedmerge.match(models, spec, method="c2m3", max_iter=1, paper=True)
    assert capped.nit == 1 and not capped.converged and "max_iter" in capped.message
    # a loose tolerance stops Frank-Wolfe within a few iterations (3 here), converged, far before the cap
    loose = fedmerge.match(models, spec, method="c2m3", tol=0.5, patience=1, paper=True)
    assert loose.converged and loose.success and loose.nit <= 3
    default = fedmerge.match(models, spec, method="c2m3", paper=True)
    assert default.converged and default.nit < 200 and default.nit > loose.nit
    # with the default refinement, `converged` is about the refinement's fixed point, even after one iteration
    refined = fedmerge.match(models, spec, method="c2m3", max_iter=1)
    assert refined.nit == 1 and refined.converged and "a whole sweep changed nothing" in refined.message
    assert refined.objective >= capped.objective


@pytest.mark.parametrize("method", ["git-rebasin", "mergemany"])
def test_sweep_cap_is_honoured_and_converged_means_a_sweep_changed_nothing(method, random_models):
    """One sweep from the identity on independent models changes permutations, so it cannot have
    converged; left alone, the sweeps stop on their own (a sweep changed nothing) well before the cap."""
    make = lambda: MLP(widths=(32, 64, 32))  # noqa: E731
    models = random_models(make, 3, seed=5)
    spec = make().permutation_spec()
    capped = fedmerge.match(models, spec, method=method, max_iter=1)
    assert capped.nit == 1 and not capped.converged and not capped.success
    free = fedmerge.match(models, spec, method=method, max_iter=50)
    assert free.converged and 1 < free.nit < 50
    assert free.objective > capped.objective  # the sweeps after the first improved the alignment


def test_git_rebasin_depends_on_its_seed_only(random_models):
    make = lambda: MLP(widths=(32, 64, 32))  # noqa: E731
    models = random_models(make, 2, seed=21)
    spec = make().permutation_spec()
    first = fedmerge.match(models, spec, method="git-rebasin", seed=1)
    again = fedmerge.match(models, spec, method="git-rebasin", seed=1)
    for g in spec.sizes:
        assert torch.equal(first.perms[1][g], again.perms[1][g])
    # ... and the seed (the order of the groups in the coordinate descent) does matter on these models
    others = [fedmerge.match(models, spec, method="git-rebasin", seed=s) for s in (2, 3)]
    assert any(not torch.equal(first.perms[1][g], o.perms[1][g]) for o in others for g in spec.sizes)


def test_progress_bar_is_shown_when_asked(capsys, random_models):
    make = lambda: MLP(widths=(8, 16))  # noqa: E731
    models = random_models(make, 3)
    fedmerge.match(models, make().permutation_spec(), method="c2m3", max_iter=3)
    assert "Frank-Wolfe" not in capsys.readouterr().err
    fedmerge.match(models, make().permutation_spec(), method="c2m3", progress=True, max_iter=3)
    assert "Frank-Wolfe" in capsys.readouterr().err


def test_result_reports_diagnostics(random_models):
    make = lambda: MLP(widths=(8, 16))  # noqa: E731
    models = random_models(make, 3)
    spec = make().permutation_spec()
    result = fedmerge.match(models, model=make(), method="c2m3", max_iter=10)
    assert result.method == "c2m3" and result.n_models == 3 and len(result.perms) == 3
    for perm in result.perms:  # one true permutation per group and model
        assert set(perm) == set(spec.sizes)
        for g, d in spec.sizes.items():
            assert torch.equal(perm[g].sort().values, torch.arange(d)), g
    assert result.objective == pytest.approx(fedmerge.matching_objective(models, spec, result.perms), rel=1e-9)
    assert result.objective > fedmerge.match(models, spec, method="identity").objective
    assert 1 <= result.nit <= 10 and result.success == result.converged
    assert result.seconds > 0 and isinstance(result.message, str) and result.message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("method", ["git-rebasin", "mergemany", "c2m3"])
def test_matching_on_gpu_recovers_hidden_permutations_and_takes_mixed_devices(method, random_models):
    """On CUDA: exact recovery as on the CPU, results stay on the GPU, CPU/GPU inputs mix without a crash."""
    make = lambda: MLP(widths=(16, 32))  # noqa: E731
    spec = make().permutation_spec()
    base = random_models(make, 1, seed=7)[0]
    # 3 copies: C²M³ Frank-Wolfe recovers an odd number of copies without refinement
    copies = [base] + [apply_permutation(base, spec, random_permutation(spec, 20 + i)) for i in range(2)]
    on_gpu = [{k: v.cuda() for k, v in sd.items()} for sd in copies]
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))

    def outputs(state_dict):  # the merge lives in the common space: compare functions, not weights
        model = make()
        model.load_state_dict({k: v.cpu() for k, v in state_dict.items()})
        with torch.no_grad():
            return model.eval()(x)

    merged = fedmerge.merge(on_gpu, align=method, spec=spec)
    assert all(v.is_cuda for v in merged.values())
    torch.testing.assert_close(outputs(merged), outputs(base), atol=1e-5, rtol=0)
    result = fedmerge.match(on_gpu, spec, method=method)
    on_cpu = fedmerge.match(copies, spec, method=method)
    assert result.objective == pytest.approx(on_cpu.objective, rel=1e-5)
    mixed = [on_gpu[0], copies[1], on_gpu[2]]
    torch.testing.assert_close(outputs(fedmerge.merge(mixed, align=method, spec=spec)), outputs(base), atol=1e-5, rtol=0)


@pytest.mark.parametrize("count", [2, 4])
def test_refinement_never_lowers_the_objective(count, random_models):
    make = lambda: MLP(widths=(32, 64, 32))  # noqa: E731
    models = random_models(make, count, seed=40)
    spec = make().permutation_spec()
    plain = fedmerge.match(models, spec, method="c2m3", max_iter=5, refine=0)
    refined = fedmerge.match(models, spec, method="c2m3", max_iter=5, refine=True)
    assert refined.objective >= plain.objective - 1e-9 * abs(plain.objective)
    assert refined.objective == pytest.approx(fedmerge.matching_objective(models, spec, refined.perms), rel=1e-9)
    assert "refinement sweep" in refined.message
    if count == 2:
        assert fedmerge.permutation.is_identity(refined.perms[0])


@pytest.mark.parametrize("count", [4, 8])
def test_one_refinement_sweep_recovers_even_numbers_of_permuted_copies(trained_mlp, count):
    """Frank-Wolfe alone can stall between symmetric alignments of an even number of copies
    (measured: 0 of 6 trials with 4 or 8 copies reach the optimum); one refinement sweep recovers
    (from identity matrices: the default start would recognise the copies before Frank-Wolfe)."""
    spec = trained_mlp.permutation_spec()
    base = trained_mlp.state_dict()
    copies = [base] + [apply_permutation(base, spec, random_permutation(spec, 7 * count + i)) for i in range(count - 1)]
    best = fedmerge.match([base] * count, spec, method="identity").objective
    result = fedmerge.match(copies, spec, method="c2m3", max_iter=20, refine=1, init="identity")
    assert result.objective == pytest.approx(best, rel=1e-6)
    assert "1 refinement sweep:" in result.message
    assert fedmerge.match(copies, spec, method="c2m3", max_iter=20, paper=True).objective < 0.999 * best


def test_sparse_and_dense_soft_permutations_agree():
    from fedmerge.matching._stack import SoftPermutation
    gen = torch.Generator().manual_seed(0)
    n, d = 3, 128  # two non-zeros per column: under the sparse threshold
    eye = torch.eye(d)
    perms = [eye[torch.randperm(d, generator=gen)] for _ in range(2 * n)]
    mats = torch.stack([0.7 * perms[2 * i] + 0.3 * perms[2 * i + 1] for i in range(n)])
    sparse = SoftPermutation(mats)
    assert sparse.sparse is not None
    dense = SoftPermutation(mats)
    dense.sparse = None
    t = torch.randn(n, 5, d * 4, 3, generator=gen)  # a block-permuted (flattened) axis of length 4d
    torch.testing.assert_close(sparse.apply(t, 1), dense.apply(t, 1), atol=1e-6, rtol=1e-6)
    t = torch.randn(n, d, 7, generator=gen)
    torch.testing.assert_close(sparse.apply(t, 0), dense.apply(t, 0), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape, axis, k", [((16, 7), 0, 1), ((7, 16), 1, 1), ((5, 16, 3, 3), 1, 1),
                                             ((5, 64, 3), 1, 4), ((16, 5, 3, 3), 0, 1)])
def test_universe_contractions_match_their_definitions(shape, axis, k, monkeypatch):
    """The stacked helpers (gathers, products, sparse gather-adds) against the formulas written out."""
    from fedmerge.matching import _stack
    from fedmerge.matching._stack import SoftPermutation, contract_hard, linear_term
    gen = torch.Generator().manual_seed(1)
    n, d = 3, 16
    t = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    s = torch.randn(n, *shape, generator=gen, dtype=torch.float64)

    def units(x):  # (n, d, rest): unit i owns k consecutive entries of the axis, times the other axes
        moved = x.movedim(axis + 1, 1)
        return moved.reshape(n, d, k, *moved.shape[2:]).reshape(n, d, -1)

    def back(m):
        moved_shape = t.movedim(axis + 1, 1).shape
        return m.reshape(moved_shape).movedim(1, axis + 1)

    perm = torch.stack([torch.randperm(d, generator=gen) for _ in range(n)])
    torch.testing.assert_close(contract_hard(t, axis, perm),
                               back(torch.stack([units(t)[p][perm[p]] for p in range(n)])), rtol=0, atol=0)
    expected = torch.einsum("nkr,nir->nki", units(t), units(s))
    torch.testing.assert_close(linear_term(t, s, axis, d), expected)
    eye = torch.eye(d, dtype=torch.float64)
    mats = torch.stack([0.6 * eye[torch.randperm(d, generator=gen)] + 0.4 * eye[torch.randperm(d, generator=gen)]
                        for _ in range(n)])
    expected = back(torch.bmm(mats.transpose(1, 2), units(t)))
    dense = SoftPermutation(mats)
    dense.sparse = None
    torch.testing.assert_close(dense.apply(t, axis), expected)
    monkeypatch.setattr(_stack, "SPARSE_DENSITY", 1.0)  # 2 non-zeros per column of 16: sparse path
    sparse = SoftPermutation(mats)
    assert sparse.sparse is not None
    torch.testing.assert_close(sparse.apply(t, axis), expected)


def test_cycle_error_counts_units_that_do_not_come_back():
    spec = MLP(widths=(8, 16)).permutation_spec()
    maps = {(a, b): random_permutation(spec, 10 * a + b) for a, b in itertools.combinations(range(4), 2)}

    def get(a, b):
        return maps[(a, b)] if (a, b) in maps else invert_permutation(maps[(b, a)])

    expected = []
    for a, b, c in itertools.combinations(range(4), 3):
        loop = compose_permutations(compose_permutations(get(a, b), get(b, c)), get(c, a))
        moved = sum(int((p != torch.arange(p.numel())).sum()) for p in loop.values())
        expected.append(moved / sum(p.numel() for p in loop.values()))
    assert fedmerge.cycle_error(maps, 4) == pytest.approx(sum(expected) / len(expected))
    assert fedmerge.cycle_error(get, 4) == pytest.approx(sum(expected) / len(expected))
    assert fedmerge.cycle_error(maps, 4) > 0.5


def test_cycle_error_of_hand_built_maps():
    """Fractions counted by hand: groups of 8 and 16 units, 24 units per cycle."""
    spec = MLP(widths=(8, 16)).permutation_spec()
    assert spec.sizes == {"layers.0": 8, "layers.1": 16}
    identity = fedmerge.identity_permutation(spec)
    swap = {"layers.0": torch.tensor([1, 0, 2, 3, 4, 5, 6, 7]), "layers.1": torch.arange(16)}
    rotate = {"layers.0": torch.arange(8), "layers.1": torch.tensor([1, 2, 0] + list(range(3, 16)))}
    # 3 models, one swap on 0 -> 1: 2 of 24 units do not come back
    assert fedmerge.cycle_error({(0, 1): swap, (1, 2): identity, (0, 2): identity}, 3) == pytest.approx(2 / 24)
    # plus a 3-cycle on 1 -> 2, given as the map 2 -> 1 (its inverse is used): 2 + 3 units
    maps = {(0, 1): swap, (2, 1): invert_permutation(rotate), (0, 2): identity}
    assert fedmerge.cycle_error(maps, 3) == pytest.approx(5 / 24)
    # 4 models, the swap on 0 -> 1 only: triples (0,1,2), (0,1,3) lose 2/24, (0,2,3), (1,2,3) none
    maps = {(a, b): identity for a, b in itertools.combinations(range(4), 2)}
    maps[(0, 1)] = swap
    assert fedmerge.cycle_error(maps, 4) == pytest.approx((2 / 24 + 2 / 24) / 4)
    # non-trivial maps that factor through a universe close every cycle; composing a -> b -> c -> a
    # in the wrong order (c -> a first) would not close these
    universe = [random_permutation(spec, 50 + i) for i in range(4)]
    consistent = {(a, b): compose_permutations(universe[a], invert_permutation(universe[b]))
                  for a, b in itertools.combinations(range(4), 2)}
    assert fedmerge.cycle_error(consistent, 4) == 0.0
    assert fedmerge.cycle_error({(0, 1): swap}, 2) == 0.0  # fewer than three models: no cycle
    with pytest.raises(ValueError, match="no map between models 1 and 2"):
        fedmerge.cycle_error({(0, 1): swap, (0, 2): identity}, 3)
