"""C²M³'s iterated local search after refinement (``perturbations=k``).

A refinement fixed point is only the best that single (model, group) blocks can reach.  Each round
draws one model's permutations at random and refines every model again, keeping the result where
Eq. 4 is higher.  The instance below is one where the plain refinement stops at a fixed point that
such rounds leave for a higher one.
"""

from __future__ import annotations

import pytest
import torch

import fedmerge
from fedmerge.models import MLP
from fedmerge.progress import STOPPED


def _noisy_permuted_copies(seed: int = 0, n: int = 6, noise: float = 2.0):
    """``n`` hidden permutations of one random MLP, each with Gaussian noise of ``noise`` times each tensor's std."""
    torch.manual_seed(seed)
    base = MLP((1, 8, 8), 10, widths=(32, 48, 32))
    spec = base.permutation_spec()
    models = []
    for _ in range(n):
        sd = {k: v + noise * v.std() * torch.randn_like(v) for k, v in base.state_dict().items()}
        models.append(fedmerge.apply_transform(sd, spec, {g: torch.randperm(d) for g, d in spec.sizes.items()}))
    return models, spec


def test_perturbation_rounds_leave_a_fixed_point_for_a_higher_one():
    models, spec = _noisy_permuted_copies()
    options = dict(method="c2m3", init="identity", max_iter=5)
    plain = fedmerge.match(models, spec, **options)
    assert plain.converged  # a fixed point: no single block improves it
    rounds = []
    searched = fedmerge.match(models, spec, perturbations=6, **options,
                              callback=lambda info: rounds.append(info.nit) if info.phase == "perturbation" else None)
    assert searched.objective > 1.005 * plain.objective
    # the objective reported is Eq. 4 at the permutations returned, and the maps stay cycle-consistent
    assert searched.objective == pytest.approx(fedmerge.matching_objective(models, spec, searched.transforms),
                                               rel=1e-6)
    assert searched.cycle_error == 0.0 and searched.converged
    assert "6 perturbation rounds" in searched.message and "raised the objective, the highest is kept" in searched.message
    assert sorted(set(rounds)) == list(range(1, 7))  # every round reports its sweeps


def test_perturbation_rounds_keep_permuted_copies_exact():
    """On exact copies the refinement's fixed point from identity matrices is the global optimum here; rounds that
    scramble a copy and refine again must not leave it (nothing is higher), and the copies are still undone."""
    torch.manual_seed(1)
    base = MLP((1, 8, 8), 10, widths=(32, 48, 32))
    spec = base.permutation_spec()
    original = base.state_dict()
    copies = [original] + [fedmerge.apply_transform(original, spec, {g: torch.randperm(d) for g, d in spec.sizes.items()})
                           for _ in range(3)]
    result = fedmerge.match(copies, spec, method="c2m3", init="identity", max_iter=3, perturbations=4)
    best = fedmerge.match([original] * 4, spec, method="identity").objective
    assert result.objective == pytest.approx(best, rel=1e-6)
    reference = fedmerge.apply_transform(copies[0], spec, result.transforms[0])
    for sd, t in zip(copies, result.transforms):
        aligned = fedmerge.apply_transform(sd, spec, t)
        for k in original:
            torch.testing.assert_close(aligned[k], reference[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("rounds", [0, 2])
def test_default_start_reports_eq4_at_what_it_returns(rounds):
    """The default start on models that are not copies: the refined rounding is kept over the sequential match, and
    its objective, computed once for that comparison, is what is reported (and where the rounds start from)."""
    models, spec = _noisy_permuted_copies()
    result = fedmerge.match(models, spec, method="c2m3", perturbations=rounds)
    assert "the refined rounding" in result.message and "is kept" in result.message
    assert result.objective == pytest.approx(fedmerge.matching_objective(models, spec, result.transforms), rel=1e-9)


def test_a_callback_stops_the_perturbation_rounds_with_a_valid_result():
    models, spec = _noisy_permuted_copies()
    options = dict(method="c2m3", init="identity", max_iter=5)
    plain = fedmerge.match(models, spec, **options)
    stopped = fedmerge.match(models, spec, perturbations=6, **options,
                             callback=lambda info: info.phase == "perturbation" and info.sweep >= 2)
    assert stopped.message == STOPPED and not stopped.converged
    assert stopped.objective >= plain.objective * (1 - 1e-9)
    assert stopped.objective == pytest.approx(fedmerge.matching_objective(models, spec, stopped.transforms), rel=1e-6)


@pytest.mark.parametrize("options, match", [
    ({"perturbations": -1}, "perturbations must be"),
    ({"perturbations": 1.5}, "perturbations must be"),
    ({"perturbations": True}, "perturbations must be"),
    ({"perturbations": 2, "refine": 0}, "needs refine"),
    ({"perturbations": 2, "paper": True}, "paper=True"),
])
def test_perturbations_option_is_checked(options, match):
    models, spec = _noisy_permuted_copies(n=3)
    with pytest.raises(ValueError, match=match):
        fedmerge.match(models, spec, method="c2m3", **options)
