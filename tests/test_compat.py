"""The version-specific helpers of optcapture._compat on the installed torch."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from helpers import frame_reads_storage_offsets

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


def test_a_float_marked_as_input_is_one_from_the_restarted_trace_on() -> None:
    inputs_per_trace: list[list[str]] = []
    marked: list[list[str]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[object]) -> object:
        inputs_per_trace.append([n.name for n in gm.graph.nodes if n.op == "placeholder"])
        marked.append(_compat.mark_floats_as_inputs(lambda name: name.endswith("['scale']")))
        if marked[-1]:
            raise _compat.restart_request()
        return gm.forward

    config = {"scale": 2.0, "shift": 1.0}

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x * config["scale"] + config["shift"]

    compiled = torch.compile(fn, backend=backend)
    x = torch.ones(3)
    assert torch.equal(compiled(x), torch.full((3,), 3.0))
    assert len(inputs_per_trace) == 2, "traced once more after the restart"
    assert len(inputs_per_trace[0]) == 1 and len(inputs_per_trace[1]) == 2, inputs_per_trace
    assert [len(names) for names in marked] == [1, 0] and marked[0][0].endswith("['config']['scale']"), marked
    config["scale"] = 5.0
    assert torch.equal(compiled(x), torch.full((3,), 6.0))
    assert len(inputs_per_trace) == 2, "a new scale recompiled"
    config["shift"] = 0.0  # specialized: recompiles, as Dynamo does for any float it has not seen change
    assert torch.equal(compiled(x), torch.full((3,), 5.0))
    assert len(inputs_per_trace) == 3


def test_a_float_input_specialized_again_is_a_constant_from_the_restarted_trace_on() -> None:
    inputs_per_trace: list[list[str]] = []
    specialized: list[list[str]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[object]) -> object:
        inputs_per_trace.append([n.name for n in gm.graph.nodes if n.op == "placeholder"])
        specialized.append(_compat.specialize_float_inputs(gm, lambda name: name.endswith("['scale']")))
        if specialized[-1]:
            raise _compat.restart_request()
        return gm.forward

    config = {"scale": 2.0}

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x * config["scale"]

    compiled = torch.compile(fn, backend=backend)
    x = torch.ones(3)
    assert torch.equal(compiled(x), torch.full((3,), 2.0))
    config["scale"] = 3.0  # Dynamo makes it an input (automatic dynamic); the backend has it specialized again
    assert torch.equal(compiled(x), torch.full((3,), 3.0))
    assert [len(names) for names in inputs_per_trace] == [1, 2, 1], inputs_per_trace
    assert [len(names) for names in specialized] == [0, 1, 0] and specialized[1][0].endswith("['scale']"), specialized
    config["scale"] = 4.0  # a constant again, guarded: a new value compiles again
    assert torch.equal(compiled(x), torch.full((3,), 4.0))
    assert len(inputs_per_trace) == 4


def test_a_python_float_inductor_specializes_is_never_served_from_a_cache_at_another_value() -> None:
    # pytorch#194976: Inductor specializes ``alpha=`` under a ShapeEnv guard only, so its caches returned the
    # first value's artifact to every later compile of the same graph.
    reads = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[object]) -> object:
        reads.append(_compat.reads_python_floats(gm))
        return _compat.compile_with_inductor(gm, list(example_inputs), {})

    config = {"m": 0.9}

    def fn(g: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        buf.mul_(config["m"])
        return g.add(buf, alpha=config["m"])

    compiled = torch.compile(fn, backend=backend)
    for m in (0.9, 0.8, 0.7, 0.6):
        config["m"] = m
        g, buf = torch.ones(4), torch.ones(4)
        torch.testing.assert_close(compiled(g, buf.clone()), g + m * (buf * m))
    assert reads[0] is False and any(reads), reads


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


def test_frame_side_effects_are_read_from_the_tracer() -> None:
    seen: list[bool] = []
    box: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        seen.append(_compat.frame_has_no_side_effects(_compat.current_tracer()))
        return gm.forward

    # Frames shaped like a shadow step: in-place updates, nothing returned.
    def pure(x: torch.Tensor) -> None:
        x.add_(1)

    def appends(x: torch.Tensor) -> None:
        box.append(1)
        x.add_(1)

    torch.compile(pure, backend=backend)(torch.ones(2))
    torch.compile(appends, backend=backend)(torch.ones(2))
    assert seen == [True, False]
    assert _compat.frame_has_no_side_effects(None) is False



def test_dict_entry_stores_name_what_each_changed_entry_now_holds() -> None:
    entries = {"m": torch.zeros(3), "v": torch.zeros(3), "kept": torch.zeros(3), "moved": torch.zeros(3)}
    seen: list[list[tuple[int, object, str | None, str | None]]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        stores = _compat.dict_entry_stores(_compat.current_tracer())
        seen.append(sorted(((i, key, node.name if node is not None else None, source)
                            for i, key, node, source in stores), key=lambda s: str(s[1])))
        return gm.forward

    def step(state: dict[str, torch.Tensor], x: torch.Tensor) -> None:
        state["m"] = state["m"] * 0.9 + x
        state["v"].add_(x)
        state["moved"] = state["v"]
        state["count"] = 3  # type: ignore[assignment]

    torch.compile(step, backend=backend)(entries, torch.ones(3))
    (stores,) = seen
    assert [(key, node is not None, source) for _, key, node, source in stores] == [
        ("count", False, None), ("m", True, None), ("moved", False, "L['state']['v']")]
    assert {object_id for object_id, *_ in stores} == {id(entries)}
    assert _compat.dict_entry_stores(None) == []


def test_is_alias_of_on_fake_tensors() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        base = torch.empty(4, 3)
        view, other = base.t(), base * 2
    assert _compat.is_alias_of(view, base) and not _compat.is_alias_of(other, base)

def test_begin_compiled_call_starts_a_cudagraph_generation() -> None:
    # What CUDA graph trees read to tell one compiled call from the next.
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager

    before = CUDAGraphTreeManager.get_curr_generation()
    _compat.begin_compiled_call()
    assert CUDAGraphTreeManager.get_curr_generation() == before + 1


def test_compile_errors_cover_what_a_failed_compile_raises() -> None:
    errors = _compat.compile_errors()
    assert issubclass(torch._dynamo.exc.FailOnRecompileLimitHit, errors)
    assert issubclass(torch._dynamo.exc.Unsupported, errors)
    assert issubclass(torch._dynamo.exc.BackendCompilerFailed, errors)
    assert not isinstance(RuntimeError("a kernel failed"), errors)


def test_restart_errors_cover_dynamos_restart_of_its_analysis() -> None:
    from torch._dynamo import exc

    assert issubclass(exc.TensorifyScalarRestartAnalysis, _compat.restart_errors())
    assert not issubclass(exc.BackendCompilerFailed, _compat.restart_errors())
    assert not issubclass(RuntimeError, _compat.restart_errors())


def test_through_dynamo_keeps_the_type_and_message_past_dynamos_wrapping() -> None:
    from optcapture.errors import UnsupportedStepError

    def backend(gm: torch.fx.GraphModule, example_inputs: list[object]) -> object:
        raise _compat.through_dynamo(UnsupportedStepError("named reason"))

    def wrapped_backend(gm: torch.fx.GraphModule, example_inputs: list[object]) -> object:
        raise UnsupportedStepError("named reason")

    x = torch.ones(3)
    with pytest.raises(UnsupportedStepError, match="named reason") as passed:
        torch.compile(lambda t: t * 2, backend=backend)(x)
    assert str(passed.value) == "named reason"  # without the advice Dynamo appends on the way out
    torch._dynamo.reset()
    with pytest.raises(Exception) as wrapped:  # what it guards against
        torch.compile(lambda t: t * 3, backend=wrapped_backend)(x)
    assert not isinstance(wrapped.value, UnsupportedStepError) and "named reason" in str(wrapped.value)


def test_an_error_out_of_cuda_graph_recording_is_told_from_any_other() -> None:
    from torch._inductor.cudagraph_trees import CUDAGraphNode

    class Unrecordable:
        graph = None  # CUDAGraphNode._record asserts it has a graph before it captures anything

    with pytest.raises(AssertionError) as recording:
        CUDAGraphNode._record(Unrecordable(), lambda inputs: None, [])  # type: ignore[arg-type]
    assert _compat.raised_while_recording_cuda_graph(recording.value)
    with pytest.raises(AssertionError) as elsewhere:
        raise AssertionError("not while recording")
    assert not _compat.raised_while_recording_cuda_graph(elsewhere.value)
    assert not _compat.raised_while_recording_cuda_graph(RuntimeError("never raised, no traceback"))


def test_a_backend_asking_to_skip_the_frame_gets_it_run_as_plain_python() -> None:
    calls = []

    def skipping(gm: torch.fx.GraphModule, example_inputs: list[object]) -> object:
        calls.append(_compat.frame_compiles())
        raise _compat.skip_frame_request("test: run me uncompiled")

    def f(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1

    assert torch.equal(torch.compile(f, backend=skipping)(torch.ones(3)), torch.full((3,), 3.0))
    (first,) = calls
    assert first is not None and first[0] == 0 and first[1] >= 1  # the first compile of the frame, and the limit
    assert _compat.frame_compiles() is None  # outside a compile


def test_rewrap_scheduler_step_points_the_schedulers_wrapper_at_the_class() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    assert not _compat.rewrap_scheduler_step(opt)  # no scheduler yet
    torch.optim.lr_scheduler.StepLR(opt, 1)
    seen = []

    class Marked(torch.optim.SGD):
        def step(self, closure: object = None) -> None:  # type: ignore[override]
            seen.append(self)

    opt.__class__ = Marked
    assert _compat.rewrap_scheduler_step(opt)
    opt._opt_called = False  # type: ignore[attr-defined]
    opt.step()
    assert seen == [opt] and opt._opt_called is True  # type: ignore[attr-defined]


def test_frame_compile_began_is_when_dynamo_began_compiling_the_frame() -> None:
    assert _compat.frame_compile_began() is None
    seen: list[tuple[float | None, float]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        seen.append((_compat.frame_compile_began(), time.perf_counter()))
        return gm.forward

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    called = time.perf_counter()
    torch.compile(fn, backend=backend)(torch.ones(2))
    ((began, handed_over),) = seen
    assert began is not None and called <= began <= handed_over, (called, began, handed_over)
    assert _compat.frame_compile_began() is None


def test_graph_breaks_since_names_each_new_graph_break_but_deliberate_ones() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        for _ in range(2):
            x = x + x.sum().item()  # a graph break in a loop: Dynamo gives the frame up
        return x

    before = _compat.graph_break_tally()
    out = torch.compile(fn, backend="eager")(torch.ones(2))
    assert out.tolist() == [9.0, 9.0]
    breaks = _compat.graph_breaks_since(before)
    assert any("item()" in line for line in breaks), breaks
    assert not any("graph_break()" in line for line in breaks), breaks
    assert all("\n" not in line for line in breaks)
    assert _compat.graph_breaks_since(_compat.graph_break_tally()) == []  # nothing new since now: none is named


def test_the_graph_break_a_graph_ends_at_and_the_function_resumed_after_it_are_read_at_compile_time() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        if y.sum().item() > 0:  # a graph break: Dynamo compiles the rest as a function of its own
            y = y + 1
        return y

    seen: list[tuple[str, str | None, _compat.Resumption | None]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        tracer = _compat.current_tracer()
        seen.append((tracer.f_code.co_name, _compat.graph_break_ending(tracer),
                     _compat.resumed_after_graph_break(tracer)))
        return gm.forward

    torch._dynamo.reset()
    assert torch.compile(fn, backend=backend)(torch.ones(2)).tolist() == [3.0, 3.0]
    (first, ending, resumed), *rest = seen
    assert first == "fn" and ending is not None and "item()" in ending and "\n" not in ending and resumed is None
    resumptions = [r for _, e, r in rest if r is not None]
    assert resumptions and resumptions[0].function == "fn", seen
    assert resumptions[0].line == fn.__code__.co_firstlineno + 2, seen  # the line of the break
    assert all(e is None for _, e, r in rest if r is not None), seen  # it ends with the frame


def test_torch_compile_enters_no_context_of_a_backend() -> None:
    # Why optcapture cannot see a call of `torch.compile(opt.step, backend="optcapture")` in which Dynamo hands it
    # no graph (README, "What it does": fused=True, Adafactor's .item()): Dynamo enters a backend's
    # `backend_ctx_ctor` around every call only through torch._dynamo.optimize; torch.compile wraps any backend in
    # `_TorchCompileWrapper` (torch/__init__.py), which does not carry it. If this fails, optcapture can use it.
    entered: list[str] = []

    @contextlib.contextmanager
    def around_each_call() -> Iterator[None]:
        entered.append("call")
        yield

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        return gm.forward

    backend.backend_ctx_ctor = around_each_call  # type: ignore[attr-defined]
    torch._dynamo.optimize(backend)(lambda x: x + 1)(torch.ones(2))
    assert entered == ["call"]
    torch._dynamo.reset()
    torch.compile(lambda x: x + 1, backend=backend)(torch.ones(2))
    assert entered == ["call"]


def test_dtensor_and_fsdp2_internals(tmp_path: Any) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    plain = torch.ones(3)
    assert _compat.local_tensor(plain) is None
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = distribute_tensor(torch.arange(6.0).view(3, 2), mesh, [Shard(0)])
        local = _compat.local_tensor(sharded)
        assert type(local) is torch.Tensor and local is _compat.local_tensor(sharded)  # the object, not a new wrapper
        assert _compat.LOCAL_TENSOR(sharded) is local and torch.equal(local, torch.arange(6.0).view(3, 2))
        assert _compat.dtensor_layout(sharded) == (mesh, ("shard(0)",))
        assert _compat.dtensor_layout(distribute_tensor(plain, mesh, [Replicate()]))[1] == ("replicate",)

        layer = torch.nn.Linear(2, 3)
        fully_shard(layer)
        managed = _compat.fsdp_sharded_params()
        assert {id(layer.weight), id(layer.bias)} <= set(managed)
        shard = _compat.fsdp_shard(managed[id(layer.weight)])
        assert shard is not None and shard.padded_numel == 6 and not shard.pinned
        assert shard.padded_data.data_ptr() == _compat.LOCAL_TENSOR(layer.weight).data_ptr()
        replacement = torch.zeros(6)
        shard.all_gather_from(replacement)
        assert shard.padded_data is replacement
    finally:
        dist.destroy_process_group()


def test_a_post_grad_pass_sees_the_graph_and_a_realized_scalar_gets_a_buffer_of_its_own() -> None:
    def fn(x: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return x * (1 - b**s).sqrt()

    def mark(graph: torch.fx.Graph) -> None:
        (root,) = [n for n in graph.nodes if n.target == torch.ops.aten.sqrt.default]
        _compat.realize_in_own_buffer(root)

    def scalar_buffers(patches: dict[str, object]) -> list[str]:
        torch._dynamo.reset()
        with torch._inductor.config.patch(fx_graph_cache=False), _compat.generated_modules() as sources:
            compiled = torch.compile(fn, backend="inductor", options=patches)
            result = compiled(torch.ones(64), torch.tensor(3.0), torch.tensor(0.9))
        torch.testing.assert_close(result, torch.ones(64) * math.sqrt(1 - 0.9**3))
        return [line for source in sources for line in source.split("\n") if "empty_strided_cpu((), ()" in line]

    assert _compat.custom_post_grad_pass() is None
    assert scalar_buffers({}) == []  # Inductor inlines the scalar into the element loop
    assert len(scalar_buffers({"post_grad_custom_post_pass": _compat.post_grad_pass(mark, __file__)})) == 1


def test_storage_holders_counts_the_tensors_that_hold_a_storage() -> None:
    alone = torch.randn(4, 4)
    assert _compat.storage_holders(alone) == 1
    alias = alone.detach()
    assert _compat.storage_holders(alone) == 2
    storage = alone.untyped_storage()  # a storage object held is no tensor
    assert _compat.storage_holders(alone) == 2
    del alias, storage
    assert _compat.storage_holders(alone) == 1
    bucket = torch.zeros(16)
    param = torch.nn.Parameter(torch.empty(4, 4))
    param.data = bucket.view(4, 4)
    assert _compat.storage_holders(param) == 2

def test_a_graph_of_dtensors_is_compiled_without_aotautogradcache_and_a_plain_one_with_it(tmp_path: Any) -> None:
    # AOTAutograd's cache key hashes a DTensor by its spec, not its local shard: ranks whose shards differ in shape
    # (an uneven Shard(0)) load one another's artifacts from the shared cache folder (pytorch#188390). Plain graphs
    # keep the cache (the counters say whether AOTAutograd looked it up: a hit, a miss or a save).
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from optcapture._compat import inductor

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")

    def looked_up() -> int:
        tally = torch._dynamo.utils.counters["aot_autograd"]
        return sum(tally[k] for k in ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_saved"))

    def compiled(inputs: list[torch.Tensor]) -> int:
        torch._dynamo.reset()
        before = looked_up()
        torch.compile(lambda x: x * 2.0 + 1.0, backend=lambda gm, args: inductor.compile_with_inductor(gm, args, {}),
                      fullgraph=True)(*inputs)
        return looked_up() - before

    with torch._functorch.config.patch(enable_autograd_cache=True):
        assert compiled([torch.randn(3, 2)]) > 0
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
        try:
            mesh = init_device_mesh("cpu", (1,))
            assert compiled([distribute_tensor(torch.randn(3, 2), mesh, [Shard(0)])]) == 0
        finally:
            dist.destroy_process_group()


def test_dtensor_metadata_guards_answer_by_identity_first_and_still_fail_on_another_layout(tmp_path: Any) -> None:
    import copy

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh
    from torch.distributed.tensor._dtensor_spec import DTensorSpec

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    compiles: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        compiles.append(_compat.identity_first_guards(_compat.current_tracer()))
        return gm.forward

    compared = 0
    check_equals, spec_eq = DTensorSpec._check_equals, DTensorSpec.__eq__

    def counted_check(self: Any, *args: Any, **kwargs: Any) -> bool:
        nonlocal compared
        compared += 1
        return bool(check_equals(self, *args, **kwargs))

    def counted_eq(self: Any, other: object) -> bool:
        nonlocal compared
        compared += 1
        return bool(spec_eq(self, other))

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        first = distribute_tensor(torch.arange(6.0).view(3, 2), mesh, [Shard(0)])
        spec = first._spec
        # Reads the local tensor only: no DTensor op (whose dispatch compares specs) runs in the compiled code.
        compiled = torch.compile(lambda x: x.to_local() * 2.0, backend=backend)
        torch.testing.assert_close(compiled(first), torch.arange(6.0).view(3, 2) * 2)
        assert len(compiles) == 1 and compiles[0] >= 1
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(DTensorSpec, "_check_equals", counted_check)
            patch.setattr(DTensorSpec, "__eq__", counted_eq)
            # A new DTensor around the very spec object (as FSDP2 makes each grad): no comparison, no recompile.
            again = DTensor(torch.ones(3, 2), spec, requires_grad=False)
            torch.testing.assert_close(compiled(again), torch.full((3, 2), 2.0))
            assert compared == 0 and len(compiles) == 1
            # An equal spec that is another object: Dynamo's own comparison decides, and it still matches.
            equal = DTensor(torch.ones(3, 2), copy.deepcopy(spec), requires_grad=False)
            torch.testing.assert_close(compiled(equal), torch.full((3, 2), 2.0))
            assert compared > 0 and len(compiles) == 1
        # Another layout fails the guard as before: the frame is compiled again.
        replicated = distribute_tensor(torch.ones(3, 2), mesh, [Replicate()])
        torch.testing.assert_close(compiled(replicated), torch.full((3, 2), 2.0))
        assert len(compiles) == 2
    finally:
        dist.destroy_process_group()


def test_view_grads_stand_in_with_their_params_view_structure_while_dynamo_traces(tmp_path: Any) -> None:
    # FSDP2's local grads view its reduce-scatter output, DDP's bucket views its buckets: Dynamo fakes such a grad
    # with every size and offset symbolic (meta_utils._grad_context_compatible), and the step's frame then reads each
    # grad's storage offset at every call. Standing in with the param's view structure, the grads trace static.
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")

    def step(params: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-0.1)

    def compiled_reads_offsets(params: list[torch.Tensor], stand_in: bool) -> tuple[bool, int]:
        torch._dynamo.reset()
        run = torch.compile(step, backend="eager")
        grads = [p.grad for p in params]
        locals_before = [_compat.local_tensor(g) for g in grads]
        with (_compat.grads_shaped_like_their_params(params) if stand_in else contextlib.nullcontext(0)) as count:
            run(params)
        assert [p.grad for p in params] == grads and [_compat.local_tensor(g) for g in grads] == locals_before
        return frame_reads_storage_offsets(step), count

    # Plain params whose grads view one bucket (DDP's gradient_as_bucket_view=True).
    bucket = torch.arange(10.0)
    params = [torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(4))]
    params[0].grad, params[1].grad = bucket[:6].view(2, 3), bucket[6:]
    assert compiled_reads_offsets(params, stand_in=False) == (True, 0)
    with _compat.grads_shaped_like_their_params(params) as count:
        stand_in = params[0].grad
        assert count == 2 and stand_in is not None and not stand_in._is_view()
        assert (stand_in.data_ptr(), stand_in.shape, stand_in.stride()) == (bucket.data_ptr(), (2, 3), (3, 1))
    assert compiled_reads_offsets(params, stand_in=True) == (False, 2)
    torch.testing.assert_close(params[1], torch.ones(4) - 0.2 * bucket[6:])  # stepped twice, through both
    with _compat.grads_shaped_like_their_params(params):
        params[0].grad = None  # a step that frees its grads keeps them freed
    assert params[0].grad is None and params[1].grad is not None and params[1].grad._base is bucket

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        model(torch.ones(5, 4)).sum().backward()
        sharded = list(model.parameters())
        views = [_compat.local_tensor(p.grad) for p in sharded]  # type: ignore[arg-type]
        assert all(v is not None and v._is_view() for v in views)
        assert compiled_reads_offsets(sharded, stand_in=False) == (True, 0)
        assert compiled_reads_offsets(sharded, stand_in=True) == (False, 4)
    finally:
        dist.destroy_process_group()
