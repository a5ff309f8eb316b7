"""The examples run at toy size and check themselves against eager."""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import optcapture

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str, filename: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import does (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def _without_warnings(run: Callable[[], Any]) -> Any:
    """``run()``, failing on any warning but torch's own deprecations: optcapture's fallbacks are RuntimeWarnings,
    an LR scheduler that does not see the step warns "Detected call of `lr_scheduler.step()` before ..."."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run()
    unexpected = [f"{w.category.__name__}: {w.message}" for w in caught
                  if not issubclass(w.category, DeprecationWarning)]
    assert not unexpected, unexpected
    return result


def test_quickstart_matches_eager_and_compiles_once(capsys: object) -> None:
    module = _load("quickstart", "01_quickstart.py")
    difference = module.main(steps=6, device="cpu")
    assert difference <= 1e-4
    assert optcapture.stats()["bucketed"] == 1


def test_amp_clipping_accumulation_matches_eager_under_the_same_autocast() -> None:
    module = _load("amp_clipping_accumulation", "02_amp_clipping_accumulation.py")
    difference = _without_warnings(lambda: module.main(steps=4, device="cpu"))
    # Both runs use the same bfloat16 autocast, so only the optimizer step differs (about one float32 ulp per step).
    # A bfloat16 forward can amplify such a difference (eager against eager with its params nudged by one ulp: 3.5e-4
    # after 3 steps, measured); the captured run measured 1.2e-7 after 4 steps, so 1e-4 holds with a wide margin for
    # a few steps. A step that missed the clipping or one micro-batch's grads is 6.8e-3 and 1.7e-2 away.
    assert difference <= 1e-4
    stats = optcapture.stats()
    assert (stats.captures, stats.bucketed, stats.steps) == (1, 1, 4), stats  # two param groups, one capture


def test_ema_and_checkpoint_resume_matches_uninterrupted_eager(capsys: pytest.CaptureFixture[str]) -> None:
    module = _load("ema_and_checkpoint", "03_ema_and_checkpoint.py")
    difference = _without_warnings(
        lambda: module.main(steps=3, device="cpu", resume_steps=3, resume_in_new_process=True))
    assert difference <= 1e-4  # params, EMA and momentum buffers; measured 1.5e-8
    stats = optcapture.stats()
    # SGD's first step creates its momentum buffers (first-step), then one capture; the resumed optimizer, whose
    # buffers come from the checkpoint, is captured at its first call.
    assert (stats.first_steps, stats.bucketed, stats.eager, stats.per_tensor) == (1, 2, 0, 0), stats
    output = capsys.readouterr().out
    assert "new process: " in output and "'paths': ['bucketed']" in output, output


def test_third_party_optimizer_is_bucketed_and_matches_eager() -> None:
    pytest.importorskip("pytorch_optimizer")
    module = _load("third_party_optimizer", "04_third_party_optimizer.py")
    result = _without_warnings(lambda: module.main(steps=3, device="cpu"))
    assert result.difference <= 1e-4  # params, exp_avg, exp_avg_var; the groups' int step counts are equal
    assert optcapture.explain(result.optimizer)[-1].path == "bucketed"
