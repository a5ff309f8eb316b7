"""Stage 4, lowering: hand programs to Inductor (Triton kernels on CUDA, C++ on CPU).

Two programs are lowered here: the bucketed shadow step (one graph over flat storage, traced by
Dynamo with ``fullgraph=True``) and, where bucketing does not apply, the per-tensor graph Dynamo
gave us. Inductor configuration is patched per compile only (``compile_fx(config_patches=...)``).

The shadow step is compiled when it is captured, not when it first runs: Dynamo traces it and Inductor
compiles the graph behind a gate that stays shut for that trace call, so nothing steps until the capture
is armed, and a failed check (e.g. of the grad-table rewrite) costs nothing but the compile. A shadow
whose graph returns tensors to Python (to rebuild Python state after it) is compiled by its first real
call instead. Once two steps show the shadow's frame to be the same call of the same compiled graph on the
same inputs, leaving Python state as it was, steps call that graph directly (:class:`_ShadowRunner`).
A shadow that follows a float the replay stage rewrites each step is compiled with automatic dynamic and
traced a second time at capture with the value nudged, so its frame reads the value as an input from its
first step (:func:`_prime_followed`).

Invariant: lowering never runs a step; the callables it returns do, when called. A compile that reads
grads through a table is returned only after every read of a grad was verified to be rewritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from optcapture import _compat
from optcapture.config import CaptureConfig
from optcapture.errors import CaptureError, FloatsSpecialized
from optcapture.grad_tables import GradTable
from optcapture.graph_outputs import host_outputs
from optcapture.rewrites import matmul_operands, scalars_once, state_writes_early
from optcapture.rewrites.indirect_grad_loads import IndirectGrad, IndirectGradLoads
from optcapture.shadows import ShadowStep, is_stock

log = logging.getLogger(__name__)


def inductor_patches(config: CaptureConfig, device: torch.device, cudagraphs: bool) -> dict[str, Any]:
    return {"triton.cudagraphs": bool(cudagraphs and config.cudagraphs and device.type == "cuda")}


# The bucketed step's inputs are the capture's own flat storage, whose sizes never change (a change rebuilds the
# capture), or inputs Dynamo's guards checked: Inductor's check of each input's size and stride at every call
# (``assert_size_stride``, about a microsecond per input on the CPU, a tenth of a small CPU step) checks nothing more.
_FIXED_INPUTS = {"size_asserts": False}


def shadow_patches(config: CaptureConfig, device: torch.device, cudagraphs: bool) -> dict[str, Any]:
    """Inductor configuration of the bucketed step. Unlike Inductor's default, its few kernels are not autotuned
    unless ``config.autotune``: over flat storage the heuristic launch configuration measured as fast, and
    autotuning cost seconds of the first call (CHANGELOG, 2026-11-22)."""
    patches = {**inductor_patches(config, device, cudagraphs), "triton.autotune_pointwise": config.autotune,
               **_FIXED_INPUTS}
    if device.type == "cpu":
        patches.update(_scalars_once())
    return patches


def _scalars_once() -> dict[str, Any]:
    """The patch that computes the step's costly scalars once per step (:mod:`optcapture.rewrites.scalars_once`).
    A user's own post-grad pass is kept, and the scalars then are computed per vector of elements, as before."""
    if _compat.custom_post_grad_pass() is not None:
        log.info("a post_grad_custom_post_pass is set: the kernels compute the step's scalars per vector of elements")
        return {}
    return {"post_grad_custom_post_pass": scalars_once.inductor_pass()}


def _batched_step_pass(graph: torch.fx.Graph) -> None:
    state_writes_early.move_state_writes_up(graph)
    matmul_operands.realize_shared_operands(graph)
    scalars_once.realize_costly_scalars(graph)


def _batched_step_passes() -> dict[str, Any]:
    """The patch of a batched step: state written back where it is computed (:mod:`optcapture.rewrites.
    state_writes_early`), a matmul operand that other ops read too stored once (:mod:`optcapture.rewrites.
    matmul_operands`), and the costly scalars computed once. A user's own post-grad pass is kept, and then none of
    them runs. Measured on the CPU and on an H100 (torch 2.11), where they take LAMB from 2.97 to 2.48 ms and Muon
    from 6.42 to 5.24 ms per step on GPT-2's shapes (CHANGELOG.md)."""
    if _compat.custom_post_grad_pass() is not None:
        log.info("a post_grad_custom_post_pass is set: the batched step's kernels are Inductor's own")
        return {}
    return {"post_grad_custom_post_pass": _compat.post_grad_pass(
        _batched_step_pass, __file__, state_writes_early.__file__, matmul_operands.__file__, scalars_once.__file__)}


# A cached graph would skip the kernel rewrite; block pointers and combo kernels would load grads in forms
# the rewrite does not know.
_TABLE_PATCHES = {"fx_graph_cache": False, "triton.use_block_ptr": False, "combo_kernels": False}


@dataclasses.dataclass
class LoweredShadow:
    call: Callable[[], None]
    kernels: int | None  # None: compiled lazily, by the first call


class _ShadowRunner:
    """Runs the compiled shadow step: through Dynamo's frame until two steps in a row show that frame to be one
    call of the same compiled graph with the same input objects and no change to the shadow's Python state;
    from then on it makes that call itself.

    Why: the shadow's frame costs tens of microseconds a step (entering Dynamo, guards, fetching inputs), a
    large share of a launch-bound step. What the frame guards is the capture's own: flat storage,
    device hyperparameters written in place, a shadow optimizer no user code sees; what can still change
    (the real optimizer's float hyperparameters, its storage) is checked by the replay stage every step and
    rebuilds the capture. Never skipped: a frame that reads a Python value the replay stage rewrites each step
    (a followed hyperparameter), and a user optimizer's frame with Python side effects.
    """

    def __init__(self, through_dynamo: Callable[[], None], shadow: torch.optim.Optimizer, may_skip: bool) -> None:
        self._through_dynamo = through_dynamo
        self._shadow = shadow
        self._may_skip = may_skip
        self._called: tuple[Callable[..., Any], tuple[Any, ...]] | None = None
        self._previous: tuple[Callable[..., Any], tuple[Any, ...], Any] | None = None
        self.direct: tuple[Callable[..., Any], tuple[Any, ...]] | None = None

    def record(self, compiled: Callable[..., Any], args: tuple[Any, ...], effects_stay_in_shadow: bool) -> None:
        """Called by the gate, inside Dynamo's frame: what the frame called. ``effects_stay_in_shadow``: the
        frame's Python side effects, if any, touch only the shadow optimizer (which the runner compares)."""
        usable = effects_stay_in_shadow and all(isinstance(arg, torch.Tensor) for arg in args)
        self._called = (compiled, args) if usable else None

    def __call__(self) -> None:
        direct = self.direct
        if direct is not None:
            # What entering the shadow's torch.compile wrapper did: CUDA graph trees start a generation per call.
            _compat.begin_compiled_call()
            direct[0](*direct[1])
            return
        if not self._may_skip:
            self._through_dynamo()
            return
        before = _python_state(self._shadow)
        self._called = None
        self._through_dynamo()
        called, self._called = self._called, None
        after = _python_state(self._shadow)
        if called is None or before != after:
            self._previous = None
            return
        previous = self._previous
        if (previous is not None and previous[0] is called[0] and previous[2] == after
                and len(previous[1]) == len(called[1]) and all(map(operator.is_, previous[1], called[1]))):
            self.direct = called
            self._previous = None
            log.info("the shadow step's frame is steady: calling its compiled graph directly from now on")
            return
        self._previous = (*called, after)


def _python_state(optimizer: torch.optim.Optimizer) -> Any:
    """What of an optimizer's Python state a step could change: object identity for tensors, values otherwise."""
    attributes = {name: value for name, value in vars(optimizer).items() if name not in ("state", "param_groups")}
    return (_fingerprint(dict(optimizer.state)), _fingerprint(optimizer.param_groups), _fingerprint(attributes))


def _fingerprint(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple((_fingerprint(key), _fingerprint(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_fingerprint(item) for item in value))
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    return (type(value), id(value))


def lower_shadow(shadow: ShadowStep, config: CaptureConfig, device: torch.device,
                 tables: Sequence[GradTable] = (),
                 followed: Sequence[tuple[dict[str, Any], str]] = ()) -> LoweredShadow:
    """The shadow step compiled by Inductor; replays under CUDA graph trees on CUDA when enabled.

    ``tables``: the grad tables the shadow's runs read their grads through (empty: real flat grads).
    ``followed``: (shadow param group, key) of the floats the replay stage writes into the shadow before each
    step (:func:`optcapture.shadows.followed_hypers`). Every step then goes through Dynamo's frame, and the
    frame reads them as inputs from its first step on (:func:`_prime_followed`).
    Raises :class:`CaptureError` when a table capture cannot be proven to read every grad through its table.
    """
    # A followed int (the step's own counter in its param group) reaches the kernels as a scalar argument; CUDA
    # graph trees record a graph per distinct int input (cudagraph_trees.py, ``get_ints``), a new one each step.
    counts = [key for group, key in followed if type(group[key]) is int]
    patches = shadow_patches(config, device, cudagraphs=not shadow.aliased and not counts)
    if (shadow.aliased or counts) and inductor_patches(config, device, cudagraphs=True)["triton.cudagraphs"]:
        log.info("this capture replays without CUDA graphs: %s", f"the step reads its counters {counts} as numbers"
                 if counts else f"{len(shadow.runs)} runs share flat buffers (grads that come and go, or diverged "
                 "step counts)")
    if tables:
        patches.update(_TABLE_PATCHES)
    armed = [False]
    kernels: list[int] = []
    # NB: weak. Dynamo's cache of the shadow's code keeps the gate, and a strong reference from it would keep
    # the runner, the shadow optimizer and the flat storage alive after the real optimizer is gone.
    runner: list[weakref.ref[_ShadowRunner]] = []
    # Stock optimizers touch no Python state outside the optimizer, which the runner compares around a step.
    known_effects = is_stock(shadow.shadow)

    def capture_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        _log_inputs(gm, example_inputs)
        outputs = host_outputs(gm)
        if not armed[0] and outputs is None:
            # Dynamo would rebuild Python state from the graph's tensor outputs: only a real step may run this
            # frame. (Side effects without outputs, like SGD re-storing its momentum buffers into the shadow's
            # state, are replayed on the shadow once by the trace call; the shadow's state is its own.)
            if tables:
                raise CaptureError("the shadow step returns tensors to Python; grads are copied instead")
            raise _Deferred("the shadow step returns tensors to Python")
        loads = _indirect_loads(tables, example_inputs) if tables else None
        effects_stay_in_shadow = known_effects or _compat.frame_has_no_side_effects(_compat.current_tracer())
        compiled, count = _compile(gm, example_inputs, patches, loads)
        kernels.append(count)

        def gate(*args: Any) -> Any:
            # The capture's own trace call must not step: the graph runs only once the capture is armed. Numbers
            # the frame writes back (``group["step"] = s0 + 1``) are computed on the host as the graph would.
            if not armed[0]:
                assert outputs is not None
                return outputs(*args)
            live_runner = runner[0]() if runner else None
            if live_runner is not None:
                live_runner.record(compiled, args, effects_stay_in_shadow)
            return compiled(*args)

        return gate

    # Followed numbers need Dynamo's automatic dynamic: with ``dynamic=False`` it specializes the frame on each
    # value, recompiling at every change until the recompile limit fails the step (fullgraph=True).
    shadow_step: Callable[[], None] = torch.compile(shadow.call, backend=capture_backend, fullgraph=True,
                                                    dynamic=None if followed else False)
    # The trace calls replay the frame's Python side effects on the shadow (``group["step"] += 1``): its groups
    # are put back as they were, so the first real step starts where the real optimizer is.
    before = [(group, dict(group)) for group in shadow.groups.values()]
    try:
        deferred = _run_trace(shadow_step)
        if followed and not deferred:
            specialized = _prime_followed(shadow_step, followed, lambda: len(kernels))
            if specialized:
                raise FloatsSpecialized(specialized)
    finally:
        for group, values in before:
            group.clear()
            group.update(values)
    armed[0] = True
    if not deferred:
        steady = _ShadowRunner(shadow_step, shadow.shadow, may_skip=not followed)
        runner.append(weakref.ref(steady))
        return LoweredShadow(steady, kernels[-1] if kernels else None)

    def inductor_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        # A failed grad-table check here fails the first step's compile, which then steps eagerly.
        return _compile(gm, example_inputs, patches, _indirect_loads(tables, example_inputs) if tables else None)[0]

    # Compiled by its first real call, through a code object of its own.
    code = shadow.call.__code__
    fresh = types.FunctionType(code.replace(co_name=code.co_name + "_stepped"), shadow.call.__globals__,
                               None, None, shadow.call.__closure__)
    return LoweredShadow(torch.compile(fresh, backend=inductor_backend, fullgraph=True,
                                       dynamic=None if followed else False), None)


def _prime_followed(shadow_step: Callable[[], None], followed: Sequence[tuple[dict[str, Any], str]],
                    compiles: Callable[[], int]) -> tuple[str, ...]:
    """Trace the shadow once more with each followed number moved, so that Dynamo's automatic dynamic makes them
    inputs now, at capture, instead of recompiling at the first change (a cycled ``momentum`` never
    recompiles the step; a counter the step keeps in its param group changes every step).

    Best effort: if this trace fails, the shadow recompiles once at the first change instead. A float is moved a
    little towards zero and a float of zero is left alone: any other value could take another branch (``if
    momentum != 0``). An int moves to its next value, the one a counter takes next.

    Then the floats are moved once more: where that compiles again (``compiles()`` grew), Dynamo keeps them
    constants of the shadow's graph (a float it cannot turn into a tensor, ``add(x, y, alpha=momentum)`` in
    single-tensor SGD with Nesterov, is specialized: torch/_dynamo's ``TensorifyScalarRestartAnalysis``), and their
    keys are returned: every change would compile the step again.
    """
    moved = [(group, key, group[key]) for group, key in followed if type(group[key]) is int or group[key] != 0]
    if not moved:
        return ()
    floats = [(group, key, value) for group, key, value in moved if type(value) is float]
    specialized: tuple[str, ...] = ()
    try:
        for group, key, value in moved:
            group[key] = value + 1 if type(value) is int else value * (1 - 2.0**-20)
        _run_trace(shadow_step)
        if floats:
            before = compiles()
            for group, key, value in floats:
                group[key] = value * (1 - 2.0**-19)
            _run_trace(shadow_step)
            if compiles() > before:
                specialized = tuple(dict.fromkeys(key for _, key, _ in floats))
    except Exception as error:  # noqa: BLE001 - priming only saves a recompile
        log.info("priming the followed values %s failed (%s: %s)", [key for _, key, _ in moved],
                 type(error).__name__, error)
    finally:
        for group, key, value in moved:
            group[key] = value
    return specialized


class _Deferred(CaptureError):
    """The shadow must be compiled by its first real call."""


def _run_trace(shadow_step: Callable[[], None]) -> bool:
    """Trace and compile without stepping. True when compiling was deferred to the first real call; a
    :class:`CaptureError` raised inside comes out as itself."""
    try:
        shadow_step()
    except Exception as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, CaptureError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        found = cause
        # NB: the tracebacks hold the capture's frames and, through them, the optimizer.
        error.__traceback__ = found.__traceback__ = None
        if isinstance(found, _Deferred):
            return True
        raise CaptureError(str(found)) from None
    return False


def _indirect_loads(tables: Sequence[GradTable], example_inputs: list[Any]) -> IndirectGradLoads:
    grads = []
    for table in tables:
        pointer = table.virtual.data_ptr()
        if not any(isinstance(value, torch.Tensor) and value.data_ptr() == pointer for value in example_inputs):
            raise CaptureError("a run's grad is not an input of the traced shadow step")
        grads.append(IndirectGrad(pointer, table.virtual.dtype, table.chunk, table.addresses_at, table.limits_at))
    return IndirectGradLoads(grads)


def _compile(gm: torch.fx.GraphModule, example_inputs: list[Any], patches: dict[str, Any],
             loads: IndirectGradLoads | None) -> tuple[Any, int]:
    before = _compat.generated_kernel_count()
    with contextlib.ExitStack() as stack:
        if loads is not None:
            input_names = stack.enter_context(_compat.rewriting_triton_kernels(loads, list(example_inputs)))
            sources = stack.enter_context(_compat.generated_modules())
        compiled = _compat.compile_with_inductor(gm, example_inputs, patches)
    if loads is not None:
        problem = loads.verify(sources, input_names)
        if problem is not None:
            raise CaptureError(problem)
    kernels = _compat.generated_kernel_count() - before
    log.info("lowered %s: %d graph nodes -> %d kernel(s)%s, %s", gm.__class__.__name__, len(gm.graph.nodes),
             kernels, f", {loads.rewritten_loads} grad load(s) through a table" if loads else "", patches)
    return compiled, kernels


def _log_inputs(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> None:
    if log.isEnabledFor(logging.DEBUG):
        for node, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs, strict=False):
            what = (f"{tuple(value.shape)} {value.dtype} {value.device}" if isinstance(value, torch.Tensor)
                    else type(value).__name__)
            log.debug("  shadow input %s: %s", node.name, what)


def lower_batched(call: Callable[..., None], inputs: Sequence[torch.Tensor], config: CaptureConfig,
                  device: torch.device) -> LoweredShadow:
    """The batched-lanes step (:mod:`optcapture.lane_batches`) traced to an ATen graph without running it and
    compiled by Inductor now, at capture. Steps call the compiled graph directly on ``inputs`` (flat buffers and
    the tensors the step shares), whose addresses stay fixed: no Dynamo frame, no guards. Not under CUDA graphs."""
    with _compat.outside_dynamo_tracing():
        gm = _compat.trace_without_running(call, inputs)
        # On every device: a batch's kernels are larger than a bucket's (a norm, a matrix product), and the bias
        # corrections of a group step tensor (``1 - beta ** step``, float64 with the group's numbers as tensors)
        # otherwise land in their element loops, in C++ per vector, in Triton per element.
        compiled, count = _compile(gm, list(inputs), {**inductor_patches(config, device, cudagraphs=False),
                                                       **_FIXED_INPUTS, **_batched_step_passes()}, None)
    arguments = tuple(inputs)

    def step() -> None:
        compiled(*arguments)

    return LoweredShadow(step, count)


def lower_graph(gm: torch.fx.GraphModule, example_inputs: list[Any], config: CaptureConfig) -> Callable[..., Any]:
    """The per-tensor graph compiled by Inductor, without CUDA graphs (they would copy every grad)."""
    devices = {t.device for t in example_inputs if isinstance(t, torch.Tensor)}
    device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
    before = _compat.generated_kernel_count()
    compiled = _compat.compile_with_inductor(gm, example_inputs, inductor_patches(config, device, cudagraphs=False))
    log.info("lowered the per-tensor graph: %d graph nodes -> %d kernel(s)", len(gm.graph.nodes),
             _compat.generated_kernel_count() - before)
    return compiled  # type: ignore[no-any-return]
