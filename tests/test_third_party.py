"""Optimizers users install (timm, pytorch_optimizer), stepped through optcapture against eager on the same grads
(tests/third_party.py). The default run takes a representative few; ``-m exhaustive`` takes every one they export
that steps without a closure, checked against stock ``backend="inductor"`` too: never a wrong answer or a crash
where stock is right, and compiled (bucketed or per tensor) wherever stock compiles."""

from __future__ import annotations

import pytest
import third_party

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# The optimizers the first survey found wrong, crashing or left eager, one per root cause (Python int step counter
# in param groups, a counter under a string key of optimizer.state, grad.conj(), a module-level update function,
# a step counter tensor of the param groups written in place: timm's Lamb; state of another shape than its
# param's: SM3; a one-element tensor per param: QHAdam),
# with the last path each takes. MADGRAD reads its counter with a graph break (``math.pow(state["k"] + 1, 0.5)``):
# Dynamo compiles the pieces, none of them the whole step.
REPRESENTATIVE = {"timm.AdaBelief": "bucketed", "timm.Adan": "bucketed", "timm.Adopt": "bucketed",
                  "timm.Lamb": "bucketed", "pytorch_optimizer.Grams": "bucketed",
                  "pytorch_optimizer.DiffGrad": "bucketed", "pytorch_optimizer.QHAdam": "bucketed",
                  "pytorch_optimizer.MADGRAD": "per-tensor", "pytorch_optimizer.SM3": "per-tensor"}


def _installed(name: str) -> type:
    optimizers = third_party.all_optimizers()
    if name not in optimizers:
        pytest.skip(f"{name.split('.')[0]} is not installed")
    return optimizers[name]


@pytest.mark.parametrize("name", sorted(REPRESENTATIVE))
def test_representative_third_party_optimizer_matches_eager(name: str) -> None:
    result = third_party.try_optimizer(name, _installed(name), "optcapture", steps=4)
    assert result.error is None, result.error
    assert result.ok, (result.max_param_diff, result.max_state_diff, result.mismatches)
    assert result.paths and result.paths[-1] == REPRESENTATIVE[name], (result.paths, result.reasons)


def _every_optimizer() -> list[str]:
    return sorted(name for name in third_party.all_optimizers() if name not in third_party.EXCLUDED)


@pytest.mark.exhaustive
@pytest.mark.parametrize("name", _every_optimizer())
def test_never_worse_than_stock(name: str) -> None:
    cls = _installed(name)
    stock = third_party.try_optimizer(name, cls, "inductor")
    if stock.backend == "eager":
        pytest.skip(f"the eager optimizer itself fails: {stock.error}")
    ours = third_party.try_optimizer(name, cls, "optcapture")
    if stock.ok:
        assert ours.ok and ours.error is None, (ours.error, ours.max_param_diff, ours.mismatches, ours.reasons)
    if stock.error is None:
        assert ours.error is None, ours.error
    if stock.ok and stock.graphs and ours.paths:
        # Where stock compiles and is right (params, state, group numbers and the optimizer's own number attributes,
        # which Dynamo does not write back: pytorch_optimizer's EmoFact), optcapture compiles too.
        assert set(ours.paths) - {"eager", "first-step"}, f"left eager where stock compiles: {ours.all_reasons}"
