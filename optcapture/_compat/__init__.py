"""Every use of torch internals that differs between the torch versions optcapture supports (>= 2.11).

Invariant: no other module touches ``torch._dynamo`` / ``torch._inductor`` / ``torch.distributed`` private names
directly; each helper here is covered by ``tests/test_compat.py`` on the installed torch. This module holds
Dynamo's; :mod:`optcapture._compat.inductor` Inductor's, CUDA graph trees' and functorch's;
:mod:`optcapture._compat.distributed` DTensor's and FSDP2's; :mod:`optcapture._compat.guards` what the
backend changes in the guards Dynamo is about to build; :mod:`optcapture._compat.side_effects` what the frame writes
back after its graph. Everything is used as ``_compat.<name>``.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

TORCH_VERSION: tuple[int, int] = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])  # type: ignore[assignment]
MIN_TORCH = (2, 11)


def check_torch_version() -> None:
    if TORCH_VERSION < MIN_TORCH:
        raise ImportError(f"optcapture needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}, found {torch.__version__}")


def current_tracer() -> Any | None:
    """The Dynamo instruction translator of the frame being compiled (None outside Dynamo)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    try:
        return InstructionTranslator.current_tx()
    except (AttributeError, IndexError, AssertionError):
        return None


def is_alias_of(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` share storage (real or fake tensors: a view and its base do)."""
    return bool(torch._C._is_alias_of(a, b))


def rewrap_scheduler_step(optimizer: torch.optim.Optimizer) -> bool:
    """Point an LR scheduler's wrapper of ``optimizer.step`` at the optimizer's class's step; True if there was one.

    An LR scheduler replaces ``opt.step`` by an instance attribute that marks ``opt._opt_called`` and calls the
    function ``opt.step.__func__`` had when the scheduler was built (torch/optim/lr_scheduler.py,
    ``patch_track_step_called``), so a class changed afterwards would not be reached. The new wrapper does the
    same, calling ``type(opt).step``.
    """
    patched = optimizer.__dict__.get("step")
    if not getattr(patched, "_wrapped_by_lr_sched", False):
        return False
    optimizer_ref = weakref.ref(optimizer)

    @functools.wraps(type(optimizer).step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = optimizer_ref()
        assert opt is not None
        opt._opt_called = True  # type: ignore[attr-defined]
        return type(opt).step(opt, *args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]
    return True


def begin_compiled_call() -> None:
    """Do what entering a ``torch.compile``'d function does for CUDA graph trees: start a new generation
    (``install_generation_tagging_init``, torch/_dynamo/mutation_guard.py), so a graph called without
    re-entering Dynamo is replayed as the root of a new generation, as it was when Dynamo called it."""
    torch._dynamo.mutation_guard.GenerationTracker.generation += 1


def restart_errors() -> tuple[type[Exception], ...]:
    """What Dynamo raises through a backend to restart its analysis of the frame, e.g. Inductor's pass that turns
    Python floats into tensors raising ``TensorifyScalarRestartAnalysis`` to have them specialized
    (torch/_dynamo/exc.py). A backend that catches compile failures must let these through."""
    from torch._dynamo import exc

    return (exc.RestartAnalysis,)


def mark_floats_as_inputs(source_selected: Callable[[str], bool]) -> list[str]:
    """Record the Python floats that ``source_selected`` picks as dynamic, so that Dynamo's next trace of a code
    that reads them makes them graph inputs; returns their source names. Raise :func:`restart_request` from the
    backend to have the frame being compiled traced again now.

    Dynamo specializes a float until it has seen it change, then recompiles with it as an input ("automatic
    dynamic", torch/_dynamo/pgo.py); this records the change ahead of time. A source already recorded as dynamic
    is never selected again, so a caller that restarts only when this returned names restarts once per source,
    whatever else keeps Dynamo specializing it.
    """
    from torch._dynamo import pgo

    # Every code's state: the entry lives under the code that read the float, an inlined function's code when
    # the read was inlined (``update_automatic_dynamic``).
    marked = []
    for state in pgo.get_code_state().values():
        for name, entry in state.automatic_dynamic.items():
            if type(entry.scalar) is float and source_selected(name):
                entry.scalar = pgo.auto_dynamic
                marked.append(name)
    return marked


def specialize_float_inputs(gm: torch.fx.GraphModule, source_selected: Callable[[str], bool]) -> list[str]:
    """Have Dynamo's next trace of the frame being compiled hold as constants (guarded) the floats it passes ``gm``
    as inputs (0-dim tensors it takes ``item()`` of) whose source ``source_selected`` picks; returns their source
    names. Raise :func:`restart_request` from the backend then.

    What Inductor's own pass does with a float it cannot keep a tensor (torch/fx/passes/_tensorify_python_scalars.py
    records the float's symbol in ``TensorifyState`` and restarts; the trace after it replaces the symbol by its
    value, ``OutputGraph.remove_tensorify_specialized_graphargs``). A float already recorded is not returned again.
    """
    from torch._dynamo.symbolic_convert import TensorifyState

    specialized = []
    for node in gm.graph.nodes:
        grapharg = node.meta.get("grapharg")
        memo = getattr(node.meta.get("example_value"), "item_memo", None)
        if node.op != "placeholder" or not getattr(grapharg, "pass_arg_as_tensor", False) or memo is None:
            continue
        symbol = getattr(memo.node._expr, "name", None)
        source = source_name(grapharg.source)
        if isinstance(symbol, str) and source_selected(source) and not TensorifyState.should_specialize(symbol):
            TensorifyState.specialize(symbol)
            specialized.append(source)
    return specialized


def restart_request() -> Exception:
    """The exception that, raised inside a backend, makes Dynamo trace the frame again: the one restart Dynamo
    lets through a backend (torch/_dynamo/output_graph.py, ``_call_user_compiler``)."""
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis

    request: Exception = TensorifyScalarRestartAnalysis()
    return request


def compile_errors() -> tuple[type[Exception], ...]:
    """What a call of a ``torch.compile``'d function raises when compiling it failed, before any of it ran.

    ``FailOnRecompileLimitHit`` (a recompile past the limit under ``fullgraph=True``) does not derive from
    ``TorchDynamoException``.
    """
    from torch._dynamo import exc

    return (exc.TorchDynamoException, exc.FailOnRecompileLimitHit)


def raised_while_recording_cuda_graph(error: BaseException) -> bool:
    """True when ``error`` came out of CUDA graph trees recording a graph, before the recorded graph first ran.

    Recording captures kernels without running them (``CUDAGraphNode._record``, after its inputs were copied by
    ``_allocate_and_copy_recording_inputs``); the node replays the graph only once both returned
    (torch/_inductor/cudagraph_trees.py, ``CUDAGraphNode.__init__``). So a failure in either, such as running
    out of memory while recording, left every param and state tensor as it was.
    """
    from torch._inductor import cudagraph_trees

    node = getattr(cudagraph_trees, "CUDAGraphNode", None)
    recording = {getattr(node, name).__code__ for name in ("_record", "_allocate_and_copy_recording_inputs")
                 if callable(getattr(node, name, None))}
    frame = error.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code in recording:
            return True
        frame = frame.tb_next
    return False


def frame_compiles() -> tuple[int, int] | None:
    """(how many times Dynamo compiled the frame being compiled before, its recompile limit), or None outside a
    compile. Past the limit Dynamo runs the frame uncompiled without calling any backend again."""
    from torch._dynamo import config
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    count = getattr(compile_id, "frame_compile_id", None)
    if count is None:
        return None
    return int(count), int(getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8)))


def frame_compile_began() -> float | None:
    """The ``time.perf_counter()`` at which Dynamo began compiling the frame being compiled now (its outermost compile
    on this thread: the one a nested ``torch.compile`` runs inside), or None outside a compile. Read from Dynamo's
    metrics context, which stamps ``time.time_ns()`` on entering it (torch/_dynamo/metrics_context.py)."""
    from torch._dynamo.utils import get_metrics_context

    context = get_metrics_context()
    began_ns = getattr(context, "_start_time_ns", 0)
    if not context.in_progress() or not began_ns:
        return None
    return time.perf_counter() - (time.time_ns() - int(began_ns)) / 1e9


def skip_frame_request(reason: str) -> Exception:
    """The exception that, raised inside a backend, makes Dynamo run the frame being compiled uncompiled, as plain
    Python, instead of failing the call (``_call_user_compiler`` re-raises ``SkipFrame``: "the backend compiler has
    requested that we skip the frame", torch/_dynamo/output_graph.py)."""
    from torch._dynamo.exc import SkipFrame

    request: Exception = SkipFrame(reason)
    return request


def through_dynamo(error: Exception) -> Exception:
    """``error`` as an exception that, raised inside a backend, reaches the caller of the compiled function as
    itself (an instance of ``type(error)``, same message). Dynamo wraps any other backend exception in
    ``BackendCompilerFailed``; it re-raises its own ``ShortenTraceback`` as is
    (torch/_dynamo/output_graph.py, ``_call_user_compiler``).
    """
    from torch._dynamo.exc import ShortenTraceback

    kind = type(error)

    message = str(error)

    def __init__(self: Exception, *args: object) -> None:  # noqa: N807 - the class's own __init__
        ShortenTraceback.__init__(self, *args, first_useful_frame=None)

    def __str__(self: Exception) -> str:  # noqa: N807
        # Dynamo appends its own advice to the message on the way out ("Set TORCHDYNAMO_VERBOSE=1 ... if you're
        # reporting a bug to PyTorch", torch/_dynamo/exc.py, augment_exc_message): the user's error is optcapture's.
        return message

    # A class per raise (rare, and raised once): nothing for optcapture.reset() to clear.
    passing = type(kind.__name__, (kind, ShortenTraceback), {"__init__": __init__, "__str__": __str__,
                                                             "__module__": kind.__module__,
                                                             "__qualname__": kind.__qualname__})
    return passing(*error.args)  # type: ignore[no-any-return]


def source_name(source: Any) -> str:
    """``Source.name`` is a method in some torch versions and a property in others."""
    name = source.name
    return str(name() if callable(name) else name)


def placeholder_source(node: torch.fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    if grapharg is None or getattr(grapharg, "source", None) is None:
        return None
    return source_name(grapharg.source)


def storage_holders(tensor: torch.Tensor) -> int:
    """How many tensors hold ``tensor``'s storage: ``tensor`` itself, and each view or alias of it (``p.detach()``,
    ``p[:]``, the bucket ZeroRedundancyOptimizer(parameters_as_bucket_view=True) views each param of). Read from the
    storage's reference count (c10::StorageImpl's use count, ``torch._C._storage_Use_Count``), less the one reference
    of the storage's Python object, which PyTorch keeps alive with the storage once made (as reading it here does)."""
    storage = tensor.untyped_storage()
    return int(torch._C._storage_Use_Count(storage._cdata)) - 1


# Re-exported: every helper is reached as ``_compat.<name>``.
from optcapture._compat.distributed import (  # noqa: E402
    LOCAL_TENSOR,
    FsdpShard,
    dtensor_class,
    dtensor_layout,
    fsdp_shard,
    fsdp_sharded_params,
    grads_shaped_like_their_params,
    local_tensor,
)
from optcapture._compat.graph_breaks import (  # noqa: E402
    GraphBreakTally,
    Resumption,
    graph_break_ending,
    graph_break_tally,
    graph_breaks_since,
    resumed_after_graph_break,
)
from optcapture._compat.guards import drop_guards, identity_first_guards  # noqa: E402
from optcapture._compat.inductor import (  # noqa: E402
    KernelInputs,
    compile_with_inductor,
    cudagraphs_recorded,
    custom_post_grad_pass,
    generated_kernel_count,
    generated_modules,
    mark_static,
    outside_dynamo_tracing,
    post_grad_pass,
    reads_python_floats,
    realize_in_own_buffer,
    reset_cudagraph_trees,
    rewriting_triton_kernels,
    trace_without_running,
)
from optcapture._compat.side_effects import (  # noqa: E402
    NOT_CONSTANT,
    dict_entry_stores,
    frame_has_no_side_effects,
    optimizer_attribute_stores,
)

__all__ = [  # the re-exports (the Dynamo helpers above are this module's own)
    "LOCAL_TENSOR",
    "FsdpShard",
    "dtensor_class",
    "dtensor_layout",
    "fsdp_shard",
    "fsdp_sharded_params",
    "grads_shaped_like_their_params",
    "local_tensor",
    "GraphBreakTally",
    "Resumption",
    "graph_break_ending",
    "graph_break_tally",
    "graph_breaks_since",
    "resumed_after_graph_break",
    "drop_guards",
    "identity_first_guards",
    "NOT_CONSTANT",
    "dict_entry_stores",
    "frame_has_no_side_effects",
    "optimizer_attribute_stores",
    "KernelInputs",
    "compile_with_inductor",
    "cudagraphs_recorded",
    "custom_post_grad_pass",
    "generated_kernel_count",
    "generated_modules",
    "mark_static",
    "outside_dynamo_tracing",
    "post_grad_pass",
    "reads_python_floats",
    "realize_in_own_buffer",
    "reset_cudagraph_trees",
    "rewriting_triton_kernels",
    "trace_without_running",
]
