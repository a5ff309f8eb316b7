"""What optcapture remembers between compiles: prepared optimizers and capture reports.

Invariant: everything is keyed weakly by the optimizer, so nothing here keeps a model, an
optimizer or their tensors alive; :func:`reset` empties every cache the package holds.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from typing import Literal

import torch

from optcapture import errors, progress, replay
from optcapture.config import CaptureConfig
from optcapture.discovery import StepGraph
from optcapture.input_roles import InputRole
from optcapture.preparation import PreparedOptimizer
from optcapture.progress import Stage
from optcapture.replay import COUNTERS, Path, Stats

__all__ = ["CaptureReport", "GradsPath", "Path", "ReportHandle", "amend", "explain", "prepared_for", "record",
           "record_uncompiled", "reports_of", "reset", "stats"]

GradsPath = Literal["in place", "copied", ""]
"""How a bucketed capture reads grads: through a grad table ("in place") or from flat storage it copies them
into ("copied"); "" for other paths."""


@dataclasses.dataclass(frozen=True)
class CaptureReport:
    """One compile of one optimizer step, as :func:`optcapture.explain` returns it; ``print`` it to read it."""

    optimizer: str
    """The optimizer's class name."""
    path: Path
    """What the compiled graph of the step runs as: ``bucketed`` (one program per bucket over flat storage),
    ``per-tensor`` (Inductor's graph of the step as Dynamo traced it, as stock ``torch.compile`` runs it), ``eager``
    (the traced graph or the optimizer's own step, uncompiled: a fallback), ``first-step`` (the first step of an
    optimizer that creates its state inside ``step()``, run as traced once; the next call is captured),
    ``uncompiled`` (a step stepped through :func:`optcapture.capture` that Dynamo ran without handing optcapture any
    graph of it: ``fused=True``, or a graph break at which Dynamo gave up the step's frame; the optimizer's own step
    ran as plain Python, and every field but ``reasons`` is empty)."""
    reasons: tuple[str, ...]
    """Why the graph is not bucketed (empty when it is)."""
    roles: tuple[InputRole, ...]
    """What each input of Dynamo's graph is: param, grad, state, scalar_state, hyper, global_state or other."""
    buckets: tuple[str, ...]
    """Param group x device x dtype of the params bucketed together, with their count and size."""
    runs: int
    """Bucketed captures: how many flat tensors the step is run on (a bucket splits into several runs where
    members' step counters differ, e.g. after grads came and went)."""
    tensor_hyperparameters: tuple[str, ...]
    """Numbers of the param groups held in device tensors, refreshed before each step: float hyperparameters a
    scheduler changes without a recompile, and (lane-local batches) an int step counter the step keeps in its
    groups."""
    kernels: int
    """Kernels Inductor generated for this compile."""
    seconds: float = 0.0
    """optcapture's share of the capture's first call: its stages (``stages``), the first run of a bucketed step
    included (which compiles it, where the compile was deferred to it)."""
    grads: GradsPath = ""
    """Bucketed captures: "in place" (read through a grad table, no copy) or "copied" (into flat storage)."""
    batches: int = 0
    """Bucketed captures of a lane-local update (per-param norms: LAMB, LARS; matrices: Muon): how many batches of
    same-shape params the step runs on, each as one vmapped program (0 for elementwise updates, which use runs)."""
    dynamo_seconds: float = 0.0
    """Dynamo's share of the capture's first call: from when Dynamo began compiling the step's frame until it handed
    the graph to optcapture, and, for a bucketed capture, from the backend's return to the step's first run (guards,
    bytecode). 0 for a capture rebuilt during a step (no Dynamo compile). Frames Dynamo compiled before the step's
    own (``torch.optim``'s wrapper of ``step``, a fraction of a second) are not counted."""
    stages: tuple[tuple[Stage, float], ...] = ()
    """Seconds of each of optcapture's stages in this first call, in order: ``discover``, ``prepare``, ``bucket``,
    ``lower``, ``first replay`` (those the capture went through; a stage run twice, e.g. after in-place grads
    failed, is summed). ``TORCH_LOGS="optcapture"`` logs each as it starts and ends."""

    @property
    def first_call_seconds(self) -> float:
        """The whole first call of the capture as timed: ``dynamo_seconds + seconds``."""
        return self.dynamo_seconds + self.seconds

    def describe(self) -> str:
        """The report as lines of text (what ``print(report)`` shows)."""
        grads = f", grads {self.grads}" if self.grads else ""
        layout = f"{self.batches} same-shape batch(es)" if self.batches else f"{self.runs} flat run(s)"
        lines = [f"{self.optimizer}: {self.path} ({self.kernels} kernel(s) generated, {layout}{grads}, "
                 f"first call {self.first_call_seconds:.1f} s: Dynamo {self.dynamo_seconds:.1f} s, optcapture "
                 f"{self.seconds:.1f} s)"]
        if self.stages:
            lines.append("  stages: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in self.stages))
        if self.path == "bucketed":  # a step that is not bucketed has no buckets, only the ones it might have had
            lines += [f"  bucket {b}" for b in self.buckets]
        lines += [f"  hyperparameter in a device tensor: {h}" for h in self.tensor_hyperparameters]
        lines += [f"  not bucketed: {r}" for r in self.reasons]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()



_prepared: weakref.WeakKeyDictionary[torch.optim.Optimizer, PreparedOptimizer] = weakref.WeakKeyDictionary()
_reports: weakref.WeakKeyDictionary[torch.optim.Optimizer, list[CaptureReport]] = weakref.WeakKeyDictionary()


def prepared_for(optimizer: torch.optim.Optimizer, config: CaptureConfig) -> PreparedOptimizer:
    prepared = _prepared.get(optimizer)
    if prepared is None or prepared.config != config:
        prepared = PreparedOptimizer(optimizer, config)
        _prepared[optimizer] = prepared
    return prepared


def record(step: StepGraph, path: Path, reasons: list[str], runs: int = 0, tensor_hypers: tuple[str, ...] = (),
           kernels: int | None = 0, seconds: float | None = None, grads: GradsPath = "",
           batches: int = 0) -> CaptureReport:
    """Report a compiled graph of ``step`` and count it by ``path``; its times so far come from the capture under
    way (``seconds`` overrides optcapture's share)."""
    replay.count_path(path)
    timing = progress.current()
    timings = timing.timings()
    owner = step.reported_to
    report = CaptureReport(
        optimizer=type(owner).__name__ if owner is not None else "unknown",
        path=path, reasons=tuple(reasons), roles=tuple(step.roles),
        buckets=tuple(f"group {b.key.group} {b.key.device} {b.key.dtype}: {len(b.members)} tensors, {b.numel} elements"
                      for b in step.buckets),
        runs=runs, tensor_hyperparameters=tensor_hypers, kernels=kernels or 0,
        seconds=timings["seconds"] if seconds is None else seconds, grads=grads,
        dynamo_seconds=timings["dynamo_seconds"], stages=timings["stages"], batches=batches)
    if owner is not None:
        timing.owner = report.optimizer
        _reports.setdefault(owner, []).append(report)
    return report


def record_uncompiled(optimizer: torch.optim.Optimizer, reason: str) -> CaptureReport:
    """Report a step of ``optimizer`` that Dynamo ran without handing optcapture any graph of it (``uncompiled``)."""
    replay.count_path("uncompiled")
    report = CaptureReport(optimizer=type(optimizer).__name__, path="uncompiled", reasons=(reason,), roles=(),
                           buckets=(), runs=0, tensor_hyperparameters=(), kernels=0)
    _reports.setdefault(optimizer, []).append(report)
    return report


def amend(optimizer: torch.optim.Optimizer | None, report: CaptureReport, **changes: object) -> CaptureReport:
    """Replace ``report`` (frozen) by a copy with ``changes``, e.g. the kernel count known after the first call."""
    updated = dataclasses.replace(report, **changes)  # type: ignore[arg-type]
    reports = _reports.get(optimizer) if optimizer is not None else None
    if reports is not None:
        reports[:] = [updated if r is report else r for r in reports]
    return updated


class ReportHandle:
    """The current report of one bucketed capture, amended as its capture runs (reports are frozen: each change
    replaces the report with an amended copy); what :class:`optcapture.replay.CaptureLog` describes."""

    def __init__(self, optimizer: torch.optim.Optimizer, report: CaptureReport) -> None:
        self._optimizer_ref = weakref.ref(optimizer)
        self.report = report

    def first_replayed(self, kernels: int | None, timings: progress.Timings) -> None:
        changes: dict[str, object] = dict(timings)
        if kernels is not None:
            changes["kernels"] = kernels
        self.report = amend(self._optimizer_ref(), self.report, **changes)

    def gave_up(self, reason: str) -> None:
        self.report = amend(self._optimizer_ref(), self.report, path="eager", reasons=(reason,))

    def replaced_by_eager(self, reason: str) -> None:
        optimizer = self._optimizer_ref()
        if optimizer is not None:
            _reports.setdefault(optimizer, []).append(dataclasses.replace(
                self.report, path="eager", reasons=(reason,), runs=0, tensor_hyperparameters=(), kernels=0,
                seconds=0.0, grads=""))


def explain(optimizer: torch.optim.Optimizer) -> list[CaptureReport]:
    """Every capture of ``optimizer``'s step so far, oldest first. Empty if none: printed, the empty list says why
    there is none (never stepped since captured, not compiled with this backend, a wrapper whose inner optimizer
    has the reports)."""
    return _Reports(_reports.get(optimizer, []), optimizer)


def reports_of(optimizer: torch.optim.Optimizer) -> Sequence[CaptureReport]:
    """The reports of ``optimizer``'s step as kept (read only, no copy, no explanation of an empty one): what
    optcapture's own code reads at every step of a captured optimizer, where :func:`explain`'s copy is not needed."""
    return _reports.get(optimizer, ())


class _Reports(list[CaptureReport]):
    """:func:`explain`'s list: printed, its reports' descriptions; printed empty, why there is no report (not a bare
    ``[]``)."""

    def __init__(self, reports: list[CaptureReport], optimizer: torch.optim.Optimizer) -> None:
        super().__init__(reports)
        self.why_empty = "" if reports else _why_no_report(optimizer)

    def __repr__(self) -> str:
        return super().__repr__() if self or not self.why_empty else f"[] (no report: {self.why_empty})"

    def __str__(self) -> str:
        """``print(explain(opt))``: each report as its description, oldest first."""
        return "\n".join(report.describe() for report in self) if self else repr(self)


def _why_no_report(optimizer: object) -> str:
    name = type(optimizer).__name__
    if not isinstance(optimizer, torch.optim.Optimizer):
        return f"explain() takes the optimizer whose step was compiled, not a {name}"
    inner = getattr(optimizer, "optim", None)  # ZeroRedundancyOptimizer steps its local optimizer
    if isinstance(inner, torch.optim.Optimizer) and _reports.get(inner):
        return f"this {name} steps its inner optimizer, which has the reports: explain(opt.optim)"
    since = "since it was captured (or since optcapture.reset())"
    if hasattr(type(optimizer), "_optcapture_base"):
        return f"this {name} is captured with optcapture.capture() but has not stepped {since}"
    return (f"no step of this {name} was compiled with backend='optcapture' and run, since the process began (or "
            "since optcapture.reset()): run torch.compile(opt.step, backend='optcapture') once, or "
            "optcapture.capture(opt) and opt.step(); a step compiled with another backend reports nothing here")


def stats() -> Stats:
    """Process-wide counts: captures, bucketed/per-tensor/eager paths, steps, grads copied, rebuilds (:class:`Stats`
    says what each counts)."""
    return dataclasses.replace(COUNTERS)


def reset() -> None:
    """Forget every prepared optimizer, report, counter and warned reason.

    Dynamo's own cache of compiled frames is not touched (``torch._dynamo.reset()`` does that);
    steps compiled before keep working, they just rebuild what they need.
    """
    _prepared.clear()
    _reports.clear()
    errors.clear_warnings()
    replay.reset_counters()
