"""The pass that writes a state back where its new value is computed, so that later kernels load it instead of
recomputing it from the old state (the batched steps it serves: ``tests/test_lane_batches.py``, whose kernel
goldens count with it)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from optcapture.rewrites import state_writes_early

aten = torch.ops.aten


def _functional(fn: Callable[..., None], *args: torch.Tensor) -> torch.fx.GraphModule:
    """``fn``'s graph as Inductor's post-grad passes see it: functional, each input it updates written back by a
    ``copy_`` at the end."""
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(torch.func.functionalize(fn, remove="mutations_and_views"), tracing_mode="fake")(*args)


def _lamb_like(m: torch.Tensor, g: torch.Tensor, p: torch.Tensor) -> None:
    m.mul_(0.9).add_(g)
    update = m / (p.abs() + 1.0)
    p.sub_(update * (update.norm() / 10))


def _reads_old_moment_late(m: torch.Tensor, g: torch.Tensor, p: torch.Tensor) -> None:
    old = m * 1.0  # a value of the old moment ...
    m.mul_(0.9).add_(g)
    p.sub_(m / (p.abs() + 1.0) + old)  # ... read after the new one is computed


def _writes(gm: torch.fx.GraphModule) -> list[tuple[str, int]]:
    nodes = list(gm.graph.nodes)
    return [(str(node.args[0]), n) for n, node in enumerate(nodes) if node.target is aten.copy_.default]


def _run(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    copies = [t.clone() for t in inputs]
    gm(*copies)
    return copies


def _inputs() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(16, generator=generator) for _ in range(3)]


def test_a_state_write_moves_up_to_its_value_and_later_ops_read_the_written_state() -> None:
    gm = _functional(_lamb_like, *_inputs())
    expected = _run(gm, _inputs())
    (m_write, m_at), (p_write, p_at) = _writes(gm)
    assert state_writes_early.move_state_writes_up(gm.graph) == 2
    gm.recompile()
    ((_, m_moved_at), _) = _writes(gm)
    assert m_moved_at < m_at and m_moved_at < p_at, gm.code
    write = next(node for node in gm.graph.nodes if node.target is aten.copy_.default and str(node.args[0]) == m_write)
    # The update reads the written moment, not the value it was written from.
    assert write.users and all(user.target is not aten.copy_.default for user in write.users), gm.code
    for got, want in zip(_run(gm, _inputs()), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_state_whose_old_value_is_read_later_is_written_back_where_it_was() -> None:
    gm = _functional(_reads_old_moment_late, *_inputs())
    expected = _run(gm, _inputs())
    state_writes_early.move_state_writes_up(gm.graph)
    gm.recompile()
    nodes = list(gm.graph.nodes)
    moment = nodes[0]
    (write,) = [node for node in nodes if node.target is aten.copy_.default and node.args[0] is moment]
    last_read = max(n for n, node in enumerate(nodes) if moment in node.all_input_nodes and node is not write)
    # Not moved: still after the update that reads the old moment (through ``old``), and nothing reads it.
    assert nodes.index(write) > nodes.index(next(n for n in nodes if n.target is aten.sub.Tensor)), gm.code
    assert nodes.index(write) > last_read and not write.users, gm.code
    for got, want in zip(_run(gm, _inputs()), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _one_value_written_twice(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> None:
    new = g * 2
    out.copy_(b + 1)  # reads the old b, after ``new`` is computed
    a.copy_(new)
    b.copy_(new)


def test_a_value_written_back_to_two_inputs_leaves_both_writes_where_a_later_op_reads_the_old_one() -> None:
    # ``seen.copy_(ema)`` after ``ema.lerp_(...)``: Inductor's post-grad graph writes one value back to two inputs.
    # Moving the first write redirected the second to it, and the second then moved before the read of old b.
    inputs = [torch.randn(8, generator=torch.Generator().manual_seed(n)) for n in range(4)]
    gm = _functional(_one_value_written_twice, *inputs)
    for node in list(gm.graph.nodes):  # as Inductor does: a copy of the same shape and dtype is its source
        if node.target is aten.copy.default:
            node.replace_all_uses_with(node.args[1])
            gm.graph.erase_node(node)
    gm.recompile()
    expected = _run(gm, inputs)
    state_writes_early.move_state_writes_up(gm.graph)
    gm.recompile()
    for got, want in zip(_run(gm, inputs), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
