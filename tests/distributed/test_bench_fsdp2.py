"""The fsdp2 benchmark preset's check over ranks (``optcapture.bench.fsdp2``), on 2 CPU processes: each rank compares
its own local shards with eager's, and the table (rank 0's) must report the largest difference of any rank.

The whole preset under ``torchrun`` is run by tests/test_bench.py.
"""

from __future__ import annotations

import _launch
import torch

from optcapture.bench.fsdp2 import largest_difference_over_ranks
from optcapture.bench.results import Result

NAMES = ["eager", "fused", "compile", "optcapture"]


def _row(method: str, diff: float | None) -> Result:
    return Result("fsdp2", method, 1.0, 1.0, 0.1, None, 0.0, 1.0, diff)


def _worker(rank: int, world_size: int) -> dict[str, float | None]:
    # Rank 1 is further from eager for fused, rank 0 for optcapture; compile failed on rank 1 only (no row there).
    rows = [_row("eager", None), _row("fused", [1e-7, 3e-3][rank]), _row("optcapture", [2e-6, 1e-8][rank])]
    if rank == 0:
        rows.insert(2, _row("compile", 5e-7))
    largest_difference_over_ranks(rows, NAMES, torch.device("cpu"))
    return {r.method: r.max_abs_diff for r in rows}


def test_each_method_reports_its_largest_difference_over_ranks() -> None:
    results = _launch.spawn(_worker, timeout=120)
    assert results[0] == {"eager": None, "fused": 3e-3, "compile": 5e-7, "optcapture": 2e-6}
    assert results[1] == {"eager": None, "fused": 3e-3, "optcapture": 2e-6}
