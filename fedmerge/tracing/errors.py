"""The tracer's exceptions (all ``ValueError``) and the advice every refusal ends with."""

from __future__ import annotations

__all__ = ["TracingError", "UnsupportedModuleError", "UntraceableModuleError", "HINT"]


class TracingError(ValueError):
    """The tracer cannot derive a spec for this module (see the message for the culprit)."""


class UnsupportedModuleError(TracingError):
    """A layer or operation whose symmetry behaviour the tracer does not know."""


class UntraceableModuleError(TracingError):
    """torch.fx could not trace the module (e.g. data-dependent control flow)."""


HINT = "write a permutation_spec() method for this model by hand instead"
