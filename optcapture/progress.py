"""Progress of a capture's first call: a line as each stage starts and ends, the seconds each took, and a warning
when the whole first call was slow.

A capture's first call is Dynamo tracing the step's frame, then optcapture's stages (discover, prepare, bucket,
lower), then Dynamo again (guards, bytecode) and, for a bucketed capture, the compiled step's first run (which
compiles the step where its compile was deferred to it). Each stage is logged at INFO as it starts and ends
(``TORCH_LOGS="optcapture"``); the capture's :class:`~optcapture.CaptureReport` gets the seconds of each and
Dynamo's share; a first call longer than :data:`SLOW_FIRST_CALL_SECONDS` is warned about, naming its slowest part.

Invariant: timing never changes what a capture does, and a capture is summed up (and warned about) at most once.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import warnings
from collections.abc import Callable
from typing import Literal, ParamSpec, TypedDict, TypeVar

from optcapture import _compat
from optcapture.errors import user_stacklevel

log = logging.getLogger(__name__)

SLOW_FIRST_CALL_SECONDS = 10.0
"""A capture whose first call (Dynamo's share included) takes longer than this many seconds is warned about (a
``UserWarning``, once per capture; ``warnings.filterwarnings("ignore", message="optcapture: the first call")``
silences it)."""

Stage = Literal["dynamo", "discover", "prepare", "bucket", "lower", "first replay"]

WHAT_STAGES_DO: dict[Stage, str] = {
    "dynamo": "tracing the step: torch.compile's own work, before and after optcapture's",
    "discover": "mapping the traced step's inputs and checking each tensor's update",
    "prepare": "moving params and state into flat storage",
    "bucket": "tracing the bucketed shadow step and proving it equal to the traced one",
    "lower": "Inductor compiling the step",
    "first replay": "the compiled step's first run",
}
"""What each part of a first call does, as the slow-first-call warning says it."""

_P = ParamSpec("_P")
_R = TypeVar("_R")


class Timings(TypedDict):
    """The fields of a :class:`~optcapture.CaptureReport` a :class:`FirstCall` fills."""

    seconds: float
    dynamo_seconds: float
    stages: tuple[tuple[Stage, float], ...]


class FirstCall:
    """Where one capture's first call spends its time. Made when Dynamo hands the backend a graph (or a capture is
    rebuilt); the backend enters its stages in order; the end of the backend, or of the first replay where one
    follows, sums it up."""

    def __init__(self, dynamo_began: float | None) -> None:
        self.began = time.perf_counter()
        # 0 where no Dynamo compile is under way (a capture rebuilt during a step).
        self.dynamo_seconds = 0.0 if dynamo_began is None else max(0.0, self.began - dynamo_began)
        self.stages: dict[Stage, float] = {}
        self.owner: str | None = None  # the optimizer's class name, once a report of this capture was recorded
        self.awaits_replay = False
        self._open: tuple[Stage, float] | None = None
        self._handed_back: float | None = None
        self._summed_up = False

    def enter(self, stage: Stage) -> None:
        """End the stage under way, if any, and start ``stage``. Dynamo's time between the backend's return and the
        first replay is Dynamo's share."""
        self.close()
        now = time.perf_counter()
        if self._handed_back is not None:
            self.dynamo_seconds += now - self._handed_back
            self._handed_back = None
        log.info("%s: start", stage)
        self._open = (stage, now)

    def close(self) -> None:
        if self._open is None:
            return
        stage, began = self._open
        self._open = None
        seconds = time.perf_counter() - began
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds
        log.info("%s: done in %.2f s", stage, seconds)

    def timings(self) -> Timings:
        """The report's fields as of now (a stage under way counts up to now)."""
        stages = dict(self.stages)
        if self._open is not None:
            stage, began = self._open
            stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - began
        own = sum(stages.values())
        return Timings(seconds=own, dynamo_seconds=self.dynamo_seconds, stages=tuple(stages.items()))

    def handed_back(self) -> None:
        """The backend returned (or raised): sum the capture up now unless its first replay is still to come."""
        self.close()
        self._handed_back = time.perf_counter()
        if not self.awaits_replay:
            self.sum_up()

    def sum_up(self) -> Timings:
        """End the stage under way; the first time, for an optimizer's step, log the whole first call and warn if it
        took longer than :data:`SLOW_FIRST_CALL_SECONDS`. Returns the report's fields."""
        self.close()
        timings = self.timings()
        if self._summed_up or self.owner is None:
            return timings
        self._summed_up = True
        parts: list[tuple[Stage, float]] = [("dynamo", timings["dynamo_seconds"]), *timings["stages"]]
        total = sum(seconds for _, seconds in parts)
        listed = ", ".join(f"{_label(stage)} {seconds:.1f} s" for stage, seconds in parts)
        log.info("first call of %s's step: %.1f s (%s)", self.owner, total, listed)
        if total > SLOW_FIRST_CALL_SECONDS:
            slowest, seconds = max(parts, key=lambda part: part[1])
            # A UserWarning: nothing is wrong, and fallbacks (RuntimeWarning) stay filterable on their own.
            warnings.warn(
                f"optcapture: the first call of {self.owner}'s step took {total:.1f} s, most of it in "
                f"{_label(slowest)} ({WHAT_STAGES_DO[slowest]}): {seconds:.1f} s; all of it: {listed}. To see more: "
                'TORCH_LOGS="optcapture" logs each stage as it starts and ends ("+optcapture" with details), '
                'TORCH_LOGS="dynamo,inductor" Dynamo\'s and Inductor\'s own work; optcapture.explain(opt) keeps '
                "these times", UserWarning, stacklevel=user_stacklevel())
        return timings


def _label(stage: Stage) -> str:
    return "Dynamo" if stage == "dynamo" else stage


class _Captures(threading.local):
    def __init__(self) -> None:
        self.under_way: list[FirstCall] = []


_captures = _Captures()


def current() -> FirstCall:
    """The capture under way on this thread (a detached one, timing nothing that is reported, outside any)."""
    return _captures.under_way[-1] if _captures.under_way else FirstCall(None)


def enter(stage: Stage) -> None:
    """Start ``stage`` of the capture under way (ending the one before)."""
    current().enter(stage)


def pending_first_replay() -> FirstCall:
    """The capture under way, which its first replay will sum up (called by a capture that replays)."""
    timing = current()
    timing.awaits_replay = True
    return timing


def timed(make_capture: Callable[_P, _R]) -> Callable[_P, _R]:
    """Time the captures ``make_capture`` makes (the backend, a rebuild): Dynamo's share so far is the time since it
    began compiling the frame; the stages are entered by the capture; the return sums it up unless a first replay
    is to come."""

    @functools.wraps(make_capture)
    def timed_capture(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        timing = FirstCall(_compat.frame_compile_began())
        _captures.under_way.append(timing)
        try:
            return make_capture(*args, **kwargs)
        finally:
            _captures.under_way.remove(timing)
            timing.handed_back()

    return timed_capture
