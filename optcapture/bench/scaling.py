"""The scaling preset: host time of AdamW's step against the number of tensors, in the default ``zero_grad()`` loop.

Every method steps over ``count`` tensors of the same size (4096 floats on CUDA, 64 on CPU: the step is host-bound
either way) and gets new grad tensors before every step, as after ``zero_grad()`` (set_to_none) and ``backward()``.

Invariant: one count at a time: its methods are built, timed in alternating blocks and freed (with Dynamo's cache)
before the next count's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from optcapture.bench import methods
from optcapture.bench.measure import compare_steps, note, release, synthetic
from optcapture.bench.presets import SCALING_NUMEL
from optcapture.bench.results import Result


def parse_counts(text: str, numel: int) -> list[tuple[int, int]]:
    """``"16x1024,96x4096,1000"`` -> (count, floats per tensor) pairs; a bare count takes ``numel``."""
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            count, _, size = item.partition("x")
            pairs.append((int(count), int(size) if size else numel))
    return pairs


def compare_scaling(counts: Sequence[tuple[int, int]], optimizer_name: str, method_names: Sequence[str],
                    device: torch.device, blocks: int, steps: int, bandwidth: float,
                    compile_limit: int, notes: list[str] | None = None) -> list[Result]:
    """``scaling-<count>`` rows (``scaling-<count>x<numel>`` where a count has its own size) for every (count,
    floats per tensor); stock compile only up to ``compile_limit`` tensors (its first call takes minutes above)."""
    results: list[Result] = []
    for count, numel in counts:
        chosen = list(method_names)
        if count > compile_limit and "compile" in chosen:
            chosen.remove("compile")
            note(notes, f"scaling-{count} compile skipped: above {compile_limit} tensors its first call takes "
                        "minutes (name it in --methods to run it)")
        make_copy, grads = synthetic([(numel,)] * count, optimizer_name, device)
        floor_ms = methods.BYTES_PER_PARAM[optimizer_name] * numel * count / bandwidth * 1e3
        label = f"scaling-{count}" if numel == default_numel(device) else f"scaling-{count}x{numel}"
        results += compare_steps(label, make_copy, grads, chosen, device, blocks, steps, floor_ms,
                                 fresh_grads=True, notes=notes)
        del make_copy, grads
        release(device)
    return results


def default_numel(device: torch.device) -> int:
    return SCALING_NUMEL[device.type]
