"""The pass that computes a step's costly small values (0-dim, or one per lane of a batch) once per step, outside the
element loop."""

from __future__ import annotations

import re

import torch
from helpers import assert_matches_eager, make_pair, paths, step_both

from optcapture import _compat, lowering
from optcapture.bench import methods
from optcapture.config import CaptureConfig
from optcapture.rewrites import scalars_once


def _traced(fn: object, *args: torch.Tensor) -> torch.fx.GraphModule:
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, tracing_mode="fake")(*args)  # type: ignore[arg-type]


def _bias_corrected(p: torch.Tensor, step: torch.Tensor, beta: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    correction = (1 - beta ** step).sqrt()  # costly: pow, sqrt
    decay = 1 - lr * 0.01  # cheap: mul, sub
    return p * decay / correction


def test_only_costly_scalars_that_larger_ops_read_are_realized() -> None:
    gm = _traced(_bias_corrected, torch.ones(16), torch.tensor(3.0), torch.tensor(0.9), torch.tensor(0.1))
    chosen = scalars_once.scalars_to_realize(gm.graph)
    # The sqrt (read by the division over 16 elements); not the pow (read only by 0-dim ops), not ``1 - lr*0.01``.
    assert [node.target for node in chosen] == [torch.ops.aten.sqrt.default], gm.code


def test_a_costly_scalar_behind_a_realized_one_is_not_realized_twice() -> None:
    def fn(p: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        root = step.sqrt()  # read by p's op and by ``root + 1``
        return p * root + p * (root + 1)

    gm = _traced(fn, torch.ones(8), torch.tensor(4.0))
    chosen = scalars_once.scalars_to_realize(gm.graph)
    assert [node.target for node in chosen] == [torch.ops.aten.sqrt.default], gm.code


def _per_lane_corrected(p: torch.Tensor, steps: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    correction = 1 - beta ** steps  # one per lane: [lanes]
    return p / correction.view(-1, 1, 1) + steps.view(-1, 1, 1)  # ``steps`` itself: cheap, stays inlined


def test_a_costly_value_per_lane_of_a_batch_is_realized() -> None:
    gm = _traced(_per_lane_corrected, torch.ones(4, 8, 8), torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor(0.9))
    chosen = scalars_once.scalars_to_realize(gm.graph)
    # The [4, 1, 1] view of the correction, read by the division over [4, 8, 8]; not ``steps`` (no costly op).
    assert [tuple(node.meta["val"].shape) for node in chosen] == [(4, 1, 1)], gm.code


def test_a_costly_value_read_only_by_ops_of_its_own_size_is_not_realized() -> None:
    def fn(p: torch.Tensor) -> torch.Tensor:
        return p.sqrt() * 2  # the sqrt is as large as what reads it: an element-for-element op, nothing to hoist

    gm = _traced(fn, torch.ones(16))
    assert scalars_once.scalars_to_realize(gm.graph) == [], gm.code


def test_a_costly_value_larger_than_a_batch_of_lanes_is_not_realized() -> None:
    rows = scalars_once.SMALL_NUMEL + 1
    gm = _traced(lambda p, v: p / v.sqrt().view(-1, 1), torch.ones(rows, 4), torch.ones(rows))
    assert scalars_once.scalars_to_realize(gm.graph) == [], gm.code


def test_marking_does_not_change_what_the_graph_computes() -> None:
    args = (torch.randn(16), torch.tensor(3.0), torch.tensor(0.9), torch.tensor(0.1))
    expected = _bias_corrected(*args)
    compiled = _compat.compile_with_inductor(_traced(_bias_corrected, *args), list(args), {
        "post_grad_custom_post_pass": scalars_once.inductor_pass(), "fx_graph_cache": False})
    result = compiled(*args)
    torch.testing.assert_close(result[0] if isinstance(result, (list, tuple)) else result, expected)


def test_marking_a_per_lane_value_does_not_change_what_the_graph_computes() -> None:
    args = (torch.randn(4, 8, 8), torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor(0.9))
    compiled = _compat.compile_with_inductor(_traced(_per_lane_corrected, *args), list(args), {
        "post_grad_custom_post_pass": scalars_once.inductor_pass(), "fx_graph_cache": False})
    result = compiled(*args)
    torch.testing.assert_close(result[0] if isinstance(result, (list, tuple)) else result, _per_lane_corrected(*args))


def test_the_pass_is_set_on_cpu_only() -> None:
    config = CaptureConfig()
    assert "post_grad_custom_post_pass" in lowering.shadow_patches(config, torch.device("cpu"), cudagraphs=False)
    # CUDA: Triton computes a 0-dim value once per program, and the CUDA kernel goldens stay as they are.
    assert "post_grad_custom_post_pass" not in lowering.shadow_patches(config, torch.device("cuda"), cudagraphs=True)


def _element_loop(kernel: str) -> str:
    """The body of the C++ loop over the flat buffer (the longest loop; up to the next loop nest)."""
    loops = list(re.finditer(r"for\(int64_t x0=[^;]*; x0<static_cast<int64_t>\((\d+)L\);", kernel))
    assert loops, kernel
    longest = max(loops, key=lambda loop: int(loop.group(1)))
    assert int(longest.group(1)) >= 220, longest.group(0)  # the 4 params' 220 elements, at least
    rest = kernel[longest.end():]
    following = rest.find("for(int64_t")
    return rest if following < 0 else rest[:following]


def test_adamw_cpu_kernel_computes_its_bias_corrections_once_per_step() -> None:
    with torch._inductor.config.patch(fx_graph_cache=False), _compat.generated_modules() as sources:
        pair = make_pair(lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.01))
        for seed in range(3):
            step_both(pair, seed)
    kernels = [source for source in sources if "cpp_fused" in source and "std::pow" in source]
    assert len(kernels) == 1, [s[:200] for s in sources]
    body = _element_loop(kernels[0])
    assert "at::vec::Vectorized<float>" in body, body
    assert "std::pow" not in body and "std::sqrt" not in body, body


def test_a_batch_of_lanes_computes_its_per_lane_bias_corrections_once_per_step() -> None:
    # The benchmark's LAMB keeps a step tensor per param: a batch of 4 same-shape matrices reads one bias correction
    # per lane, a float64 ``pow`` that the C++ kernel computed per vector of its 4 x 64 x 32 element loop.
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.weights = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(64, 32)) for _ in range(4)])
    with torch._inductor.config.patch(fx_graph_cache=False), _compat.generated_modules() as sources:
        pair = make_pair(lambda p: methods.make_optimizer("lamb", list(p)), model=model)
        for seed in range(3):
            step_both(pair, seed)
            assert_matches_eager(pair)
    assert paths(pair.optimizer)[-1] == "bucketed"
    kernels = [source for source in sources if "cpp_fused" in source]
    assert kernels and all("pow" in kernel for kernel in kernels), [s[:200] for s in sources]  # pow is in the step
    element_loops = []
    for kernel in kernels:
        for loop in re.finditer(r"for\(int64_t (x\d+)=[^;]*; \1<static_cast<int64_t>\((\d+)L\);", kernel):
            if int(loop.group(2)) >= 64 * 32:  # a loop over a lane's elements, or more
                rest = kernel[loop.end():]
                following = rest.find("for(int64_t")
                element_loops.append(rest if following < 0 else rest[:following])
    assert element_loops, kernels
    for body in element_loops:
        assert "pow(" not in body, body
