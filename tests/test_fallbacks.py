"""What is not bucketed still runs correctly, says why once, and fallback="raise" makes it an error."""

from __future__ import annotations

import re
import warnings
from typing import Any

import helpers
import pytest
import torch
from helpers import (
    Pair,
    SummedNormSGD,
    assert_matches_eager,
    make_model,
    make_pair,
    paths,
    set_grads,
    squared_loss_closure,
    step_both,
)

import optcapture
from optcapture import errors


def _warnings_of(fn: object) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()  # type: ignore[operator]
    return [str(w.message) for w in caught if "optcapture" in str(w.message)]


ON_TORCH_2_13 = torch.__version__.startswith("2.13")
# What Dynamo hands no backend any graph of: fused=True (torch.optim's fused kernel runs under
# torch.compiler.disable) and, on torch 2.13, Adafactor (a graph break at step_t.item() inside its loop).
NEVER_HANDED_OVER = {
    "fused": (lambda p: torch.optim.AdamW(p, fused=True), r"param group\(s\) \[0\] of AdamW use fused=True"),
    "adafactor": (lambda p: torch.optim.Adafactor(p), r"graph break: .*Tensor\.item\(\)"),
}


def _captured_pair(make: object, options: dict[str, str] | None = None) -> Pair:
    """A pair whose optimizer is stepped through optcapture.capture (which knows the optimizer of every call)."""
    pair = make_pair(make)  # type: ignore[arg-type]
    optcapture.capture(pair.optimizer, options)
    pair.step = pair.optimizer.step
    return pair


@pytest.mark.parametrize("name", sorted(NEVER_HANDED_OVER))
def test_unbucketed_optimizers_match_eager(name: str) -> None:
    make, reason = NEVER_HANDED_OVER[name]
    if name == "adafactor" and not ON_TORCH_2_13:
        pytest.skip("Adafactor's graph break at step_t.item() is what torch 2.13 does")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pair = _captured_pair(make)
        for seed in range(3):
            step_both(pair, seed)
    assert_matches_eager(pair)
    (report,) = optcapture.explain(pair.optimizer)  # one report, not one per step
    assert report.path == "uncompiled" and len(report.reasons) == 1
    assert re.search(reason, report.reasons[0]), report.reasons
    said = [w for w in caught if str(w.message).startswith("optcapture: Dynamo hands optcapture no graph")]
    assert len(said) == 1 and re.search(reason, str(said[0].message)), [str(w.message) for w in caught]
    # At the user's line: fused=True is said at capture (here), before any step; Adafactor at its first step().
    assert said[0].filename == (__file__ if name == "fused" else helpers.__file__), said[0].filename
    stats = optcapture.stats()
    assert (stats.uncompiled, stats.captures) == (1, 0)


def test_a_fused_step_with_fallback_raise_is_refused_before_anything_runs() -> None:
    pair = make_pair(lambda p: torch.optim.AdamW(p, fused=True))
    with pytest.raises(optcapture.UnsupportedStepError, match=r"use fused=True.*: not captured"):
        optcapture.capture(pair.optimizer, {"fallback": "raise"})
    # A fused group added after capture is refused at the step, before it runs.
    torch.manual_seed(0)
    added = torch.nn.Parameter(torch.randn(3))
    opt = optcapture.capture(torch.optim.AdamW([torch.nn.Parameter(torch.randn(2))]), {"fallback": "raise"})
    opt.add_param_group({"params": [added], "fused": True})
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    before = [p.detach().clone() for group in opt.param_groups for p in group["params"]]
    with pytest.raises(optcapture.UnsupportedStepError, match=r"param group\(s\) \[1\] .*fused=True.*: not stepped"):
        opt.step()
    after = [p.detach() for group in opt.param_groups for p in group["params"]]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert opt.state == {}


def test_a_step_dynamo_gives_up_warns_at_its_first_call_with_fallback_raise_and_raises_before_later_steps() -> None:
    if not ON_TORCH_2_13:
        pytest.skip("Adafactor's graph break at step_t.item() is what torch 2.13 does")
    pair = _captured_pair(lambda p: torch.optim.Adafactor(p), {"fallback": "raise"})
    # Dynamo decides while it runs the step: the first call has stepped (as eager does) when that is known, so it
    # warns instead of raising an error after the update was applied.
    with pytest.warns(RuntimeWarning, match=r"graph break: .*this call ran it uncompiled.*later calls raise"):
        step_both(pair, 0)
    assert_matches_eager(pair)
    assert [r.path for r in optcapture.explain(pair.optimizer)] == ["uncompiled"]
    set_grads(pair, 1)
    before = [p.detach().clone() for p in pair.model.parameters()]
    steps_before = [state["step"].item() for state in pair.optimizer.state.values()]
    with pytest.raises(optcapture.UnsupportedStepError, match=r"graph break: .*: not stepped"):
        pair.step()
    assert all(torch.equal(a, p) for a, p in zip(before, pair.model.parameters(), strict=True))
    assert [state["step"].item() for state in pair.optimizer.state.values()] == steps_before


def _non_leaf_params() -> list[torch.Tensor]:
    # differentiable=True steps with grad enabled: like optim_db, use params that are not leaves.
    torch.manual_seed(0)
    params = [torch.randn(3, 3, requires_grad=True).clone() for _ in range(2)]
    for p in params:
        p.grad = torch.randn(3, 3)
    return params


def test_differentiable_runs_as_traced_and_matches_eager() -> None:
    params, eager_params = _non_leaf_params(), _non_leaf_params()
    opt = torch.optim.Adam(params, lr=0.1, differentiable=True)
    eager = torch.optim.Adam(eager_params, lr=0.1, differentiable=True)
    step = torch.compile(opt.step, backend="optcapture")
    for _ in range(2):
        step()
        eager.step()
    torch.testing.assert_close(params, eager_params)


def test_fallback_is_warned_once_per_reason() -> None:
    pair = make_pair(lambda p: SummedNormSGD(p))
    first = _warnings_of(lambda: step_both(pair, 0))
    second = _warnings_of(lambda: step_both(pair, 1))
    assert len(first) == 1 and "not provably elementwise" in first[0], first
    assert second == []
    assert_matches_eager(pair)
    assert paths(pair.optimizer) == ["per-tensor"]


class NormalizedMomentum(torch.optim.Optimizer):
    """Not bucketable (the grads' norms added one by one, each ``+`` mixing two params), and creates its state in its
    first step."""

    def __init__(self, params: object, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: object = None) -> None:
        for group in self.param_groups:
            total = sum(p.grad.norm() for p in group["params"])
            for p in group["params"]:
                state = self.state[p]
                if "buf" not in state:
                    state["buf"] = torch.zeros_like(p)
                state["buf"].mul_(0.9).add_(p.grad / total)
                p.add_(state["buf"], alpha=-group["lr"])


def test_a_reason_is_warned_once_whether_the_first_step_runs_as_traced_or_per_tensor() -> None:
    # The first step creates the state (runs as traced), the next ones run per tensor: both are not bucketed
    # for the same reason, which is said once, at the first step.
    pair = make_pair(lambda p: NormalizedMomentum(p))
    errors.clear_warnings()
    first = _warnings_of(lambda: step_both(pair, 0))
    later = _warnings_of(lambda: [step_both(pair, seed) for seed in (1, 2)])
    assert len(first) == 1 and "not provably elementwise" in first[0], first
    assert later == []
    assert_matches_eager(pair)
    assert paths(pair.optimizer) == ["first-step", "per-tensor"]


def test_fallback_raise_names_the_reason() -> None:
    # The error reaches the training loop as itself: Dynamo wraps other backend errors in BackendCompilerFailed.
    pair = make_pair(lambda p: SummedNormSGD(p), options={"fallback": "raise"})
    with pytest.raises(optcapture.UnsupportedStepError, match="not provably elementwise"):
        step_both(pair, 0)


def test_fallback_raise_on_a_graph_that_is_never_bucketed() -> None:
    pair = make_pair(lambda p: SummedNormSGD(p), options={"fallback": "raise"})
    before = [p.detach().clone() for p in pair.model.parameters()]
    with pytest.raises(optcapture.UnsupportedStepError, match="cannot capture this step"):
        step_both(pair, 0)
    assert all(torch.equal(a, p) for a, p in zip(before, pair.model.parameters(), strict=True))  # nothing stepped


def test_lbfgs_with_closure_runs_eagerly_and_matches() -> None:
    torch.manual_seed(0)
    model, eager_model = make_model(), make_model()
    data = torch.randn(4, 10)

    opt, eager = torch.optim.LBFGS(model.parameters()), torch.optim.LBFGS(eager_model.parameters())
    opt._numel()  # fills LBFGS's cache eagerly: torch 2.11's Dynamo fails on that setattr inside a compiled piece
    step = torch.compile(opt.step, backend="optcapture")
    errors.clear_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            step(squared_loss_closure(model, opt, data))
            eager.step(squared_loss_closure(eager_model, eager, data))
    torch.testing.assert_close(list(model.parameters()), list(eager_model.parameters()))
    # Dynamo disables LBFGS.step once it has patched torch.optim (the first compile of a process does that),
    # so whether its pieces reach the backend depends on what the process compiled before.
    named = [str(w.message) for w in caught if "optcapture" in str(w.message)]
    assert len(named) <= 1 and all("LBFGS is closure-coupled" in m for m in named), named


def test_lbfgs_pieces_that_reach_the_backend_are_named_closure_coupled_once() -> None:
    model, expected = make_model(), make_model()
    opt = torch.optim.LBFGS(model.parameters())
    direction = torch.randn(sum(p.numel() for p in model.parameters()))
    opt._numel()  # fills LBFGS's cache eagerly: torch 2.11's Dynamo fails on that setattr inside the piece

    def add_direction(optimizer: torch.optim.LBFGS) -> None:
        optimizer._add_grad(0.1, direction)  # a piece of LBFGS's step: writes every param in place

    errors.clear_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(add_direction, backend="optcapture")
        for _ in range(2):
            with torch.no_grad():
                compiled(opt)
                torch.nn.utils.vector_to_parameters(
                    torch.nn.utils.parameters_to_vector(expected.parameters()) + 0.1 * direction, expected.parameters())
    torch.testing.assert_close(list(model.parameters()), list(expected.parameters()))
    named = [str(w.message) for w in caught if "optcapture" in str(w.message)]
    assert len(named) == 1 and "LBFGS is closure-coupled" in named[0], named


def test_sparse_adam_runs_and_matches() -> None:
    init = torch.randn(6, 3)
    weights = [torch.nn.Parameter(init.clone()) for _ in range(2)]
    opts = [torch.optim.SparseAdam([w], lr=0.1) for w in weights]
    step = torch.compile(opts[1].step, backend="optcapture")
    for seed in range(3):
        grad = torch.sparse_coo_tensor([[seed % 6]], torch.randn(1, 3), (6, 3))
        for w in weights:
            w.grad = grad.clone()
        opts[0].step()
        step()
    torch.testing.assert_close(weights[1], weights[0])


def test_user_function_calling_step_and_scheduler() -> None:
    pair = make_pair(lambda p: torch.optim.AdamW(p, lr=0.01))
    eager_scheduler = torch.optim.lr_scheduler.StepLR(pair.eager, 1, 0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(pair.optimizer, 1, 0.5)

    @torch.compile(backend="optcapture")
    def train_step() -> None:
        pair.optimizer.step()
        scheduler.step()

    from helpers import set_grads

    for seed in range(4):
        set_grads(pair, seed)
        pair.eager.step()
        eager_scheduler.step()
        train_step()
    assert_matches_eager(pair)
    assert pair.optimizer.param_groups[0]["lr"] == pair.eager.param_groups[0]["lr"]


@pytest.mark.parametrize("fallback", ["eager", "raise"])
def test_a_whole_training_step_compiles_its_forward_with_inductor_and_captures_the_step(
        fallback: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Forward, backward, clipping, step, zero_grad in one compiled function: Dynamo breaks the graph at backward()
    # and torch.optim at its step, so the backend sees the forward (params and data in, the loss out), the
    # clipping (grads in, grads scaled) and the step. Neither of the first two is an optimizer step: the forward
    # once took the lazy-state path and ran eagerly in every call, and both were warned about as uncaptured
    # steps (errors with fallback="raise").
    pair = make_pair(lambda p: torch.optim.AdamW(p, lr=0.01))
    lowered: list[int] = []
    lower_graph = optcapture.lowering.lower_graph

    def spy(gm: torch.fx.GraphModule, *args: object) -> object:
        lowered.append(sum(n.op == "placeholder" for n in gm.graph.nodes))
        return lower_graph(gm, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(optcapture.lowering, "lower_graph", spy)

    def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: torch.Tensor) -> torch.Tensor:
        loss = model(data).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
        return loss

    compiled = torch.compile(train_step, backend="optcapture", options={"fallback": fallback})
    losses = []
    graphs_after_warm_up = []

    def run() -> None:
        for seed in range(4):
            data = torch.randn(5, 10, generator=torch.Generator().manual_seed(seed))
            expected = train_step(pair.eager_model, pair.eager, data)
            losses.append((compiled(pair.model, pair.optimizer, data), expected))
            if seed == 1:
                graphs_after_warm_up.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    assert _warnings_of(run) == []
    for loss, expected in losses:
        torch.testing.assert_close(loss, expected)
    assert_matches_eager(pair)
    assert lowered == [5, 4], "the forward (4 params and the data) and the clipping (4 grads), once each"
    assert paths(pair.optimizer) == ["bucketed"]
    assert optcapture.stats()["eager"] == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_after_warm_up[0]


def test_fullgraph_true_on_the_unwrapped_step() -> None:
    # torch.optim's step wrapper calls torch._dynamo.graph_break() on purpose (pytorch#104053), so
    # fullgraph=True on opt.step itself fails in Dynamo for every backend. PyTorch's own compiled-optimizer
    # suite compiles the unwrapped step instead; that works here with one graph.
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01))
    inner = type(pair.optimizer).step.__wrapped__.__wrapped__  # type: ignore[attr-defined]
    compiled = torch.compile(inner, backend="optcapture", fullgraph=True)

    def step() -> None:
        with torch.no_grad():
            compiled(pair.optimizer)

    pair.step = step
    for seed in range(3):
        step_both(pair, seed)
    assert_matches_eager(pair)
    assert paths(pair.optimizer) == ["bucketed"]


MODULE_OPTIMIZER: torch.optim.Optimizer | None = None


def _train_step_of_the_module_optimizer() -> None:
    with torch.no_grad():
        type(MODULE_OPTIMIZER).step.__wrapped__.__wrapped__(MODULE_OPTIMIZER)  # type: ignore[attr-defined]


def test_a_user_function_reaching_its_optimizer_through_a_global_gets_the_right_reason() -> None:
    # fullgraph=True over a user's function that runs the unwrapped step of a module-level optimizer: the graph is
    # the whole function, so it runs per tensor, and the reason says so (it once said no optimizer was in reach).
    global MODULE_OPTIMIZER
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01))
    MODULE_OPTIMIZER = pair.optimizer
    try:
        pair.step = torch.compile(_train_step_of_the_module_optimizer, backend="optcapture", fullgraph=True)
        caught = _warnings_of(lambda: [step_both(pair, seed) for seed in range(3)])
    finally:
        MODULE_OPTIMIZER = None
    assert any("not the optimizer's own step" in w for w in caught), caught
    assert paths(pair.optimizer) == ["per-tensor"]
    assert_matches_eager(pair)


def test_mixed_devices_in_one_group_is_exact_or_a_clear_error() -> None:
    # Only CPU here; a group over CPU and CUDA is exercised in tests/gpu.
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3, dtype=torch.float64))]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = torch.optim.Adam(params, lr=0.1)
    torch.compile(opt.step, backend="optcapture")()
    assert optcapture.explain(opt)[0].path == "bucketed"
    assert len(optcapture.explain(opt)[0].buckets) == 2


def test_a_failing_compile_falls_back_to_a_correct_eager_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from optcapture import _compat

    def broken(*args: object, **kwargs: object) -> object:
        raise torch.cuda.OutOfMemoryError("simulated: out of memory while compiling")

    monkeypatch.setattr(_compat, "compile_with_inductor", broken)
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01))
    caught = _warnings_of(lambda: [step_both(pair, seed) for seed in range(3)])
    assert any("failed" in w and "stepping eagerly" in w for w in caught), caught
    assert_matches_eager(pair)
    assert optcapture.stats()["eager"] == 1


def _failing_after_warm_up(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    from optcapture import lowering

    def failing(self: object) -> None:
        raise error

    monkeypatch.setattr(lowering._ShadowRunner, "__call__", failing)


def test_a_recompile_failing_in_a_later_step_falls_back_to_a_correct_eager_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # What the shadow's frame raised once a scheduler had changed a followed momentum more often than Dynamo's
    # recompile limit allows: the training step must not fail with it.
    pair = make_pair(lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))
    for seed in range(3):
        step_both(pair, seed)
    _failing_after_warm_up(monkeypatch, torch._dynamo.exc.FailOnRecompileLimitHit("simulated: recompile limit"))
    caught = _warnings_of(lambda: [step_both(pair, seed) for seed in range(3, 6)])
    assert [w for w in caught if "stepping eagerly" in w and "FailOnRecompileLimitHit" in w], caught
    # SGD's first step, which creates its buffers, is no fallback; this one is.
    assert (optcapture.stats()["first_steps"], optcapture.stats()["eager"]) == (1, 1)
    assert paths(pair.optimizer) == ["first-step", "eager"]  # the capture's report now says it steps eagerly
    assert_matches_eager(pair)


def test_a_recompile_failing_in_a_later_step_raises_with_fallback_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01), options={"fallback": "raise"})
    for seed in range(2):
        step_both(pair, seed)
    _failing_after_warm_up(monkeypatch, torch._dynamo.exc.FailOnRecompileLimitHit("simulated: recompile limit"))
    with pytest.raises(optcapture.UnsupportedStepError, match="recompile limit"):
        step_both(pair, 2)


def test_a_failure_while_a_later_step_runs_is_not_retried_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    # Past compiling, part of the step may have run: stepping again eagerly could apply it twice.
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01))
    for seed in range(2):
        step_both(pair, seed)
    _failing_after_warm_up(monkeypatch, RuntimeError("simulated: a kernel failed"))
    with pytest.raises(RuntimeError, match="a kernel failed"):
        step_both(pair, 2)


def _failing_while_recording(self: object) -> None:
    # An error out of CUDA graph trees' recording, raised in a real CUDAGraphNode._record frame (which asserts it
    # has a graph before it captures anything): recording never runs the step. On CUDA, tests/gpu records for real.
    from torch._inductor.cudagraph_trees import CUDAGraphNode

    class Unrecordable:
        graph = None

    CUDAGraphNode._record(Unrecordable(), lambda inputs: None, [])  # type: ignore[arg-type]


def test_a_failure_while_recording_the_cuda_graph_falls_back_to_a_correct_eager_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from optcapture import lowering

    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01))
    for seed in range(2):
        step_both(pair, seed)
    monkeypatch.setattr(lowering._ShadowRunner, "__call__", _failing_while_recording)
    caught = _warnings_of(lambda: [step_both(pair, seed) for seed in range(2, 5)])
    assert [w for w in caught if "recording the CUDA graph of the bucketed step of Adam failed" in w
            and "stepping eagerly" in w], caught
    assert paths(pair.optimizer) == ["eager"]
    assert_matches_eager(pair)  # the failed step is applied once, eagerly


def test_a_failure_while_recording_the_cuda_graph_raises_with_fallback_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    from optcapture import lowering

    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01), options={"fallback": "raise"})
    for seed in range(2):
        step_both(pair, seed)
    monkeypatch.setattr(lowering._ShadowRunner, "__call__", _failing_while_recording)
    with pytest.raises(optcapture.UnsupportedStepError, match="recording the CUDA graph"):
        pair.step()


def _replace_a_weight_with_rebuilds_failing(pair: object, monkeypatch: pytest.MonkeyPatch,
                                            crashing: bool = True) -> None:
    """``crashing``: the rebuild raises an unexpected error; else it is refused (a CaptureError)."""
    from optcapture import shadows

    def refused(*args: object) -> str:
        if crashing:
            raise RuntimeError("simulated: no longer provably equal")
        return "simulated: no longer provably equal"

    monkeypatch.setattr(shadows, "prove_equivalent", refused)
    with torch.no_grad():
        for model in (pair.model, pair.eager_model):  # type: ignore[attr-defined]
            model[0].weight.data = torch.full((10, 10), 0.5)


def test_a_failing_rebuild_falls_back_to_a_correct_eager_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # p.data = ... (or load_state_dict) rebuilds the capture inside a step; before this, a rebuild that failed
    # raised its CaptureError out of the user's training step.
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01))
    for seed in range(2):
        step_both(pair, seed)
    _replace_a_weight_with_rebuilds_failing(pair, monkeypatch)
    caught = _warnings_of(lambda: [step_both(pair, seed) for seed in range(2, 5)])
    assert [w for w in caught if "rebuilding the bucketed step of Adam failed" in w and "no longer provably" in w]
    assert optcapture.stats()["rebuilds"] == 1 and optcapture.stats()["eager"] == 1
    assert paths(pair.optimizer) == ["bucketed", "eager"]
    assert_matches_eager(pair)


def test_a_refused_rebuild_steps_per_tensor_as_stock_does(monkeypatch: pytest.MonkeyPatch) -> None:
    # A rebuild refused for a reason of its own (a CaptureError) steps the traced graph per tensor, compiled for the
    # inputs as they are now, as stock torch.compile would; it stepped eagerly for good before.
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01))
    for seed in range(2):
        step_both(pair, seed)
    _replace_a_weight_with_rebuilds_failing(pair, monkeypatch, crashing=False)
    caught = _warnings_of(lambda: [step_both(pair, seed) for seed in range(2, 5)])
    assert [w for w in caught if "no longer provably" in w and "per-tensor graph" in w], caught
    assert paths(pair.optimizer) == ["bucketed", "per-tensor"]
    assert_matches_eager(pair)


def test_a_failing_rebuild_raises_with_fallback_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01), options={"fallback": "raise"})
    for seed in range(2):
        step_both(pair, seed)
    _replace_a_weight_with_rebuilds_failing(pair, monkeypatch)
    with pytest.raises(optcapture.UnsupportedStepError, match="rebuilding the bucketed step of Adam failed"):
        step_both(pair, 2)


def test_a_param_held_by_a_live_autograd_graph_is_said_by_that_cause() -> None:
    # An eval loss computed with grad enabled and still alive at step() (its graph holds the params): each param
    # steps per tensor, as stock torch.compile does, and the warning names the cause.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    step = torch.compile(optimizer.step, backend="optcapture")

    def train() -> None:
        model(torch.randn(2, 3, 6, 6)).sum().backward()
        held = model(torch.randn(2, 3, 6, 6)).sum()
        step()
        del held

    caught = _warnings_of(lambda: [train() for _ in range(2)])
    expected = "an autograd graph still alive at step()"
    assert [w for w in caught if expected in w and "per-tensor graph" in w], caught


def test_a_param_made_a_view_of_a_larger_buffer_after_the_capture_steps_per_tensor_and_the_buffer_follows() -> None:
    # vector_to_parameters-style: p.data becomes a view of a user's flat buffer after the capture. The rebuild used
    # to fail (KeyError from the flat group that no longer held the param) and step eagerly for good; the traced graph
    # steps it right per tensor, as stock torch.compile does, with the reason said.
    pair = make_pair(lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))
    for seed in range(2):
        step_both(pair, seed)
    buffers = []
    for model in (pair.eager_model, pair.model):
        weight = model[0].weight
        buffer = torch.zeros(weight.numel() + 3)
        buffer[:weight.numel()] = weight.detach().reshape(-1)
        weight.data = buffer[:weight.numel()].view_as(weight)
        buffers.append(buffer)
    caught = _warnings_of(lambda: [step_both(pair, seed) for seed in range(2, 5)])
    assert paths(pair.optimizer) == ["first-step", "bucketed", "per-tensor"]
    assert [w for w in caught if "is a view of a larger buffer" in w and "per-tensor graph" in w], caught
    assert_matches_eager(pair)
    weight = pair.model[0].weight.detach()
    # The user's buffer holds the updated weight (the param was not moved out of it), as eager's does.
    torch.testing.assert_close(buffers[1][:weight.numel()].view_as(weight), weight, rtol=0, atol=0)
    torch.testing.assert_close(buffers[1], buffers[0])


def test_a_compile_failed_at_capture_keeps_nothing_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    # The eager fallback re-raised one kept exception at its first step; its traceback chained the caller's
    # frames, and Dynamo's cache kept it: the optimizer and the model were never freed.
    import gc
    import weakref

    from optcapture import _compat

    def broken(*args: object, **kwargs: object) -> object:
        raise torch.cuda.OutOfMemoryError("simulated: out of memory while compiling")

    monkeypatch.setattr(_compat, "compile_with_inductor", broken)

    def train_once() -> tuple[weakref.ref[torch.Tensor], weakref.ref[torch.optim.Optimizer]]:
        model = torch.nn.Linear(8, 8)
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        step = torch.compile(opt.step, backend="optcapture")
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            step()
        return weakref.ref(model.weight), weakref.ref(opt)

    caught = _warnings_of(train_once)
    assert any("stepping eagerly" in w for w in caught), caught
    weight, optimizer = train_once()
    gc.collect()
    assert weight() is None and optimizer() is None


def test_step_with_closure_matches_eager() -> None:
    torch.manual_seed(0)
    model, eager_model = make_model(), make_model()
    data = torch.randn(4, 10)
    opt, eager = torch.optim.Adam(model.parameters(), lr=0.01), torch.optim.Adam(eager_model.parameters(), lr=0.01)
    step = torch.compile(opt.step, backend="optcapture")
    for _ in range(3):
        step(squared_loss_closure(model, opt, data))
        eager.step(squared_loss_closure(eager_model, eager, data))
    torch.testing.assert_close(list(model.parameters()), list(eager_model.parameters()))


def test_complex_params_match_eager() -> None:
    torch.manual_seed(0)
    init = torch.randn(4, dtype=torch.complex64)
    params = [torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())]
    opts = [torch.optim.Adam([p], lr=0.1) for p in params]
    step = torch.compile(opts[1].step, backend="optcapture")
    for seed in range(3):
        grad = torch.randn(4, dtype=torch.complex64, generator=torch.Generator().manual_seed(seed))
        for p in params:
            p.grad = grad.clone()
        opts[0].step()
        step()
    torch.testing.assert_close(params[1], params[0])


def test_params_sharing_one_grad_tensor_step_like_eager() -> None:
    pair = make_pair(lambda p: torch.optim.AdamW(p, lr=0.01))
    for seed in range(3):
        grad = torch.randn(10, 10, generator=torch.Generator().manual_seed(seed))
        for model in (pair.eager_model, pair.model):
            model[0].weight.grad = model[1].weight.grad = grad.clone()
            model[0].bias.grad, model[1].bias.grad = torch.ones(10), torch.ones(10)
        pair.eager.step()
        caught = _warnings_of(pair.step)
        assert seed > 0 or any("shares its grad tensor" in w for w in caught), caught
    assert_matches_eager(pair)


def test_a_capture_that_gave_up_is_replaced_by_the_eager_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # From then on no per-step work of the capture: no grad copies, no counter reads (each eager step moves them).
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.01))
    for seed in range(2):
        step_both(pair, seed)
    _failing_after_warm_up(monkeypatch, torch._dynamo.exc.FailOnRecompileLimitHit("simulated: recompile limit"))
    _warnings_of(lambda: step_both(pair, 2))
    copied = optcapture.stats()["grads_copied"]
    for seed in range(3, 6):
        step_both(pair, seed)
    assert optcapture.stats()["grads_copied"] == copied
    assert_matches_eager(pair)


def test_params_moved_to_another_dtype_step_eagerly_and_say_why() -> None:
    # model.half() swaps every param's storage without failing the guards of the step's frame, so the capture
    # rebuilds over a graph traced at float32. It cannot: the reason names the param and the way out, where it
    # once read "KeyError: 0" (found by an adversarial run of user scenarios).
    pair = make_pair(lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))
    for seed in range(3):
        step_both(pair, seed)
    pair.model.half()
    pair.eager_model.half()
    caught = _warnings_of(lambda: [step_both(pair, seed) for seed in range(3, 5)])
    assert len(caught) == 1 and "param 0 of group 0 is now torch.float16" in caught[0], caught
    assert "torch._dynamo.reset()" in caught[0]
    assert_matches_eager(pair)
    assert paths(pair.optimizer)[-1] == "eager"



class CountingSGD(torch.optim.Optimizer):
    """Keeps its step count in a Python attribute, as some users' optimizers do."""

    def __init__(self, params: object, lr: float = 0.1, momentum: bool = False) -> None:
        super().__init__(params, {"lr": lr})
        self._k = 0
        self._momentum = momentum

    @torch.no_grad()
    def step(self, closure: object = None) -> None:
        self._k += 1
        for group in self.param_groups:
            for p in group["params"]:
                update = p.grad
                if self._momentum:  # state created lazily, in the first step
                    state = self.state[p]
                    if not state:
                        state["m"] = torch.zeros_like(p)
                    update = state["m"].mul_(0.9).add_(p.grad)
                p.add_(update, alpha=-group["lr"] * 0.9**self._k)


def _skip_where_dynamo_refuses_optimizer_attribute_stores() -> None:
    # torch 2.11's Dynamo raises while tracing such a step ("Attempted setattr on a user-defined object that does
    # not have an AttributeMutation mutation_type"), for every backend and before any is called: loud, not wrong.
    param = torch.nn.Parameter(torch.zeros(1))
    param.grad = torch.zeros(1)
    try:
        torch.compile(CountingSGD([param]).step, backend="eager")()
    except AssertionError as error:
        pytest.skip(f"this torch's Dynamo refuses attribute stores on an optimizer: {error}".splitlines()[0])
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("momentum", [False, True])
def test_attributes_the_step_assigns_on_its_optimizer_are_written_back(momentum: bool) -> None:
    _skip_where_dynamo_refuses_optimizer_attribute_stores()
    # Dynamo records ``self._k += 1`` on an Optimizer but does not write it back, with any backend: _k stayed 0
    # and every step used the first step's factor (params 0.88 off eager's after 8 steps; found by an
    # adversarial run of user scenarios).
    pair = make_pair(lambda p: CountingSGD(p, momentum=momentum))
    caught = _warnings_of(lambda: [step_both(pair, seed) for seed in range(6)])
    assert pair.optimizer._k == pair.eager._k == 6  # type: ignore[attr-defined]
    assert_matches_eager(pair)
    assert len(caught) == 1 and "assigns attributes of the optimizer (_k)" in caught[0], caught
    assert "bucketed" not in paths(pair.optimizer)


def test_attributes_the_step_assigns_raise_with_fallback_raise_before_anything_runs() -> None:
    _skip_where_dynamo_refuses_optimizer_attribute_stores()
    pair = make_pair(lambda p: CountingSGD(p), options={"fallback": "raise"})
    before = [p.detach().clone() for p in pair.model.parameters()]
    with pytest.raises(optcapture.UnsupportedStepError, match=r"assigns attributes of the optimizer \(_k\)"):
        step_both(pair, 0)
    assert all(torch.equal(a, p) for a, p in zip(before, pair.model.parameters(), strict=True))
    assert pair.optimizer._k == 0  # type: ignore[attr-defined]


class ClampedAdamW(torch.optim.AdamW):
    """A subclass that overrides step(): the stock step, then a clamp of every param."""

    @torch.no_grad()
    def step(self, closure: object = None) -> None:
        super().step()
        for group in self.param_groups:
            for p in group["params"]:
                p.clamp_(-0.2, 0.2)


def test_a_subclass_overriding_step_matches_eager_and_says_why_it_is_not_bucketed() -> None:
    # Its pieces reach the backend as frames of AdamW's own step; they once read "a user function that calls
    # step()", which the user did not write.
    pair = make_pair(lambda p: ClampedAdamW(p, lr=0.3))
    caught = _warnings_of(lambda: [step_both(pair, seed) for seed in range(4)])
    assert_matches_eager(pair)
    assert max(float(p.abs().max()) for p in pair.model.parameters()) == pytest.approx(0.2)
    assert len(caught) == 1 and "called by the step that ClampedAdamW overrides" in caught[0], caught


@pytest.mark.parametrize("fallback", ["eager", "raise"])
def test_attributes_assigned_outside_the_step_are_never_replaced_by_a_step(fallback: str) -> None:
    # The eager replacement of a frame whose attribute store Dynamo holds as a symbol is the optimizer's own step:
    # right for the step's frame, a whole extra step for any other frame. Such a frame runs uncompiled, as plain
    # Python (Dynamo skips it at the backend's request), or with fallback="raise" is an error raised before it ran.
    _skip_where_dynamo_refuses_optimizer_attribute_stores()
    pair = make_pair(lambda p: torch.optim.SGD(p, lr=0.1))
    pair.optimizer.calls = 0  # type: ignore[attr-defined]
    data = torch.zeros(3)
    options = {"fallback": fallback}

    def count_calls(optimizer: torch.optim.Optimizer, data: torch.Tensor) -> None:
        optimizer.calls += 1  # type: ignore[attr-defined]
        data.add_(1)

    compiled = torch.compile(count_calls, backend="optcapture", options=options)
    from helpers import set_grads

    set_grads(pair, 0)
    before = [p.detach().clone() for p in pair.model.parameters()]
    if fallback == "raise":
        with pytest.raises(optcapture.UnsupportedStepError, match=r"assigns attributes of the optimizer \(calls\)"):
            compiled(pair.optimizer, data)
        assert pair.optimizer.calls == 0 and data.tolist() == [0.0, 0.0, 0.0]  # type: ignore[attr-defined]
        return
    with pytest.warns(RuntimeWarning, match="runs as Dynamo traced it, and optcapture writes the attributes back"):
        compiled(pair.optimizer, data)  # the first value is a constant: written back after the graph
    assert pair.optimizer.calls == 1 and data.tolist() == [1.0, 1.0, 1.0]  # type: ignore[attr-defined]
    with pytest.warns(RuntimeWarning, match="the frame runs uncompiled, as plain Python"):
        compiled(pair.optimizer, data)
    assert pair.optimizer.calls == 2 and data.tolist() == [2.0, 2.0, 2.0]  # type: ignore[attr-defined]
    assert all(torch.equal(a, p) for a, p in zip(before, pair.model.parameters(), strict=True))


def test_a_fallback_warning_says_what_runs_and_points_at_the_users_line() -> None:
    import warnings

    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    for p in params:
        p.grad = torch.ones_like(p)
    step = torch.compile(SummedNormSGD(params).step, backend="optcapture")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
    (warning,) = [w for w in caught if "optcapture" in str(w.message)]
    assert str(warning.message) == ("optcapture: step of SummedNormSGD is not bucketed (the update is not provably "
                                    "elementwise: op 'add' mixes params [(0, 0), (0, 1)]): it runs as Inductor's "
                                    "per-tensor graph, as stock torch.compile runs it")
    assert warning.filename == __file__, warning.filename


class _FreshStateSGD(torch.optim.Optimizer):
    """Stores a new tensor into the state of each matrix at every step, and keeps no state for vectors: every
    compile of its step finds a param without state (pytorch_optimizer's LoRARite is so)."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() > 1:
                    self.state[p]["last_update"] = p.grad * group["lr"]
                    p.sub_(self.state[p]["last_update"])
                else:
                    p.sub_(p.grad, alpha=group["lr"])


def test_a_step_that_finds_a_param_without_state_at_every_compile_runs_as_traced_once_only() -> None:
    # Its second compile was taken for a first step too, and ran as traced (uncompiled) at every call from then on,
    # where stock torch.compile runs Inductor's per-tensor graph.
    pair = make_pair(lambda p: _FreshStateSGD(p))
    for seed in range(4):
        step_both(pair, seed)
        assert_matches_eager(pair)
    reports = optcapture.explain(pair.optimizer)
    assert [r.path for r in reports] == ["first-step", "per-tensor"], reports
    # Its matrices' state is stored in place (optcapture.state_rebinds), so the graph returns no tensor: what keeps
    # it per tensor is that its vectors keep no state.
    assert any("run different update programs" in why for why in reports[-1].reasons), reports


class _HostGatedSGD(torch.optim.Optimizer):
    """SGD whose step size depends on a global grad norm read on the host: Dynamo breaks the step's graph at
    ``.item()`` and compiles the update after it as a function of its own."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        total = torch.stack([p.grad.norm() for p in params]).norm()
        scale = 1.0 if total.item() < 1.0 else 0.5
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] * scale)


def test_a_graph_break_inside_a_users_step_is_named_as_one() -> None:
    # Not "the compiled function is not the optimizer's own step": it is, broken in two by Dynamo.
    pair = make_pair(_HostGatedSGD)
    messages = _warnings_of(lambda: [step_both(pair, seed) for seed in range(3)])
    assert_matches_eager(pair)
    assert any(re.search(r"the step has a graph break: this graph is the part of step\(\) after line \d+", m)
               for m in messages), messages
    assert not any("not the optimizer's own step" in m for m in messages), messages
    text = "\n".join(map(str, optcapture.explain(pair.optimizer)))
    assert "Unsupported Tensor.item()" in text, text  # the graph before the break says why it ends there
    assert "creates its state" not in text, text
    assert "  bucket " not in text, text  # none of its graphs was bucketed: no bucket is listed


def test_a_graph_break_inside_a_users_step_with_fallback_raise_raises_before_the_update() -> None:
    pair = make_pair(_HostGatedSGD, options={"fallback": "raise"})
    set_grads(pair, 0)
    before = [p.detach().clone() for p in pair.model.parameters()]
    with pytest.raises(optcapture.UnsupportedStepError, match=r"graph break: this graph is the part of step\(\)"):
        pair.step()
    for p, old in zip(pair.model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), old, rtol=0, atol=0)


def test_params_refused_for_one_reason_are_named_in_one_line() -> None:
    model = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(3)))
    pair = make_pair(lambda p: torch.optim.AdamW(p, lr=0.1), model=model)
    kept = pair.model.state_dict()  # holds a view of every param: none can move into flat storage
    messages = _warnings_of(lambda: [step_both(pair, seed) for seed in range(2)])
    assert_matches_eager(pair)
    shared = [m for m in messages if "shares its storage" in m]
    assert len(shared) == 1 and shared[0].count("shares its storage") == 1, shared
    assert "params 0-5 of group 0: each shares its storage" in shared[0], shared
    assert kept  # still held


def _sgd_update(params: list[torch.Tensor], grads: list[torch.Tensor], lr: float) -> None:
    for p, g in zip(params, grads, strict=True):
        p.add_(g, alpha=-lr)


class _GivenUpStepSGD(torch.optim.Optimizer):
    """A step whose frame Dynamo gives up (a graph break inside a loop), so the module-level update function it
    calls is compiled as a frame of its own, reaching no optimizer: timm's NAdamW on the CPU."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.abs().sum().item() > 1e30:  # a host read in a loop
                    raise FloatingPointError("grad overflow")
            _sgd_update(params, [p.grad for p in params], group["lr"])


def test_a_function_the_step_calls_compiled_on_its_own_is_reported_to_the_optimizer_whose_step_called_it() -> None:
    pair = make_pair(_GivenUpStepSGD)
    messages = _warnings_of(lambda: [step_both(pair, seed) for seed in range(3)])
    assert_matches_eager(pair)
    reports = optcapture.explain(pair.optimizer)
    assert reports and {report.path for report in reports} == {"per-tensor"}, reports
    assert all(report.optimizer == "_GivenUpStepSGD" for report in reports), reports
    said = "Dynamo compiled '_sgd_update', which the step of _GivenUpStepSGD calls, as a frame of its own"
    assert said in str(reports[0]), reports[0]
    assert any(said in m and "step of _GivenUpStepSGD is not bucketed" in m for m in messages), messages
