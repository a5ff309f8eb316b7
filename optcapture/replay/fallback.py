"""The give-up policy of a running capture, and the eager steps that replace one.

A compile that failed before any of the step ran (at capture, at a lazy first compile, when the shadow's frame
recompiles in a later step, or while its CUDA graph was recorded) makes the optimizer step eagerly from then on,
said once, or raises :class:`~optcapture.UnsupportedStepError` under ``fallback="raise"``. Invariant: a failure
while the step's kernels run is raised, never retried: part of the step may have run.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from optcapture import _compat, progress, shadows
from optcapture.config import CaptureConfig
from optcapture.errors import CaptureError, UnsupportedStepError, warn_once
from optcapture.replay.counters import count_path

if TYPE_CHECKING:
    from optcapture.replay.step import CapturePlan


def eager_step(optimizer_ref: weakref.ref[torch.optim.Optimizer]) -> Callable[[], None]:
    """The optimizer's own step, run outside Dynamo and holding the optimizer weakly."""
    optimizer = optimizer_ref()
    assert optimizer is not None
    inner = shadows.unwrapped_step(optimizer)
    del optimizer

    @torch._dynamo.disable  # type: ignore[misc, untyped-decorator]
    def step_eagerly() -> None:
        live_optimizer = optimizer_ref()
        assert live_optimizer is not None
        with torch.no_grad():
            inner(live_optimizer)

    stepper: Callable[[], None] = step_eagerly
    return stepper


def stepping_eagerly(optimizer_ref: weakref.ref[torch.optim.Optimizer],
                     output: Callable[..., Any]) -> Callable[..., Any]:
    """What Dynamo's frame calls instead of a capture that steps eagerly for good: the optimizer's own step,
    returning the graph's outputs (the numbers the frame writes back after it, computed from its inputs)."""
    return then(eager_step(optimizer_ref), output)


def then(step: Callable[[], None], output: Callable[..., Any]) -> Callable[..., Any]:
    def replacement(*args: Any) -> Any:
        step()
        return output(*args)

    return replacement


def give_up(doing: str, name: str, error: Exception, config: CaptureConfig) -> str:
    """The give-up policy: raise :class:`UnsupportedStepError` (``fallback="raise"``), or warn once that the
    optimizer steps eagerly from now on and count it. Returns the reason, for the capture's report."""
    if config.fallback == "raise":
        raise UnsupportedStepError(f"{doing} the bucketed step of {name} failed: {error}") from error
    reason = f"{doing} the bucketed step of {name} failed ({type(error).__name__}: {error})"
    warn_once(f"{reason}; stepping eagerly")
    count_path("eager")
    return reason


def raising(error: Exception) -> Callable[[], None]:
    """A step that raises the :class:`CaptureError` ``error`` became: a compile that failed at capture, given up
    on (by the give-up policy) at its first call."""
    # NB: not the exception object: each raise would chain a new traceback, with the caller's frames, onto the
    # one object this closure keeps, and Dynamo's cache keeps the closure: the optimizer would never be freed.
    message = f"{type(error).__name__}: {error}"

    def compile_failed() -> None:
        raise CaptureError(message)

    return compile_failed


class Runner:
    """Runs the lowered step and applies the give-up policy to a compile that failed (at capture, at a lazy first
    compile, when the shadow's frame recompiles in a later step, or while its CUDA graph was recorded). A failure
    while the step runs is raised, never retried: part of the step may have run."""

    def __init__(self, plan: CapturePlan) -> None:
        self._step: Callable[[], None] | None = plan.step
        self._first_compiles = plan.compiled_lazily
        self._first = True
        self._timing = progress.pending_first_replay()  # the first run ends the capture's first call
        self._optimizer_ref = plan.optimizer_ref
        self._config = plan.config
        self._log = plan.log
        optimizer = plan.optimizer_ref()
        self._name = type(optimizer).__name__
        del optimizer
        # CaptureError: what :func:`raising` raises for a compile that failed at capture.
        self._compile_errors: tuple[type[Exception], ...] = (*_compat.compile_errors(), CaptureError)

    def __call__(self) -> Callable[[], None] | None:
        """Run one step. None, or once it gave up (and stepped eagerly this once), the eager step that replaces
        the capture from the next step on."""
        step = self._step
        assert step is not None
        first_compile, self._first_compiles = self._first_compiles, False
        first, self._first = self._first, False
        if first:
            kernels_before = _compat.generated_kernel_count()
            self._timing.enter("first replay")
        try:
            step()
        except self._compile_errors as error:
            # Raised before any of the step ran (e.g. Dynamo's recompile limit under fullgraph=True, after a
            # followed float took too many values): stepping eagerly is exact.
            return self.give_up("compiling", error)
        except Exception as error:
            # Recording the CUDA graph (the 2nd or 3rd step) runs none of it either, e.g. out of memory.
            if not _compat.raised_while_recording_cuda_graph(error):
                raise
            return self.give_up("recording the CUDA graph of", error)
        if first:
            self._log.first_replayed(_compat.generated_kernel_count() - kernels_before if first_compile else None,
                                     self._timing.sum_up())
        return None

    def give_up(self, doing: str, error: Exception) -> Callable[[], None]:
        """Before any of the step ran: the give-up policy (raise under ``fallback="raise"``), then step eagerly this
        once; the eager step that replaces the capture from the next step on."""
        reason = give_up(doing, self._name, error, self._config)
        self._step = None  # the shadow, its flat storage view and its CUDA graph are not needed any more
        self._log.gave_up(reason)
        step_eagerly = eager_step(self._optimizer_ref)
        step_eagerly()
        # Called instead of the capture from now on: no per-step checks, grad copies or counter reads (each eager
        # step moves the counters the capture would read again).
        return step_eagerly
