"""``optcapture.capture(optimizer)``: the one public way to hand a framework an optimizer whose step is compiled.

Frameworks build and step the optimizer themselves (Lightning's ``configure_optimizers`` and ``closure=``,
``torch.amp.GradScaler.step``, ZeroRedundancyOptimizer's local optimizer, the Hugging Face Trainer's
``optimizers=``), so replacing ``opt.step`` by a ``torch.compile``'d function does not reach them, and it breaks LR
schedulers built afterwards (they wrap ``opt.step.__func__``). :func:`capture` changes the optimizer's class to a
subclass whose ``step`` runs the compiled step: the same object, ``isinstance`` and ``state_dict`` unchanged.

Invariant: a captured optimizer steps exactly as its own ``step`` would. A closure is evaluated before the compiled
step only where the class's own step provably does just that first (every ``torch.optim`` class but LBFGS, and
users' steps that open with the same pattern); any other step given a closure runs uncompiled, said once.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import inspect
import logging
import sys
import textwrap
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from optcapture import _compat, registry
from optcapture.config import CaptureConfig, parse_options
from optcapture.errors import OptionError, UnsupportedStepError, warn_once
from optcapture.replay import COUNTERS

log = logging.getLogger(__name__)

OptimizerT = TypeVar("OptimizerT", bound=torch.optim.Optimizer)

# The compiled step of each captured optimizer. Not a cache (``optcapture.reset()`` keeps it): it is what the
# optimizer's class now runs. Weak: the compiled function takes the optimizer as its argument and holds none.
_compiled: weakref.WeakKeyDictionary[torch.optim.Optimizer, Callable[..., Any]] = weakref.WeakKeyDictionary()
# One subclass per (class, config), so two optimizers captured alike share a class.
_classes: dict[tuple[type, CaptureConfig], type] = {}
# Captured wrappers whose own step Dynamo never handed over, but whose call captured the optimizer they wrap.
_steps_a_captured_optimizer: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()


def capture(optimizer: OptimizerT, options: Mapping[str, Any] | CaptureConfig | None = None) -> OptimizerT:
    """Compile ``optimizer``'s step with the optcapture backend, in place, and return ``optimizer``.

    ``options`` are the backend's (:class:`CaptureConfig`), checked now. The optimizer stays the same object:
    ``isinstance``, ``state_dict``/``load_state_dict``, hooks and LR schedulers built before or after work as
    before, and ``opt.step()`` (also called by ``GradScaler.step`` or a framework) runs the compiled step.
    ``opt.step(closure)`` evaluates the closure with grad enabled, then runs the compiled step, where the class's
    step only evaluates its closure first (all of ``torch.optim`` but LBFGS); other steps run uncompiled when given
    a closure, said once. Capturing an optimizer twice with the same options returns it as it is.
    ``torch.save(opt)`` and ``copy.deepcopy(opt)`` give an optimizer captured with the same options.

    A ``ZeroRedundancyOptimizer`` is returned as it is with its local optimizer (``zero.optim``) captured: its own
    step runs collectives around the local step. Refused, said once, with ``overlap_with_ddp=True`` (no
    ``torch.optim`` step to capture) and ``parameters_as_bucket_view=True`` (its buckets would go stale).
    """
    config = parse_options(options)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise OptionError(f"optcapture.capture takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if _is_zero_redundancy_optimizer(optimizer):
        return _capture_local_optimizer(optimizer, config)
    if isinstance(optimizer, torch.optim.LBFGS):
        raise UnsupportedStepError("LBFGS re-evaluates its closure inside step() (line search): its step cannot be "
                                   "compiled as one; step it eagerly")
    fused = _fused_reason(optimizer)
    if fused is not None:
        # Said now, not only after the first step (which reports it): nothing of a fused step reaches optcapture.
        if config.fallback == "raise":
            raise UnsupportedStepError(f"{_uncompiled_message(type(optimizer).__name__, fused)}: not captured")
        warn_once(f"{_uncompiled_message(type(optimizer).__name__, fused)}{_RUNS_UNCOMPILED}")
    current = type(optimizer)
    base: type = getattr(current, "_optcapture_base", current)
    if base is not current and getattr(current, "_optcapture_config", None) != config:
        raise OptionError(f"this {base.__name__} was captured with other options "
                          f"({getattr(current, '_optcapture_config', None)}); capture a new optimizer instead")
    optimizer.__class__ = _captured_class(base, config)
    _compat.rewrap_scheduler_step(optimizer)
    log.info("captured %s: its step runs compiled with optcapture (%s)", base.__name__, config)
    return optimizer


def _is_zero_redundancy_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    # Looked up, not imported: importing torch.distributed.optim has side effects (TorchScript deprecation warnings),
    # and an optimizer can only be a ZeroRedundancyOptimizer once its module is imported.
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    zero_class = getattr(module, "ZeroRedundancyOptimizer", None)
    return zero_class is not None and isinstance(optimizer, zero_class)


def _capture_local_optimizer(zero: OptimizerT, config: CaptureConfig) -> OptimizerT:
    """ZeroRedundancyOptimizer's step steps its local optimizer (``zero.optim``, over this rank's shard of the
    params), then broadcasts each rank's params between Python-level collectives: the local optimizer is what can be
    captured. Refused, said once (``fallback="raise"``: raised), where capturing it would not be the same step."""
    local = getattr(zero, "optim", None)
    reason = None
    if not isinstance(local, torch.optim.Optimizer):
        # overlap_with_ddp=True: built at DDP's first backward, a functional optimizer stepped from DDP's comm hook.
        reason = ("ZeroRedundancyOptimizer(overlap_with_ddp=True) steps a functional optimizer from DDP's "
                  "communication hook, not a torch.optim step: there is nothing to capture, it runs as it is")
    elif getattr(zero, "parameters_as_bucket_view", False):
        # Its params are views into its buckets, which it broadcasts; optcapture's flat storage would stop the
        # updates from reaching those buckets.
        reason = ("ZeroRedundancyOptimizer(parameters_as_bucket_view=True) broadcasts its params from buckets that "
                  "they are views of, which a captured step would not update: it steps uncompiled (capture it "
                  "with parameters_as_bucket_view=False)")
    if reason is not None:
        if config.fallback == "raise":
            raise UnsupportedStepError(reason)
        warn_once(reason)
        return zero
    capture(local, config)
    log.info("captured the local optimizer of ZeroRedundancyOptimizer (explain(zero.optim) reports on it)")
    return zero


def _captured_class(base: type, config: CaptureConfig) -> type:
    key = (base, config)
    cls = _classes.get(key)
    if cls is not None:
        return cls
    base_step: Callable[..., Any] = base.step  # type: ignore[attr-defined]
    closure_first = evaluates_closure_first(base_step)

    @functools.wraps(base_step)  # NB: sets __wrapped__, which discovery and the shadow follow to the real step
    def step(self: torch.optim.Optimizer, closure: Callable[[], Any] | None = None) -> Any:
        compiled = _compiled.get(self)
        if compiled is None:
            compiled = _compiled[self] = torch.compile(base_step, backend="optcapture",
                                                       options=dataclasses.asdict(config))
        if config.fallback == "raise":
            _refuse_known_uncompiled(self, base)
        if closure is None:
            reports = registry.reports_of(self)
            watch = _watch(self, reports)
            with _grads_for_a_trace(self, reports):
                result = compiled(self)
            _report_if_never_seen(self, base, watch, config)
            return result
        if not closure_first:
            warn_once(f"{base.__name__}.step uses its closure beyond evaluating it first; steps given a closure run "
                      "uncompiled")
            return base_step(self, closure)
        with torch.enable_grad():
            loss = closure()
        reports = registry.reports_of(self)
        watch = _watch(self, reports)  # after the closure, which may compile a forward with this backend
        with _grads_for_a_trace(self, reports):
            compiled(self)
        _report_if_never_seen(self, base, watch, config)
        return loss

    cls = type(base.__name__, (base,), {"step": step, "_optcapture_base": base, "_optcapture_config": config,
                                        "__module__": base.__module__, "__qualname__": base.__qualname__,
                                        "__reduce_ex__": _reduce_captured})
    _classes[key] = cls
    return cls


def _reduce_captured(self: torch.optim.Optimizer, protocol: int) -> tuple[Any, ...]:
    """Pickling (``torch.save(opt)``) and ``copy.deepcopy``: the subclass made at run time has its base's name, under
    which pickle would find the base, not it; the copy is rebuilt as its base captured with the same options, its
    compiled step made again at its first step."""
    reduced = object.__reduce_ex__(self, protocol)
    cls = type(self)
    return (_restore_captured, (cls._optcapture_base, cls._optcapture_config), *reduced[2:])  # type: ignore[attr-defined]


def _restore_captured(base: type, config: CaptureConfig) -> torch.optim.Optimizer:
    """An empty captured ``base`` (pickle then sets its state): see :func:`_reduce_captured`."""
    optimizer: torch.optim.Optimizer = object.__new__(_captured_class(base, config))
    return optimizer


def _grads_for_a_trace(optimizer: torch.optim.Optimizer,
                       reports: Sequence[registry.CaptureReport]) -> contextlib.AbstractContextManager[int]:
    """Until the step is captured (``reports``: none yet but its first step's; Dynamo traces it at one of these calls),
    its grads that are views stand in with their params' view structure
    (:func:`optcapture._compat.grads_shaped_like_their_params`: FSDP2's and DDP's bucket views would otherwise be
    traced with every size symbolic); from then on, nothing."""
    if reports and any(report.path != "first-step" for report in reports):
        return contextlib.nullcontext(0)
    return _compat.grads_shaped_like_their_params(p for group in optimizer.param_groups for p in group["params"])


def _fused_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Why a step with ``fused=True`` groups never reaches optcapture (None without such groups): torch.optim
    runs its fused kernel under ``torch.compiler.disable`` ("don't trace into fused optimizer", torch/optim/adam.py),
    so Dynamo gives up the step's frame and hands no backend any graph of it."""
    fused = [g for g, group in enumerate(optimizer.param_groups) if group.get("fused")]
    if not fused:
        return None
    return (f"param group(s) {fused} of {type(optimizer).__name__} use fused=True: it runs PyTorch's own fused "
            "kernel, which Dynamo does not trace, so Dynamo hands no graph of the step to the backend")


def _uncompiled_message(name: str, reason: str) -> str:
    return f"Dynamo hands optcapture no graph of the step of {name} ({reason})"


_RUNS_UNCOMPILED = ": it runs uncompiled, as plain Python"


def _refuse_known_uncompiled(optimizer: torch.optim.Optimizer, base: type) -> None:
    """``fallback="raise"``: raise before the step runs where it is known that optcapture will see none of it: a
    ``fused=True`` group (also one added after :func:`capture`), or a step already reported ``uncompiled``."""
    reason = _fused_reason(optimizer)
    if reason is None:
        reports = registry.reports_of(optimizer)
        if not reports or reports[-1].path != "uncompiled":
            return
        reason = reports[-1].reasons[0]
    raise UnsupportedStepError(f"{_uncompiled_message(base.__name__, reason)}: not stepped")


@dataclasses.dataclass(frozen=True)
class _Watch:
    """What a call of a compiled step is compared with afterwards, while optcapture has seen no graph of the step."""

    captures: int
    graph_breaks: _compat.GraphBreakTally


def _watch(optimizer: torch.optim.Optimizer, reports: Sequence[registry.CaptureReport]) -> _Watch | None:
    """None once the step was reported (``reports``: captured, or ``uncompiled``) or steps a captured optimizer:
    nothing to watch, so a steady step reads no Dynamo counters."""
    if reports or optimizer in _steps_a_captured_optimizer:
        return None
    return _Watch(COUNTERS.captures, _compat.graph_break_tally())


def _report_if_never_seen(optimizer: torch.optim.Optimizer, base: type, watch: _Watch | None,
                          config: CaptureConfig) -> None:
    """A compiled step Dynamo ran without handing optcapture any graph of it (``fused=True``; a graph break at which
    Dynamo gives the step's frame up: Adafactor's ``step_t.item()`` on torch 2.13) ran uncompiled: reported
    (``uncompiled``) and said once, after its first call. ``fallback="raise"`` does not raise then: the step ran (Dynamo
    decides while it runs the step), and an error comes before anything is applied or not at all; later calls raise
    before stepping (:func:`_refuse_known_uncompiled`).

    Not said of a wrapper whose step steps another optimizer that optcapture captured during the call (Accelerate's
    ``AcceleratedOptimizer`` captured after ``prepare``): Dynamo compiles the inner step's frame after the wrapper's
    graph break, so the step that matters is compiled."""
    if watch is None or registry.reports_of(optimizer):
        return
    if COUNTERS.captures > watch.captures:
        _steps_a_captured_optimizer.add(optimizer)
        log.info("the step of %s ran as Python around an inner optimizer's step, which was captured", base.__name__)
        return
    reason = _fused_reason(optimizer)
    if reason is None:
        breaks = _compat.graph_breaks_since(watch.graph_breaks)
        # Dynamo meets a graph break only when it compiles the frame: not again after optcapture.reset() alone.
        reason = (f"graph break: {'; '.join(breaks)}; TORCH_LOGS=graph_breaks says where" if breaks
                  else "Dynamo gave the step's frame up; TORCH_LOGS=graph_breaks says why")
    registry.record_uncompiled(optimizer, reason)
    message = _uncompiled_message(base.__name__, reason)
    if config.fallback == "raise":
        # An error is raised before anything is applied, or not at all: this call's update is applied already.
        warn_once(f"{message}: this call ran it uncompiled, as plain Python, before that was known (Dynamo decides "
                  "while it runs the step), so it is not an error; with fallback='raise' later calls raise before "
                  "stepping")
        return
    warn_once(f"{message}{_RUNS_UNCOMPILED}")


# torch.optim checks its capture health first (the name differs between torch 2.11 and 2.13).
_ALLOWED_BEFORE_CLOSURE = frozenset({"_cuda_graph_capture_health_check", "_accelerator_graph_capture_health_check"})


@functools.cache
def evaluates_closure_first(step: Callable[..., Any]) -> bool:
    """Whether ``step`` (unwrapped) only evaluates its closure, first, as ``torch.optim`` steps do::

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

    and never reads the closure afterwards. Then evaluating the closure before the compiled step is the same step.
    Nothing but constants, a docstring and torch.optim's capture health check may come before it.
    """
    fn = inspect.unwrap(step)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    func = tree.body[0]
    if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(func.args.args) < 2:
        return False
    name = func.args.args[1].arg
    uses = [node for node in ast.walk(func) if isinstance(node, ast.Name) and node.id == name]
    for index, statement in enumerate(func.body):
        if not any(isinstance(node, ast.Name) and node.id == name for node in ast.walk(statement)):
            if not _harmless_before_closure(statement):
                return False
            continue
        later = [node for rest in func.body[index + 1:] for node in ast.walk(rest)
                 if isinstance(node, ast.Name) and node.id == name]
        return not later and _is_closure_evaluation(statement, name) and len(uses) == 2
    return False


def _harmless_before_closure(statement: ast.stmt) -> bool:
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
        return True  # a docstring
    if isinstance(statement, (ast.Assign, ast.AnnAssign)) and isinstance(statement.value, ast.Constant):
        return True  # loss = None
    call = statement.value if isinstance(statement, ast.Expr) else None
    return (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
            and call.func.attr in _ALLOWED_BEFORE_CLOSURE and not call.args)


def _is_closure_evaluation(statement: ast.stmt, name: str) -> bool:
    """``if closure is not None: [with torch.enable_grad():] loss = closure()``, with no else."""
    if not (isinstance(statement, ast.If) and not statement.orelse and isinstance(statement.test, ast.Compare)
            and isinstance(statement.test.left, ast.Name) and statement.test.left.id == name
            and len(statement.test.ops) == 1 and isinstance(statement.test.ops[0], ast.IsNot)):
        return False
    body = statement.body
    if len(body) == 1 and isinstance(body[0], ast.With):
        body = body[0].body
    if len(body) != 1 or not isinstance(body[0], (ast.Assign, ast.AnnAssign)):
        return False
    value = body[0].value
    return (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == name
            and not value.args and not value.keywords)
