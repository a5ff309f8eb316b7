"""An EMA of the weights, and a checkpoint resumed by a new model, optimizer and scheduler (in a new process too).

The loop: SGD with Nesterov momentum and weight decay under ``CosineAnnealingLR``, the step captured with
``torch.compile(opt.step, backend="optcapture")``, and after every step an exponential moving average (EMA) of the
params, updated outside the compiled step::

    with torch.no_grad():
        torch._foreach_lerp_(ema, params, 1 - DECAY)     # ema += (1 - DECAY) * (param - ema)

The EMA reads the params where they are: optcapture moves them into flat storage but keeps each ``nn.Parameter``
object (and ``optimizer.state`` entry), so a list taken before the first step stays valid.

Checkpointing is the usual ``torch.save({"model": ..., "opt": opt.state_dict(), "sched": ..., "ema": ...})``: the
captured optimizer's tensors save as ordinary tensors. Resuming builds a *new* model, optimizer and scheduler, as a
restarted job does, loads the three state dicts and the EMA into them, and only then compiles the new optimizer's
step (after its scheduler; see ``02_amp_clipping_accumulation.py`` for why the order matters).

The check: train ``steps`` steps captured, save, resume into new objects and train ``resume_steps`` more, then
compare the params, the EMA and the optimizer's state (momentum buffers) with one uninterrupted eager run of
``steps + resume_steps`` steps. With ``resume_in_new_process=True`` the resume also runs in a fresh Python process
(``python 03_ema_and_checkpoint.py --resume-from CHECKPOINT``), which prints one JSON line and saves what it ended
with for the same comparison: nothing in the checkpoint depends on the process that wrote it.
"""

# %% Imports, model, data
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

DECAY = 0.9  # EMA decay (0.999 and more in real runs; small here so that a few steps move the EMA)
TOLERANCE = 1e-4


def make_model(device: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10)).to(device)


def make_optimizer(
    model: nn.Module, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return optimizer, scheduler


def batch(index: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of step ``index``: the same in every run and process, wherever the run starts."""
    generator = torch.Generator().manual_seed(index)
    x = torch.randn(32, 64, generator=generator)
    return x.to(device), torch.randint(0, 10, (32,), generator=generator).to(device)


# %% The training loop, with the EMA
def train(
    model: nn.Module,
    ema: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: Callable[[], object],
    start: int,
    stop: int,
    device: str,
) -> None:
    params = list(model.parameters())
    for index in range(start, stop):
        x, y = batch(index, device)
        nn.functional.cross_entropy(model(x), y).backward()
        step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - DECAY)


def new_ema(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# %% Checkpoint and resume
def save_checkpoint(
    path: Path,
    model: nn.Module,
    ema: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    steps_done: int,
    total_steps: int,
) -> None:
    torch.save({"model": model.state_dict(), "opt": optimizer.state_dict(), "sched": scheduler.state_dict(),
                "ema": ema, "steps_done": steps_done, "total_steps": total_steps}, path)


def resume(path: Path, more_steps: int, device: str) -> tuple[nn.Module, list[torch.Tensor], torch.optim.Optimizer]:
    """What a restarted job does: new objects, state loaded into them, the new step compiled, training goes on."""
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    model = make_model(device, seed=1234)  # other initial weights: only the checkpoint can make this run match
    optimizer, scheduler = make_optimizer(model, checkpoint["total_steps"])
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["opt"])
    scheduler.load_state_dict(checkpoint["sched"])
    ema = checkpoint["ema"]
    step = torch.compile(optimizer.step, backend="optcapture")  # after the scheduler and the loads
    start = checkpoint["steps_done"]
    train(model, ema, optimizer, scheduler, step, start, start + more_steps, device)
    return model, ema, optimizer


def snapshot(model: nn.Module, ema: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor the comparison covers, by name: params, EMA, and the optimizer's per-param state."""
    tensors = {f"param {name}": p.detach() for name, p in model.named_parameters()}
    tensors |= {f"ema {i}": t for i, t in enumerate(ema)}
    for index, state in optimizer.state_dict()["state"].items():
        tensors |= {f"state {index} {key}": v for key, v in state.items() if isinstance(v, torch.Tensor)}
    return {name: t.detach().cpu().clone() for name, t in tensors.items()}


def max_difference(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    assert reference.keys() == other.keys(), sorted(reference.keys() ^ other.keys())
    return max((reference[k].double() - other[k].double()).abs().max().item() for k in reference)


def resume_in_subprocess(path: Path, more_steps: int, device: str) -> dict[str, torch.Tensor]:
    out = path.with_name("resumed-in-new-process.pt")
    command = [sys.executable, __file__, "--resume-from", str(path), "--steps", str(more_steps),
               "--device", device, "--out", str(out)]
    environment = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as many threads as this one
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    sys.stderr.write(done.stderr)  # its warnings, if any
    if done.returncode != 0:
        raise RuntimeError(f"resuming in a new process failed with exit code {done.returncode}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"new process: {result}")
    saved: dict[str, torch.Tensor] = torch.load(result["out"], weights_only=True)
    return saved


# %% Run: captured with a checkpoint in the middle, against eager without one
def main(steps: int = 4, device: str = "cpu", resume_steps: int = 4, resume_in_new_process: bool = True) -> float:
    total = steps + resume_steps
    # Reference: eager, uninterrupted.
    model = make_model(device)
    optimizer, scheduler = make_optimizer(model, total)
    ema = new_ema(model)
    train(model, ema, optimizer, scheduler, optimizer.step, 0, total, device)
    reference = snapshot(model, ema, optimizer)

    # Captured: `steps` steps, checkpoint, then a new model/optimizer/scheduler resumes from it.
    begin = time.perf_counter()
    model = make_model(device)
    optimizer, scheduler = make_optimizer(model, total)
    ema = new_ema(model)
    step = torch.compile(optimizer.step, backend="optcapture")
    train(model, ema, optimizer, scheduler, step, 0, steps, device)
    import optcapture  # only for the report; capturing needed no import

    reports = list(optcapture.explain(optimizer))
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "checkpoint.pt"
        save_checkpoint(path, model, ema, optimizer, scheduler, steps, total)
        resumed_model, resumed_ema, resumed_optimizer = resume(path, resume_steps, device)
        differences = {"resumed in this process": max_difference(
            reference, snapshot(resumed_model, resumed_ema, resumed_optimizer))}
        if resume_in_new_process:
            differences["resumed in a new process"] = max_difference(
                reference, resume_in_subprocess(path, resume_steps, device))
    seconds = time.perf_counter() - begin

    for report in reports + optcapture.explain(resumed_optimizer):
        print(report.describe())
    difference = max(differences.values())
    print(f"{steps} + {resume_steps} steps on {device} in {seconds:.1f} s (compiles included); max |captured - eager| "
          f"over params, EMA and momentum buffers: "
          + ", ".join(f"{where} {d:.2e}" for where, d in differences.items()) + f"; stats {optcapture.stats()}")
    if difference > TOLERANCE:
        raise SystemExit(f"captured run diverged from eager by {difference}")
    return difference


def _resume_main(path: Path, more_steps: int, device: str, out: Path) -> None:
    """The new process: resume, save what the comparison covers, print one JSON line."""
    begin = time.perf_counter()
    model, ema, optimizer = resume(path, more_steps, device)
    torch.save(snapshot(model, ema, optimizer), out)
    import optcapture

    reports = optcapture.explain(optimizer)
    print(json.dumps({"out": str(out), "steps": more_steps, "seconds": round(time.perf_counter() - begin, 1),
                      "paths": [report.path for report in reports], "captures": optcapture.stats()["captures"]}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="steps before the checkpoint (with --resume-from: after)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resume-from", type=Path, help="resume from this checkpoint (the new-process part)")
    parser.add_argument("--out", type=Path, help="with --resume-from: where to save the resumed tensors")
    arguments = parser.parse_args()
    if arguments.resume_from is not None:
        _resume_main(arguments.resume_from, arguments.steps, arguments.device, arguments.out)
    else:
        main(arguments.steps, arguments.device)
