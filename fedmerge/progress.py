"""Progress of long computations, reported through a callback in the manner of ``scipy.optimize``.

Every aligner calls ``callback(intermediate_result)`` after each of its iterations with an
:class:`~scipy.optimize.OptimizeResult` holding at least

* ``method`` — the aligner (``"c2m3"``, ``"mergemany"``, ``"git-rebasin"`` or a user's name);
* ``phase`` — what is iterating (``"start"``, ``"frank-wolfe"``, ``"refinement"``, ``"perturbation"``,
  ``"sweep"``, ``"model"``);
* ``nit`` and ``max_iter`` — iterations done in this phase and their cap;

plus what the method knows cheaply at that point (``objective``, ``step``, ``changed``...).  A
callback that returns ``True`` or raises :class:`StopIteration` stops the aligner, which then
returns its current result with the message ``"stopped by the callback"``.

:class:`ProgressBar` is the default renderer (``progress=True``): one tqdm bar per phase.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from scipy.optimize import OptimizeResult

__all__ = ["Callback", "ProgressBar", "STOPPED", "chain", "report"]

Callback = Callable[[OptimizeResult], Optional[bool]]

#: The message of a result whose aligner was stopped by its callback.
STOPPED = "stopped by the callback"

_POSTFIX = ("objective", "step", "changed")
_LABELS = {"c2m3": "C²M³", "mergemany": "MergeMany", "git-rebasin": "Git Re-Basin", "frank-wolfe": "Frank-Wolfe",
           "perturbation": "perturbation rounds", "sweep": "sweeps", "model": "models"}


def report(callback: Callback | None, **fields: Any) -> bool:
    """Call ``callback`` with an ``OptimizeResult`` of ``fields``; True when the callback asks to stop."""
    if callback is None:
        return False
    try:
        return callback(OptimizeResult(fields)) is True
    except StopIteration:
        return True


class ProgressBar:
    """A callback that draws a tqdm bar per phase of an aligner (close it when the work ends)."""

    def __init__(self, desc: str | None = None) -> None:
        self.desc = desc
        self._bar = None
        self._key: tuple | None = None

    def __call__(self, info: OptimizeResult) -> None:
        key = (info.get("method"), info.get("phase"))
        if key != self._key:
            self.close()
            from tqdm.auto import tqdm
            label = self.desc or " ".join(_LABELS.get(str(k), str(k)) for k in key if k)
            self._bar = tqdm(total=info.get("max_iter"), desc=label, unit="it")
            self._key = key
        self._bar.n = int(info.get("nit", self._bar.n + 1))
        postfix = {k: f"{info[k]:.6g}" if isinstance(info[k], float) else info[k] for k in _POSTFIX if k in info}
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._key = None, None


def chain(*callbacks: Callback | None) -> Callback | None:
    """One callback calling each given one in turn; stops when any of them asks to."""
    live = [c for c in callbacks if c is not None]
    if not live:
        return None
    if len(live) == 1:
        return live[0]

    def both(info: OptimizeResult) -> bool:
        stop = False
        for c in live:
            try:
                stop |= c(info) is True
            except StopIteration:
                stop = True
        return stop
    return both
