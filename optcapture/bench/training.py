"""The training presets: whole iterations of a nanoGPT-style model, the loop's tail run by each method.

An iteration is forward (autocast where asked), backward (through ``GradScaler`` with ``--amp fp16``), the tail, and
the scheduler's step. The tail is ``clip_grad_norm_``, the optimizer's step and ``zero_grad()`` (set_to_none); the
methods differ only in how it runs: eager foreach, ``fused=True``, the step compiled by stock ``torch.compile``
(tensor lr, PyTorch's recipe under a scheduler), the step compiled with optcapture, or the whole tail compiled with
optcapture. LambdaLR's step stays outside the tail: it is host-side Python that sets the groups' lr.

Invariant: every method trains its own deep copy of one model, with the same optimizer settings, on the same batches
in the same order, for the same number of iterations; its final params are compared with eager's.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import torch

import optcapture
from optcapture.bench import methods
from optcapture.bench.blocks import Timings, run_blocks, warm_up
from optcapture.bench.gpt import GPT, param_groups
from optcapture.bench.measure import failed, note, optcapture_path, release, say
from optcapture.bench.presets import TrainingPreset
from optcapture.bench.results import Result, median

Amp = Literal["none", "bf16", "fp16"]
TOLERANCE: dict[Amp, float] = {"none": 1e-3, "bf16": 5e-2, "fp16": 5e-2}
"""Largest |params - eager's| / |eager's params - initial| for "ok", or 3 times fused=True's where that is more. In
fp32 the methods differ by rounding of the same sums; under autocast a last-bit difference in a param changes a
low-precision activation, and Adam's normalised update turns grads near zero into full-size steps of either sign, so
the methods drift apart as training goes on; fused=True, which optcapture does not touch, measures that drift."""
PARITY_ITERATIONS = 4
"""Params are compared with eager's after this many iterations (the warm-up's, on the same batches in every method):
under autocast the methods drift apart chaotically as training goes on (the same run measured fused=True 0.025 and
0.29 from eager after 64 iterations on an H100), while a wrong update already stands out after a few."""
BATCHES = 4
"""Distinct batches, cycled: iteration i trains on batch i mod 4 in every method."""


@dataclasses.dataclass
class Warmup:
    """LambdaLR's factor: linear warmup over ``iterations``, then constant (a class, so it prints and pickles)."""

    iterations: int

    def __call__(self, iteration: int) -> float:
        return min(1.0, (iteration + 1) / self.iterations)


@dataclasses.dataclass
class TrainingContender:
    name: str
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    tail: Callable[[], None]
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
    autocast: torch.dtype | None
    device: torch.device
    iterations: int = 0
    timings: Timings = dataclasses.field(default_factory=Timings)
    early: list[torch.Tensor] | None = None
    """The params after :data:`PARITY_ITERATIONS` iterations, on the CPU."""

    def step(self) -> float:
        """One training iteration; returns the host seconds of its tail."""
        tokens, targets = self.batches[self.iterations % len(self.batches)]
        self.iterations += 1
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            loss = self.model(tokens, targets)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        begin = time.perf_counter()
        self.tail()
        host = time.perf_counter() - begin
        self.scheduler.step()
        if self.iterations == PARITY_ITERATIONS:
            self.early = [p.detach().to("cpu", copy=True) for p in self.params]
        return host


def _tail(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
          clip: float) -> Callable[[], None]:
    def tail() -> None:
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true grads
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()

    return tail


def build(method: str, master: GPT, preset: TrainingPreset, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
          device: torch.device, amp: Amp, compile_model: bool) -> TrainingContender | methods.Skipped:
    model = copy.deepcopy(master)
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(param_groups(model, preset.weight_decay), lr=preset.lr,
                                                         betas=preset.betas, foreach=True)
    if method == "fused":
        fused = methods.with_fused(optimizer)
        if isinstance(fused, methods.Skipped):
            return fused
        optimizer = fused
    elif method == "compile":
        optimizer = methods.with_tensor_lr(optimizer, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, Warmup(preset.warmup_iterations))
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    if method in ("compile", "optcapture"):
        # Compiled after the scheduler wrapped opt.step, as a user would; GradScaler.step(opt) calls it.
        optimizer.step = torch.compile(optimizer.step, backend="optcapture" if method == "optcapture" else "inductor")
    tail = _tail(model, optimizer, scaler, preset.clip)
    if method == "optcapture-tail":
        tail = torch.compile(tail, backend="optcapture")
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.compile(model) if compile_model else model
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return TrainingContender(method, forward, list(model.parameters()), optimizer, scheduler, scaler, tail, batches,
                             dtype, device)


def make_batches(preset: TrainingPreset, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator(device="cpu").manual_seed(1)
    shape = (preset.batch, preset.model.sequence)
    return [(torch.randint(0, preset.model.vocab, shape, generator=generator).to(device),
             torch.randint(0, preset.model.vocab, shape, generator=generator).to(device)) for _ in range(BATCHES)]


def compare_training(name: str, preset: TrainingPreset, method_names: Sequence[str], device: torch.device,
                     blocks: int, steps: int, amp: Amp, compile_model: bool,
                     notes: list[str] | None = None) -> list[Result]:
    """Build every method (eager first), warm each up, time whole iterations in alternating blocks, check them.
    ``notes`` gets a line for each method skipped or failed (raised while built or warmed up)."""
    torch.manual_seed(0)
    master = GPT(preset.model).to(device)
    initial = [p.detach().to("cpu", copy=True) for p in master.parameters()]
    batches = make_batches(preset, device)
    contenders: list[TrainingContender] = []
    with warnings.catch_warnings():
        # The scheduler's "lr_scheduler.step() before optimizer.step()" (GradScaler skips a step on inf; a compiled
        # step replaced the one it wrapped) says nothing about the methods here.
        warnings.filterwarnings("ignore", message=r".*lr_scheduler\.step\(\).*")
        warnings.filterwarnings("ignore", message=r".*optimizer\.step\(\) has been overridden.*")
        for method in ["eager", *(m for m in method_names if m != "eager")]:
            try:
                built = build(method, master, preset, batches, device, amp, compile_model)
                if isinstance(built, methods.Skipped):
                    note(notes, f"{name} {method} skipped: {built.reason}")
                    continue
                built.timings = warm_up(built, device)
            except Exception as error:  # reported with the others' results, as a benchmark of what happens must
                failed(notes, name, method, error)
                continue
            say(f"  {name}: {method} built, first iteration {built.timings.first_call_s:.1f} s")
            contenders.append(built)
        replays_before = _address_graph_calls()
        run_blocks(contenders, [c.timings for c in contenders], device, blocks, steps)
        replays, staged, misses = (after - before for after, before in
                                   zip(_address_graph_calls(), replays_before, strict=True))
        if replays or misses:  # the graphs beside the step (the tail's clip) replayed as CUDA graphs, or not
            say(f"  {name}: graphs beside the step, timed calls: {replays} replayed a CUDA graph ({staged} of them "
                f"over copies of moved grads), {misses} ran unrecorded")
    early = {c.name: c.early for c in contenders if c.early is not None}
    results = [_result(name, c, early.get(c.name), early.get("eager"), initial) for c in contenders]
    drift = next((r.relative_diff for r in results if r.method == "fused" and r.relative_diff is not None), 0.0)
    for r in results:
        r.tolerance = max(TOLERANCE[amp], 3 * drift)
    for r in results:
        say(f"  {name}: {r.method:16s} {r.step_ms:9.3f} ms/iteration, tail host {r.host_ms:.3f} ms")
    del contenders, master
    release(device)
    return results


def _address_graph_calls() -> tuple[int, int, int]:
    stats = optcapture.stats()
    return stats["address_graph_replays"], stats["address_graph_staged"], stats["address_graph_misses"]


def _result(name: str, contender: TrainingContender, early: list[torch.Tensor] | None,
            reference: list[torch.Tensor] | None, initial: list[torch.Tensor]) -> Result:
    """``early``: the contender's params after :data:`PARITY_ITERATIONS`; ``reference``: eager's."""
    timings = contender.timings
    max_diff = relative = None
    if early is not None and reference is not None and contender.name != "eager":
        max_diff = max(float((a - b).abs().max()) for a, b in zip(early, reference, strict=True))
        apart = sum(float((a - b).double().pow(2).sum()) for a, b in zip(early, reference, strict=True)) ** 0.5
        moved = sum(float((a - b).double().pow(2).sum()) for a, b in zip(reference, initial, strict=True)) ** 0.5
        relative = apart / moved if moved > 0 else float("inf")
    path, details = ("", "")
    if contender.name.startswith("optcapture"):
        path, details = optcapture_path(contender.optimizer, timings)
    return Result(name, contender.name, median(timings.device_ms), median(timings.host_ms), timings.first_call_s,
                  None, 0.0, 0.0, max_diff, timings.warm_up_s, step_blocks_ms=tuple(timings.device_ms),
                  host_blocks_ms=tuple(timings.host_ms), unit="iteration", relative_diff=relative, path=path,
                  details=details)
