"""Shared fixtures: every test starts from fresh Dynamo, Inductor metrics and optcapture caches."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.metrics

import optcapture
from optcapture import progress


def _has_cuda_triton() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


HAS_GPU = _has_cuda_triton()


@pytest.fixture(autouse=True)
def _fresh_caches():
    torch._dynamo.reset()
    torch._inductor.metrics.reset()
    optcapture.reset()
    yield
    torch._dynamo.reset()
    optcapture.reset()


@pytest.fixture(autouse=True)
def _no_slow_first_call_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    # First calls pass 10 s on a loaded 2-core machine; tests that fail on any warning must not see that one.
    # tests/test_progress.py sets the threshold it tests.
    monkeypatch.setattr(progress, "SLOW_FIRST_CALL_SECONDS", float("inf"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="requires a CUDA GPU with Triton")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
