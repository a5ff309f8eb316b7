"""Every use of torch internals that differs between the torch versions optcapture supports (>= 2.11).

Invariant: no other module touches ``torch._dynamo`` / ``torch._inductor`` private names
directly; each helper here is covered by ``tests/test_compat.py`` on the installed torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
    """Inductor's ``compile_fx`` with config patches applied only for this compile."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=patches)
