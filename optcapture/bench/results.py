"""What one benchmark row is: one method on one preset, timed in blocks.

Invariant: every number a table or chart shows is a field here or derived from fields here (medians and spreads from
the per-block values), so ``results.json`` alone reproduces the table (``--merge``).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Literal

Unit = Literal["step", "iteration"]
"""What a row times: one optimizer ``step()`` call, or one whole training iteration (forward, backward, tail)."""

TOLERANCE = 1e-4
"""Max |param - eager's| for "ok" after an fp32 step preset (steps of lr 1e-3)."""


@dataclasses.dataclass
class Result:
    preset: str
    method: str
    step_ms: float
    """Median over blocks of the device time per step (per iteration for training presets): CUDA events around the
    block's steps in a row, divided by their number (the host of one step overlaps the device work of the previous
    one, as in training); wall time on CPU."""
    host_ms: float
    """Median over blocks of the host wall time per ``step()`` call (training presets: of the tail, from after
    ``backward()`` to the tail's return), without synchronising."""
    first_call_s: float
    kernels: int | None
    """Device kernels launched by one steady step (CUDA, step presets only)."""
    peak_mb: float
    """Peak memory above params + grads while the method warmed up (CUDA, step presets only)."""
    floor_ms: float
    """Bytes the step must move / copy bandwidth (0 where no floor applies)."""
    max_abs_diff: float | None
    """Against the eager method's params after the same steps on the same data (None for eager itself)."""
    warm_up_s: float = 0.0
    """Wall time of the first 4 calls: a step whose first call runs as traced (SGD creates its momentum buffers
    in it) is captured in its second call, which "first call" does not include."""
    note: str = ""
    step_blocks_ms: tuple[float, ...] = ()
    """``step_ms`` of every block, in block order."""
    host_blocks_ms: tuple[float, ...] = ()
    unit: Unit = "step"
    relative_diff: float | None = None
    """|params - eager's| / |eager's params - initial params| (L2 over all params): the share of the training's
    own movement by which the method disagrees with eager; the check of training presets (autocast rounding
    makes single elements drift)."""
    tolerance: float = TOLERANCE
    """``relative_diff`` limit for training presets, ``max_abs_diff`` limit otherwise."""
    path: str = ""
    """optcapture methods: the path each capture took (``optcapture.explain``) and the steps run bucketed."""
    details: str = ""
    """optcapture methods: every ``CaptureReport`` printed, reasons included."""

    def __post_init__(self) -> None:  # JSON gives lists back
        self.step_blocks_ms = tuple(self.step_blocks_ms)
        self.host_blocks_ms = tuple(self.host_blocks_ms)

    @property
    def of_floor(self) -> float:
        return self.floor_ms / self.step_ms if self.step_ms > 0 else 0.0

    @property
    def step_spread(self) -> tuple[float, float]:
        """Lowest and highest block of ``step_ms`` (the median alone where there were no blocks)."""
        return _spread(self.step_blocks_ms, self.step_ms)

    @property
    def host_spread(self) -> tuple[float, float]:
        return _spread(self.host_blocks_ms, self.host_ms)

    @property
    def matches(self) -> bool | None:
        """Whether the params agree with eager's (None: this is eager, the reference)."""
        if self.unit == "iteration":
            return None if self.relative_diff is None else self.relative_diff <= self.tolerance
        return None if self.max_abs_diff is None else self.max_abs_diff <= self.tolerance


def _spread(blocks: tuple[float, ...], median: float) -> tuple[float, float]:
    return (min(blocks), max(blocks)) if blocks else (median, median)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def fused_ratio(results: list[Result], row: Result, host: bool = False) -> float | None:
    """``row``'s median over the ``fused`` method's of the same preset (None where the preset has no fused row)."""
    fused = next((r for r in results if r.preset == row.preset and r.method == "fused"), None)
    if fused is None:
        return None
    base = fused.host_ms if host else fused.step_ms
    value = row.host_ms if host else row.step_ms
    return value / base if base > 0 else None
