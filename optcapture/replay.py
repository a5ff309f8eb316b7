"""Stage 5, replay: everything a captured optimizer step does while it runs.

The backend builds a :class:`CapturePlan` at compile time and hands it to :class:`CapturedStep`, the callable
Dynamo calls for every step; from then on this module alone runs the step. Per call it (1) checks that the
capture still describes the optimizer: the same storage under every param and state tensor, no per-param scalar
state (step counters) written outside the capture since its last step, no float it holds as a constant changed;
(2) binds the grads: on CUDA it points each run's grad table at the grads autograd left (a few bytes, only when a
grad moved), otherwise it copies every grad into its flat slot (``p.grad`` stays the user's tensor); (3) writes
changed hyperparameters into their device tensors; (4) runs the lowered step, which on CUDA replays one CUDA
graph. It owns what happens when that stops working: a rebuild when storage was replaced, the give-up policy
(a compile that failed before any of the step ran: the optimizer steps eagerly from then on, said once, or
:class:`~optcapture.UnsupportedStepError` under ``fallback="raise"``) and the process-wide counters.

Host cost: a call's Python work is a fixed number of operations per bucket, run and param group. What grows with
the tensor count runs inside single C-level calls over lists built at capture (``map`` of a C method, ``list
==``, ``torch._foreach_copy_``), never as Python code per tensor.

Invariant: the compiled step only ever runs on storage that every param, grad and state tensor of the capture
currently uses; when that stops being true the capture is rebuilt, never reused.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import operator
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, Protocol

import torch

from optcapture import _compat, bucketing
from optcapture.config import CaptureConfig
from optcapture.discovery import BucketKey
from optcapture.errors import CaptureError, UnsupportedStepError, warn_once
from optcapture.preparation import PARAM, FlatGroup, GradLayoutError, GradTable, PreparedOptimizer

log = logging.getLogger(__name__)

Path = Literal["bucketed", "per-tensor", "eager", "first-step"]
"""What a compiled graph of an optimizer step runs as: ``bucketed`` (one program per bucket over flat storage),
``per-tensor`` (Inductor's graph of the step as Dynamo traced it, as stock ``torch.compile`` runs it), ``eager``
(the traced graph or the optimizer's own step, uncompiled: a fallback), ``first-step`` (the first step of an
optimizer that creates its state inside ``step()``, run as traced once; the next call is captured)."""


@dataclasses.dataclass
class Stats(Mapping[str, int]):
    """Process-wide counts since the last :func:`optcapture.reset`; :func:`optcapture.stats` returns a copy (also
    readable as a dict: ``stats()["steps"]``). The one live instance, ``COUNTERS``, is written only by this
    module (:func:`count_graph`, :func:`count_path` and the running captures)."""

    captures: int = 0
    """Graphs of optimizer steps handed to optcapture by Dynamo."""
    bucketed: int = 0
    """Of those, captured as bucketed steps."""
    per_tensor: int = 0
    """Of those, compiled as Inductor's per-tensor graph (not bucketed, said once with the reason)."""
    eager: int = 0
    """Of those, run uncompiled (a fallback, said once with the reason), plus captures that gave up later."""
    first_steps: int = 0
    """Of those, first steps that create the optimizer's state, run as traced once (no fallback)."""
    steps: int = 0
    """Steps run by bucketed captures."""
    grads_copied: int = 0
    """Grads copied into flat storage by bucketed steps (CPU, or ``grads_in_place=False``)."""
    grad_tables_written: int = 0
    """Grad address tables rewritten on the device because a grad moved (CUDA, grads read in place)."""
    rebuilds: int = 0
    """Captures rebuilt because their storage was replaced (``load_state_dict``, ``p.data = ...``)."""

    def __getitem__(self, key: str) -> int:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        value: int = getattr(self, key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)


COUNTERS = Stats()
_PATH_COUNTER = {"bucketed": "bucketed", "per-tensor": "per_tensor", "eager": "eager", "first-step": "first_steps"}


def count_graph() -> None:
    """One graph of an optimizer step handed to optcapture."""
    COUNTERS.captures += 1


def count_path(path: Path) -> None:
    """One graph that runs as ``path`` (called once per compiled graph, when its report is recorded)."""
    name = _PATH_COUNTER[path]
    setattr(COUNTERS, name, getattr(COUNTERS, name) + 1)


def reset_counters() -> None:
    for field in dataclasses.fields(Stats):
        setattr(COUNTERS, field.name, 0)


class CaptureLog(Protocol):
    """Where a capture reports what happened after it was compiled (:class:`optcapture.registry.ReportHandle`)."""

    def compiled_lazily(self, kernels: int, seconds: float) -> None:
        """The first call compiled the step: its kernels and time complete the report."""

    def gave_up(self, reason: str) -> None:
        """The capture steps eagerly from now on."""

    def replaced_by_eager(self, reason: str) -> None:
        """Rebuilding the capture failed: the optimizer steps eagerly from now on (a report of its own)."""


@dataclasses.dataclass
class CapturePlan:
    """What the backend built at compile time for one bucketed capture; :class:`CapturedStep` runs it."""

    optimizer_ref: weakref.ref[torch.optim.Optimizer]
    config: CaptureConfig
    prepared: PreparedOptimizer
    flats: dict[BucketKey, FlatGroup]
    runs: list[bucketing.Run]
    step: Callable[[], None]  # the lowered step (:class:`optcapture.lowering.LoweredShadow`'s ``call``)
    compiled_lazily: bool  # the step compiles at its first call (kernels unknown until then)
    log: CaptureLog
    grad_slots: list[tuple[int, BucketKey, int]]  # (graph input index, bucket, member position) of each grad
    grad_tables: list[tuple[GradTable, list[int]]]  # (table, graph input index of each member's grad), or none
    run_scalars: list[tuple[torch.Tensor, int, torch.Tensor]]  # (member vector, first member, run's own scalar)
    frozen_hypers: dict[tuple[int, str], Any]  # (group, key) -> the value the compiled step holds as a constant
    # (shadow param group, real group index, keys the shadow holds its own way): the rest is written into the
    # shadow before each step (:attr:`optcapture.bucketing.ShadowStep.mirrored`).
    mirrored: list[tuple[dict[str, Any], int, frozenset[str]]]
    output: Callable[..., Any]  # the graph's outputs from its inputs: numbers the frame writes back, or nothing
    rebuild: Callable[[], Callable[..., Any]]  # a new capture of the same graph over the current storage; raises


def eager_step(optimizer_ref: weakref.ref[torch.optim.Optimizer]) -> Callable[[], None]:
    """The optimizer's own step, run outside Dynamo and holding the optimizer weakly."""
    optimizer = optimizer_ref()
    assert optimizer is not None
    inner = bucketing.unwrapped_step(optimizer)
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
    return _then(eager_step(optimizer_ref), output)


def _then(step: Callable[[], None], output: Callable[..., Any]) -> Callable[..., Any]:
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


class _Runner:
    """Runs the lowered step and applies the give-up policy to a compile that failed (at capture, at a lazy first
    compile, when the shadow's frame recompiles in a later step, or while its CUDA graph was recorded). A failure
    while the step runs is raised, never retried: part of the step may have run."""

    def __init__(self, plan: CapturePlan) -> None:
        self._step: Callable[[], None] | None = plan.step
        self._first_compiles = plan.compiled_lazily
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
        if first_compile:
            kernels_before, began = _compat.generated_kernel_count(), time.perf_counter()
        try:
            step()
        except self._compile_errors as error:
            # Raised before any of the step ran (e.g. Dynamo's recompile limit under fullgraph=True, after a
            # followed float took too many values): stepping eagerly is exact.
            return self._step_eagerly_from_now_on("compiling", error)
        except Exception as error:
            # Recording the CUDA graph (the 2nd or 3rd step) runs none of it either, e.g. out of memory.
            if not _compat.raised_while_recording_cuda_graph(error):
                raise
            return self._step_eagerly_from_now_on("recording the CUDA graph of", error)
        if first_compile:
            self._log.compiled_lazily(_compat.generated_kernel_count() - kernels_before, time.perf_counter() - began)
        return None

    def _step_eagerly_from_now_on(self, doing: str, error: Exception) -> Callable[[], None]:
        reason = give_up(doing, self._name, error, self._config)
        self._step = None  # the shadow, its flat storage view and its CUDA graph are not needed any more
        self._log.gave_up(reason)
        step_eagerly = eager_step(self._optimizer_ref)
        step_eagerly()
        # Called instead of the capture from now on: no per-step checks, grad copies or counter reads (each eager
        # step moves the counters the capture would read again).
        return step_eagerly


_DATA_PTR = torch.Tensor.data_ptr
_VERSION = operator.attrgetter("_version")
_tokens = itertools.count()


class _LastStep:
    """Which capture of one optimizer stepped it last (each grad pattern compiles a capture of its own, and one
    capture's steps move counters another capture holds copies of). Shared by the captures of one optimizer."""

    def __init__(self) -> None:
        self.token = -1


_last_steps: weakref.WeakKeyDictionary[PreparedOptimizer, _LastStep] = weakref.WeakKeyDictionary()


def _versions(tensors: Sequence[torch.Tensor]) -> list[int] | None:
    """Each tensor's version counter (bumped by in-place writes through autograd: not through ``.data`` or a
    numpy view); None when one has none (a tensor made under ``torch.inference_mode``), which makes every step
    check the values instead."""
    try:
        return list(map(_VERSION, tensors))
    except RuntimeError:
        return None


def _same_hyper(live: Any, held: Any) -> bool:
    """Floats by value; tensors by identity (the shadow reads the held tensor object itself, and comparing values
    would sync with the device)."""
    if isinstance(held, torch.Tensor) or isinstance(live, torch.Tensor):
        return live is held
    if isinstance(held, tuple) and isinstance(live, tuple) and len(live) == len(held):
        return all(map(_same_hyper, live, held))
    return bool(live == held)


def _picker(indices: Sequence[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """``args -> tuple(args[i] for i in indices)``, in C."""
    if len(indices) == 1:
        (index,) = indices
        return lambda args: (args[index],)
    if not indices:
        return lambda args: ()
    return operator.itemgetter(*indices)


class _Capture:
    """The live part of a capture: what each call checks, binds and runs. Dropped (so that no storage outlives
    it) when the optimizer dies, when the capture is rebuilt, and when it gives up."""

    def __init__(self, plan: CapturePlan) -> None:
        self.plan = plan
        self.runner = _Runner(plan)
        self.token = next(_tokens)
        self.last_step = _last_steps.setdefault(plan.prepared, _LastStep())
        self.flats = list(plan.flats.items())
        self.frozen_hypers = list(plan.frozen_hypers.items())
        optimizer = plan.optimizer_ref()
        assert optimizer is not None
        state: Any = optimizer.state
        del optimizer
        # Every param and state tensor in flat storage, with the address it must have: ``t.data = other`` on any
        # of them is noticed. Member by member, so that a member's tensors are read together.
        self.homed: list[torch.Tensor] = []
        self.addresses: list[int] = []
        # The optimizer's own per-param scalar state (step counters, ...): each run steps a copy of it, so a write
        # to it outside the capture (an eager ``opt.step()``) must be noticed; their versions tell.
        self.scalar_states: list[torch.Tensor] = []
        for run in plan.runs:
            flat = plan.flats[run.key]
            for j in run.positions:
                member_state = state.get(flat.params[j], {})
                for role, homes in flat.homes.items():
                    tensor = flat.params[j] if role == PARAM else member_state.get(role.key)
                    # State that was not moved into flat storage (another shape) is not the capture's to check.
                    if isinstance(tensor, torch.Tensor) and (role == PARAM or
                                                             tensor.data_ptr() == homes[j].data_ptr()):
                        self.homed.append(tensor)
                        self.addresses.append(homes[j].data_ptr())
                        if role.kind == "scalar":
                            self.scalar_states.append(tensor)
        self.scalar_versions = _versions(self.scalar_states)
        # (table, picker of each member's grad from the graph inputs): grads read in place.
        self.grad_tables = [(table, _picker(indices)) for table, indices in plan.grad_tables]
        # Copied grads: each step copies every grad into its flat slot. ``p.grad`` stays the user's tensor: a
        # slot handed out as ``p.grad`` would be overwritten under a grad the user kept, and in-place writes
        # into a grad the user holds would stop reaching the step.
        copied = [] if self.grad_tables else plan.grad_slots
        self.pick_grads = _picker([index for index, _, _ in copied])
        self.grad_homes = [plan.flats[key].grad_homes[j] for _, key, j in copied]

    def is_current(self) -> bool:
        optimizer = self.plan.optimizer_ref()
        if optimizer is None:
            return False
        # Float hyperparameters the compiled step holds as constants. Dynamo usually guards them, but once it has
        # made one dynamic it stops, so a change is caught here and rebuilds the capture.
        groups = optimizer.param_groups
        for (group, key), value in self.frozen_hypers:
            if not _same_hyper(groups[group][key], value):
                return False
        prepared = self.plan.prepared.groups
        for bucket, flat in self.flats:
            if prepared.get(bucket) is not flat:
                return False
        # One C-level pass over every homed tensor (the per-tensor host cost of a step).
        if list(map(_DATA_PTR, self.homed)) != self.addresses:
            return False
        versions = _versions(self.scalar_states)
        if self.last_step.token == self.token and versions is not None and versions == self.scalar_versions:
            return True
        return self._counters_agree(versions)

    def _counters_agree(self, versions: list[int] | None) -> bool:
        """Another capture (another grad pattern) ran since this one, or the scalar state was written outside any
        capture (an eager ``opt.step()``, a reset counter): members of one run may have been stepped a different
        number of times. Reading the counters syncs with the device, but only here."""
        for run in self.plan.runs:
            flat = self.plan.flats[run.key]
            for vector in flat.scalars.values():
                values = vector[run.positions[0]:run.positions[-1] + 1]
                if bool((values != values[0]).any()):
                    return False
        with torch.no_grad():
            for vector, first, scalar in self.plan.run_scalars:
                scalar.copy_(vector[first])
        self.scalar_versions = versions
        return True

    def bind_grads(self, args: Sequence[Any]) -> None:
        """Raises :class:`GradLayoutError` when a grad cannot be read in place (before anything is written)."""
        if self.grad_tables:
            for table, pick in self.grad_tables:
                if table.bind(pick(args)):
                    COUNTERS.grad_tables_written += 1
            return
        if self.grad_homes:
            with torch.no_grad():
                torch._foreach_copy_(self.grad_homes, self.pick_grads(args))
            COUNTERS.grads_copied += len(self.grad_homes)

    def refresh(self) -> None:
        """Write the real optimizer's hyperparameters into the device tensors and the shadow's param groups."""
        plan = self.plan
        plan.prepared.refresh_hypers()
        optimizer = plan.optimizer_ref()
        assert optimizer is not None
        groups = optimizer.param_groups
        for shadow_group, g, own in plan.mirrored:
            for key, value in groups[g].items():
                if key not in own:
                    shadow_group[key] = value

    def stepped(self) -> None:
        self.last_step.token = self.token


class _Slot:
    """A capture's live state: the capture, or what replaced it (a rebuilt capture, or an eager step)."""

    def __init__(self, capture: _Capture) -> None:
        self.capture: _Capture | None = capture
        self.replacement: Callable[..., Any] | None = None

    def release(self) -> None:
        self.capture = None
        self.replacement = None


class CapturedStep:
    """What the backend returns for a bucketed capture. Called by Dynamo with the graph's inputs.

    Lifecycle:
      - built by the backend from a :class:`CapturePlan` over the flat storage of one optimizer;
      - each call checks its storage, binds grads, refreshes hyperparameters and runs the step;
      - when its storage is replaced it builds a successor (a new capture, or an eager step if that fails),
        forwards to it from then on and drops its own storage; likewise when its compiled step gives up;
      - when the optimizer is garbage collected it drops every tensor it referenced.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, plan: CapturePlan) -> None:
        self.output = plan.output
        # NB: Dynamo wraps this object with functools.wraps, which copies __dict__ into the wrapper; a shared slot
        # is what lets release() drop the storage for both.
        self._slot = _Slot(_Capture(plan))
        weakref.finalize(optimizer, self._slot.release)

    def __call__(self, *args: Any) -> Any:
        slot = self._slot
        if slot.replacement is not None:
            return slot.replacement(*args)
        capture = slot.capture
        if capture is None:
            raise RuntimeError("optcapture: this captured step belongs to an optimizer that no longer exists")
        if not capture.is_current():
            log.info("captured storage was replaced (load_state_dict, new state or p.data=...): rebuilding")
            return self._rebuild(slot, args)
        try:
            capture.bind_grads(args)
        except GradLayoutError as error:
            log.info("rebuilding the capture: %s", error)
            return self._rebuild(slot, args)
        capture.refresh()
        replacement = capture.runner()
        COUNTERS.steps += 1
        if replacement is not None:
            # The capture gave up (and stepped eagerly this once): its replacement runs from the next step on.
            slot.replacement = _then(replacement, self.output)
            slot.capture = None
            return self.output(*args)
        capture.stepped()
        return self.output(*args)

    def _rebuild(self, slot: _Slot, args: tuple[Any, ...]) -> Any:
        capture = slot.capture
        assert capture is not None
        plan = capture.plan
        rebuild = functools.partial(self._rebuild_with, slot, plan.rebuild, plan.optimizer_ref, plan.config, plan.log)
        # The old shadow, flat storage views and CUDA graph: the replacement does not use them.
        slot.capture = None
        del capture, plan
        return rebuild(args)

    def _rebuild_with(self, slot: _Slot, rebuild: Callable[[], Callable[..., Any]],
                      optimizer_ref: weakref.ref[torch.optim.Optimizer], config: CaptureConfig,
                      capture_log: CaptureLog, args: tuple[Any, ...]) -> Any:
        COUNTERS.rebuilds += 1
        try:
            slot.replacement = rebuild()
        except Exception as error:  # noqa: BLE001 - a rebuild runs before any of the step: stepping eagerly is exact
            optimizer = optimizer_ref()
            name = type(optimizer).__name__ if optimizer is not None else "an optimizer"
            del optimizer
            # Under fallback="raise" this raises, and the next call tries to rebuild again.
            slot.replacement = functools.partial(_call_with_args, functools.partial(
                self._rebuild_with, slot, rebuild, optimizer_ref, config, capture_log))
            reason = give_up("rebuilding", name, error, config)
            capture_log.replaced_by_eager(reason)
            slot.replacement = stepping_eagerly(optimizer_ref, self.output)
        return slot.replacement(*args)


def _call_with_args(function: Callable[[tuple[Any, ...]], Any], *args: Any) -> Any:
    return function(args)
