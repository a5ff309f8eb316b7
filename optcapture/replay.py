"""Stage 5, replay: the callable Dynamo calls for every step of a captured optimizer.

Per call it (1) checks that the captured storage is still the one the tensors live in, and that no per-param
scalar state (step counters) was written outside the capture since its last step, (2) binds
the grads: on CUDA it points each run's grad table at the grads autograd left (a few bytes, only when
a grad moved); otherwise it copies every grad into its flat slot (each step; ``p.grad`` stays the
user's tensor), (3) writes changed hyperparameters into their device tensors, and
(4) runs the compiled bucketed step, which on CUDA replays one CUDA graph.

Invariant: the compiled step only ever runs on storage that every param, grad and state tensor of
the capture currently uses; when that stops being true the capture is rebuilt, never reused.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from optcapture import _compat
from optcapture.bucketing import Run
from optcapture.discovery import BucketKey
from optcapture.preparation import FlatGroup, GradTable, PreparedOptimizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Stats(Mapping[str, int]):
    """Process-wide counts since the last :func:`optcapture.reset`; :func:`optcapture.stats` returns a copy (also
    readable as a dict: ``stats()["steps"]``). The one live instance, ``COUNTERS``, is written by the backend and
    this stage."""

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


@dataclasses.dataclass
class GradBinding:
    arg_index: int
    flat: FlatGroup
    position: int


class _Live:
    """The heavy part of a capture; emptied when the optimizer dies so no storage outlives it."""

    def __init__(self, prepared: PreparedOptimizer, flats: dict[BucketKey, FlatGroup], runs: list[Run],
                 compiled: Callable[[], Callable[[], None] | None], grad_bindings: Sequence[GradBinding],
                 rebuild: Callable[[Sequence[Any]], Callable[..., Any]],
                 run_scalars: Sequence[tuple[torch.Tensor, int, torch.Tensor]],
                 frozen_hypers: dict[tuple[int, str], Any],
                 grad_tables: Sequence[tuple[GradTable, list[int]]] = (),
                 mirrored: Sequence[tuple[dict[str, Any], int, frozenset[str]]] = (),
                 runs_share_scalars: bool = True, grads_written: bool = False,
                 held_inputs: Sequence[tuple[int, torch.Tensor]] = ()) -> None:
        self.prepared = prepared
        # (graph input index, tensor) of every input the capture reads from its own storage (params, state, tensor
        # hyperparameters): Dynamo guards a user optimizer's state tensors by metadata, not identity, so after
        # ``load_state_dict`` it hands the capture new tensors of the same shape; their addresses tell.
        self.pick_held = _picker([index for index, _ in held_inputs])
        self.held_ptrs = [tensor.data_ptr() for _, tensor in held_inputs]
        # The step writes into its grads (NovoGrad divides them by their norm): eager leaves them written, so the
        # copies the step wrote are copied back into the user's grads after it.
        self.grads_written = grads_written
        # Runs of an elementwise update step one copy of their members' scalar state, which must be equal; a batch
        # of a lane-local update steps each member's own.
        self.runs_share_scalars = runs_share_scalars
        self.frozen_hypers = frozen_hypers
        # (shadow param group, real group index, keys the shadow holds its own way): the rest is written into the
        # shadow before each step (:attr:`optcapture.bucketing.ShadowStep.mirrored`).
        self.mirrored = list(mirrored)
        self.run_scalars = list(run_scalars)
        self.flats = flats
        self.runs = runs
        self.compiled = compiled
        self.rebuild = rebuild
        members = [(flats[run.key], j) for run in runs for j in run.positions]
        # The optimizer's own per-param scalar state (step counters, ...): each run steps a copy of it, so a
        # write to it outside the capture (an eager ``opt.step()``) must be noticed; their versions tell.
        optimizer = prepared.optimizer_ref()
        state: Any = optimizer.state if optimizer is not None else {}
        del optimizer
        self.scalar_states = [value for flat, j in members for key in flat.scalars
                              if isinstance(value := state.get(flat.params[j], {}).get(key), torch.Tensor)]
        self.scalar_versions = _versions(self.scalar_states)
        # Per-call checks read precomputed addresses; they are the host cost of every step. Every param and
        # state tensor of the capture, so that ``t.data = other`` on any of them is noticed.
        self.homed: list[torch.Tensor] = []
        self.homed_ptrs: list[int] = []
        for flat, j in members:
            member_state = state.get(flat.params[j], {})
            for role, homes in flat.homes.items():
                tensor = flat.params[j] if role == "param" else member_state.get(role.split(":", 1)[1])
                # State that was not moved into flat storage (another shape) is not the capture's to check.
                if role == "param" or (isinstance(tensor, torch.Tensor) and tensor.data_ptr() == homes[j].data_ptr()):
                    self.homed.append(tensor)
                    self.homed_ptrs.append(homes[j].data_ptr())
        # (table, picker of each member's grad from the graph inputs): set when grads are read in place.
        self.grad_tables = [(table, _picker(indices)) for table, indices in grad_tables]
        # Copied grads: each step copies every grad into its flat slot. ``p.grad`` stays the user's tensor: a
        # slot handed out as ``p.grad`` would be overwritten under a grad the user kept, and in-place writes
        # into a grad the user holds would stop reaching the step.
        bound = [] if self.grad_tables else list(grad_bindings)
        self.pick_grads = _picker([b.arg_index for b in bound])
        self.grad_homes = [b.flat.grad_homes[b.position] for b in bound]


_VERSION = operator.attrgetter("_version")


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
    """``args -> tuple(args[i] for i in indices)``, in C (the per-step host cost scales with the tensor count)."""
    if len(indices) == 1:
        (index,) = indices
        return lambda args: (args[index],)
    if not indices:
        return lambda args: ()
    return operator.itemgetter(*indices)


def _stepping_then(step: Callable[[], None], output: Callable[..., Any]) -> Callable[..., Any]:
    def replacement(*args: Any) -> Any:
        step()
        return output(*args)

    return replacement


class _Cell:
    def __init__(self, live: _Live) -> None:
        self.live: _Live | None = live
        self.replacement: Callable[..., Any] | None = None  # a rebuilt capture, or an eager step if that failed

    def release(self) -> None:
        self.live = None
        self.replacement = None


class CapturedStep:
    """What the backend returns for a bucketed capture. Called by Dynamo with the graph's inputs.

    Lifecycle:
      - built by the backend over the flat storage of one optimizer;
      - each call checks its storage, binds grads, refreshes hyperparameters and runs the step;
      - when its storage is replaced it builds a successor (a new capture, or an eager step if that fails),
        forwards to it from then on and drops its own storage; likewise when its compiled step gives up;
      - when the optimizer is garbage collected it drops every tensor it referenced.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, live: _Live, output: Callable[..., Any]) -> None:
        self.output = output  # the graph's outputs from its inputs: numbers the frame writes back, or nothing
        # NB: Dynamo wraps this object with functools.wraps, which copies __dict__ into the wrapper;
        # a shared holder is what lets release() drop the storage for both.
        self._cell = _Cell(live)
        weakref.finalize(optimizer, self._cell.release)

    def __call__(self, *args: Any) -> Any:
        cell = self._cell
        if cell.replacement is not None:
            return cell.replacement(*args)
        live = cell.live
        if live is None:
            raise RuntimeError("optcapture: this captured step belongs to an optimizer that no longer exists")
        if not self._storage_is_current(live) or not _compat.data_ptrs_equal(live.pick_held(args), live.held_ptrs):
            COUNTERS.rebuilds += 1
            log.info("captured storage was replaced (load_state_dict, new state or p.data=...): rebuilding")
            cell.replacement = live.rebuild(args)
            cell.live = None  # the old flat storage, shadow and CUDA graph: the replacement does not use them
            return cell.replacement(*args)
        self._bind_grads(live, args)
        live.prepared.refresh_hypers()
        groups = live.prepared.optimizer_ref().param_groups  # type: ignore[union-attr]
        for shadow_group, g, own in live.mirrored:
            for key, value in groups[g].items():
                if key not in own:
                    shadow_group[key] = value
        replacement = live.compiled()
        if live.grads_written and replacement is None and live.grad_homes:
            with torch.no_grad():
                torch._foreach_copy_(list(live.pick_grads(args)), live.grad_homes)
        COUNTERS.steps += 1
        if replacement is not None:
            # The capture gave up (and stepped eagerly this once): its replacement runs from the next step on.
            cell.replacement = _stepping_then(replacement, self.output)
            cell.live = None
            return self.output(*args)
        live.prepared.last_runner = self
        return self.output(*args)

    def _storage_is_current(self, live: _Live) -> bool:
        optimizer = live.prepared.optimizer_ref()
        if optimizer is None:
            return False
        # Float hyperparameters the compiled step holds as constants. Dynamo usually guards them, but
        # once it has made one dynamic it stops, so a change is caught here and rebuilds the capture.
        for (group, key), value in live.frozen_hypers.items():
            if not _same_hyper(optimizer.param_groups[group][key], value):
                return False
        groups = live.prepared.groups
        if any(groups.get(key) is not flat for key, flat in live.flats.items()):
            return False
        if not _compat.data_ptrs_equal(live.homed, live.homed_ptrs):
            return False
        versions = _versions(live.scalar_states)
        if live.prepared.last_runner is self and versions is not None and versions == live.scalar_versions:
            return True
        # Another capture (another grad pattern) ran since ours, or the scalar state was written outside any
        # capture (an eager ``opt.step()``, a reset counter): members of one of our runs may have been stepped a
        # different number of times. Reading the counters syncs, but only here.
        for run in live.runs if live.runs_share_scalars else ():
            flat = live.flats[run.key]
            for vector in flat.scalars.values():
                values = vector[run.positions[0]:run.positions[-1] + 1]
                if bool((values != values[0]).any()):
                    return False
        with torch.no_grad():
            for vector, first, scalar in live.run_scalars:
                scalar.copy_(vector[first])
        live.scalar_versions = versions
        return True

    @staticmethod
    def _bind_grads(live: _Live, args: Sequence[Any]) -> None:
        if live.grad_tables:
            for table, pick in live.grad_tables:
                if table.bind(pick(args)):
                    COUNTERS.grad_tables_written += 1
            return
        if live.grad_homes:
            with torch.no_grad():
                torch._foreach_copy_(live.grad_homes, list(live.pick_grads(args)))
            COUNTERS.grads_copied += len(live.grad_homes)
