"""Measuring optimizer-step methods side by side: each on its own copy of the same params and grads, timed in
alternating blocks (:mod:`optcapture.bench.blocks`), then checked against eager's params.

Invariant: every method starts from the same initial params, state and grads (copies, never shared), runs the same
number of steps, and is compared with the eager method's params at the end.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence

import torch

import optcapture
from optcapture import dtensors
from optcapture.bench import methods
from optcapture.bench.blocks import Timings, run_blocks, synchronize, warm_up
from optcapture.bench.results import TOLERANCE, Result, median

CopyFactory = Callable[[], tuple[list[torch.Tensor], torch.optim.Optimizer]]
"""Builds one method's own copy: its trainable params (in the same order every time) and an optimizer over them that
has not stepped, in the form the eager method runs."""


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device copy, counting bytes read and written."""
    numel = (256 if device.type == "cuda" else 32) * 2**20
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - begin)
    return float(2 * src.numel() * src.element_size() / statistics.median(times))


def kernels_per_step(step: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def release(device: torch.device) -> None:
    """Free what the last methods held before the next ones allocate."""
    torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def note(notes: list[str] | None, line: str) -> None:
    """Say ``line`` now and keep it for the table's notes (a method skipped or failed, a count left out)."""
    say(f"  {line}")
    if notes is not None:
        notes.append(line)


def failed(notes: list[str] | None, preset: str, method: str, error: Exception) -> None:
    """A method that raised while built or warmed up: said with its traceback; the other methods still run."""
    say(traceback.format_exc())
    note(notes, f"{preset} {method} failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


@dataclasses.dataclass
class StepContender:
    """One step method over its own params; ``step()`` gives fresh grads first where the method asks for them."""

    name: str
    setup: methods.Setup
    params: list[torch.Tensor]
    spare_grads: list[list[torch.Tensor]]
    steps_run: int = 0
    peak_mb: float = 0.0
    kernels: int | None = None
    timings: Timings = dataclasses.field(default_factory=Timings)

    def step(self) -> float:
        if self.setup.fresh_grads:  # as after zero_grad() + backward(): new grad tensors every step
            for p, g in zip(self.params, self.spare_grads[self.steps_run % 2], strict=True):
                p.grad = g
        self.steps_run += 1
        begin = time.perf_counter()
        self.setup.step()
        return time.perf_counter() - begin


def synthetic(shapes: Sequence[tuple[int, ...]], optimizer_name: str,
              device: torch.device) -> tuple[CopyFactory, list[torch.Tensor]]:
    """Seeded fp32 params and grads of ``shapes`` (grads of scale 1e-2), and copies of the params with
    ``optimizer_name`` over them."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    master = [torch.randn(s, generator=generator).to(device) for s in shapes]
    grads = [(torch.randn(s, generator=generator) * 1e-2).to(device) for s in shapes]

    def make_copy() -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
        params = [torch.nn.Parameter(p.clone()) for p in master]
        return list(params), methods.make_optimizer(optimizer_name, params)

    return make_copy, grads


def fits_at_once(numel: int, method_count: int, device: torch.device) -> bool:
    """Whether copies for every method fit in device memory together (CPU: assumed): each holds params, grads, up to
    two state tensors and two sets of spare grads per param, in fp32, besides the master params and grads."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return bool((method_count * 6 + 2) * 4 * numel < 0.8 * free)


def _build(method: str, make_copy: CopyFactory, grads: Sequence[torch.Tensor], device: torch.device,
           fresh_grads: bool) -> StepContender | methods.Skipped:
    params, optimizer = make_copy()
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    built = methods.setup(method, optimizer, device)
    if isinstance(built, methods.Skipped):
        return built
    built.fresh_grads = built.fresh_grads or fresh_grads
    spare = [[g.clone() for g in grads] for _ in range(2)] if built.fresh_grads else []
    return warmed_contender(method, built, params, spare, device)


def warmed_contender(method: str, built: methods.Setup, params: Sequence[torch.Tensor],
                     grad_sets: Sequence[Sequence[torch.Tensor]], device: torch.device) -> StepContender:
    """A contender of ``built`` with its first calls run and timed; on CUDA with the peak memory they took above what
    was allocated before them."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    contender = StepContender(method, built, list(params), [list(grads) for grads in grad_sets])
    contender.timings = warm_up(contender, device)
    if device.type == "cuda":
        contender.peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return contender


def optcapture_path(optimizer: torch.optim.Optimizer, timings: Timings) -> tuple[str, str]:
    """A one-line summary of how optcapture ran this optimizer's step, and every report in full."""
    reports = optcapture.explain(optimizer)
    paths = ", ".join(dict.fromkeys(r.path for r in reports)) or "no capture (Dynamo handed optcapture no graph)"
    summary = f"{paths}; {timings.bucketed_steps}/{timings.timed_steps} timed steps bucketed"
    return summary, "\n".join(str(r) for r in reports)


def compare_steps(preset: str, make_copy: CopyFactory, grads: Sequence[torch.Tensor], method_names: Sequence[str],
                  device: torch.device, blocks: int, steps: int, floor_ms: float = 0.0,
                  isolated: bool = False, fresh_grads: bool = False, notes: list[str] | None = None) -> list[Result]:
    """Build every method (eager first: the reference), warm each up, time them in alternating blocks, check them.

    ``isolated``: one method at a time (built, timed, freed) where all of them do not fit in memory at once.
    ``fresh_grads``: every method gets new grad tensors before every step (the default ``zero_grad()`` loop).
    ``notes``: gets a line for each method skipped (not applicable) or failed (raised while built or warmed up).
    """
    names = ["eager", *(m for m in method_names if m != "eager")]
    contenders: list[StepContender] = []
    results: list[Result] = []
    reference: list[torch.Tensor] | None = None  # eager's final params, on the CPU

    def conclude(contender: StepContender) -> None:
        nonlocal reference
        final = final_params(contender, device)
        if contender.name == "eager":
            reference = final
        results.append(step_result(preset, contender, final, reference, floor_ms))
        say(f"  {preset}: {contender.name:22s} {results[-1].step_ms:9.3f} ms/step "
            f"(blocks {min(contender.timings.device_ms):.3f}-{max(contender.timings.device_ms):.3f})")

    for name in names:
        try:
            built = _build(name, make_copy, grads, device, fresh_grads)
        except Exception as error:  # reported with the others' results, as a benchmark of what happens must
            failed(notes, preset, name, error)
            continue
        if isinstance(built, methods.Skipped):
            note(notes, f"{preset} {name} skipped: {built.reason}")
            continue
        say(f"  {preset}: {name} built, first call {built.timings.first_call_s:.1f} s")
        if isolated:  # timed and concluded now, then freed before the next method allocates
            run_blocks([built], [built.timings], device, blocks, steps)
            conclude(built)
            del built
            release(device)
        else:
            contenders.append(built)
    run_blocks(contenders, [c.timings for c in contenders], device, blocks, steps)
    for contender in contenders:
        conclude(contender)
    return results


def final_params(contender: StepContender, device: torch.device) -> list[torch.Tensor]:
    """One more step (profiled on CUDA, so every method runs as many), then the params on the CPU (a DTensor's local
    shard: the elements this rank steps)."""
    if device.type == "cuda":
        contender.kernels = kernels_per_step(contender.step)
    else:
        contender.step()
    synchronize(device)
    return [dtensors.local(p).detach().to("cpu", copy=True) for p in contender.params]


def step_result(preset: str, contender: StepContender, final: list[torch.Tensor],
            reference: list[torch.Tensor] | None, floor_ms: float) -> Result:
    timings = contender.timings
    diff = None
    if reference is not None and contender.name != "eager":
        diff = max((float((a - b).abs().max()) for a, b in zip(final, reference, strict=True)), default=0.0)
    path, details = ("", "")
    if contender.name.startswith("optcapture"):
        path, details = optcapture_path(contender.setup.optimizer, timings)
    return Result(preset, contender.name, median(timings.device_ms), median(timings.host_ms), timings.first_call_s,
                  contender.kernels, contender.peak_mb, floor_ms, diff, timings.warm_up_s,
                  step_blocks_ms=tuple(timings.device_ms), host_blocks_ms=tuple(timings.host_ms),
                  path=path, details=details,
                  tolerance=methods.TOLERANCE_BY_CLASS.get(type(contender.setup.optimizer).__name__, TOLERANCE))
