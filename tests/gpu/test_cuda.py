"""CUDA: parity, one CUDA graph recorded and replayed, no host sync, no grad copies, no recompiles."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import (
    assert_as_close_to_eager_as_stock,
    assert_matches_eager,
    make_pair,
    paths,
    run_backends,
    step_both,
    stock_variants,
    warmup_from_zero,
)
from torch.testing._internal.common_optimizers import _get_optim_inputs_including_global_cliquey_kwargs, optim_db

import optcapture
from optcapture import _compat

pytestmark = pytest.mark.gpu

ELEMENTWISE = ("Adadelta", "Adagrad", "Adam", "Adamax", "AdamW", "ASGD", "NAdam", "RAdam", "RMSprop", "Rprop", "SGD")
TOLERANCES = {"Adadelta": {"rtol": 5.5e-4, "atol": 5e-5}, "NAdam": {"rtol": 1.7e-5, "atol": 1.5e-5}}


def _cuda_cases(first_n: int | None) -> list[Any]:
    cases = []
    for info in optim_db:
        name = info.optim_cls.__name__
        if name not in ELEMENTWISE:
            continue
        inputs = _get_optim_inputs_including_global_cliquey_kwargs("cuda", torch.float32, info,
                                                                     skip=("differentiable", "fused"))
        for n, optim_input in enumerate(inputs):
            marks = [] if first_n is None or n < first_n else [pytest.mark.exhaustive]
            kwargs = dict(optim_input.kwargs)
            case_id = f"{name}-{n}-{optim_input.desc}-foreach{kwargs.get('foreach')}".replace(" ", "_")
            cases.append(pytest.param(info.optim_cls, kwargs, id=case_id, marks=marks))
    return cases


def _steady(pair: Any, first_seed: int, steps: int) -> None:
    for seed in range(first_seed, first_seed + steps):
        step_both(pair, seed)


@pytest.mark.parametrize(("optim_cls", "kwargs"), _cuda_cases(first_n=4))
def test_matches_eager_cuda(optim_cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
    _compat.reset_cudagraph_trees()
    name = optim_cls.__name__
    kwargs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    pair = make_pair(lambda params: optim_cls(params, **copy.deepcopy(kwargs)), device="cuda")
    _steady(pair, 0, 4)
    assert_matches_eager(pair, **TOLERANCES.get(name, {}))
    taken = paths(pair.optimizer)
    assert taken[-1] == "bucketed", taken
    assert taken.count("bucketed") == 1, f"recompiled: {taken}"
    if _compat.cudagraphs_recorded() != 1:
        pytest.fail(f"{_compat.cudagraphs_recorded()} CUDA graphs recorded, expected 1")


def _adamw_pair(**options: Any) -> Any:
    return make_pair(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), device="cuda", options=options)


def test_one_graph_recorded_and_replayed() -> None:
    _compat.reset_cudagraph_trees()
    pair = _adamw_pair()
    _steady(pair, 0, 6)
    assert _compat.cudagraphs_recorded() == 1
    assert optcapture.stats()["steps"] == 6
    assert_matches_eager(pair)


def _kernels_in_one_step(step: Any) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def test_no_grad_copy_and_no_host_sync_in_steady_state() -> None:
    _compat.reset_cudagraph_trees()
    pair = _adamw_pair()
    _steady(pair, 0, 3)  # warm-up, record
    grads_copied = optcapture.stats()["grads_copied"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # grads stay where they are (in their flat slots) between these steps
            pair.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert optcapture.stats()["grads_copied"] == grads_copied
    # A steady step launches the bucket's Triton kernels and nothing else: no grad copy
    # (multi_tensor_apply / Memcpy), no per-tensor kernels. Inductor names a fused update after its ops,
    # including the in-place write-backs ("copy_"), so kernels are matched by origin, not by name.
    kernels = _kernels_in_one_step(pair.step)
    assert len(kernels) == 3 and all(k.startswith("triton_") for k in kernels), kernels


def test_fresh_grads_are_read_in_place_with_no_copy_and_no_host_sync() -> None:
    # zero_grad() (set_to_none=True) + backward: autograd allocates new grads every step. The bucket kernel
    # reads them through its grad table: no grad copy kernel, no host sync, one CUDA graph.
    _compat.reset_cudagraph_trees()
    pair = _adamw_pair()
    for seed in range(4):
        step_both(pair, seed)
    assert optcapture.explain(pair.optimizer)[-1].grads == "in place"
    fresh = [[torch.randn_like(p) for p in pair.model.parameters()] for _ in range(4)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for grads in fresh[:3]:
            for p, grad in zip(pair.model.parameters(), grads, strict=True):
                p.grad = grad.clone()
            pair.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert optcapture.stats()["grads_copied"] == 0
    for p, grad in zip(pair.model.parameters(), fresh[3], strict=True):
        p.grad = grad.clone()
    kernels = _kernels_in_one_step(pair.step)
    copies = [k for k in kernels if not k.startswith("triton_")]
    assert all("HtoD" in k or "DtoD" in k for k in copies), kernels  # at most the table's few bytes
    assert sum(k.startswith("triton_") for k in kernels) == 3, kernels
    assert _compat.cudagraphs_recorded() == 1
    for grads in fresh:  # eager takes the same four steps
        for p, grad in zip(pair.eager_model.parameters(), grads, strict=True):
            p.grad = grad.clone()
        pair.eager.step()
    for seed in range(4, 6):
        step_both(pair, seed)
    assert_matches_eager(pair)


def test_grads_in_place_false_copies_each_fresh_grad_once() -> None:
    _compat.reset_cudagraph_trees()
    pair = _adamw_pair(grads_in_place=False)
    for seed in range(4):
        step_both(pair, seed)
    assert optcapture.explain(pair.optimizer)[-1].grads == "copied"
    assert optcapture.stats()["grads_copied"] == 4 * 4
    assert_matches_eager(pair)


def test_a_channels_last_model_reads_its_grads_in_place_and_steps_like_eager_cuda() -> None:
    # Autograd gives each conv weight a grad of its param's channels_last strides: the bucket kernel reads it in the
    # slot's element order through the grad table. A grad of another order (a user's contiguous one) is copied.
    _compat.reset_cudagraph_trees()
    torch.manual_seed(0)
    # A 1 x 1 conv too: its weight is contiguous in either format, its grad's strides may differ on dims of size 1.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.Tanh(), torch.nn.Conv2d(16, 16, 1),
                                torch.nn.Conv2d(16, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 4))
    model = model.cuda().to(memory_format=torch.channels_last)
    pair = make_pair(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), device="cuda", model=model)
    generator = torch.Generator("cuda").manual_seed(0)
    for _ in range(6):
        data = torch.randn(4, 3, 8, 8, device="cuda", generator=generator).contiguous(
            memory_format=torch.channels_last)
        for net, step in ((pair.eager_model, pair.eager.step), (pair.model, pair.step)):
            net.zero_grad()
            net(data).square().sum().backward()
            step()
    assert not pair.model[0].weight.grad.is_contiguous()
    assert_matches_eager(pair)
    report = optcapture.explain(pair.optimizer)[-1]
    assert report.path == "bucketed" and report.grads == "in place", report
    assert paths(pair.optimizer).count("bucketed") == 1, paths(pair.optimizer)
    assert optcapture.stats()["grads_copied"] == 0
    assert _compat.cudagraphs_recorded() == 1
    for seed in range(6, 8):
        step_both(pair, seed)  # contiguous grads for channels_last params
    assert_matches_eager(pair)


def _mlp(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda().to(dtype)


@pytest.mark.parametrize("name", ["AdamW", "SGD", "RMSprop", "Adagrad"])
def test_training_loop_with_default_zero_grad_matches_eager(name: str) -> None:
    _compat.reset_cudagraph_trees()
    kwargs: dict[str, Any] = {"lr": 1e-2}
    if name in ("SGD", "RMSprop"):
        kwargs["momentum"] = 0.9
    models = [_mlp(), _mlp()]
    opts = [getattr(torch.optim, name)(m.parameters(), **kwargs) for m in models]
    step = torch.compile(opts[1].step, backend="optcapture")
    data = torch.randn(16, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for i in range(6):
        # Autograd allocates every grad anew (zero_grad() sets them to None), as in any training loop. The
        # loss is linear in the params, so both sides get the same grads and rounding cannot feed back.
        generator = torch.Generator("cuda").manual_seed(i)
        weights = [torch.randn(p.shape, device="cuda", generator=generator) for p in models[0].parameters()]
        for model, opt, run in zip(models, opts, (opts[0].step, step), strict=True):
            opt.zero_grad()
            loss = (model(data) * 0).sum() + sum((p * w).sum() for p, w in zip(model.parameters(), weights,
                                                                               strict=True))
            loss.backward()
            run()
    torch.testing.assert_close(list(models[1].parameters()), list(models[0].parameters()))
    for p0, p1 in zip(models[0].parameters(), models[1].parameters(), strict=True):
        for key, value in opts[0].state[p0].items():
            torch.testing.assert_close(opts[1].state[p1][key].to(value.device), value)
    assert optcapture.explain(opts[1])[-1].grads == "in place"
    assert optcapture.stats()["grads_copied"] == 0
    assert _compat.cudagraphs_recorded() == 1


def test_a_whole_training_step_compiled_with_the_backend_captures_its_step_cuda() -> None:
    # Forward, backward, step and zero_grad in one compiled function: the forward goes to Inductor (no CUDA
    # graph: stock torch.compile's default), the step is captured and reads autograd's fresh grads in place.
    _compat.reset_cudagraph_trees()
    models = [_mlp(), _mlp()]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    data = torch.randn(16, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, weights: list[torch.Tensor]) -> None:
        # Linear in the params: both sides get the same grads, so rounding of the forward cannot feed back.
        loss = (model(data) * 0).sum() + sum((p * w).sum() for p, w in zip(model.parameters(), weights, strict=True))
        loss.backward()
        opt.step()
        opt.zero_grad()

    compiled = torch.compile(train_step, backend="optcapture", options={"fallback": "raise"})
    for i in range(6):
        generator = torch.Generator("cuda").manual_seed(i)
        weights = [torch.randn(p.shape, device="cuda", generator=generator) for p in models[0].parameters()]
        train_step(models[0], opts[0], weights)
        compiled(models[1], opts[1], weights)
    torch.testing.assert_close(list(models[1].parameters()), list(models[0].parameters()))
    for p0, p1 in zip(models[0].parameters(), models[1].parameters(), strict=True):
        for key, value in opts[0].state[p0].items():
            torch.testing.assert_close(opts[1].state[p1][key].to(value.device), value)
    assert paths(opts[1]) == ["bucketed"]
    assert optcapture.explain(opts[1])[-1].grads == "in place"
    assert optcapture.stats()["grads_copied"] == 0
    assert _compat.cudagraphs_recorded() == 1


def test_mixed_dtypes_and_grads_that_come_and_go_read_in_place() -> None:
    _compat.reset_cudagraph_trees()
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10)).cuda()
    model[1].to(torch.bfloat16)
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=1e-2), device="cuda", model=model)
    for seed in range(6):
        step_both(pair, seed, present=lambda i, seed=seed: i != 1 or seed % 3 != 0)
    assert_matches_eager(pair, atol=1e-2, rtol=1e-2)  # bf16 params: eager's own rounding, per element
    assert {r.grads for r in optcapture.explain(pair.optimizer) if r.path == "bucketed"} == {"in place"}
    assert optcapture.stats()["grads_copied"] == 0


def test_a_0_dim_param_is_bucketed_and_read_in_place_cuda() -> None:
    # A learned 0-dim scale (CLIP's logit_scale) once sent its whole bucket per tensor.
    _compat.reset_cudagraph_trees()
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10)).cuda()
    model.register_parameter("scale", torch.nn.Parameter(torch.tensor(2.0, device="cuda")))
    pair = make_pair(lambda p: torch.optim.AdamW(p, lr=1e-2), device="cuda", model=model)
    _steady(pair, 0, 5)
    assert paths(pair.optimizer) == ["bucketed"]
    assert optcapture.explain(pair.optimizer)[-1].grads == "in place"
    assert len(optcapture.explain(pair.optimizer)[-1].buckets) == 1
    assert _compat.cudagraphs_recorded() == 1
    assert_matches_eager(pair)


def test_grad_table_layout_and_binding() -> None:
    from optcapture import grad_tables, preparation
    from optcapture.discovery import BucketKey

    params = [torch.nn.Parameter(torch.zeros(n, device="cuda")) for n in (100, 64, 5)]
    opt = torch.optim.SGD(params, lr=0.1)
    flat = preparation._build_flat_group(opt, BucketKey(0, params[0].device, torch.float32), 64)
    table = grad_tables.GradTable(flat, (0, 1, 2), chunk=64)
    # members at offsets 0, 128, 192 (slots rounded up to 64 elements); 197 elements: 4 chunks
    descriptor = table.descriptor.cpu()
    assert descriptor[:16].view(torch.int32).tolist() == [0, 0, 1, 2]
    assert (table.addresses_at, table.limits_at) == (2, 5)
    assert descriptor[40:64].view(torch.int64).tolist() == [100, 192, 197]
    assert table.virtual.shape == (197,) and table.virtual.data_ptr() == table.descriptor.data_ptr()
    grads = [torch.randn(n, device="cuda") for n in (100, 64, 5)]
    assert table.bind(grads) and not table.bind(grads)
    torch.cuda.synchronize()

    def expected(grads: list[torch.Tensor]) -> list[int]:
        return [grads[0].data_ptr(), grads[1].data_ptr() - 128 * 4, grads[2].data_ptr() - 192 * 4]

    assert table.descriptor.cpu()[16:40].view(torch.int64).tolist() == expected(grads)
    # Two grad sets in turn (a loop over two batches' grads): each list is staged from the host once, then bound
    # again from its copy on the device.
    others = [torch.randn(n, device="cuda") for n in (100, 64, 5)]
    for current in (others, grads, others, grads, others):
        assert table.bind(current)
        torch.cuda.synchronize()
        assert table.descriptor.cpu()[16:40].view(torch.int64).tolist() == expected(current)
    assert table.staged == 2
    fresh = [[torch.randn(n, device="cuda") for n in (100, 64, 5)] for _ in range(grad_tables.KNOWN_TABLES + 1)]
    for current in fresh:
        table.bind(current)
    assert table.staged == 2 + len(fresh) and len(table._known) == grad_tables.KNOWN_TABLES


def test_float_lr_scheduler_never_recompiles_cuda() -> None:
    _compat.reset_cudagraph_trees()
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=1e-2), device="cuda",
                     scheduler=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.02, total_steps=20))
    _steady(pair, 0, 8)
    assert paths(pair.optimizer) == ["bucketed"]
    assert _compat.cudagraphs_recorded() == 1
    assert_matches_eager(pair)


def test_kernel_counts_cuda() -> None:
    from expecttest import assert_expected_inline

    counts = {}
    makers = stock_variants()
    makers["SGD-momentum"] = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)
    for name, make in makers.items():
        torch._dynamo.reset()
        _compat.reset_cudagraph_trees()
        with torch._inductor.config.patch(fx_graph_cache=False):
            before = _compat.generated_kernel_count()
            pair = make_pair(make, device="cuda")
            _steady(pair, 0, 3)
            taken = paths(pair.optimizer)  # SGD's momentum buffers appear in its first step, which runs as traced
            assert taken[-1] == "bucketed" and taken.count("bucketed") == 1, (name, taken)
            counts[name] = _compat.generated_kernel_count() - before
    assert_expected_inline("\n".join(f"{k}: {v}" for k, v in counts.items()), """\
Adadelta: 3
Adadelta-foreach: 3
Adagrad: 3
Adagrad-foreach: 3
Adam: 3
Adam-foreach: 3
AdamW: 3
AdamW-foreach: 3
Adamax: 3
Adamax-foreach: 3
ASGD: 5
ASGD-foreach: 5
NAdam: 5
NAdam-foreach: 5
RAdam: 4
RAdam-foreach: 4
RMSprop: 3
RMSprop-foreach: 3
Rprop: 3
Rprop-foreach: 3
SGD: 1
SGD-foreach: 1
SGD-momentum: 1""")


@pytest.mark.parametrize("name", ["SGD", "RMSprop"])
def test_cycling_momentum_on_cuda_never_recompiles(name: str) -> None:
    _compat.reset_cudagraph_trees()
    pair = make_pair(lambda p: getattr(torch.optim, name)(p, lr=1e-2, momentum=0.9), device="cuda",
                     scheduler=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.02, total_steps=40))
    _steady(pair, 0, 2)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    _steady(pair, 2, 14)  # more momentum values than Dynamo's recompile limit
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a Dynamo frame recompiled"
    assert optcapture.stats()["rebuilds"] == 0
    # The step's frame reached the backend once, and once more for SGD, whose first step creates its buffers.
    assert optcapture.stats()["captures"] == {"SGD": 2, "RMSprop": 1}[name]
    assert paths(pair.optimizer) == {"SGD": ["first-step", "bucketed"], "RMSprop": ["bucketed"]}[name]
    assert_matches_eager(pair)


def test_nesterov_with_a_cycled_momentum_steps_eagerly_and_never_recompiles_cuda() -> None:
    # Dynamo specializes momentum passed as ``alpha=``; Inductor's caches once served the first value's compile to
    # every later value (pytorch#194976). The capture spots the specialization and steps eagerly, warned once.
    _compat.reset_cudagraph_trees()
    pair = make_pair(lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True), device="cuda",
                     scheduler=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.02, total_steps=40))
    with pytest.warns(RuntimeWarning, match="nesterov=True passes momentum as alpha=.*runs eagerly, with no recompile"):
        for seed in range(14):
            step_both(pair, seed)
            assert_matches_eager(pair)
            if seed == 2:
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a Dynamo frame recompiled"


def test_nothing_captured_keeps_params_state_or_flat_storage_alive_cuda() -> None:
    import gc
    import weakref

    from optcapture import registry

    _compat.reset_cudagraph_trees()
    flat_buffers: list[weakref.ref[torch.Tensor]] = []

    def train_once() -> tuple[weakref.ref[torch.Tensor], weakref.ref[torch.optim.Optimizer]]:
        model = torch.nn.Linear(64, 64, device="cuda")
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        step = torch.compile(opt.step, backend="optcapture")
        for _ in range(5):  # past warm-up and recording: steady replays, called directly
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            step()
        assert paths(opt) == ["bucketed"]
        for flat in registry._prepared[opt].groups.values():
            flat_buffers.extend(weakref.ref(buffer) for buffer in flat.flats.values())
        return weakref.ref(model.weight), weakref.ref(opt)

    weight, opt = train_once()
    gc.collect()
    assert weight() is None and opt() is None
    assert flat_buffers and all(buffer() is None for buffer in flat_buffers)


def _recording_runs_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """CUDA graph trees record for real, then the recording fails as an out-of-memory error would: after every
    kernel of the step was captured (captured, not run). Returns the count of failed recordings."""
    from torch._inductor import cudagraph_trees

    record = cudagraph_trees.CUDAGraphNode._record
    failed: list[int] = []

    def record_then_run_out_of_memory(self: Any, model: Any, inputs: list[Any]) -> Any:
        def captured_then_out_of_memory(model_inputs: list[Any]) -> Any:
            model(model_inputs)
            failed.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated, while recording)")

        return record(self, captured_then_out_of_memory, inputs)

    monkeypatch.setattr(cudagraph_trees.CUDAGraphNode, "_record", record_then_run_out_of_memory)
    return failed


def test_running_out_of_memory_while_recording_the_cuda_graph_steps_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    _compat.reset_cudagraph_trees()
    failed = _recording_runs_out_of_memory(monkeypatch)
    pair = _adamw_pair()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _steady(pair, 0, 6)
    said = [str(w.message) for w in caught if "recording the CUDA graph" in str(w.message)]
    assert len(failed) == 1 and len(said) == 1, (failed, said)
    assert "OutOfMemoryError" in said[0] and "stepping eagerly" in said[0]
    assert paths(pair.optimizer) == ["eager"]
    assert _compat.cudagraphs_recorded() == 0
    assert_matches_eager(pair)  # the step whose recording failed ran once, eagerly; nothing twice


def test_running_out_of_memory_while_recording_raises_with_fallback_raise_and_changes_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import set_grads

    _compat.reset_cudagraph_trees()
    failed = _recording_runs_out_of_memory(monkeypatch)
    pair = _adamw_pair(fallback="raise")
    for seed in range(6):
        set_grads(pair, seed)
        before = [p.detach().clone() for p in pair.model.parameters()]
        try:
            pair.step()
        except optcapture.UnsupportedStepError as error:
            assert "recording the CUDA graph" in str(error) and failed == [1]
            torch.testing.assert_close(list(pair.model.parameters()), before, atol=0, rtol=0)
            return
        pair.eager.step()
        assert_matches_eager(pair)
    pytest.fail("recording never failed")


def test_an_eager_step_between_compiled_steps_is_noticed_cuda() -> None:
    from helpers import set_grads

    _compat.reset_cudagraph_trees()
    pair = _adamw_pair()
    _steady(pair, 0, 4)
    set_grads(pair, 4)
    pair.eager.step()
    pair.optimizer.step()  # not the compiled step: the real step counters advance, the capture's copy does not
    _steady(pair, 5, 3)
    assert_matches_eager(pair)
    assert paths(pair.optimizer) == ["bucketed"]
    assert _compat.cudagraphs_recorded() == 1


def test_steps_taken_by_a_per_tensor_capture_of_the_same_optimizer_are_noticed_cuda() -> None:
    _compat.reset_cudagraph_trees()
    torch.manual_seed(0)
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(16)),
                                    torch.nn.Parameter(torch.randn(4, 4))]).cuda()
    pair = make_pair(lambda p: torch.optim.NAdam(p, lr=0.01), device="cuda", model=model)  # type: ignore[arg-type]
    third = list(pair.model.parameters())[2]
    third.data = torch.empty(4, 8, device="cuda")[:, ::2].copy_(third)  # not dense: steps per tensor
    for seed in range(6):
        step_both(pair, seed, present=lambda i, seed=seed: i != 2 or seed % 2 == 1)
    assert_matches_eager(pair, **TOLERANCES["NAdam"])
    # The other steps run per tensor, or eagerly where Inductor cannot compile that graph (torch 2.11, H100).
    taken = paths(pair.optimizer)
    assert "bucketed" in taken and set(taken) - {"bucketed"}, taken


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_a_warmup_from_lr_zero_writes_no_nan_where_grads_are_always_zero_cuda(name: str) -> None:
    # The CPU test's case on the device (tests/test_replay.py): rows 0 and 4-9 of the embedding get grads of 0 at
    # every step, where Adam's capturable form divides 0 by 0 at lr 0.0 (pytorch#126514). On a GPU Dynamo also sets
    # capturable=True in the optimizer's own groups when it traces the first step, which the lr-0.0 eager step unsets.
    _compat.reset_cudagraph_trees()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2)).cuda()
    cls = getattr(torch.optim, name)
    pair = make_pair(lambda p: cls(p, lr=0.01), device="cuda", model=model,
                     scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, s / 2)))
    warmup_from_zero(pair, 6, device="cuda")
    assert paths(pair.optimizer) == ["bucketed"]


@pytest.mark.parametrize("name", ["GroupStepAdam", "ConjAdam", "DataWritingLion", "GlobalTensorCounterSGD",
                                  "ConstantBuildingAdam", "RebindingAdam"])
def test_user_optimizers_match_eager_cuda(name: str) -> None:
    # Third-party patterns (tests/user_optimizers.py). GroupStepAdam counts steps as a Python int in its groups:
    # the count reaches the kernels as a number, so its capture replays without CUDA graphs (a graph per value).
    import warnings

    from user_optimizers import USER_OPTIMIZERS

    _compat.reset_cudagraph_trees()
    pair = make_pair(lambda p: USER_OPTIMIZERS[name](p), device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for seed in range(6):
            step_both(pair, seed)
            assert_matches_eager(pair)
    assert paths(pair.optimizer)[-1] == "bucketed", paths(pair.optimizer)
    if name != "GlobalTensorCounterSGD":  # Dynamo recompiles its frame at every step, as with every backend
        assert _compat.cudagraphs_recorded() == (0 if name == "GroupStepAdam" else 1)


def _shapes_model(shapes: list[tuple[int, ...]]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.weights = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes])
    return model


@pytest.mark.parametrize("name", ["Bf16MomentumLamb", "Bf16MomentumAdamW"])
def test_a_bfloat16_moment_beside_float32_params_is_bucketed_and_as_close_to_eager_as_stock_cuda(name: str) -> None:
    # The moment lives in a bfloat16 flat buffer of its own; Inductor rounds its fused update once where eager rounds
    # each op, so stock torch.compile's own distance from eager is the bar.
    import lane_local_optimizers

    _compat.reset_cudagraph_trees()
    make = getattr(lane_local_optimizers, name)

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = _shapes_model([(64, 32), (32,), (64, 32), (32,), (32, 64)])
        return model, make(model.parameters())

    runs = run_backends(build, steps=5, device="cuda")
    optimizer = runs["optcapture"].optimizer
    assert {state["exp_avg"].dtype for state in optimizer.state.values()} == {torch.bfloat16}
    assert optcapture.explain(optimizer)[-1].path == "bucketed", optcapture.explain(optimizer)
    assert_as_close_to_eager_as_stock(runs, slack=1e-6)


@pytest.mark.parametrize("name", ["TrustRatioLamb", "ForeachNovoGrad", "Float32Muon"])
def test_lane_local_updates_are_batched_by_shape_and_match_eager_cuda(name: str) -> None:
    # Per-param norms (LAMB, NovoGrad) and per-matrix matmuls (Muon's iteration) run once per batch of same-shape
    # params under vmap: one batch per shape, whatever the number of tensors.
    import lane_local_optimizers

    make = getattr(lane_local_optimizers, name)
    shapes = [(64, 32), (32,), (64, 32), (32,), (32, 64), (64, 32)] if name != "Float32Muon" else \
        [(64, 32), (32, 64), (64, 32), (48, 48)]
    pair = make_pair(lambda p: make(p), model=_shapes_model(shapes))
    for seed in range(5):
        step_both(pair, seed)
        assert_matches_eager(pair, atol=1e-5, rtol=1e-5)
    report = optcapture.explain(pair.optimizer)[-1]
    assert report.path == "bucketed" and report.batches == 3, report


@pytest.mark.parametrize("name", ["GlobalClipLamb", "StackedNormsLars"])
def test_a_global_grad_norm_is_batched_and_matches_eager_over_groups_and_missing_grads_cuda(name: str) -> None:
    # Norms reduced across every batch, then updates per batch; one param without a grad at two steps is left out of
    # the norm as eager leaves it. Same-shape members of a batch are one view of flat storage, their state written
    # back in place.
    import lane_local_optimizers

    make = getattr(lane_local_optimizers, name)
    shapes = [(64, 32), (32,), (64, 32), (32,), (32, 64), (64, 32), (32,)]

    def two_groups(params: Any) -> torch.optim.Optimizer:
        listed = list(params)
        return make([{"params": listed[:4]}, {"params": listed[4:], "lr": 5e-3}])  # type: ignore[no-any-return]

    pair = make_pair(two_groups, model=_shapes_model(shapes))
    for seed in range(6):
        step_both(pair, seed, present=lambda i, seed=seed: not (i == 4 and seed in (2, 3)))
        assert_matches_eager(pair, atol=1e-5, rtol=1e-5)
    reports = optcapture.explain(pair.optimizer)
    assert {r.path for r in reports} <= {"first-step", "bucketed"}, [r.reasons for r in reports]
    assert any(r.path == "bucketed" for r in reports), reports


def test_torch_muon_is_batched_and_as_close_to_eager_as_stock_compile_cuda() -> None:
    # torch.optim.Muon orthogonalises in bfloat16: no two implementations agree to float32 tolerance, so the bar is
    # stock torch.compile's own distance from eager.
    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = _shapes_model([(256, 128), (128, 256), (256, 128), (192, 192)])
        return model, torch.optim.Muon(model.parameters(), lr=0.02)

    runs = run_backends(build, steps=5, device="cuda")
    report = optcapture.explain(runs["optcapture"].optimizer)[-1]
    assert report.path == "bucketed" and report.batches == 3, report
    assert_as_close_to_eager_as_stock(runs, slack=1e-3)


def test_a_grad_that_is_not_contiguous_is_read_right_cuda() -> None:
    # A table capture read every grad as a contiguous run from its address: ``p.grad = g.t()`` (same shape, other
    # strides) was read in the wrong order. Now the capture is rebuilt and copies grads into flat storage.
    _compat.reset_cudagraph_trees()
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(8, 8, device="cuda")),
                                    torch.nn.Parameter(torch.randn(16, device="cuda"))])
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=1e-2), model=model, device="cuda")  # type: ignore[arg-type]
    _steady(pair, 0, 3)
    assert optcapture.explain(pair.optimizer)[-1].grads == "in place"
    for seed in range(3, 5):
        generator = torch.Generator().manual_seed(seed)
        square, vector = torch.randn(8, 8, generator=generator).cuda(), torch.randn(16, generator=generator).cuda()
        for m in (pair.model, pair.eager_model):
            m[0].grad, m[1].grad = square.t(), vector.clone()
        pair.eager.step()
        pair.step()
    assert_matches_eager(pair)
    assert optcapture.stats()["rebuilds"] == 1


def test_the_first_call_holds_no_second_copy_of_the_params_cuda() -> None:
    # Each role's flat buffer was allocated while every old tensor lived: one extra copy of the params at the
    # first call (AdamW over 908M params: 10.95 GB above params and grads, against 7.26 GB for fused=True).
    numel, count = 2**24, 6

    def peak_of_first_call(make: Callable[[list[torch.nn.Parameter]], Any]) -> int:
        params = [torch.nn.Parameter(torch.randn(numel, device="cuda")) for _ in range(count)]
        for p in params:
            p.grad = torch.randn_like(p)
        step = make(params)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    fused = peak_of_first_call(lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True).step)
    captured = peak_of_first_call(lambda params: torch.compile(torch.optim.AdamW(params, lr=1e-3).step,
                                                               backend="optcapture"))
    assert optcapture.stats()["bucketed"] == 1
    assert captured <= fused + numel * 4 + 2**20, (captured / 2**20, fused / 2**20)


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_a_per_tensor_step_replays_a_cuda_graph_per_set_of_grad_addresses(name: str) -> None:
    # Not bucketed (bucketing=False): Inductor's per-tensor graph, which stock torch.compile launches kernel by
    # kernel (its CUDA graph trees skip graphs that write their inputs), replays a CUDA graph recorded for its
    # inputs' addresses once the grads come back where they were; the step counters it writes look written.
    kwargs: dict[str, Any] = {"lr": 1e-2, **({"momentum": 0.9} if name == "SGD" else {})}
    pair = make_pair(lambda p: getattr(torch.optim, name)(p, **kwargs), device="cuda", options={"bucketing": False})
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        for p, q in zip(pair.eager_model.parameters(), pair.model.parameters(), strict=True):
            grad = torch.randn(p.shape, generator=generator).cuda()
            if p.grad is None or q.grad is None:
                p.grad, q.grad = grad.clone(), grad.clone()
            else:  # zero_grad(set_to_none=False): the grads stay where they are
                p.grad.copy_(grad)
                q.grad.copy_(grad)
        pair.eager.step()
        pair.step()
        assert_matches_eager(pair)
    assert set(paths(pair.optimizer)) <= {"per-tensor", "first-step"}, paths(pair.optimizer)
    assert optcapture.stats()["address_graph_replays"] >= 3, optcapture.stats()
