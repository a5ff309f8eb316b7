"""Reports and caches: explain, stats, reset, and reports that never keep an optimizer alive."""

from __future__ import annotations

import gc
import weakref

import torch
from helpers import make_pair, step_both

import optcapture


def _captured_pair() -> object:
    pair = make_pair(lambda p: torch.optim.Adam(p, lr=0.1))
    for seed in range(3):
        step_both(pair, seed)
    return pair


def test_explain_describes_each_capture() -> None:
    pair = _captured_pair()
    reports = optcapture.explain(pair.optimizer)  # type: ignore[attr-defined]
    assert [r.path for r in reports] == ["bucketed"]  # Dynamo creates Adam's state before tracing the step
    bucketed = reports[0]
    assert bucketed.kernels == 3 and bucketed.runs == 1 and bucketed.grads == "copied"
    text = bucketed.describe()
    assert text.startswith("Adam: bucketed (3 kernel(s) generated, 1 flat run(s), grads copied, ")
    assert "bucket group 0 cpu torch.float32: 4 tensors, 220 elements" in text
    assert "hyperparameter in a device tensor: group 0 lr" in text
    assert str(bucketed) == text  # print(explain(opt)[0]) reads as the description, not a dataclass repr
    reports.clear()  # explain returns a copy
    assert len(optcapture.explain(pair.optimizer)) == 1  # type: ignore[attr-defined]


def test_explain_printed_reads_as_the_descriptions_and_says_why_it_is_empty() -> None:
    pair = _captured_pair()
    reports = optcapture.explain(pair.optimizer)  # type: ignore[attr-defined]
    assert str(reports) == reports[0].describe()  # print(explain(opt)): the descriptions, not dataclass reprs
    never = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    assert optcapture.explain(never) == []
    assert "no step of this SGD was compiled with backend='optcapture'" in str(optcapture.explain(never))
    optcapture.capture(never)
    assert "this SGD is captured with optcapture.capture() but has not stepped" in repr(optcapture.explain(never))

    class Wrapper(torch.optim.Optimizer):  # steps an inner optimizer, as ZeroRedundancyOptimizer does (.optim)
        def __init__(self, inner: torch.optim.Optimizer) -> None:
            super().__init__([torch.zeros(1)], {})
            self.optim = inner

    assert "explain(opt.optim)" in str(optcapture.explain(Wrapper(pair.optimizer)))  # type: ignore[attr-defined]
    assert "not a Linear" in str(optcapture.explain(torch.nn.Linear(2, 2)))  # type: ignore[arg-type]


def test_stats_count_steps_and_reset_clears_everything() -> None:
    pair = _captured_pair()
    stats = optcapture.stats()
    assert (stats["captures"], stats["bucketed"], stats["eager"], stats["steps"]) == (1, 1, 0, 3)
    assert isinstance(stats, optcapture.Stats) and stats.steps == 3 and stats.first_steps == 0
    assert dict(stats) == {name: getattr(stats, name) for name in stats}
    optcapture.reset()
    assert set(optcapture.stats().values()) == {0}
    assert optcapture.explain(pair.optimizer) == []  # type: ignore[attr-defined]


def test_reports_do_not_keep_the_optimizer_alive() -> None:
    pair = _captured_pair()
    optimizer = weakref.ref(pair.optimizer)  # type: ignore[attr-defined]
    del pair
    gc.collect()
    assert optimizer() is None


def test_a_first_step_that_creates_state_is_no_fallback() -> None:
    pair = make_pair(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    for seed in range(3):
        step_both(pair, seed)
    stats = optcapture.stats()
    assert (stats.first_steps, stats.eager, stats.bucketed) == (1, 0, 1)
    assert [r.path for r in optcapture.explain(pair.optimizer)] == ["first-step", "bucketed"]
