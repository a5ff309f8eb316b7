"""Running one method on one preset and measuring it."""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Any

import torch

from optcapture.bench import methods


@dataclasses.dataclass
class Result:
    preset: str
    method: str
    step_ms: float  # device time per steady step (CUDA events; wall time on CPU), median
    host_ms: float  # host wall time per step call, median
    first_call_s: float
    kernels: int | None  # device kernels launched by one steady step (CUDA only)
    peak_mb: float  # peak memory above params + grads while stepping (CUDA only)
    floor_ms: float
    max_abs_diff: float | None  # against eager's params after the same steps
    # Wall time of the first 4 calls: a step whose first call runs as traced (SGD creates its momentum
    # buffers in it) is captured in its second call, which "first call" does not include.
    warm_up_s: float = 0.0
    note: str = ""

    @property
    def of_floor(self) -> float:
        return self.floor_ms / self.step_ms if self.step_ms > 0 else 0.0


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device copy, counting bytes read and written."""
    numel = (256 if device.type == "cuda" else 32) * 2**20
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        times.append(_timed(device, lambda: dst.copy_(src)))
    return float(2 * src.numel() * src.element_size() / (statistics.median(times) / 1e3))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Any) -> float:
    """Milliseconds of device time for ``fn`` (events on CUDA, wall time on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def make_data(shapes: list[tuple[int, ...]], device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.randn(s, generator=generator).to(device) for s in shapes]
    grads = [torch.randn(s, generator=generator).to(device) * 1e-2 for s in shapes]
    return params, grads


def kernels_per_step(step: Any) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def run(method: str, optimizer_name: str, preset: str, shapes: list[tuple[int, ...]], device: torch.device,
        steps: int, floor_ms: float, reference: list[torch.Tensor] | None) -> tuple[Result | None, list[torch.Tensor]]:
    """Measure ``method``; returns its result and its final params (on the CPU, for the parity check)."""
    master_params, master_grads = make_data(shapes, device)
    params = [torch.nn.Parameter(p) for p in master_params]
    for p, g in zip(params, master_grads, strict=True):
        p.grad = g.clone()
    spare = [[g.clone() for g in master_grads] for _ in range(2)]
    del master_params
    built = methods.setup(method, optimizer_name, params, device)
    if built is None:
        return None, []

    def one_step(i: int) -> None:
        if built.fresh_grads:  # as after zero_grad() + backward: new grad tensors every step
            for p, g in zip(params, spare[i % 2], strict=True):
                p.grad = g
        built.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    _sync(device)
    begin = time.perf_counter()
    one_step(0)
    _sync(device)
    first_call = time.perf_counter() - begin
    for i in range(1, 4):
        one_step(i)
    _sync(device)
    warm_up = time.perf_counter() - begin
    # As in baseline-h100.md: CUDA events around `steps` steady steps in a row, divided by `steps` (the
    # host of one step overlaps the device work of the previous one, as in training); host time is the
    # wall time of the same calls. The median of 3 such windows is reported.
    device_ms, host_ms = [], []
    for window in range(3):
        grads = [spare[(window * steps + i) % 2] for i in range(steps)] if built.fresh_grads else []

        def window_of_steps(grads: list[list[torch.Tensor]] = grads) -> None:
            begin = time.perf_counter()
            for i in range(steps):
                if grads:
                    for p, g in zip(params, grads[i], strict=True):
                        p.grad = g
                built.step()
            host_ms.append((time.perf_counter() - begin) * 1e3 / steps)

        device_ms.append(_timed(device, window_of_steps) / steps)
    kernels = None
    if device.type == "cuda":
        if built.fresh_grads:
            for p, g in zip(params, spare[0], strict=True):
                p.grad = g
        kernels = kernels_per_step(built.step)
    else:
        one_step(0)
    _sync(device)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else 0.0
    final = [p.detach().to("cpu", copy=True) for p in params]
    diff = None
    if reference is not None:
        diff = max(float((a - b).abs().max()) for a, b in zip(final, reference, strict=True))
    result = Result(preset, method, statistics.median(device_ms), statistics.median(host_ms), first_call, kernels,
                    peak, floor_ms, diff, warm_up)
    return result, final


def release(device: torch.device) -> None:
    """Free what the last method held before the next one allocates."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
