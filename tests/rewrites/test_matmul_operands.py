"""The pass that stores a matmul operand other ops read too (a Newton-Schulz iterate), so that the next iterate loads
it instead of recomputing the chain back to the step's inputs (the batched steps it serves:
``tests/test_lane_batches.py``)."""

from __future__ import annotations

import re

import torch
from torch._inductor import config as inductor_config
from torch._inductor.utils import run_and_get_code

from optcapture import _compat
from optcapture.rewrites import matmul_operands

aten = torch.ops.aten


def _newton_schulz(m: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Muon's orthogonalisation of a batch, as torch.optim.Muon writes it per matrix (momentum, then three
    iterations of ``X = a X + (b A + c A A) X`` with ``A = X X^T``)."""
    x = m.lerp(g, 0.05).bfloat16()
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=1e-7)
    for _ in range(3):
        gram = x @ x.mT
        x = 3.4445 * x + (-4.775 * gram + 2.0315 * gram @ gram) @ x
    return x


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, 64, 192, generator=generator), torch.randn(4, 64, 192, generator=generator)


def _newton_schulz_float64(m: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = m.double().lerp(g.double(), 0.05)
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=1e-7)
    for _ in range(3):
        gram = x @ x.mT
        x = 3.4445 * x + (-4.775 * gram + 2.0315 * gram @ gram) @ x
    return x


def _compiled_code(with_pass: bool) -> tuple[torch.Tensor, str]:
    torch._dynamo.reset()
    patch = {"post_grad_custom_post_pass": _compat.post_grad_pass(matmul_operands.realize_shared_operands,
                                                                   matmul_operands.__file__)} if with_pass else {}
    with inductor_config.patch(fx_graph_cache=False, **patch):
        result, (code, *_) = run_and_get_code(torch.compile(_newton_schulz, backend="inductor"), *_inputs())
    return result, code


def _kernel_calls_reading_the_momentum(code: str) -> int:
    # The momentum is the compiled graph's first input; the call of a C++ kernel names each buffer it reads.
    calls = [match.group(1) for line in code.splitlines() if (match := re.fullmatch(r"\s+cpp_fused_\w+\((.*)\)", line))]
    assert calls, code
    return sum(1 for arguments in calls if "arg0_1" in arguments.split(", "))


def test_the_iterates_and_the_normalised_start_are_chosen_and_no_gram_matrix() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(_newton_schulz, tracing_mode="fake", pre_dispatch=False)(*_inputs())
    chosen = matmul_operands.shared_operands(gm.graph)
    # Read by matmuls and by a pointwise op: the normalised start (a div) and the first two iterates (adds); the
    # last iterate is read by no matmul, and each Gram matrix is a matmul's own result.
    assert [node.target for node in chosen] == [aten.div.Tensor, aten.add.Tensor, aten.add.Tensor], chosen


def test_each_iterate_is_loaded_instead_of_recomputed_from_the_momentum() -> None:
    without, code_without = _compiled_code(with_pass=False)
    with_pass, code_with = _compiled_code(with_pass=True)
    # Inductor alone recomputes the start from the momentum in every iterate's kernel; with the pass only the
    # kernel that computes the start reads it.
    assert _kernel_calls_reading_the_momentum(code_without) > 1, code_without
    assert _kernel_calls_reading_the_momentum(code_with) == 1, code_with
    # Stored iterates are rounded to bfloat16 as eager rounds them, where the inlined chain kept float32: neither
    # equals eager bit for bit, and the stored one is as close to the exact (float64) iteration as eager is.
    exact, eager = _newton_schulz_float64(*_inputs()), _newton_schulz(*_inputs()).double()
    error = (with_pass.double() - exact).abs().mean()
    assert error <= (eager - exact).abs().mean(), (error, (eager - exact).abs().mean())
    torch.testing.assert_close(with_pass.double(), eager, atol=2e-2, rtol=0)
