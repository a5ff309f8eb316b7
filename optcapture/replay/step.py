"""The callable Dynamo calls for every step of a bucketed capture: checks, grad binding, hyperparameters, run.

Invariant: the compiled step only ever runs on storage that every param, grad and state tensor of the capture
currently uses; when that stops being true the capture is rebuilt, never reused. A call's Python work is a fixed
number of operations per bucket, run and param group; what grows with the tensor count runs inside single C-level
calls over lists built at capture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import operator
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from optcapture import _compat, dtensors, shadows
from optcapture.config import CaptureConfig
from optcapture.discovery import BucketKey
from optcapture.errors import CaptureError
from optcapture.grad_tables import GradLayoutError, GradTable
from optcapture.lane_hypers import MemberNumbers
from optcapture.preparation import PARAM, FlatGroup, PreparedOptimizer
from optcapture.progress import Timings
from optcapture.replay.counters import COUNTERS
from optcapture.replay.fallback import Runner, eager_step, give_up, stepping_eagerly, then
from optcapture.replay.grad_copies import GradCopies, picker

log = logging.getLogger(__name__)


class CaptureLog(Protocol):
    """Where a capture reports what happened after it was compiled (:class:`optcapture.registry.ReportHandle`)."""

    def first_replayed(self, kernels: int | None, timings: Timings) -> None:
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
    runs: list[shadows.Run]
    step: Callable[[], None]  # the lowered step (:class:`optcapture.lowering.LoweredShadow`'s ``call``)
    compiled_lazily: bool  # the step compiles at its first call (kernels unknown until then)
    log: CaptureLog
    grad_slots: list[tuple[int, BucketKey, int]]  # (graph input index, bucket, member position) of each grad
    grad_tables: list[tuple[GradTable, list[int]]]  # (table, graph input index of each member's grad), or none
    run_scalars: list[tuple[torch.Tensor, int, torch.Tensor]]  # (member vector, first member, run's own scalar)
    frozen_hypers: dict[tuple[int, str], Any]  # (group, key) -> the value the compiled step holds as a constant
    # (shadow param group, real group index, keys the shadow holds its own way): the rest is written into the
    # shadow before each step (:attr:`optcapture.shadows.ShadowStep.mirrored`).
    mirrored: list[tuple[dict[str, Any], int, frozenset[str]]]
    output: Callable[..., Any]  # the graph's outputs from its inputs: numbers the frame writes back, or nothing
    # A new capture of the same graph over the current storage, from this call's graph inputs; raises.
    rebuild: Callable[[Sequence[Any]], Callable[..., Any]]
    # (graph input index, tensor) of every input the capture reads from its own storage (params, state): Dynamo
    # guards a user optimizer's plain state tensors by metadata, not identity (DTensor state by identity: a new one
    # compiles the step again), so after ``load_state_dict`` it hands the capture new tensors of the same shape;
    # their addresses tell.
    held_inputs: list[tuple[int, torch.Tensor]] = dataclasses.field(default_factory=list)
    # Runs of an elementwise update step one copy of their members' scalar state, which must agree; a batch of a
    # lane-local update (:mod:`optcapture.lane_batches`) steps each member's own.
    runs_share_scalars: bool = True
    # The step writes into its grads (NovoGrad divides them by their norm): eager leaves them written, so the copies
    # the step wrote are copied back into the user's grads after it.
    grads_written: bool = False
    # A number of each member's state (``state[p]["step"]``) that batches read from a vector, written from the
    # graph's inputs before each step (:mod:`optcapture.lane_hypers`).
    member_numbers: list[MemberNumbers] = dataclasses.field(default_factory=list)
    # Param groups whose steps at lr 0.0 run eagerly (:func:`optcapture.shadows.groups_stepped_eagerly_at_zero_lr`).
    zero_lr_groups: tuple[int, ...] = ()


_DATA_PTR = torch.Tensor.data_ptr
_LOCAL = _compat.LOCAL_TENSOR  # a DTensor's elements are its local tensor's (DTensor.data_ptr() is 0)
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


def _is_zero_on_host(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.device.type == "cpu" and value.numel() == 1 and bool(value == 0)
    return isinstance(value, int | float) and value == 0


@contextlib.contextmanager
def eager_form(optimizer: torch.optim.Optimizer, groups: Sequence[int]) -> Iterator[None]:
    """``capturable`` unset in ``groups`` (:func:`optcapture.shadows.groups_stepped_eagerly_at_zero_lr`) while the
    optimizer's own step runs, and set again after: Dynamo set it when it traced the first step on a GPU, and the
    capturable form is the one that writes NaN at lr 0.0; the eager form reads the step counters where they lie."""
    flipped = [optimizer.param_groups[g] for g in groups if optimizer.param_groups[g].get("capturable", False)]
    for group in flipped:
        group["capturable"] = False
    try:
        yield
    finally:
        for group in flipped:
            group["capturable"] = True


def _same_hyper(live: Any, held: Any) -> bool:
    """Floats by value; tensors by identity (the shadow reads the held tensor object itself, and comparing values
    would sync with the device)."""
    if isinstance(held, torch.Tensor) or isinstance(live, torch.Tensor):
        return live is held
    if isinstance(held, tuple) and isinstance(live, tuple) and len(live) == len(held):
        return all(map(_same_hyper, live, held))
    return bool(live == held)


class _Capture:
    """The live part of a capture: what each call checks, binds and runs. Dropped (so that no storage outlives
    it) when the optimizer dies, when the capture is rebuilt, and when it gives up."""

    def __init__(self, plan: CapturePlan) -> None:
        self.plan = plan
        self.runner = Runner(plan)
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
        # DTensors (params and state): their local tensors' addresses, read through the DTensor at each step.
        self.homed_dtensors: list[torch.Tensor] = []
        self.dtensor_addresses: list[int] = []
        # The optimizer's own per-param scalar state (step counters, ...): each run steps a copy of it, so a write
        # to it outside the capture (an eager ``opt.step()``) must be noticed; their versions tell.
        self.scalar_states: list[torch.Tensor] = []
        # A tensor that is also a held graph input is checked there, through the very object Dynamo passes.
        held = {id(tensor) for _, tensor in plan.held_inputs}
        for run in plan.runs:
            flat = plan.flats[run.key]
            for j in run.positions:
                member_state = state.get(flat.params[j], {})
                for role, homes in flat.homes.items():
                    tensor = flat.params[j] if role == PARAM else member_state.get(role.key)
                    # State that was not moved into flat storage (another shape) is not the capture's to check.
                    if isinstance(tensor, torch.Tensor) and (role == PARAM or
                                                             dtensors.local(tensor).data_ptr() == homes[j].data_ptr()):
                        if id(tensor) not in held:
                            is_dtensor = dtensors.is_dtensor(tensor)
                            (self.homed_dtensors if is_dtensor else self.homed).append(tensor)
                            (self.dtensor_addresses if is_dtensor else self.addresses).append(homes[j].data_ptr())
                        if role.kind == "scalar":
                            self.scalar_states.append(tensor)
        self.scalar_versions = _versions(self.scalar_states)
        held_plain = [(index, tensor) for index, tensor in plan.held_inputs if not dtensors.is_dtensor(tensor)]
        held_dtensors = [(index, tensor) for index, tensor in plan.held_inputs if dtensors.is_dtensor(tensor)]
        self.pick_held = picker([index for index, _ in held_plain])
        self.held_addresses = [tensor.data_ptr() for _, tensor in held_plain]
        self.pick_held_dtensors = picker([index for index, _ in held_dtensors])
        self.held_dtensor_addresses = [dtensors.local(tensor).data_ptr() for _, tensor in held_dtensors]
        # (table, picker of each member's grad from the graph inputs): grads read in place.
        self.grad_tables = [(table, picker(indices)) for table, indices in plan.grad_tables]
        # Copied grads: each step copies every grad into its flat slot. ``p.grad`` stays the user's tensor: a
        # slot handed out as ``p.grad`` would be overwritten under a grad the user kept, and in-place writes
        # into a grad the user holds would stop reaching the step.
        copied = [] if self.grad_tables else plan.grad_slots
        # The grads of DTensor params are DTensors: their local tensors are copied.
        is_local = [dtensors.is_dtensor(plan.flats[key].params[j]) for _, key, j in copied]
        plain = [slot for slot, local in zip(copied, is_local, strict=True) if not local]
        local = [slot for slot, local in zip(copied, is_local, strict=True) if local]
        self.copy_grads = GradCopies(plain, plan.flats)
        self.pick_grads = picker([index for index, _, _ in plain])
        self.grad_homes = [plan.flats[key].grad_homes[j] for _, key, j in plain]
        self.pick_local_grads = picker([index for index, _, _ in local])
        self.local_grad_homes = [plan.flats[key].grad_homes[j] for _, key, j in local]
        # Only a lane-local update writes grads, and discovery refuses lane-local updates of DTensors.
        assert not (plan.grads_written and self.local_grad_homes), "a step that writes grads over DTensor grads"

    def is_current(self, args: Sequence[Any]) -> bool:
        if list(map(_DATA_PTR, self.pick_held(args))) != self.held_addresses:
            return False
        if self.held_dtensor_addresses and \
                list(map(_DATA_PTR, map(_LOCAL, self.pick_held_dtensors(args)))) != self.held_dtensor_addresses:
            return False
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
        if self.homed_dtensors and list(map(_DATA_PTR, map(_LOCAL, self.homed_dtensors))) != self.dtensor_addresses:
            return False
        versions = _versions(self.scalar_states)
        if self.last_step.token == self.token and versions is not None and versions == self.scalar_versions:
            return True
        return self._counters_agree(versions)

    def _counters_agree(self, versions: list[int] | None) -> bool:
        """Another capture (another grad pattern) ran since this one, or the scalar state was written outside any
        capture (an eager ``opt.step()``, a reset counter): members of one run may have been stepped a different
        number of times. Reading the counters syncs with the device, but only here."""
        for run in self.plan.runs if self.plan.runs_share_scalars else ():
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
            self.copy_grads(args)
            COUNTERS.grads_copied += len(self.grad_homes)
        if self.local_grad_homes:
            with torch.no_grad():
                torch._foreach_copy_(self.local_grad_homes, list(map(_LOCAL, self.pick_local_grads(args))))
            COUNTERS.grads_copied += len(self.local_grad_homes)

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

    def write_grads_back(self, args: Sequence[Any]) -> None:
        if self.plan.grads_written and self.grad_homes:
            with torch.no_grad():
                torch._foreach_copy_(list(self.pick_grads(args)), self.grad_homes)

    def stepped(self) -> None:
        self.last_step.token = self.token

    def lr_is_zero(self) -> bool:
        """A group of :attr:`CapturePlan.zero_lr_groups` has lr 0.0: a Python number, or a tensor on the CPU. A
        tensor lr on a GPU is not read (that would wait for the device at every step)."""
        if not self.plan.zero_lr_groups:
            return False
        optimizer = self.plan.optimizer_ref()
        assert optimizer is not None
        groups = optimizer.param_groups
        return any(_is_zero_on_host(groups[g]["lr"]) for g in self.plan.zero_lr_groups)


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
        if not capture.is_current(args):
            log.info("captured storage was replaced (load_state_dict, new state or p.data=...): rebuilding")
            return self._rebuild(slot, args)
        try:
            capture.bind_grads(args)
        except GradLayoutError as error:
            log.info("rebuilding the capture: %s", error)
            return self._rebuild(slot, args)
        capture.refresh()
        if capture.lr_is_zero():
            # Exact where the captured form is not; the step counters it moves are read again at the next call.
            optimizer = capture.plan.optimizer_ref()
            assert optimizer is not None
            log.info("lr is 0.0: this step of %s runs eagerly (its captured form writes NaN at lr 0.0)",
                     type(optimizer).__name__)
            with eager_form(optimizer, capture.plan.zero_lr_groups):
                eager_step(capture.plan.optimizer_ref)()
            del optimizer
            COUNTERS.steps += 1
            return self.output(*args)
        replacement: Callable[[], None] | None
        try:
            for numbers in capture.plan.member_numbers:
                numbers.write(args)
        except CaptureError as error:
            # Past 2**53 steps a float64 vector would round the counter: nothing of the step ran yet.
            replacement = capture.runner.give_up("reading the numbers of the params' state for", error)
        else:
            replacement = capture.runner()
        COUNTERS.steps += 1
        if replacement is not None:
            # The capture gave up (and stepped eagerly this once): its replacement runs from the next step on.
            slot.replacement = then(replacement, self.output)
            slot.capture = None
            return self.output(*args)
        capture.write_grads_back(args)
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

    def _rebuild_with(self, slot: _Slot, rebuild: Callable[[Sequence[Any]], Callable[..., Any]],
                      optimizer_ref: weakref.ref[torch.optim.Optimizer], config: CaptureConfig,
                      capture_log: CaptureLog, args: tuple[Any, ...]) -> Any:
        COUNTERS.rebuilds += 1
        try:
            slot.replacement = rebuild(args)
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
