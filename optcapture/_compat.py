"""Every use of torch internals that differs between the torch versions optcapture supports (>= 2.11).

Invariant: no other module touches ``torch._dynamo`` / ``torch._inductor`` private names
directly; each helper here is covered by ``tests/test_compat.py`` on the installed torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import operator
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
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


def frame_has_no_side_effects(tracer: Any) -> bool:
    """True when Dynamo replays no Python side effect after the graph of the frame being compiled
    (False when that cannot be told)."""
    try:
        return bool(tracer.output.side_effects.is_empty())
    except AttributeError:
        return False


NOT_CONSTANT = object()
"""An attribute store whose value Dynamo holds as a symbol or a tensor, not as a Python constant."""


def optimizer_attribute_stores(tracer: Any) -> list[tuple[Any, str, Any]]:
    """(optimizer, attribute, value) of each attribute assignment on a ``torch.optim.Optimizer`` that the frame
    being compiled made (``self._k += 1`` in a user's step). Dynamo records them but does not write them back
    after the graph, whatever the backend (torch 2.13: the attribute keeps its old value, so the guard on it
    keeps passing and every later step reuses the first step's value). The value is a Python constant, or
    :data:`NOT_CONSTANT`."""
    try:
        mutations = tracer.output.side_effects.store_attr_mutations
    except AttributeError:
        return []
    stores = []
    for variable, attributes in mutations.items():
        owner = getattr(variable, "value", None)
        if not isinstance(owner, torch.optim.Optimizer):
            continue
        for name, value in attributes.items():
            try:
                stores.append((owner, name, value.as_python_constant()))
            except Exception:  # noqa: BLE001 - NotImplementedError for symbols and tensors; any failure: not a constant
                stores.append((owner, name, NOT_CONSTANT))
    return stores


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


def drop_guards(tracer: Any, should_drop: Callable[[str], bool]) -> list[str]:
    """Remove the guards whose source name satisfies ``should_drop`` from the frame being compiled.

    Called from the backend, i.e. before Dynamo turns its collected guards into the guard function.
    Returns the names of the sources whose guards were removed. One pass over the guard set
    (``GuardsSet.remove_guards_with_source`` rebuilds it once per source).
    """
    guards = tracer.output.guards
    keep, dropped = [], set()
    for guard in guards.inner:
        name = source_name(guard.originating_source)
        if should_drop(name):
            dropped.add(name)
        else:
            keep.append(guard)
    if dropped:
        guards.inner = type(guards.inner)(keep)
        if hasattr(guards, "source_to_guards"):
            guards.source_to_guards.clear()
            for guard in keep:
                guards.track_guard_by_source(guard)
    return sorted(dropped)


def mark_static(tensor: torch.Tensor) -> None:
    """Tell Dynamo and CUDA graph trees the tensor keeps its address, without an identity guard."""
    torch._dynamo.mark_static_address(tensor, guard=False)


def generated_kernel_count() -> int:
    from torch._inductor import metrics

    return int(metrics.generated_kernel_count)


def _tree_nodes(manager: Any) -> Iterator[Any]:
    stack = [node for nodes in (manager.roots or {}).values() for node in nodes]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(child for children in node.children.values() for child in children)


def cudagraphs_recorded(device_index: int = 0) -> int:
    """How many CUDA graphs Inductor's CUDA graph trees have recorded on this device."""
    from torch._inductor import cudagraph_trees

    container = cudagraph_trees.get_container(device_index)
    manager = container.tree_manager
    if manager is None:
        return 0
    return sum(1 for _ in _tree_nodes(manager))


def reset_cudagraph_trees() -> None:
    from torch._inductor import cudagraph_trees

    cudagraph_trees.reset_cudagraph_trees()


def compile_with_inductor(gm: torch.fx.GraphModule, example_inputs: list[Any], patches: dict[str, Any]) -> Any:
    """Inductor's ``compile_fx`` with config patches applied only for this compile.

    A graph that reads Python floats as inputs is compiled without Inductor's and AOTAutograd's caches: where
    Inductor specializes such a float (``add(x, y, alpha=momentum)``, SGD with Nesterov), only a ShapeEnv guard
    records the value and the cache key is the same for every value, so the recompile at the next value gets
    the first compile's artifact back and computes with the old value, silently (pytorch#194976, #197889; torch
    2.11 and 2.13). Caches off, each value compiles as itself.
    """
    from torch._inductor.compile_fx import compile_fx

    if not reads_python_floats(gm):
        return compile_fx(gm, example_inputs, config_patches=patches)
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, config_patches={**patches, "fx_graph_cache": False})


def trace_without_running(fn: Callable[..., Any], args: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
    """``fn`` traced to an ATen graph over fake copies of ``args`` (``make_fx``): nothing runs, no Dynamo frame.
    In-place writes to ``args`` stay in the graph; Inductor's AOT stage turns them into writes back into the inputs."""
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.no_grad(), _vmap_fallback_disabled():
        return make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=False)(*args)


@contextlib.contextmanager
def _vmap_fallback_disabled() -> Iterator[None]:
    """vmap raises on an op without a batching rule instead of running it once per batch member (its fallback,
    aten/src/ATen/functorch/BatchedFallback.cpp): a traced batch then has a kernel per member, not per batch."""
    functorch = torch._C._functorch
    enabled = functorch._is_vmap_fallback_enabled()
    functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        functorch._set_vmap_fallback_enabled(enabled)


@contextlib.contextmanager
def outside_dynamo_tracing() -> Iterator[None]:
    """No Dynamo tracing context while a backend compiles a program of its own: ``compile_fx`` would otherwise take
    the frame's fake mode and shape environment (``detect_fake_mode`` reads the tracing context first) and issue
    guards for symbols that frame never had."""
    with torch._guards.tracing(None):
        yield


def reads_python_floats(gm: torch.fx.GraphModule) -> bool:
    """Whether Dynamo passes ``gm`` a Python float as an input (as a 0-dim tensor it takes ``item()`` of)."""
    return any(getattr(node.meta.get("grapharg"), "pass_arg_as_tensor", False)
               for node in gm.graph.nodes if node.op == "placeholder")


KernelInputs = Callable[[int], "str | None"]
"""For the kernel being generated: a graph input's data pointer -> the kernel's argument name for it (or None)."""


@contextlib.contextmanager
def rewriting_triton_kernels(rewrite: Callable[[KernelInputs, str], str],
                             example_inputs: list[Any]) -> Iterator[dict[int, str]]:
    """While active, every Triton kernel Inductor generates passes through ``rewrite(inputs, source)``.

    Patches ``TritonKernel.codegen_kernel`` (torch 2.11 and 2.13 both generate a pointwise kernel's whole
    source there), restoring it on exit. Inductor's graph inputs are the tensors AOT lifted from the graph's
    attributes (``TracingContext.params_flat``) followed by ``example_inputs``; the yielded dict ends up
    mapping each one's data pointer to Inductor's name for it. Callers must also disable the FX graph cache,
    whose hits would skip code generation.
    """
    from torch._guards import TracingContext
    from torch._inductor.codegen.triton import TritonKernel
    from torch._inductor.virtualized import V

    original = TritonKernel.codegen_kernel
    names_by_pointer: dict[int, str] = {}
    inputs_now = list(example_inputs)

    def codegen_kernel(self: Any, *args: Any, **kwargs: Any) -> str:
        source: str = original(self, *args, **kwargs)
        if not names_by_pointer:
            context = TracingContext.try_get()
            lifted = list(getattr(context, "params_flat", None) or []) if context is not None else []
            names = list(V.graph.graph_input_names)
            tensors = lifted + inputs_now
            if len(tensors) == len(names):
                for name, tensor in zip(names, tensors, strict=True):
                    if isinstance(tensor, torch.Tensor):
                        names_by_pointer.setdefault(tensor.data_ptr(), name)
        buffers = self.args.input_buffers

        def inputs(pointer: int) -> str | None:
            name = names_by_pointer.get(pointer)
            inner = buffers.get(name) if name is not None else None
            return inner if isinstance(inner, str) else None

        return rewrite(inputs, source)

    TritonKernel.codegen_kernel = codegen_kernel  # type: ignore[method-assign]
    try:
        yield names_by_pointer
    finally:
        TritonKernel.codegen_kernel = original  # type: ignore[method-assign]


@contextlib.contextmanager
def generated_modules() -> Iterator[list[str]]:
    """Collects the source of every Python module Inductor generates (wrappers embed their kernels' source)."""
    from torch._inductor.codecache import PyCodeCache

    sources: list[str] = []
    before = len(PyCodeCache.modules)
    try:
        yield sources
    finally:
        for module in PyCodeCache.modules[before:]:
            path = getattr(module, "__file__", None)
            if path:
                with open(path, encoding="utf-8") as file:
                    sources.append(file.read())



GraphBreakTally = dict[str, int]
"""How often Dynamo has met each graph break (or unsupported construct) in this process, by its message."""

# Dynamo's counters by message (torch/_dynamo/utils.py, ``counters``): ``Unsupported.add_to_stats`` counts every
# unsupported construct under "unimplemented", and a graph break again under "graph_break" (torch/_dynamo/exc.py,
# symbolic_convert.py; torch 2.11 and 2.13).
_GRAPH_BREAK_COUNTERS = ("unimplemented", "graph_break")
# ``torch._dynamo.graph_break()``: torch.optim puts one in ``_use_grad`` on purpose (pytorch#104053), around every
# step; never the reason a step was not handed over.
_DELIBERATE_GRAPH_BREAK = "Call to `torch._dynamo.graph_break()`"


def graph_break_tally() -> GraphBreakTally:
    """A copy of Dynamo's process-wide graph-break counts now (read only), for :func:`graph_breaks_since`."""
    from torch._dynamo.utils import counters

    return {f"{kind}\0{message}": count for kind in _GRAPH_BREAK_COUNTERS
            for message, count in counters.get(kind, {}).items()}


def graph_breaks_since(before: GraphBreakTally) -> list[str]:
    """The first line of each graph break Dynamo met since ``before`` was taken (distinct, in the order Dynamo
    counted them), leaving out deliberate ``torch._dynamo.graph_break()`` calls: e.g. "Unsupported Tensor.item() call
    with capture_scalar_outputs=False" (Adafactor's ``step_t.item()``, torch 2.13)."""
    lines: dict[str, None] = {}
    for key, count in graph_break_tally().items():
        if count <= before.get(key, 0):
            continue
        message = key.split("\0", 1)[1].strip()
        first = message.splitlines()[0].strip() if message else ""
        if first and not first.startswith(_DELIBERATE_GRAPH_BREAK):
            lines[first] = None
    return list(lines)


# DTensor and FSDP2 (``fully_shard``) internals, read by optcapture.dtensors.


def dtensor_class() -> type | None:
    """``torch.distributed.tensor.DTensor``, or None on a build without distributed support."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    cls: type = DTensor
    return cls


def local_tensor(tensor: torch.Tensor) -> torch.Tensor | None:
    """The local shard of a DTensor (its ``_local_tensor``: the one object the DTensor keeps, where ``to_local()``
    makes a new wrapper at each call), or None for any other tensor."""
    cls = dtensor_class()
    if cls is None or not isinstance(tensor, cls):
        return None
    local: torch.Tensor = tensor._local_tensor  # type: ignore[attr-defined]
    return local


def dtensor_layout(tensor: torch.Tensor) -> tuple[Any, tuple[str, ...]]:
    """(device mesh, each placement named ``shard(dim)``, ``replicate`` or ``partial``) of a DTensor."""
    names = []
    for placement in tensor.placements:  # type: ignore[attr-defined]
        if placement.is_shard():
            names.append(f"shard({placement.dim})")
        elif placement.is_replicate():
            names.append("replicate")
        else:
            names.append("partial" if placement.is_partial() else type(placement).__name__)
    return tensor.device_mesh, tuple(names)  # type: ignore[attr-defined]


def fsdp_sharded_params() -> dict[int, Any]:
    """``id(sharded param) -> FSDPParam`` of every param FSDP2's ``fully_shard`` manages in this process, found
    through the states ``torch.distributed._composable_state`` maps modules to (torch/distributed/fsdp/_fully_shard/
    _fsdp_state.py: ``_fsdp_param_groups``, a single ``_fsdp_param_group`` on older torch)."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:
        return {}
    found: dict[int, Any] = {}
    for state_ref in list(_module_state_mapping.values()):
        state = state_ref()
        if not isinstance(state, FSDPState):
            continue
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            single = state.__dict__.get("_fsdp_param_group")
            groups = [single] if single is not None else []
        for group in groups:
            for fsdp_param in group.fsdp_params:
                found[id(fsdp_param.sharded_param)] = fsdp_param
    return found


@dataclasses.dataclass(frozen=True)
class FsdpShard:
    """What FSDP2 keeps of one param's shard besides the DTensor (torch/distributed/fsdp/_fully_shard/
    _fsdp_param.py): ``_sharded_param_data``, the 1-D padded shard each forward all-gathers, whose first elements
    the DTensor's local tensor views."""

    fsdp_param: Any
    padded_numel: int
    pinned: bool  # CPU offload with pinned memory: FSDP2 re-pins (copies) a shard that is not pinned

    @property
    def padded_data(self) -> torch.Tensor:
        data: torch.Tensor = self.fsdp_param._sharded_param_data
        return data

    def all_gather_from(self, padded: torch.Tensor) -> None:
        """Make FSDP2 all-gather from ``padded`` (1-D, ``padded_numel`` elements)."""
        self.fsdp_param._sharded_param_data = padded


def fsdp_shard(fsdp_param: Any) -> FsdpShard | None:
    """The shard FSDP2 keeps of ``fsdp_param``, or None when FSDP2 keeps it in a form optcapture does not know."""
    data = getattr(fsdp_param, "_sharded_param_data", None)
    size = getattr(fsdp_param, "padded_sharded_param_size", None)
    if not isinstance(data, torch.Tensor) or type(data) is not torch.Tensor or size is None:
        return None
    return FsdpShard(fsdp_param, data.numel(), bool(getattr(fsdp_param, "pin_memory", False)))


LOCAL_TENSOR: Callable[[torch.Tensor], torch.Tensor] = operator.attrgetter("_local_tensor")
"""A DTensor's local tensor, read in C (a step maps it over every DTensor it checks)."""



def realize_in_own_buffer(node: torch.fx.Node) -> None:
    """Make Inductor store ``node``'s value in a buffer of its own instead of inlining its computation into each
    reader: ``GraphLowering.run_node`` realizes a node whose meta has ``inductor_realize_to_strides`` (set by
    Inductor's own ``decompose_mem_bound_mm`` pass; torch 2.11 and 2.13), then restores the node's strides."""
    node.meta["inductor_realize_to_strides"] = True


def post_grad_pass(graph_pass: Callable[[torch.fx.Graph], None], source_file: str) -> Any:
    """``graph_pass`` as an Inductor ``post_grad_custom_post_pass``: a ``CustomGraphPass`` whose uuid hashes
    ``source_file`` (the module that defines the pass), so that Inductor's FX graph cache keys on it instead of
    bypassing the cache."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class SourcedPass(CustomGraphPass):  # type: ignore[misc]
        def __call__(self, graph: torch.fx.Graph) -> None:
            graph_pass(graph)

        def uuid(self) -> Any:
            return get_hash_for_files((source_file, __file__))

    return SourcedPass()


def custom_post_grad_pass() -> Any:
    """The ``post_grad_custom_post_pass`` set in Inductor's configuration now (None: none)."""
    from torch._inductor import config

    return config.post_grad_custom_post_pass
