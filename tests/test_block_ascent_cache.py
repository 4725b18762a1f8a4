"""Block-coordinate ascent keeps its cost matrices between visits and updates them on the moved units:
after every step each kept matrix equals a fresh product, on every kind of tensor the zoo has
(linear, conv, BatchNorm, residual groups shared by many tensors, a block-permuted flattened axis),
both when all models are counted and while models are placed one at a time."""

import numpy as np
import pytest
import torch

from fedmerge.matching._stack import Stack, linear_term
from fedmerge.matching.block_ascent import BlockAscent
from fedmerge.models import MLP, SmallCNN, VGG, resnet20

MAKERS = {
    "mlp": lambda: MLP((1, 6, 6), 5, widths=(24, 16)),
    "cnn": lambda: SmallCNN((1, 8, 8), 5, channels=(6, 8), hidden=12),
    "vgg-flatten": lambda: VGG(11, (3, 8, 8), 5, norm="batchnorm", width=0.0625, hidden=16, pool=2),
    "resnet20-bn": lambda: resnet20(input_shape=(3, 8, 8), num_classes=5, width=0.25, norm="batchnorm"),
}


def _models(name, n):
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = MAKERS[name]()
        out.append({k: v.clone() for k, v in model.state_dict().items()})
    return out, MAKERS[name]().permutation_spec()


def _fresh(ascent, p, g):
    stack, d = ascent.stack, ascent.stack.spec.sizes[g]
    one = {h: q[p:p + 1] for h, q in ascent.perms.items()}
    score = None
    for key, a in ascent.places[g]:
        x = stack.to_universe_hard(one, key, skip=a, source=stack.weights[key][p:p + 1])
        s = linear_term(x, ascent._target32(key, p).unsqueeze(0), a, d)[0]
        score = s if score is None else score + s
    return score


def _check_cache(ascent):
    """Compares every kept matrix with a fresh product; returns how many owed updates were checked."""
    checked = 0
    for g, cache in ascent._scores.items():
        for p in range(ascent.stack.n):
            if cache.valid[p]:
                ascent._catch_up(p, g)  # what a visit does first: owe the changes logged since the last one
                checked += bool(cache.pending[p])
                fresh = _fresh(ascent, p, g)
                kept = cache.current(p, ascent.stack.weights)
                torch.testing.assert_close(kept, fresh, rtol=0, atol=1e-5 * float(fresh.abs().max()) + 1e-12)
                checked += 1
    return checked


def _random_start(spec, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return {g: torch.stack([torch.randperm(d, generator=gen) for _ in range(n)]) for g, d in spec.sizes.items()}


def _most_owed(ascent):
    """The most logged changes of other models that one kept matrix has not applied yet."""
    most = 0
    for g, cache in ascent._scores.items():
        for p in torch.nonzero(cache.valid).flatten().tolist():
            most = max(most, sum(entry > int(cache.seen[p]) and q != p
                                 for key, _ in ascent.places[g] for entry, q, *_ in ascent._log[key]))
    return most


def _sweeps(ascent, rng, sweeps, *, check_every_step):
    """Sweeps over the models in random order, each model's groups in random order; the kept matrices are
    checked after every step, or only after each sweep.  Returns ``(accepted steps, checks, the most logged
    changes one kept matrix caught up on at once)``."""
    groups = ascent.stack.groups()
    checked = accepted = most = 0
    for _ in range(sweeps):
        for p in rng.permutation(ascent.stack.n):
            for g in rng.permutation(groups):
                accepted += ascent.step(int(p), str(g))
                if check_every_step:
                    most = max(most, _most_owed(ascent))
                    checked += _check_cache(ascent)
        if not check_every_step:
            most = max(most, _most_owed(ascent))
            checked += _check_cache(ascent)
    return accepted, checked, most


@pytest.mark.parametrize("name", list(MAKERS))
def test_kept_cost_matrices_equal_fresh_products_after_every_step(name):
    n = 4
    sds, spec = _models(name, n)
    stack = Stack.from_state_dicts(sds, spec)
    ascent = BlockAscent(stack, _random_start(spec, n, 0))
    start = ascent.objective()
    accepted, checked, _ = _sweeps(ascent, np.random.default_rng(0), 3, check_every_step=True)
    assert accepted > 0 and checked > 0
    # the accepted gains are exact: the objective is the start's plus them
    assert ascent.objective() == pytest.approx(start + ascent.gain, rel=1e-9)


@pytest.mark.parametrize("name", ["mlp", "resnet20-bn"])
def test_changes_logged_by_many_steps_are_applied_together_at_the_visit(name):
    """Checked only after whole sweeps: each kept matrix then catches up on the changes of many steps of
    several other models at once (concatenated per tensor), and must still equal a fresh product."""
    n = 6
    sds, spec = _models(name, n)
    stack = Stack.from_state_dicts(sds, spec)
    ascent = BlockAscent(stack, _random_start(spec, n, 2))
    accepted, checked, most = _sweeps(ascent, np.random.default_rng(1), 3, check_every_step=False)
    assert accepted > n and checked > 0
    assert most > 1  # some kept matrix applied several logged changes in one catch-up


def test_kept_cost_matrices_while_models_are_placed_in_turn():
    n = 4
    sds, spec = _models("cnn", n)
    stack = Stack.from_state_dicts(sds, spec)
    ascent = BlockAscent(stack, _random_start(spec, n, 1), active=torch.arange(n) == 0)
    groups = stack.groups()
    checked = 0
    for p in range(1, n):
        for _ in range(2):
            for g in groups:
                ascent.step(p, g)
                checked += _check_cache(ascent)
        ascent.activate(p)
        assert not any(bool(c.valid.any()) for c in ascent._scores.values())  # every target changed
    assert checked > 0
