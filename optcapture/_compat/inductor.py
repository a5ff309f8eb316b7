"""Inductor's, CUDA graph trees' and functorch's internals (see :mod:`optcapture._compat`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch


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

    A graph with tensor-subclass inputs (DTensors) is compiled without AOTAutograd's cache: its key hashes a DTensor
    by its spec (mesh, placements, global shape), not by its local shard, so the ranks of one job, which share the
    cache folder, hit one another's entries where their shards differ in shape (an uneven ``Shard(0)``: 3 rows on 2
    ranks), and the artifact fails its size assertions or runs on the wrong shape (pytorch#188390, #173526; torch
    2.11 and 2.13, stock ``torch.compile`` too). Inductor's own cache keys the plain graph AOTAutograd makes, with the
    local shapes, and stays on.
    """
    from torch._inductor.compile_fx import compile_fx

    floats = reads_python_floats(gm)
    if not floats and not any(map(_is_wrapper_subclass, example_inputs)):
        return compile_fx(gm, example_inputs, config_patches=patches)
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs,
                          config_patches={**patches, "fx_graph_cache": False} if floats else patches)


def _is_wrapper_subclass(value: Any) -> bool:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return isinstance(value, torch.Tensor) and is_traceable_wrapper_subclass(value)


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


def realize_in_own_buffer(node: torch.fx.Node) -> None:
    """Make Inductor store ``node``'s value in a buffer of its own instead of inlining its computation into each
    reader: ``GraphLowering.run_node`` realizes a node whose meta has ``inductor_realize_to_strides`` (set by
    Inductor's own ``decompose_mem_bound_mm`` pass; torch 2.11 and 2.13), then restores the node's strides."""
    node.meta["inductor_realize_to_strides"] = True


def post_grad_pass(graph_pass: Callable[[torch.fx.Graph], None], *source_files: str) -> Any:
    """``graph_pass`` as an Inductor ``post_grad_custom_post_pass``: a ``CustomGraphPass`` whose uuid hashes
    ``source_files`` (the modules that define the pass), so that Inductor's FX graph cache keys on them instead of
    bypassing the cache."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class SourcedPass(CustomGraphPass):  # type: ignore[misc]
        def __call__(self, graph: torch.fx.Graph) -> None:
            graph_pass(graph)

        def uuid(self) -> Any:
            return get_hash_for_files((*source_files, __file__))

    return SourcedPass()


def custom_post_grad_pass() -> Any:
    """The ``post_grad_custom_post_pass`` set in Inductor's configuration now (None: none)."""
    from torch._inductor import config

    return config.post_grad_custom_post_pass
