"""The examples run at toy size and check themselves against eager."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import tempfile
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


# Recipes for distributed training and frameworks (examples 05-09)


def _torchrun(filename: str, timeout: float = 240) -> str:
    """Run an example as ``torchrun --standalone --nproc-per-node 2`` does (gloo on CPU): the rendezvous binds a port
    the system picks, so parallel jobs cannot collide. Returns its output; fails with it on a non-zero exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(EXAMPLES.parent), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(EXAMPLES / filename)]
    launched = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        output, _ = launched.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in a session of its own, so killing torchrun would orphan them; on SIGTERM
        # it stops them itself (SIGTERM, then SIGKILL) before it exits.
        launched.terminate()
        try:
            output, _ = launched.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            launched.kill()
            output, _ = launched.communicate()
        raise AssertionError(f"{filename} took more than {timeout} s:\n{output}") from None
    assert launched.returncode == 0, output
    return output


def test_ddp_recipe_under_torchrun_is_bucketed_and_matches_eager() -> None:
    output = _torchrun("05_ddp_torchrun.py")
    assert "AdamW: bucketed" in output, output
    assert "max |captured - eager| over params and state, all ranks: " in output, output


def test_fsdp2_recipe_under_torchrun_is_bucketed_and_matches_eager() -> None:
    output = _torchrun("06_fsdp2_torchrun.py")
    # The step is bucketed over each rank's local shards (tests/distributed/test_fsdp2.py); the shards match eager.
    assert "AdamW: bucketed" in output, output
    assert "max |captured - eager| over local shards of params and state, all ranks: " in output, output


def test_accelerate_recipe_is_bucketed_and_matches_eager() -> None:
    pytest.importorskip("accelerate")
    module = _load("accelerate_recipe", "07_accelerate.py")
    difference = _without_warnings(module.main)
    assert difference <= 1e-5  # params and AdamW's state after 4 accumulated steps; measured 1.2e-7
    stats = optcapture.stats()
    assert (stats.captures, stats.bucketed, stats.steps) == (1, 1, 4), stats  # steps only when grads are synced


def test_lightning_recipe_steps_with_its_closure_compiled_and_matches_eager() -> None:
    if importlib.util.find_spec("lightning") is None:
        pytest.importorskip("pytorch_lightning")
    module = _load("lightning_recipe", "08_lightning.py")
    difference = module.main(steps=5)
    assert difference <= 1e-5  # measured 3e-8
    stats = optcapture.stats()
    # Lightning calls optimizer.step(closure=...) at every step: each ran the compiled step after the closure.
    assert (stats.captures, stats.bucketed, stats.steps) == (1, 1, 5), stats


def test_hf_trainer_recipe_is_bucketed_and_matches_eager() -> None:
    pytest.importorskip("transformers")
    module = _load("hf_trainer_recipe", "09_hf_trainer.py")
    difference = module.main(steps=4)
    assert difference <= 1e-4  # stock torch.compile: 1.0e-5 (see the example); optcapture measured 7e-6
    stats = optcapture.stats()
    assert (stats.captures, stats.bucketed, stats.steps) == (1, 1, 4), stats


def test_hf_trainer_recipe_with_warmup_from_lr_zero_matches_eager() -> None:
    # pytorch#126514: torch.optim's compiled Adam/AdamW computes denom = exp_avg_sq.sqrt() / (bias_correction2_sqrt *
    # step_size_neg) + eps / step_size_neg; at lr 0.0 (HF's warmup's first step) that is 0/0, NaN, wherever exp_avg_sq
    # is 0 (embedding rows no token used). A bucketed AdamW takes that step eagerly.
    pytest.importorskip("transformers")
    module = _load("hf_trainer_recipe_from_zero", "09_hf_trainer.py")
    model = module.make_model()
    with tempfile.TemporaryDirectory() as folder:
        eager = module.train(copy.deepcopy(model), False, 4, folder, warmup_from_zero=True)
        captured = module.train(copy.deepcopy(model), True, 4, folder, warmup_from_zero=True)
    assert module.max_difference(eager, captured) <= 1e-4  # NaN before optcapture stepped lr 0.0 eagerly
