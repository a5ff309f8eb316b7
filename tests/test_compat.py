"""The version-specific helpers of optcapture._compat on the installed torch."""

from __future__ import annotations

import torch

from optcapture import _compat


def test_version_floor() -> None:
    assert _compat.TORCH_VERSION >= _compat.MIN_TORCH
    _compat.check_torch_version()


def test_no_tracer_outside_dynamo() -> None:
    assert _compat.current_tracer() is None


def test_tracer_sources_and_guard_drop_inside_a_backend() -> None:
    seen: dict[str, object] = {}

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        tracer = _compat.current_tracer()
        seen["sources"] = [_compat.placeholder_source(n) for n in gm.graph.nodes if n.op == "placeholder"]
        seen["dropped"] = _compat.drop_guards(tracer, lambda name: name.endswith("['scale']"))
        return gm.forward

    config = {"scale": 2.0}

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x * config["scale"]

    compiled = torch.compile(fn, backend=backend)
    x = torch.ones(3)
    assert torch.equal(compiled(x), torch.full((3,), 2.0))
    assert seen["sources"] == ["L['x']"]
    dropped = seen["dropped"]
    assert isinstance(dropped, list) and len(dropped) == 1 and dropped[0].endswith("['config']['scale']"), dropped
    config["scale"] = 5.0
    # The guard on the value was dropped: no recompile, the traced constant stays.
    assert torch.equal(compiled(x), torch.full((3,), 2.0))


def test_kernel_counter_is_an_int() -> None:
    assert isinstance(_compat.generated_kernel_count(), int)


def test_generated_modules_collects_the_wrapper_inductor_writes() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return x.sin() + 1

    with torch._inductor.config.patch(fx_graph_cache=False), _compat.generated_modules() as sources:
        torch.compile(fn, backend="inductor")(torch.ones(8))
    assert any("def call(" in source for source in sources), [s[:80] for s in sources]


def test_rewriting_triton_kernels_patches_codegen_only_while_active() -> None:
    from torch._inductor.codegen.triton import TritonKernel

    original = TritonKernel.codegen_kernel
    with _compat.rewriting_triton_kernels(lambda inputs, source: source, []) as names:
        assert TritonKernel.codegen_kernel is not original
        assert names == {}
    assert TritonKernel.codegen_kernel is original
