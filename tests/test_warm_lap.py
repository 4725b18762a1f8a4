"""The warm-started assignment solver: optimal from any start, cheaper from a good one."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import fedmerge
from fedmerge import assignment, warm_lap
from fedmerge.models import MLP

pytestmark = pytest.mark.skipif(not warm_lap.available(), reason="Numba is not importable here")


def _best(score: np.ndarray) -> float:
    rows, cols = linear_sum_assignment(score, maximize=True)
    return float(score[rows, cols].sum())


def _value(score: np.ndarray, perm: np.ndarray) -> float:
    return float(score[perm, np.arange(len(perm))].sum())


def _check(score: np.ndarray, perm: np.ndarray) -> None:
    assert sorted(perm.tolist()) == list(range(score.shape[0]))
    assert _value(score, perm) == pytest.approx(_best(score), rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("d", [1, 2, 3, 7, 40])
def test_cold_solve_is_optimal_on_random_and_tied_scores(d):
    rng = np.random.default_rng(d)
    for score in (rng.standard_normal((d, d)), rng.integers(0, 3, (d, d)).astype(np.float64),
                  rng.standard_normal((d, d)).astype(np.float32), np.zeros((d, d))):
        perm = warm_lap.solve(score, warm_lap.WarmStart(d))
        _check(score.astype(np.float64), perm)


def test_warm_solves_stay_optimal_along_a_sequence_and_augment_fewer_rows():
    rng = np.random.default_rng(0)
    d = 64
    score = rng.standard_normal((d, d))
    state = warm_lap.WarmStart(d)
    warm_lap.solve(score, state)
    assert state.augmented == d  # a cold start augments every row
    for _ in range(10):
        score = score + 1e-3 * rng.standard_normal((d, d))
        before = state.augmented
        perm = warm_lap.solve(score, state)
        _check(score, perm)
        assert state.augmented - before < d // 2  # most previous pairs are still tight
    state.augmented = 0
    warm_lap.solve(score, state)  # the same matrix again: the last assignment is certified as it is
    assert state.augmented == 0


def test_any_start_gives_the_optimum():
    rng = np.random.default_rng(1)
    d = 30
    for trial in range(20):
        score = rng.standard_normal((d, d)) * (10.0 ** rng.integers(-3, 4))
        state = warm_lap.WarmStart(d)
        state.v = rng.standard_normal(d) * 100  # potentials from some other matrix entirely
        state.perm = rng.permutation(d)
        _check(score, warm_lap.solve(score, state))


def test_bad_input_raises_and_resets_the_state():
    state = warm_lap.WarmStart(3)
    score = np.eye(3)
    warm_lap.solve(score, state)
    score[1, 2] = np.nan
    with pytest.raises(FloatingPointError, match="not finite"):
        warm_lap.solve(score, state)
    assert not state.v.any() and (state.perm == -1).all()
    with pytest.raises(ValueError, match="square"):
        warm_lap.solve(np.zeros((3, 4)), state)
    with pytest.raises(ValueError, match="matching its state"):
        warm_lap.solve(np.zeros((4, 4)), state)


def test_solve_lap_falls_back_to_scipy_without_numba(monkeypatch):
    rng = np.random.default_rng(2)
    score = torch.from_numpy(rng.standard_normal((12, 12)))
    state = warm_lap.WarmStart(12)
    warm = assignment.solve_lap(score, state)
    monkeypatch.setattr(warm_lap, "_COMPILED", [None])
    assert not warm_lap.available()
    cold = assignment.solve_lap(score, warm_lap.WarmStart(12))
    assert torch.equal(warm, cold)
    groups = assignment.solve_lap_groups({"g": score.unsqueeze(0).float()}, {"g": [warm_lap.WarmStart(12)]})
    assert torch.equal(groups["g"][0], cold)


def test_c2m3_iterates_are_the_same_with_and_without_warm_starts(monkeypatch):
    torch.manual_seed(0)
    model = MLP((1, 6, 6), 5, widths=(24, 16))
    spec = model.permutation_spec()
    sds = []
    for i in range(4):
        torch.manual_seed(i)
        sds.append({k: v.clone() for k, v in MLP((1, 6, 6), 5, widths=(24, 16)).state_dict().items()})
    warm = fedmerge.match(sds, spec, method="c2m3", max_iter=15)
    monkeypatch.setattr(warm_lap, "_COMPILED", [None])
    cold = fedmerge.match(sds, spec, method="c2m3", max_iter=15)
    assert warm.nit == cold.nit and warm.sweeps == cold.sweeps
    assert warm.objective == pytest.approx(cold.objective, rel=1e-12)
    for a, b in zip(warm.transforms, cold.transforms):
        assert all(torch.equal(a[g], b[g]) for g in a)
