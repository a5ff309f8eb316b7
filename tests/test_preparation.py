"""Flat storage: params keep their identity and value, and checkpoints hold each tensor at its own size."""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Callable

import pytest
import torch
from helpers import (
    assert_as_close_to_eager_as_stock,
    assert_matches_eager,
    make_model,
    make_pair,
    run_backends,
    set_grads,
    step_both,
)
from user_optimizers import BufferMomentum

import optcapture
from optcapture import preparation, registry
from optcapture.discovery import BucketKey


def _captured_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    step = torch.compile(opt.step, backend="optcapture")
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        step()
    assert [r.path for r in optcapture.explain(opt)] == ["bucketed"]
    return model, opt


def test_params_keep_identity_and_values() -> None:
    model = make_model()
    before = {id(p): p.detach().clone() for p in model.parameters()}
    objects = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    torch.compile(opt.step, backend="optcapture")()
    assert list(model.parameters()) == objects
    for p in model.parameters():
        assert isinstance(p, torch.nn.Parameter)
        torch.testing.assert_close(p.detach(), before[id(p)], rtol=0, atol=0)


def test_torch_save_holds_each_tensor_at_its_own_size() -> None:
    model, _ = _captured_model()
    weight = model[0].weight
    buffer = io.BytesIO()
    torch.save({"w": weight}, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()))["w"]
    assert loaded.untyped_storage().nbytes() == weight.numel() * 4
    torch.testing.assert_close(loaded, weight.detach(), rtol=0, atol=0)
    whole = io.BytesIO()
    torch.save(model.state_dict(), whole)
    state = torch.load(io.BytesIO(whole.getvalue()))
    assert sum(t.untyped_storage().nbytes() for t in state.values()) == sum(p.numel() * 4 for p in model.parameters())


def test_safetensors_round_trip() -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model, _ = _captured_model()
    data = safetensors_torch.save(model.state_dict())
    loaded = safetensors_torch.load(data)
    assert set(loaded) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


def test_deepcopy_is_independent() -> None:
    model, _ = _captured_model()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone[0].weight.fill_(7.0)
    assert not torch.equal(model[0].weight, clone[0].weight)
    assert clone[0].weight.data_ptr() != model[0].weight.data_ptr()


def test_model_load_state_dict_writes_through() -> None:
    model, opt = _captured_model()
    target = make_model()
    with torch.no_grad():
        for p in target.parameters():
            p.mul_(3.0)
    model.load_state_dict(target.state_dict())
    for p, q in zip(model.parameters(), target.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("beta2", [0.999, 0.9999, 0.99999])
def test_device_hyperparameters_are_as_exact_as_eagers_python_floats(beta2: float) -> None:
    # float32(0.999) made 1 - beta2 off by 1.3e-5 relative in every exp_avg_sq update; unit-scale grads hid it
    # under the absolute tolerance, grads of 100 do not.
    pair = make_pair(lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.9, beta2)))
    for seed in range(3):
        set_grads(pair, seed)
        for model in (pair.eager_model, pair.model):
            for p in model.parameters():
                p.grad.mul_(100)
        pair.eager.step()
        pair.step()
    assert_matches_eager(pair)


def _peak_resident_bytes_while(run: Callable[[], object]) -> int:
    """How far the process's resident memory rose above its level before ``run``, at its highest during ``run``
    (Linux: ``/proc/self/clear_refs`` resets the high-water mark ``VmHWM``)."""

    def kilobytes(field: str) -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = kilobytes("VmRSS")
    run()
    return (kilobytes("VmHWM") - before) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resident-memory high-water mark")
def test_moving_tensors_into_flat_storage_holds_no_second_copy_of_a_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each role's flat buffer was allocated zeroed (every page backed) while every old tensor still lived: the first
    # call held a whole extra copy of the params (then of each state) while preparing. Tensors above glibc's
    # largest mmap threshold (32 MiB) go back to the OS when freed, so resident memory shows what is held.
    numel = 12 * 2**20  # 48 MiB each
    params = [torch.nn.Parameter(torch.randn(numel)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn(numel)
    opt = torch.optim.AdamW(params, lr=0.01)
    expected = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for e, p in zip(expected, params, strict=True):
        e.grad = p.grad
    torch.optim.AdamW(expected, lr=0.01).step()
    peaks: list[int] = []
    build = preparation._build_flat_group

    def measured(*args: object) -> preparation.FlatGroup:
        result: list[preparation.FlatGroup] = []
        peaks.append(_peak_resident_bytes_while(lambda: result.append(build(*args))))  # type: ignore[arg-type]
        return result[0]

    monkeypatch.setattr(preparation, "_build_flat_group", measured)
    torch.compile(opt.step, backend="optcapture")()
    assert [r.path for r in optcapture.explain(opt)] == ["bucketed"]
    largest = numel * 4
    assert len(peaks) == 1 and peaks[0] < largest + 8 * 2**20, (peaks, largest)  # a role is 4 x largest
    torch.testing.assert_close([p.detach() for p in params], [e.detach() for e in expected])


@pytest.mark.parametrize("staged_on_host", [False, True])
def test_tensors_moved_into_flat_storage_keep_identity_and_values(staged_on_host: bool) -> None:
    # Staged through host memory is what accelerators do (tested here on CPU); gaps and absent members are zeros.
    tensors = [torch.randn(3, 2), None, torch.randn(5)]
    shapes = [torch.Size([3, 2]), torch.Size([4]), torch.Size([5])]
    values = [None if t is None else t.clone() for t in tensors]
    objects = list(tensors)
    key = BucketKey(0, torch.device("cpu"), torch.float32)
    flat, homes = preparation._move_into_flat(tensors, shapes, [None] * 3, [0, 8, 16], 24, key, staged_on_host)
    assert tensors == objects
    for tensor, value, home, offset in zip(tensors, values, homes, [0, 8, 16], strict=True):
        assert home.data_ptr() == flat.data_ptr() + offset * 4
        if tensor is not None:
            assert tensor.data_ptr() == home.data_ptr() and torch.equal(tensor, value)
    assert flat[6:8].tolist() == [0.0, 0.0] and flat[8:16].tolist() == [0.0] * 8 and flat[21:].tolist() == [0.0] * 3


class _Bf16MomentumSGD(BufferMomentum):
    """SGD with its momentum kept in bfloat16 for float32 params (timm's AdafactorBigVision keeps ``exp_avg`` so);
    ``mixed``: only the matrices' momentum, the vectors' in float32 (one key, two dtypes); ``transposed``: the
    momentum of each matrix in the transposed element order."""

    def __init__(self, params: object, mixed: bool = False, transposed: bool = False) -> None:
        super().__init__(params, lr=0.1)
        self.mixed, self.transposed = mixed, transposed

    def new_buffer(self, p: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if self.mixed and p.dim() == 1 else torch.bfloat16
        if self.transposed and p.dim() == 2:
            return torch.zeros(p.shape[::-1], dtype=dtype).t()
        return torch.zeros_like(p, dtype=dtype)


def test_a_group_refused_for_state_elsewhere_is_not_moved_again_at_the_next_capture_attempt(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Each capture attempt (here: Dynamo compiling the step again after a reset) rebuilt the group's flat storage,
    # moving every param again, only to refuse it again for the same state (here: in another element order).
    builds = []
    build = preparation._build_flat_group
    monkeypatch.setattr(preparation, "_build_flat_group", lambda *args: builds.append(args[1]) or build(*args))
    pair = make_pair(lambda p: _Bf16MomentumSGD(p, transposed=True))
    for seed in range(3):
        step_both(pair, seed)
    assert builds, "no flat storage was built: the test no longer reaches the refusal"
    before = len(builds)
    torch._dynamo.reset()
    for seed in range(3, 5):
        step_both(pair, seed)
        for p, q in zip(pair.model.parameters(), pair.eager_model.parameters(), strict=True):
            torch.testing.assert_close(p, q, atol=1e-2, rtol=1e-2)
    assert len(builds) == before, builds
    # The reason names the order, not the dtype: the bfloat16 slot is the momentum's own dtype.
    assert any("another element order" in why and "its slot's (10, 10) torch.bfloat16" in why
               for r in optcapture.explain(pair.optimizer) for why in r.reasons), \
        [r.reasons for r in optcapture.explain(pair.optimizer)]


def test_state_of_another_dtype_than_its_param_keeps_its_dtype_in_flat_storage_of_its_own() -> None:
    # Once copied into the float32 flat buffer, the user's bfloat16 state became float32 and the next call crashed
    # into the training loop; then it was left where it was and the step not bucketed. Now a key whose tensors all
    # have one dtype is held in a flat buffer of that dtype. Inductor rounds the fused momentum update to bfloat16
    # once, eager twice: stock torch.compile's own distance from eager is the bar.
    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = make_model()
        return model, _Bf16MomentumSGD(model.parameters())

    runs = run_backends(build, steps=4)
    optimizer = runs["optcapture"].optimizer
    assert_as_close_to_eager_as_stock(runs, slack=1e-6)
    reports = optcapture.explain(optimizer)
    assert reports[-1].path == "bucketed", reports
    (flat,) = registry._prepared[optimizer].groups.values()
    momentum = flat.flats[preparation.Role("state", "buf")]
    assert momentum.dtype == torch.bfloat16 and flat.flats[preparation.PARAM].dtype == torch.float32
    for state in optimizer.state.values():
        assert state["buf"].dtype == torch.bfloat16
        assert momentum.data_ptr() <= state["buf"].data_ptr() < momentum.data_ptr() + momentum.nbytes


def test_one_state_key_of_two_dtypes_stays_where_it_is_and_the_step_is_not_bucketed() -> None:
    pair = make_pair(lambda p: _Bf16MomentumSGD(p, mixed=True))
    for seed in range(4):
        step_both(pair, seed)
        for p, q in zip(pair.model.parameters(), pair.eager_model.parameters(), strict=True):
            assert pair.optimizer.state[p]["buf"].dtype == (torch.float32 if p.dim() == 1 else torch.bfloat16)
            torch.testing.assert_close(p, q, atol=1e-2, rtol=1e-2)
    reports = optcapture.explain(pair.optimizer)
    assert "bucketed" not in [r.path for r in reports], reports
    assert all(r.reasons for r in reports), reports


@pytest.mark.parametrize("holder", ["detached alias", "kept state_dict", "bucket viewing all of it"])
def test_a_param_whose_storage_another_tensor_holds_stays_where_it_is_and_that_tensor_sees_every_update(
        holder: str) -> None:
    # ZeroRedundancyOptimizer(parameters_as_bucket_view=True) makes each param a view of its bucket and broadcasts the
    # bucket after each step; a bucket of one param views all of the param's storage, so only the storage's other
    # holder tells. Moving such a param into flat storage would leave the bucket (or a user's alias) with the
    # values of before the step: the params of every other rank then trained on stale weights.
    pair = make_pair(lambda params: torch.optim.Adam(params, lr=0.1))
    first = next(pair.model.parameters())
    if holder == "detached alias":
        other = first.detach()
    elif holder == "kept state_dict":
        other = next(iter(pair.model.state_dict().values()))  # state_dict() holds p.detach(): it follows training
    else:
        other = torch.empty(first.numel())
        other.copy_(first.detach().view(-1))
        first.data = other.view_as(first)
    for seed in range(4):
        step_both(pair, seed)
    assert_matches_eager(pair)
    torch.testing.assert_close(other.view_as(first), first.detach(), rtol=0, atol=0)
    reports = optcapture.explain(pair.optimizer)
    assert reports and all("shares its storage with another tensor" in str(report) for report in reports), reports


def test_an_alias_made_after_the_capture_still_sees_every_update_once_the_capture_is_rebuilt() -> None:
    # A param already homed in flat storage shares its storage with its slot by design; an alias a user makes after
    # the capture is one holder more. A rebuild (load_state_dict gives the state new tensors) would move the param
    # into a new flat buffer and leave that alias with the old values; it is told shared and stays where it is.
    pair = make_pair(lambda params: torch.optim.Adam(params, lr=0.1))
    for seed in range(2):
        step_both(pair, seed)
    assert optcapture.explain(pair.optimizer)[-1].path == "bucketed"
    first = next(pair.model.parameters())
    kept = first.detach()
    for optimizer in (pair.eager, pair.optimizer):
        optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for seed in range(2, 5):
        step_both(pair, seed)
    assert_matches_eager(pair)
    torch.testing.assert_close(kept, first.detach(), rtol=0, atol=0)
