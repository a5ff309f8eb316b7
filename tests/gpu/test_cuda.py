"""CUDA: parity, one CUDA graph recorded and replayed, no host sync, no grad copies, no recompiles."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from helpers import assert_matches_eager, make_pair, paths, step_both
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


def test_default_zero_grad_loop_copies_each_fresh_grad_once() -> None:
    # zero_grad() (set_to_none=True) + backward: autograd allocates new grads, which are moved into their
    # flat slots once per step (a foreach copy); documented cost, and the result stays exact.
    _compat.reset_cudagraph_trees()
    pair = _adamw_pair()
    for seed in range(4):
        step_both(pair, seed)
    assert optcapture.stats()["grads_copied"] == 4 * 4
    assert_matches_eager(pair)


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
    for name, make in [("adamw_foreach", lambda p: torch.optim.AdamW(p, foreach=True)),
                       ("adamw_single", lambda p: torch.optim.AdamW(p, foreach=False)),
                       ("sgd_momentum", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))]:
        torch._dynamo.reset()
        _compat.reset_cudagraph_trees()
        with torch._inductor.config.patch(fx_graph_cache=False):
            before = _compat.generated_kernel_count()
            pair = make_pair(make, device="cuda")
            _steady(pair, 0, 3)
            counts[name] = _compat.generated_kernel_count() - before
    assert_expected_inline(str(counts), """{'adamw_foreach': 3, 'adamw_single': 3, 'sgd_momentum': 1}""")
