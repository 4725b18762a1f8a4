"""merge() as align -> average -> repair: user stages, per-stage options, callbacks, every kind of group."""

import pytest
import torch
from torch import nn

import fedmerge
from fedmerge.models import MLP
from fedmerge.progress import STOPPED


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _net(act: type[nn.Module], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), act(), nn.Linear(8, 7), act(), nn.Linear(7, 3)).double()


def _net_spec(kind: str) -> fedmerge.SymmetrySpec:
    return fedmerge.SymmetrySpec(
        {"0.weight": ("h0", None), "0.bias": ("h0",), "2.weight": ("h1", "h0"), "2.bias": ("h1",),
         "4.weight": (None, "h1"), "4.bias": (None,)}, {"h0": 8, "h1": 7}, {"h0": kind, "h1": kind})


def _outputs(template: nn.Module, sd, x):
    with torch.no_grad():
        return torch.func.functional_call(template, sd, (x,))


def _copies(sd, spec, count, seed=0):
    """The model and ``count - 1`` copies moved by hidden random elements of its groups (all non-trivial)."""
    out = [sd]
    for i in range(1, count):
        t = fedmerge.random_transform(spec, seed + i)
        assert not fedmerge.transforms.is_identity(t)
        out.append(fedmerge.apply_transform(sd, spec, t))
    return out


# ------------------------------------------------------------------ user stages

def norm_sort(state_dicts, spec, *, callback=None, descending=True):
    """A data-free aligner: order every group's units by the norm of everything they touch.

    Each unit's squared norm, summed over the slices of every tensor the group acts on, does not
    change when other groups are permuted, so sorting by it sends permuted copies of one model to
    the same order (a canonical form, as in weight-space canonicalisation).
    """
    transforms = []
    for sd in state_dicts:
        t = {}
        for g, places in spec.groups.items():
            d = spec.sizes[g]
            norms = torch.zeros(d, dtype=torch.float64)
            for key, axis in places:
                x = sd[key].double()
                x = x.reshape(*x.shape[:axis], d, -1, *x.shape[axis + 1:])  # blocks of a flattened axis
                norms += x.pow(2).sum(dim=[i for i in range(x.dim()) if i != axis]).cpu()
            t[g] = torch.argsort(norms, descending=descending)
        transforms.append(t)
    return {"transforms": transforms, "message": "sorted by norm"}


def trimmed_mean(state_dicts, weights, *, trim=0):
    """An averager: per entry, drop the ``trim`` largest and smallest values across models, then average."""
    out = {}
    for key, first in state_dicts[0].items():
        stacked = torch.stack([sd[key] for sd in state_dicts]).double()
        if first.is_floating_point():
            kept = stacked.sort(0).values[trim:len(state_dicts) - trim]
            out[key] = kept.mean(0).to(first.dtype)
        else:
            out[key] = stacked.amax(0).to(first.dtype)
    return out


def test_a_user_aligner_and_averager_run_through_merge():
    model = MLP(widths=(12, 9))
    spec = model.permutation_spec()
    x = torch.randn(16, 1, 28, 28, generator=_gen(0))
    copies = _copies(model.state_dict(), spec, 5)
    merged, result = fedmerge.merge(copies, spec=spec, align=norm_sort, average=trimmed_mean,
                                    average_options={"trim": 1}, full_output=True)
    assert result.method == "norm_sort" and result.average == "trimmed_mean" and result.message == "sorted by norm"
    assert torch.allclose(_outputs(model, merged, x), _outputs(model, model.state_dict(), x), atol=1e-5)
    # without the aligner the same averager mixes unaligned units and changes the function
    plain = fedmerge.merge(copies, align=None, average=trimmed_mean, average_options={"trim": 1})
    assert not torch.allclose(_outputs(model, plain, x), _outputs(model, model.state_dict(), x), atol=1e-2)


def test_the_averager_gets_the_aligned_models_and_normalised_weights():
    models = [MLP(widths=(8,)).state_dict() for _ in range(3)]
    seen = {}

    def spy(aligned, weights):
        seen["weights"], seen["n"] = list(weights), len(aligned)
        return fedmerge.weighted_average(aligned, weights)

    fedmerge.merge(models, model=MLP(widths=(8,)), align="git-rebasin", average=spy, weights=[1, 1, 2])
    assert seen == {"weights": [0.25, 0.25, 0.5], "n": 3}


def test_each_stage_gets_only_its_own_options():
    model = MLP(widths=(8, 8))
    models = [MLP(widths=(8, 8)).state_dict() for _ in range(3)]
    _, result = fedmerge.merge(models, model=model, align="c2m3", align_options={"max_iter": 2},
                               average=trimmed_mean, average_options={"trim": 1}, full_output=True)
    assert result.nit <= 2
    # an averager option reaching the aligner would raise TypeError from c2m3_matching
    _, same = fedmerge.merge(models, model=model, max_iter=2, full_output=True)  # keyword shorthand
    assert same.nit == result.nit and same.objective == pytest.approx(result.objective)
    with pytest.raises(TypeError, match="not both"):
        fedmerge.merge(models, model=model, max_iter=2, align_options={"max_iter": 3})
    with pytest.raises(TypeError, match="trim"):
        fedmerge.merge(models, model=model, average_options={"trim": 1})  # "mean" takes no options
    with pytest.raises(TypeError, match="without a repair stage"):
        fedmerge.merge(models, model=model, repair_options={"x": 1})


def test_unknown_or_broken_stages_raise_clear_errors():
    model = MLP(widths=(8,))
    models = [MLP(widths=(8,)).state_dict() for _ in range(2)]
    with pytest.raises(ValueError, match="unknown average 'median'; choose one of mean"):
        fedmerge.merge(models, model=model, average="median")
    with pytest.raises(ValueError, match="unknown repair 'fix'; choose one of repair, reset"):
        fedmerge.merge(models, model=model, repair="fix")
    with pytest.raises(ValueError, match="unknown method 'c3m3'"):
        fedmerge.merge(models, model=model, align="c3m3")
    with pytest.raises(TypeError, match="a name or a callable"):
        fedmerge.merge(models, model=model, average=3)

    def drops_a_key(aligned, weights):
        return {k: v for k, v in fedmerge.weighted_average(aligned, weights).items() if k != "head.bias"}
    with pytest.raises(ValueError, match="result of average='drops_a_key'.*head.bias"):
        fedmerge.merge(models, model=model, average=drops_a_key)

    def too_few(state_dicts, spec, callback=None):
        return {"transforms": [fedmerge.identity_transform(spec)]}
    with pytest.raises(ValueError, match="aligner 'too_few' must return 'transforms', one per model \\(2\\)"):
        fedmerge.merge(models, model=model, align=too_few)

    def not_a_permutation(state_dicts, spec, callback=None):
        return {"transforms": [{g: torch.zeros(d, dtype=torch.long) for g, d in spec.sizes.items()}
                               for _ in state_dicts]}
    with pytest.raises(ValueError, match="aligner 'not_a_permutation', model 0, group 'layers.0'.*not a permutation"):
        fedmerge.merge(models, model=model, align=not_a_permutation)


def test_a_repair_stage_gets_the_merge_and_its_options_and_its_result_is_returned():
    model = MLP(widths=(8,))
    models = [MLP(widths=(8,)).state_dict() for _ in range(3)]
    calls = []

    def scale_head(merged, aligned, weights, *, spec, model, factor):
        calls.append((len(aligned), weights, spec, type(model).__name__))
        return {k: v * factor if k.startswith("head") else v for k, v in merged.items()}

    plain = fedmerge.merge(models, model=model, align="git-rebasin")
    repaired, result = fedmerge.merge(models, model=model, align="git-rebasin", repair=scale_head,
                                      repair_options={"factor": 2.0}, full_output=True)
    assert calls == [(3, [1 / 3] * 3, model.permutation_spec(), "MLP")]
    assert torch.equal(repaired["head.weight"], 2 * plain["head.weight"])
    assert torch.equal(repaired["layers.0.weight"], plain["layers.0.weight"])
    assert result.repair == "scale_head" and set(result.stage_seconds) == {"align", "average", "repair"}


# ------------------------------------------------------------------ callbacks

@pytest.mark.parametrize("method,phase", [("c2m3", "frank-wolfe"), ("mergemany", "sweep"), ("git-rebasin", "model")])
def test_the_callback_sees_every_iteration_and_can_stop(method, phase):
    model = MLP(widths=(16, 16))
    models = [MLP(widths=(16, 16)).state_dict() for _ in range(4)]
    seen = []

    def watch(info):
        seen.append((info.method, info.phase, info.nit))
        return info.phase == phase and info.nit >= 2  # stop after the second iteration

    result = fedmerge.match(models, model=model, method=method, callback=watch)
    # C²M³'s start reports each model it places first (models 1, 2, 3; these are not copies)
    start = [(method, "start", p) for p in (1, 2, 3)] if method == "c2m3" else []
    assert seen == start + [(method, phase, 1), (method, phase, 2)]
    assert result.message == STOPPED and not result.converged
    if method == "c2m3":
        assert result.nit == 2
    full = fedmerge.match(models, model=model, method=method)
    assert full.message != STOPPED


def test_c2m3_refinement_reports_its_own_phase_and_stop_iteration_stops():
    model = MLP(widths=(16, 16))
    models = [MLP(widths=(16, 16)).state_dict() for _ in range(4)]
    phases = []
    fedmerge.match(models, model=model, method="c2m3", max_iter=3, refine=True,
                   callback=lambda info: phases.append(info.phase))
    assert phases[:3] == ["start"] * 3 and phases[3:6] == ["frank-wolfe"] * 3
    assert phases[6:] and set(phases[6:]) == {"refinement"}

    def stop(info):
        raise StopIteration
    stopped = fedmerge.match(models, model=model, method="c2m3", callback=stop)
    assert stopped.message == STOPPED and stopped.nit == 0  # stopped at the first model the start placed

    def stop_frank_wolfe(info):
        if info.phase == "frank-wolfe":
            raise StopIteration
    stopped = fedmerge.match(models, model=model, method="c2m3", callback=stop_frank_wolfe)
    assert stopped.message == STOPPED and stopped.nit == 1 and stopped.sweeps == 0


# ------------------------------------------------------------------ other kinds of groups

def test_weight_matching_aligners_undo_hidden_signed_permutations_of_tanh_units():
    net = _net(nn.Tanh, 0)
    spec = _net_spec("signed-permutation")
    x = torch.randn(32, 6, generator=_gen(1), dtype=torch.float64)
    copies = _copies(net.state_dict(), spec, 4)
    assert any(bool((t.signs < 0).any()) for t in fedmerge.random_transform(spec, 1).values())
    for method in ("git-rebasin", "mergemany"):
        merged, result = fedmerge.merge(copies, spec=spec, align=method, full_output=True)
        assert isinstance(result.transforms[1]["h0"], fedmerge.SignedPermutation)
        assert torch.allclose(_outputs(net, merged, x), _outputs(net, net.state_dict(), x), atol=1e-5), method
    # by permutations alone the sign flips cannot be undone
    merged, result = fedmerge.merge(copies, spec=spec.with_kinds({"h0": "permutation", "h1": "permutation"}),
                                    align="git-rebasin", full_output=True)
    assert not torch.allclose(_outputs(net, merged, x), _outputs(net, net.state_dict(), x), atol=1e-2)


def test_c2m3_aligns_other_kinds_by_permutations_and_says_so():
    net = _net(nn.Tanh, 0)
    spec = _net_spec("signed-permutation")
    copies = _copies(net.state_dict(), spec.with_kinds({"h0": "permutation", "h1": "permutation"}), 3)
    x = torch.randn(32, 6, generator=_gen(1), dtype=torch.float64)
    merged, result = fedmerge.merge(copies, spec=spec, align="c2m3", refine=True, full_output=True)
    assert "aligned by permutations only" in result.message
    assert torch.allclose(_outputs(net, merged, x), _outputs(net, net.state_dict(), x), atol=1e-5)


def test_weight_matching_aligners_undo_a_hidden_rotation_of_a_linear_layer():
    """One orthogonal group: its best response (an SVD) is the global optimum, so a rotation is undone.

    With several coupled orthogonal groups coordinate ascent reaches a stationary point that need
    not be the global one; the orthogonal aligner of a later issue propagates Procrustes layer by layer.
    """
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(6, 8), nn.Identity(), nn.Linear(8, 3)).double()
    spec = fedmerge.SymmetrySpec({"0.weight": ("h", None), "0.bias": ("h",), "2.weight": (None, "h"),
                                  "2.bias": (None,)}, {"h": 8}, {"h": "orthogonal"})
    x = torch.randn(32, 6, generator=_gen(3), dtype=torch.float64)
    copies = [{k: v.double() for k, v in sd.items()} for sd in _copies(net.state_dict(), spec, 4)]
    assert not torch.allclose(copies[1]["0.weight"].abs(), copies[0]["0.weight"].abs(), atol=1e-2)
    for method in ("git-rebasin", "mergemany"):
        merged, result = fedmerge.merge(copies, spec=spec, align=method, full_output=True)
        q = result.transforms[1]["h"].double()
        assert torch.allclose(q.T @ q, torch.eye(8, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(_outputs(net, merged, x), _outputs(net, net.state_dict(), x), atol=1e-5), method
        assert result.objective == pytest.approx(fedmerge.matching_objective(copies, spec, result.transforms))
    # the permutation subgroup cannot undo a rotation
    merged = fedmerge.merge(copies, spec=spec.with_kinds({"h": "permutation"}), align="git-rebasin")
    assert not torch.allclose(_outputs(net, merged, x), _outputs(net, net.state_dict(), x), atol=1e-2)


def test_the_readme_example_of_custom_stages_runs_and_undoes_the_hidden_permutations():
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- example: custom-stages.*?-->\s*```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md:custom-stages", "exec"), scope)
    result, model, merged = scope["result"], scope["model"], scope["merged"]
    assert (result.method, result.average, result.message) == ("norm_sort", "trimmed_mean", "sorted by norm")
    x = torch.randn(8, 1, 28, 28, generator=_gen(0))
    assert not torch.allclose(scope["copies"][1]["layers.0.weight"], model.state_dict()["layers.0.weight"])
    canonical = fedmerge.apply_transform(model.state_dict(), scope["spec"],
                                         scope["norm_sort"]([model.state_dict()], scope["spec"])["transforms"][0])
    assert all(torch.allclose(merged[k], canonical[k], atol=1e-6) for k in merged)
    assert torch.allclose(_outputs(model, merged, x), _outputs(model, model.state_dict(), x), atol=1e-5)
