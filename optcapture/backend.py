"""The ``optcapture`` torch.compile backend: composes discovery -> preparation -> shadows -> lowering -> replay.

Registered through the ``torch_dynamo_backends`` entry point, so ``backend="optcapture"`` works
without importing the package. Compile time only: a bucketed capture is handed to :mod:`optcapture.replay`
as a :class:`~optcapture.replay.CapturePlan`, and nothing here runs per step. Invariant: every graph gets a
correct callable back: the bucketed capture, else the per-tensor Inductor graph, else eager, and every
fallback says why (or raises with ``options={"fallback": "raise"}``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from optcapture import (
    _compat,
    cross_lane,
    lane_batches,
    lane_hypers,
    lowering,
    preparation,
    progress,
    registry,
    replay,
    shadows,
    stock_paths,
)
from optcapture.config import CaptureConfig, parse_options
from optcapture.discovery import (
    BucketKey,
    StepGraph,
    changed_since_traced,
    cycled_floats_held_constant,
    discover,
    no_longer_bucketable,
)
from optcapture.errors import CaptureError, FloatsSpecialized, OptionError, UnsupportedStepError, warn_once
from optcapture.grad_tables import GradTable, backed_by_memory, grads_fit_table
from optcapture.graph_outputs import outputs_or_error
from optcapture.input_roles import InputRole
from optcapture.replay import CapturedStep
from optcapture.rewrites.indirect_grad_loads import triton_type
from optcapture.sources import is_hyper_source

log = logging.getLogger(__name__)


@progress.timed
def optcapture_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable[..., Any]:
    """Dynamo backend entry point (``torch.compile(opt.step, backend="optcapture")``)."""
    began = time.perf_counter()
    try:
        config = parse_options(kwargs.pop("options", None), kwargs.pop("mode", None))
        if kwargs:
            raise OptionError(f"optcapture backend got unexpected arguments {sorted(kwargs)}")
    except OptionError as error:
        # Before any of the step ran; as itself, not wrapped in Dynamo's BackendCompilerFailed.
        raise _compat.through_dynamo(error) from None
    tracer = _compat.current_tracer()
    if tracer is not None:
        _compat.identity_first_guards(tracer)
    progress.enter("discover")
    step = discover(gm, example_inputs, tracer)
    gm = step.graph if step.graph is not None else gm
    if not step.is_optimizer_graph:
        return stock_paths.not_an_optimizer_step(step, gm, example_inputs, config)
    if not config.bucketing:
        step.blockers.append("bucketing=False")
    _say_if_recompiling_every_step(step)
    _read_cycled_floats_as_inputs(step)
    replay.count_graph()
    try:
        if step.optimizer is not None and not step.blockers and not step.lazy_state:
            try:
                if step.update == "lane-local":
                    return _capture_batches(step, gm, example_inputs, config, tracer, began)
                return _capture(step, gm, example_inputs, config, tracer, began)
            except FloatsSpecialized as error:
                return stock_paths.eager_for_floats_that_change(step, gm, error, config, tracer)
            except CaptureError as error:
                step.blockers.append(str(error))
        return stock_paths.fallback(step, gm, example_inputs, config)
    except UnsupportedStepError as error:
        # Dynamo wraps any other backend error in BackendCompilerFailed; the training loop must see this one.
        raise _compat.through_dynamo(error) from None


def _say_if_recompiling_every_step(step: StepGraph) -> None:
    """Dynamo compiles a step again whenever a guard fails; past its recompile limit it runs the step uncompiled,
    calling no backend, so optcapture could not say so then: it says so at the compile two before the limit (the 6th
    of 8) of one optimizer's step.
    What often does it: an int the step counts in its param groups passed to a math function
    (``math.pow(beta, group["step"])``, pytorch_optimizer), which Dynamo specializes at every value.

    Dynamo counts compiles per code object, so every optimizer stepped through one function shares its limit (the
    step of one class, compiled for several instances): that is said when the frame nears the limit."""
    compiles = _compat.frame_compiles()
    optimizer = step.optimizer
    if compiles is None or optimizer is None:
        return
    count, limit = compiles
    own = len(registry.reports_of(optimizer))  # this optimizer's earlier compiles
    name = type(optimizer).__name__
    if own >= 3 and own + 1 >= limit - 2:
        # Said near the limit, not before: grads that come and go, a new param group or an eager step between
        # compiled ones each compile once, rightly (stock torch.compile compiles as often and says nothing), and
        # only the logs tell which guard failed.
        warn_once(f"Dynamo compiled the step of {name} {own + 1} times, each time because a guard failed; after "
                  f"{limit} compiles (torch._dynamo.config.recompile_limit) the step runs uncompiled, as with any "
                  "backend. TORCH_LOGS=recompiles names each failed guard. A grad that comes or goes, a new param "
                  "group or an eager step between compiled ones compiles once each; a step that compiles at every "
                  "call often passes an int it counts in its param groups to a math function "
                  "(math.pow(beta, group['step'])), which Dynamo specializes at every value",
                  key=f"recompiling {name}")
    elif count + 1 >= limit - 1:
        warn_once(f"Dynamo compiled this step function {count + 1} times, for several optimizers ({name} now): its "
                  f"recompile limit ({limit}, torch._dynamo.config.recompile_limit) counts the compiles of every "
                  "optimizer stepped through it together, and steps compiled past it run uncompiled, as with any "
                  "backend. Raise the limit to compile the steps of more optimizers", key="shared recompile limit")


def _read_cycled_floats_as_inputs(step: StepGraph) -> None:
    """Have Dynamo trace a capturable step again, now, with the floats a scheduler cycles as inputs: the capture
    follows them, and the step compiles once instead of again at the scheduler's first change."""
    if step.optimizer is None or step.blockers:
        return
    cycled = cycled_floats_held_constant(step)
    if not cycled:
        return
    marked = _compat.mark_floats_as_inputs(lambda name: is_hyper_source(name, cycled))
    if marked:
        log.info("tracing the step again with %s as inputs: a scheduler cycles them", marked)
        raise _compat.restart_request()


def _capture(step: StepGraph, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: CaptureConfig,
             tracer: Any, began: float, required_hypers: frozenset[tuple[int, str]] = frozenset()) -> CapturedStep:
    optimizer = step.optimizer
    assert optimizer is not None
    progress.enter("prepare")
    prepared = registry.prepared_for(optimizer, config)
    try:
        flats = preparation.prepare(step, prepared)
    except CaptureError:
        raise
    except Exception as error:  # noqa: BLE001 - each tensor is moved whole or not at all: the step is still exact
        raise CaptureError(f"moving the params into flat storage failed ({type(error).__name__}: {error})") from None
    runs = shadows.plan_runs(step, flats)
    tables = _grad_tables(step, runs, flats, config)
    if tables:
        try:
            return _capture_runs(step, gm, example_inputs, config, tracer, began, required_hypers, prepared, flats,
                                 runs, tables)
        except Exception as error:  # noqa: BLE001 - any failure of the in-place form: capture with grad copies
            log.info("grads are copied into flat storage for this capture: in-place grads failed (%s: %s)",
                     type(error).__name__, error)
    return _capture_runs(step, gm, example_inputs, config, tracer, began, required_hypers, prepared, flats, runs, [])


def _capture_batches(step: StepGraph, gm: torch.fx.GraphModule, example_inputs: list[Any], config: CaptureConfig,
                     tracer: Any, began: float) -> CapturedStep:
    """A lane-local update (not elementwise): params of one shape stepped as one vmapped batch
    (:mod:`optcapture.lane_batches`). Grads are copied into flat storage. The numbers of the param groups the graph
    reads as inputs are read from device tensors refreshed before each step (:mod:`optcapture.lane_hypers`); the
    floats it holds as constants are made inputs first, by tracing the step again now, so that a scheduler never
    compiles it again."""
    optimizer = step.optimizer
    assert optimizer is not None and step.lane_report is not None
    if tracer is not None:
        lane_hypers.trace_floats_as_inputs(step)
    reason = step.lane_report.reason
    try:
        progress.enter("prepare")
        prepared = registry.prepared_for(optimizer, config)
        flats = preparation.prepare(step, prepared)
        progress.enter("bucket")
        batches = lane_batches.plan_batches(step, flats)
        build = cross_lane.build_step if step.lane_report.cross_lanes else lane_batches.build_batched_step
        batched = build(step, gm, example_inputs, flats, batches, prepared)
        progress.enter("lower")
        lowered = lowering.lower_batched(batched.call, batched.inputs, config, batches[0].key.device)
    except _compat.restart_errors():
        raise
    except Exception as error:  # noqa: BLE001 - refused before any of the step ran: the per-tensor graph runs
        why = f"{type(error).__name__}: {error}"
        if tracer is not None:
            lane_hypers.trace_floats_as_constants(gm, why)
        raise CaptureError(f"the update is not elementwise ({reason}) and batching params of one shape failed "
                           f"({why})") from None
    runs = [shadows.Run(b.key, b.positions, b.start, b.end) for b in batches]
    optimizer_ref = weakref.ref(optimizer)
    output = outputs_or_error(gm)

    rebuild = _rebuilder(step, gm, config,
                         lambda args: _capture_batches(step, gm, list(args), config, None, time.perf_counter()))

    report = registry.record(step, "bucketed", [], runs=len(runs), seconds=time.perf_counter() - began,
                             kernels=lowered.kernels, grads="copied", batches=len(batches),
                             tensor_hypers=(*(f"group {g} {k}" for g, k in sorted(batched.device_hypers)),
                                            *_member_keys(step)))
    plan = replay.CapturePlan(
        optimizer_ref=optimizer_ref, config=config, prepared=prepared, flats=flats, runs=runs, step=lowered.call,
        compiled_lazily=False, log=registry.ReportHandle(optimizer, report),
        grad_slots=_grad_slots(step, gm, flats), grad_tables=[], run_scalars=[],
        frozen_hypers=shadows.frozen_hypers(optimizer, runs, batched.device_hypers), mirrored=[], output=output,
        rebuild=rebuild,
        held_inputs=_held_inputs(step, gm, example_inputs), runs_share_scalars=False,
        grads_written=batched.writes_grads, member_numbers=batched.member_numbers)
    log.info("captured %s (lane-local update): %d batch(es) of one shape over %d bucket(s)", type(optimizer).__name__,
             len(batches), len(step.buckets))
    return CapturedStep(optimizer, plan)


def _member_keys(step: StepGraph) -> list[str]:
    """How explain() names the numbers of each param's state read from device vectors (``state step``)."""
    return [f"state {key}" for key in sorted({role.key for role in step.roles if role.kind == "member_number"
                                              and role.key is not None})]


def _rebuilder(step: StepGraph, gm: torch.fx.GraphModule, config: CaptureConfig,
               capture_again: Callable[[Sequence[Any]], CapturedStep]
               ) -> Callable[[Sequence[Any]], Callable[..., Any]]:
    """A new capture of ``step``'s graph over the current storage, from a later call's graph inputs; the graph per
    tensor (as stock ``torch.compile`` runs it, said once, compiled for the inputs as they are now) when a param can
    no longer move into flat storage or the new capture is refused (``model.to(memory_format=torch.channels_last)``
    after a capture: its state keeps the old element order); raises (the replay stage then steps eagerly) when the
    params no longer fit the traced graph."""

    @progress.timed
    def rebuild(args: Sequence[Any]) -> Callable[..., Any]:
        changed = changed_since_traced(step)
        if changed is not None:
            raise CaptureError(changed)
        refused = no_longer_bucketable(step)
        if not refused:
            try:
                return capture_again(args)
            except CaptureError as error:
                refused = [str(error)]
        return stock_paths.fallback(dataclasses.replace(step, blockers=refused), gm, list(args), config)

    return rebuild


# Not "hyper": a tensor in a param group is checked by identity (frozen_hypers), and a float Dynamo passes as a tensor
# is a new tensor at every call.
_HELD_ROLES = frozenset({"param", "state", "scalar_state", "global_state"})


def _placeholder_roles(step: StepGraph, gm: torch.fx.GraphModule) -> Iterator[tuple[int, InputRole]]:
    """(graph input index, role) of each placeholder discovery gave a role."""
    roles = {role.node: role for role in step.roles}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        role = roles.get(node.name)
        if role is not None:
            yield index, role


def _held_inputs(step: StepGraph, gm: torch.fx.GraphModule,
                 example_inputs: Sequence[Any]) -> list[tuple[int, torch.Tensor]]:
    """(index, tensor) of each graph input the capture reads from where it lies now (not a grad, which moves)."""
    return [(index, example_inputs[index]) for index, role in _placeholder_roles(step, gm)
            if role.kind in _HELD_ROLES and index < len(example_inputs)
            and isinstance(example_inputs[index], torch.Tensor)]


def _grad_slots(step: StepGraph, gm: torch.fx.GraphModule,
                flats: dict[BucketKey, preparation.FlatGroup]) -> list[tuple[int, BucketKey, int]]:
    """Where each grad comes in: (graph input index, bucket, member position in the bucket)."""
    optimizer = step.optimizer
    assert optimizer is not None
    grad_slots: list[tuple[int, BucketKey, int]] = []
    for index, role in _placeholder_roles(step, gm):
        if role.kind == "grad":
            assert role.group is not None and role.param_index is not None
            p = optimizer.param_groups[role.group]["params"][role.param_index]
            key = BucketKey(role.group, p.device, p.dtype)
            grad_slots.append((index, key, flats[key].param_indices.index(role.param_index)))
    return grad_slots


def _grad_tables(step: StepGraph, runs: list[shadows.Run], flats: dict[BucketKey, preparation.FlatGroup],
                 config: CaptureConfig) -> list[GradTable]:
    """One grad table per run when every run's grads can be read where autograd leaves them; else none."""
    if not config.grads_in_place:
        return []
    optimizer = step.optimizer
    assert optimizer is not None
    if not shadows.is_stock(optimizer) and shadows.followed_hypers(step, optimizer, runs, set()):
        # A followed hyperparameter recompiles the shadow's frame during a step, when the virtual grads cannot
        # be backed by memory, and a user's foreach code may read its operands while Dynamo traces it.
        log.info("grads are copied into flat storage: the step reads a float hyperparameter as an input")
        return []
    for run in runs:
        reason = grads_fit_table(flats[run.key], run.positions)
        if reason is None and triton_type(run.key.dtype) is None:
            reason = f"no in-place grad loads for {run.key.dtype}"
        if reason is not None:
            log.info("grads are copied into flat storage: %s", reason)
            return []
    return [GradTable(flats[run.key], run.positions, config.align_elements) for run in runs]


def _capture_runs(step: StepGraph, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: CaptureConfig,
                  tracer: Any, began: float,
                  required_hypers: frozenset[tuple[int, str]], prepared: preparation.PreparedOptimizer,
                  flats: dict[BucketKey, preparation.FlatGroup], runs: list[shadows.Run],
                  tables: list[GradTable]) -> CapturedStep:
    optimizer = step.optimizer
    assert optimizer is not None
    run_grads = [table.virtual for table in tables] or None
    progress.enter("bucket")
    with backed_by_memory(tables):
        built = shadows.build(step, optimizer, prepared, runs, flats, run_grads, required_hypers)
        shadow, tensor_hypers = built.step, built.tensor_hypers
        progress.enter("lower")
        try:
            lowered = lowering.lower_shadow(shadow, config, runs[0].key.device, tables,
                                            [(shadow.groups[g], key) for g, key in sorted(built.followed)])
        except FloatsSpecialized:
            raise  # known at capture: the frame steps eagerly from its first call, never recompiling
        except Exception as error:
            if tables:
                raise
            lowered = lowering.LoweredShadow(replay.raising(error), None)
    if tracer is not None:
        dropped = _compat.drop_guards(tracer, lambda name: is_hyper_source(name, tensor_hypers))
        log.info("no recompile on changes of %s", dropped)

    grad_slots = _grad_slots(step, gm, flats)
    arg_of = {(key, j): index for index, key, j in grad_slots}
    grad_tables = [(table, [arg_of[(run.key, j)] for j in run.positions])
                   for table, run in zip(tables, runs if tables else [], strict=True)]
    if not tables:
        for _, key, _ in grad_slots:
            flats[key].grad_flat()  # the slots the grads are copied into (made by the shadow already)

    optimizer_ref = weakref.ref(optimizer)
    output = outputs_or_error(gm)

    rebuild = _rebuilder(step, gm, config, lambda args: _capture(step, gm, args, config, None, time.perf_counter(),
                                                                 frozenset(tensor_hypers)))

    report = registry.record(step, "bucketed", [], runs=len(runs),
                             tensor_hypers=tuple(f"group {g} {k}" for g, k in sorted(tensor_hypers)),
                             seconds=time.perf_counter() - began, kernels=lowered.kernels,
                             grads="in place" if tables else "copied")
    plan = replay.CapturePlan(
        optimizer_ref=optimizer_ref, config=config, prepared=prepared, flats=flats, runs=runs, step=lowered.call,
        compiled_lazily=lowered.kernels is None, log=registry.ReportHandle(optimizer, report),
        grad_slots=grad_slots, grad_tables=grad_tables, run_scalars=shadow.run_scalars,
        frozen_hypers=built.frozen,
        mirrored=shadow.mirrored, output=output, rebuild=rebuild,
        held_inputs=_held_inputs(step, gm, example_inputs),
        zero_lr_groups=shadows.groups_stepped_eagerly_at_zero_lr(optimizer, runs))
    captured = CapturedStep(optimizer, plan)
    log.info("captured %s: %d bucket(s), %d run(s), grads %s, device hyperparameters %s",
             type(optimizer).__name__, len(step.buckets), len(runs), "read in place" if tables else "copied",
             sorted(tensor_hypers))
    return captured

