"""C²M³'s Frank-Wolfe stopping rule: the authors' where the rounding is the result, looser where it only
starts a refinement to a fixed point (``fedmerge.matching.c2m3.PAPER_STOP`` and ``START_STOP``)."""

from __future__ import annotations

import pytest
import torch

import fedmerge
from fedmerge.matching.c2m3 import PAPER_STOP, START_STOP
from fedmerge.models import MLP


def _random_mlps(n: int = 6):
    """``n`` independent random inits of one small MLP: Frank-Wolfe from identity matrices creeps on them."""
    models = []
    for seed in range(1, n + 1):
        torch.manual_seed(seed)
        models.append(MLP((1, 8, 8), 10, widths=(64, 64)).state_dict())
    return models, MLP((1, 8, 8), 10, widths=(64, 64)).permutation_spec()


def test_refinement_to_a_fixed_point_stops_frank_wolfe_by_the_start_rule():
    models, spec = _random_mlps()
    default = fedmerge.match(models, spec, method="c2m3", init="identity")
    long = fedmerge.match(models, spec, method="c2m3", init="identity", **PAPER_STOP)
    assert f"less than tol={START_STOP['tol']:g} for {START_STOP['patience']} iterations" in default.message
    assert default.nit < long.nit
    # the same iterates up to where the looser rule stops
    assert default.history == pytest.approx(long.history[:len(default.history)], rel=1e-9)
    # both are refined to a fixed point, and what they return is Eq. 4 at their permutations
    assert default.converged and long.converged
    for result in (default, long):
        assert result.objective == pytest.approx(fedmerge.matching_objective(models, spec, result.transforms),
                                                 rel=1e-6)


@pytest.mark.parametrize("options", [dict(refine=3), dict(refine=0), dict(paper=True)])
def test_a_rounding_that_is_the_result_keeps_the_authors_rule(options):
    """With no refinement or a capped one, the rounding is (nearly) the answer: Frank-Wolfe runs to the authors'
    rule, exactly as when that rule is given."""
    models, spec = _random_mlps()
    init = {} if "paper" in options else {"init": "identity"}
    got = fedmerge.match(models, spec, method="c2m3", **init, **options)
    given = fedmerge.match(models, spec, method="c2m3", **init, **options, **PAPER_STOP)
    looser = fedmerge.match(models, spec, method="c2m3", **init, **options, **START_STOP)
    assert got.nit == given.nit > looser.nit
    assert got.history == given.history


def test_a_given_tolerance_overrides_the_rule():
    models, spec = _random_mlps()
    exhaustive = fedmerge.match(models, spec, method="c2m3", init="identity", tol=0.0, patience=1, max_iter=25)
    assert exhaustive.nit == 25 and "reached max_iter=25" in exhaustive.message
    with pytest.raises(ValueError, match="tol must be >= 0"):
        fedmerge.match(models, spec, method="c2m3", tol=-1e-3)
    with pytest.raises(ValueError, match="patience must be >= 1"):
        fedmerge.match(models, spec, method="c2m3", patience=0)
