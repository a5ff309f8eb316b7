"""The stock paths: what a graph runs when it is not bucketed, chosen at compile time by :mod:`optcapture.backend`.

Inductor's per-tensor graph (as stock ``torch.compile`` runs it), the graph as Dynamo traced it (an optimizer's first
step, which creates its state), the optimizer's own step run eagerly (a float Dynamo can only specialize that changes
every step; attributes Dynamo drops), or the frame uncompiled. Invariant: every path returned computes what eager
computes, and every one that is a fallback says why once (``fallback="raise"``: raises before any of the step ran).
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch

from optcapture import _compat, lowering, progress, registry, replay
from optcapture.config import CaptureConfig
from optcapture.discovery import StepGraph, cycles_momentum
from optcapture.errors import FloatsSpecialized, UnsupportedStepError, warn_once
from optcapture.graph_outputs import outputs_or_error
from optcapture.input_roles import state_of
from optcapture.replay import address_graphs
from optcapture.sources import is_hyper_source

log = logging.getLogger(__name__)

_FIRST_STEP = ("the step creates its state (lazy initialisation): this call runs the traced graph and the next "
               "one is captured")
_STATE_STAYS_EMPTY = ("a param still has no state after the optimizer's first step (its step keeps none for it, or "
                      "creates state at every step)")


def _stateless_params_met_before(step: StepGraph, optimizer: torch.optim.Optimizer) -> bool:
    """Whether every param of ``step`` without state was a param of an earlier first step of ``optimizer`` (whose
    state it should have made); True after a first step whose report names no param (nothing tells them apart)."""
    first_steps = [report for report in registry.reports_of(optimizer) if report.path == "first-step"]
    if not first_steps:
        return False
    met = {(role.group, role.param_index) for report in first_steps for role in report.roles
           if role.param_index is not None}
    groups = optimizer.param_groups
    stateless = {(b.key.group, i) for b in step.buckets for i in b.members
                 if not state_of(optimizer, groups[b.key.group]["params"][i])}
    return not met or stateless <= met


def fallback(step: StepGraph, gm: torch.fx.GraphModule, example_inputs: list[Any],
              config: CaptureConfig) -> Callable[..., Any]:
    reported_to = step.reported_to
    owner = type(reported_to).__name__ if reported_to is not None else "a function"
    del reported_to
    # The first step of an optimizer that creates its state inside step() runs the traced graph once; the
    # state it creates changes the guards and the next call is captured, unless another reason stands in
    # the way, which is said now. Once per param: a compile that finds a param without state again (pytorch_optimizer's
    # LoRARite) compiles per tensor, as stock torch.compile would, not as traced at every call from then on; a param
    # no first step has met (a group added later, a layer unfrozen) has its own first step.
    optimizer = step.optimizer
    if step.lazy_state and optimizer is not None and _stateless_params_met_before(step, optimizer):
        step = dataclasses.replace(step, lazy_state=False, blockers=[*step.blockers, _STATE_STAYS_EMPTY])
    del optimizer
    said = bool(step.blockers) or not step.lazy_state
    reason = "; ".join(step.blockers) or "unknown"
    if said and config.fallback == "raise":
        raise UnsupportedStepError(f"cannot capture this step of {owner}: {reason}")

    def say(what_runs: str, key: str | None = None) -> None:
        if said:
            warn_once(f"step of {owner} is not bucketed ({reason}): {what_runs}", key=key)

    per_tensor = "it runs as Inductor's per-tensor graph, as stock torch.compile runs it"

    if step.attribute_stores:
        writing_back, what_runs = _writing_back_attributes(step, gm)
        # Once per reason whether its graph runs as traced or the optimizer's own step runs; a frame run as plain
        # Python is said on its own.
        say(what_runs, key=None if writing_back is None else f"attributes of {owner}: {reason}")
        if writing_back is None:
            # Run the frame uncompiled, as plain Python: Dynamo skips it at the backend's request.
            raise _compat.skip_frame_request(f"optcapture: {reason}")
        return writing_back
    if step.lazy_state:
        # Said once for both: this first step (run as traced) and the per-tensor steps after it.
        say("this first step, which creates the optimizer's state, runs as Dynamo traced it, and the steps after "
            "it as Inductor's per-tensor graph while the reason holds",
            key=f"optcapture: step of {owner} is not bucketed ({reason}): {per_tensor}")
        # After a graph break the tensors returned may be values the rest of the step reads, not state it creates.
        first = _FIRST_STEP if step.graph_break is None else (
            f"the step has a graph break ({step.graph_break}): this graph ends there and returns tensors to the rest "
            "of the step, which Dynamo compiles as a function of its own; this call runs it as traced and the next "
            "one is compiled again")
        return _as_traced(step, gm, [*step.blockers, first], "first-step")
    if step.miscompiled is not None:
        say("it runs as Dynamo traced it (stock torch.compile would be wrong)")
        return _as_traced(step, gm, step.blockers)
    before = _compat.generated_kernel_count()
    compiled = _inductor_or_error(gm, example_inputs, config)
    if isinstance(compiled, Exception):
        say(f"it runs eagerly, as Dynamo traced it: Inductor could not compile the per-tensor step "
            f"({type(compiled).__name__}: {compiled})")
        return _as_traced(step, gm, [*step.blockers, str(compiled)])
    say(per_tensor)
    registry.record(step, "per-tensor", step.blockers, kernels=_compat.generated_kernel_count() - before)
    return _replayed_by_address(compiled, gm, example_inputs, config, step)


def eager_for_floats_that_change(step: StepGraph, gm: torch.fx.GraphModule, error: FloatsSpecialized,
                                  config: CaptureConfig, tracer: Any) -> Callable[..., Any]:
    """A float a scheduler changes every step reaches the step where Dynamo can only use a fixed number (SGD with
    ``nesterov=True`` passes ``momentum`` as ``alpha=``): compiled, the step would compile again at every change,
    with any backend, a second or more each, until Dynamo's recompile limit. The optimizer's own step runs eagerly
    from now on, reading the floats as they are, so this frame no longer guards them: it never recompiles."""
    optimizer = step.optimizer
    assert optimizer is not None
    name = type(optimizer).__name__
    cycled = any(map(cycles_momentum, optimizer.param_groups))
    by = ("OneCycleLR or CyclicLR (cycle_momentum=True) changes it every step" if cycled
          else "it changes between steps")
    nesterov = optimizer.defaults.get("nesterov") and "momentum" in error.keys
    where = ("nesterov=True passes momentum as alpha=" if nesterov
             else "an op that takes a Python number, such as alpha=")
    reason = (f"{name}'s {', '.join(error.keys)} reaches its step where Dynamo can only use a fixed number ({where}), "
              f"and {by}: compiled, the step would compile again at every change")
    if config.fallback == "raise":
        raise UnsupportedStepError(f"cannot capture this step of {name}: {reason}")
    keys = {(g, key) for g, group in enumerate(optimizer.param_groups) for key in error.keys if key in group}
    if tracer is not None:
        _compat.drop_guards(tracer, lambda source: is_hyper_source(source, keys))
    warn_once(f"step of {name} is not bucketed ({reason}): it runs eagerly, with no recompile (keep "
              f"{', '.join(error.keys)} fixed to have it captured)")
    registry.record(step, "eager", [reason])
    return replay.stepping_eagerly(weakref.ref(optimizer), outputs_or_error(gm))


def _inductor_or_error(gm: torch.fx.GraphModule, example_inputs: list[Any],
                       config: CaptureConfig) -> Callable[..., Any] | Exception:
    """``gm`` compiled by Inductor per tensor (no CUDA graph), or the error that stopped it. Dynamo's requests to
    restart its analysis are not failures: they pass through."""
    progress.enter("lower")
    try:
        compiled: Callable[..., Any] = lowering.lower_graph(gm, example_inputs, config)
    except _compat.restart_errors():
        raise
    except Exception as error:  # noqa: BLE001 - any Inductor failure: the caller runs the graph as traced instead
        return error
    return compiled


def _writing_back_attributes(step: StepGraph, gm: torch.fx.GraphModule) -> tuple[Callable[..., Any] | None, str]:
    """A step that assigns attributes of its optimizer (a user's ``self._k += 1``), which Dynamo drops.

    Constant values are exact for every call the frame's guards admit (Dynamo guarded the attributes it read to
    compute them): the graph runs as traced and the stores are written after it. A value Dynamo holds as a
    symbol cannot be written back, so the optimizer's own step runs eagerly instead; that is exact only when the
    frame is the step's own and keeps no tensors of the graph (no lazily created state); any other such frame must
    run uncompiled (None). Returns the callable, or None, and what runs, for the warning.
    """
    stores = step.attribute_stores
    owners = {id(ref()) for ref, _, _ in stores}
    if all(value is not _compat.NOT_CONSTANT for _, _, value in stores):
        traced = _as_traced(step, gm, step.blockers)

        def run_and_write_back(*args: Any) -> Any:
            out = traced(*args)
            for ref, name, value in stores:
                owner = ref()
                if owner is not None:
                    setattr(owner, name, value)
            return out

        return run_and_write_back, "it runs as Dynamo traced it, and optcapture writes the attributes back after it"
    # Only the step's own frame, keeping no tensors of the graph, can be replaced by the optimizer's eager step.
    registry.record(step, "eager", step.blockers)
    if step.returns_tensors or len(owners) != 1 or not step.frame_is_step:
        return None, ("the frame runs uncompiled, as plain Python (Dynamo holds a new value of an attribute as a "
                      "symbol in a frame that is not the optimizer's own step or keeps tensors of its graph)")
    return (replay.stepping_eagerly(stores[0][0], outputs_or_error(gm)),
            "the optimizer's own step runs eagerly (Dynamo holds a new value of an attribute as a symbol)")


def not_an_optimizer_step(step: StepGraph, gm: torch.fx.GraphModule, example_inputs: list[Any],
                           config: CaptureConfig) -> Callable[..., Any]:
    """A graph that is no piece of an optimizer step (the forward of a whole training step compiled with this
    backend) is compiled as stock ``torch.compile`` compiles it, with nothing to warn about."""
    log.info("not an optimizer step (%s): compiled by Inductor", step.summary())
    compiled = _inductor_or_error(gm, example_inputs, config)
    if isinstance(compiled, Exception):
        warn_once(f"Inductor could not compile a graph that is not an optimizer step ({type(compiled).__name__}: "
                  f"{compiled}); running it eagerly")
        traced: Callable[..., Any] = gm.forward
        return traced
    return _replayed_by_address(compiled, gm, example_inputs, config, step)


def _replayed_by_address(compiled: Callable[..., Any], gm: torch.fx.GraphModule, example_inputs: list[Any],
                         config: CaptureConfig, step: StepGraph) -> Callable[..., Any]:
    """``compiled`` replayed from a CUDA graph recorded per set of input addresses, where the graph allows
    (:mod:`optcapture.replay.address_graphs`: all inputs on one GPU, no random numbers, no host reads); else itself.
    Stock ``torch.compile`` launches such a graph's kernels one by one: its CUDA graph trees skip graphs that write
    their inputs, as a clip, an EMA and a per-tensor step do."""
    unfit = "cudagraphs=False" if not config.cudagraphs else address_graphs.unfit_for_recording(gm, example_inputs)
    if unfit is not None:
        log.debug("no CUDA graphs for this graph: %s", unfit)
        return compiled
    return address_graphs.AddressGraphs(compiled, step.summary(), address_graphs.tensor_attributes(gm))


def _as_traced(step: StepGraph, gm: torch.fx.GraphModule, reasons: list[str],
               path: registry.Path = "eager") -> Callable[..., Any]:
    """Run the graph as Dynamo traced it (eagerly), and report that: a fallback, or an optimizer's first step."""
    registry.record(step, path, reasons)
    traced: Callable[..., Any] = gm.forward
    return traced
