"""Which optimizers a frame reaches, and which graphs are pieces of an optimizer's step."""

from __future__ import annotations

import types

import torch

from optcapture import reach


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)


def test_candidates_are_found_in_values_their_items_and_attributes_but_not_in_modules() -> None:
    direct, listed, held, in_module = _optimizer(), _optimizer(), _optimizer(), _optimizer()
    trainer = types.SimpleNamespace(optimizer=held)
    module = torch.nn.Linear(2, 2)
    module.optimizer = in_module  # type: ignore[assignment]
    found = reach.candidate_optimizers([direct, [listed, 3], trainer, module, "text"])
    assert [id(o) for o in found] == [id(direct), id(listed), id(held)]


def test_globals_read_are_the_ones_the_frames_code_names() -> None:
    optimizer = _optimizer()
    code = compile("opt.step()", "<frame>", "exec")
    tracer = types.SimpleNamespace(f_code=code, f_globals={"opt": optimizer, "unused": _optimizer()})
    assert reach.globals_read(tracer) == [optimizer]
    assert reach.globals_read(types.SimpleNamespace(f_code=None, f_globals={})) == []
    assert reach.globals_read(None) == []


def test_step_codes_include_every_wrapped_function() -> None:
    codes = reach.step_codes(_optimizer())
    assert torch.optim.SGD.step.__wrapped__.__code__ in codes  # type: ignore[attr-defined]
    assert len(codes) >= 2


def test_a_graph_writing_a_param_in_place_touches_an_optimizer_and_a_forward_does_not() -> None:
    optimizer = _optimizer()
    param = optimizer.param_groups[0]["params"][0]

    def update(p: torch.Tensor) -> None:
        p.mul_(0.5)

    def forward(p: torch.Tensor) -> torch.Tensor:
        return p * 2

    for fn, expected in ((update, True), (forward, False)):
        gm = torch.fx.symbolic_trace(fn)
        placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
        assert reach.touches_optimizer(gm, {placeholder: param}, [optimizer]) is expected
