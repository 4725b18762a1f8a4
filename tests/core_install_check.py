"""Check that fedmerge's core imports and merges without the federated extra.

Run by ``.ci/run`` in a fresh virtualenv made with ``pip install .`` (no extras), as

    python tests/core_install_check.py --fresh-env

and by ``tests/test_core_install.py`` in the development environment, where an import blocker
stands in for the missing packages.  Not a pytest module (pytest collects ``test_*.py`` only).
"""

from __future__ import annotations

import importlib.util
import sys

#: What only the federated extra (``pip install 'fedmerge[federated]'``) brings.
FEDERATED_ONLY = ("flwr", "ray", "tensorboard", "torchvision", "matplotlib")


def check(fresh_env: bool) -> None:
    import torch

    import fedmerge
    from fedmerge.models import MLP

    if fresh_env:
        missing = [name for name in FEDERATED_ONLY if importlib.util.find_spec(name) is None]
        assert missing == list(FEDERATED_ONLY), f"installed without extras, yet importable: " \
                                                f"{sorted(set(FEDERATED_ONLY) - set(missing))}"
        assert "site-packages" in (fedmerge.__file__ or ""), f"not the installed copy: {fedmerge.__file__}"

    template = MLP(widths=(16, 16))
    spec = template.permutation_spec()
    copies = [fedmerge.apply_permutation(template.state_dict(), spec, fedmerge.random_permutation(spec, seed))
              for seed in range(3)]  # three hidden permutations of one model
    merged, result = fedmerge.merge(copies, align="c2m3", model=template, full_output=True, refine=True)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = template(x)
        template.load_state_dict(merged)
        assert torch.allclose(template(x), expected, atol=1e-5), "c2m3 did not undo the hidden permutations"
    assert result.converged and "global optimum" in result.message, result.message  # certified copies
    mean = fedmerge.merge(copies, align=None)
    for key, value in mean.items():
        assert torch.allclose(value, sum(sd[key] for sd in copies) / len(copies)), key

    from fedmerge.data import load_dataset
    try:  # the data helpers read through torchvision: without it, an error that names the extra
        load_dataset("mnist", train=False)
    except ImportError as e:
        assert "fedmerge[federated]" in str(e), e
    else:
        raise AssertionError("load_dataset worked without torchvision")

    loaded = sorted(name for name in FEDERATED_ONLY if name in sys.modules)
    assert not loaded, f"importing fedmerge and merging loaded {loaded}"
    print(f"core install OK: fedmerge {getattr(fedmerge, '__version__', '?')} from {fedmerge.__file__}, "
          f"torch {torch.__version__}; none of {', '.join(FEDERATED_ONLY)} loaded")


if __name__ == "__main__":
    check(fresh_env="--fresh-env" in sys.argv[1:])
