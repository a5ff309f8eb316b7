"""Timing several methods in alternating blocks, so that host drift reaches every method alike.

Every method is built and warmed up first; then each block runs every method for the same number of steps in a row,
in an order that rotates from block to block (block b starts with method b mod n). A slow spell of the host (another
process, a frequency change) then lands in one block of several methods instead of in all of one method's steps.

Invariant: one method runs at a time, the device idle before and after its block (synchronised), and every method
runs the same number of steps in all, so their final params can be compared.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Protocol

import torch

import optcapture


class Contender(Protocol):
    """One method, built and ready: ``step()`` runs one step (or training iteration) on the contender's own copy of
    the params and returns the host seconds of the part that is the method's (the ``step()`` call, or the tail)."""

    name: str

    def step(self) -> float: ...


@dataclasses.dataclass
class Timings:
    """What the blocks measured of one contender, per block, in block order."""

    device_ms: list[float] = dataclasses.field(default_factory=list)
    host_ms: list[float] = dataclasses.field(default_factory=list)
    first_call_s: float = 0.0
    warm_up_s: float = 0.0
    bucketed_steps: int = 0
    """Steps optcapture's bucketed replay ran while this contender's blocks ran (``optcapture.stats().steps``)."""
    timed_steps: int = 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(contender: Contender, device: torch.device, calls: int = 4) -> Timings:
    """Run the first ``calls`` steps: the first call's wall time and all of theirs (compiles happen here)."""
    timings = Timings()
    synchronize(device)
    begin = time.perf_counter()
    contender.step()
    synchronize(device)
    timings.first_call_s = time.perf_counter() - begin
    for _ in range(calls - 1):
        contender.step()
    synchronize(device)
    timings.warm_up_s = time.perf_counter() - begin
    return timings


def block_order(count: int, block: int) -> list[int]:
    """Indices of ``count`` contenders in the order block ``block`` runs them: rotated by one each block."""
    start = block % count if count else 0
    return [*range(start, count), *range(start)]


def run_blocks(contenders: Sequence[Contender], timings: Sequence[Timings], device: torch.device, blocks: int,
               steps: int) -> None:
    """Time ``blocks`` blocks of ``steps`` steps of every contender, appending to its ``timings``."""
    for block in range(blocks):
        for index in block_order(len(contenders), block):
            _time_block(contenders[index], timings[index], device, steps)


def _time_block(contender: Contender, timings: Timings, device: torch.device, steps: int) -> None:
    bucketed_before = optcapture.stats().steps
    synchronize(device)
    host_s = 0.0
    if device.type == "cuda":
        # The clock starts once the block's first step is queued, not on an idle device: otherwise the host time of
        # that one step, which in training overlaps the previous iteration's kernels, is charged to the block's
        # device time. A method slower on the host than on the device still shows it: the device then waits for each
        # following step.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        queued = 1 if steps > 1 else 0  # steps launched before the clock starts
        for _ in range(queued):
            host_s += contender.step()
        start.record()
        for _ in range(steps - queued):
            host_s += contender.step()
        end.record()
        end.synchronize()
        step_ms = float(start.elapsed_time(end)) / (steps - queued)
    else:
        begin = time.perf_counter()
        for _ in range(steps):
            host_s += contender.step()
        step_ms = (time.perf_counter() - begin) * 1e3 / steps
    timings.device_ms.append(step_ms)
    timings.host_ms.append(host_s * 1e3 / steps)
    timings.bucketed_steps += optcapture.stats().steps - bucketed_before
    timings.timed_steps += steps
