"""``python -m optcapture.bench`` and :func:`compare`: optcapture side by side with eager, ``fused=True`` and stock
``torch.compile``.

Every method runs in one process on its own copy of the same params, optimizer and grads (or model and batches),
built first and then timed in alternating blocks, so that host drift reaches every method alike; tables report the
median over blocks with the spread (fastest to slowest block), host time, first-call time, ratios to ``fused=True``,
and whether each method's params agree with eager's after the same steps.

    from optcapture.bench import compare
    print(compare(model, lambda m: torch.optim.AdamW(m.parameters(), lr=3e-4)))
"""

from optcapture.bench.compare import Comparison, compare
from optcapture.bench.results import Result

__all__ = ["Comparison", "Result", "compare"]
