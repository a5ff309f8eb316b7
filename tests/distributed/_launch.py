"""Multi-process scaffolding for the distributed tests: spawn ``world_size`` CPU workers, bounded in time.

Each test hands :func:`spawn` a module-level ``worker(rank, world_size) -> result`` function. The workers run in
fresh processes (``spawn``: no state inherited from pytest, as under ``torchrun``), one thread each, with a gloo
process group rendezvousing through a file in a fresh temporary folder (no port to collide with other jobs on the
machine; gloo itself binds whatever ports the system gives it). Whatever each worker returns (anything picklable)
comes back to the test, rank by rank, so the assertions run in pytest; an exception in any worker fails the test
with the worker's traceback, and a worker still running after ``timeout`` seconds is killed and fails the test.

Invariant: no worker outlives :func:`spawn` (killed on timeout or on another worker's failure), and every worker
destroys its process group (and RPC agent) before it returns.
"""

from __future__ import annotations

import dataclasses
import datetime
import pickle
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Worker = Callable[[int, int], Any]

DEFAULT_TIMEOUT_S = 150.0


def spawn(worker: Worker, world_size: int = 2, timeout: float = DEFAULT_TIMEOUT_S, rpc: bool = False) -> list[Any]:
    """Run ``worker(rank, world_size)`` in ``world_size`` processes over gloo on CPU; return their results by rank.

    ``rpc=True`` also starts the RPC framework (TensorPipe), workers named ``worker0``, ``worker1``, ...
    """
    with tempfile.TemporaryDirectory(prefix="optcapture-dist-") as folder:
        context = mp.start_processes(_entry, args=(worker, world_size, folder, rpc), nprocs=world_size, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.0, deadline - time.monotonic()), grace_period=5.0):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{worker.__name__} did not finish in {timeout:.0f} s on {world_size} "
                                       "processes (a collective waiting for a rank that took another path?)")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        results = []
        for rank in range(world_size):
            with open(Path(folder) / f"result-{rank}.pickle", "rb") as result_file:
                results.append(pickle.load(result_file))
        return results


def _entry(rank: int, worker: Worker, world_size: int, folder: str, rpc: bool) -> None:
    torch.set_num_threads(1)  # two ranks on a small shared CPU, as torchrun's default OMP_NUM_THREADS=1 gives
    store = dist.FileStore(str(Path(folder) / "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    if rpc:
        from torch.distributed import rpc as rpc_module

        options = rpc_module.TensorPipeRpcBackendOptions(init_method=f"file://{Path(folder) / 'rpc'}",
                                                         rpc_timeout=60)
        rpc_module.init_rpc(f"worker{rank}", rank=rank, world_size=world_size, rpc_backend_options=options)
    try:
        result = worker(rank, world_size)
    finally:
        if rpc:
            rpc_module.shutdown()
        dist.destroy_process_group()
    with open(Path(folder) / f"result-{rank}.pickle", "wb") as result_file:
        pickle.dump(result, result_file)


# What the workers send back


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One scenario on one rank: an eager optimizer and a captured one trained side by side on the same batches."""

    eager: list[dict[str, Any]]
    """Per param of the eager optimizer: ``"param"`` and each state entry, as local CPU tensors (a DTensor's local
    shard) or Python values."""
    captured: list[dict[str, Any]]
    """The same for the captured optimizer."""
    paths: tuple[str, ...]
    """``optcapture.explain(...)`` paths of the captured optimizer, in compile order."""
    graphs_after_warmup: int
    """Dynamo graphs compiled after the warm-up steps (0: no recompile once warm)."""
    warnings: tuple[str, ...]
    """Every warning raised while training (torch's deprecations left out)."""


@dataclasses.dataclass
class Side:
    """A model, its optimizer and optional LR scheduler, stepped by :func:`train_side_by_side`."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    tail: Callable[[], Any] | None = None
    """What runs after ``backward()`` in place of clip, ``step()`` and ``zero_grad()`` (a compiled tail)."""


def local(tensor: Any) -> Any:
    """A tensor's local part (a DTensor's shard on this rank), detached and cloned; other values as they are."""
    if not isinstance(tensor, torch.Tensor):
        return tensor
    to_local = getattr(tensor, "to_local", None)
    return (to_local() if to_local is not None else tensor).detach().clone()


def snapshot(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Params and the whole optimizer state, param by param, as local tensors."""
    return [{"param": local(p), **{key: local(value) for key, value in optimizer.state.get(p, {}).items()}}
            for group in optimizer.param_groups for p in group["params"]]


def graphs_compiled() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def train_side_by_side(eager: Side, captured: Side, loss: Callable[[torch.nn.Module, int], torch.Tensor],
                       steps: int, warmup: int = 2, clip: float | None = None,
                       explained: torch.optim.Optimizer | None = None,
                       eager_optimizer: torch.optim.Optimizer | None = None) -> Outcome:
    """Step both sides ``steps`` times: ``loss(model, step).backward()``, optional ``clip_grad_norm_``, ``step()``,
    ``zero_grad()``, ``scheduler.step()``. ``explained`` (default: the captured optimizer) is the optimizer whose
    reports and state are read, ``eager_optimizer`` its eager counterpart (ZeRO's local optimizers)."""
    import optcapture

    graphs_at_warmup = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            if step == warmup:
                graphs_at_warmup = graphs_compiled()
            for side in (eager, captured):
                loss(side.model, step).backward()
                if side.tail is not None:
                    side.tail()
                    if side.scheduler is not None:
                        side.scheduler.step()
                    continue
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(side.model.parameters(), clip)
                side.optimizer.step()
                side.optimizer.zero_grad()
                if side.scheduler is not None:
                    side.scheduler.step()
    explained = explained if explained is not None else captured.optimizer
    return Outcome(
        eager=snapshot(eager_optimizer if eager_optimizer is not None else eager.optimizer),
        captured=snapshot(explained),
        paths=tuple(report.path for report in optcapture.explain(explained)),
        graphs_after_warmup=graphs_compiled() - graphs_at_warmup,
        warnings=tuple(f"{w.category.__name__}: {w.message}" for w in caught
                       if not issubclass(w.category, (DeprecationWarning, FutureWarning))))


def assert_matches_eager(outcome: Outcome) -> None:
    """Params and every state entry equal the eager optimizer's (float32 tolerances), param by param."""
    assert len(outcome.captured) == len(outcome.eager) > 0
    for index, (captured, eager) in enumerate(zip(outcome.captured, outcome.eager, strict=True)):
        assert captured.keys() == eager.keys(), (index, captured.keys(), eager.keys())
        torch.testing.assert_close(captured, eager, msg=lambda m, index=index: f"param {index}: {m}")


def fresh_compile_state() -> None:
    """Forget Dynamo's compiled frames, its counters and optcapture's reports: one scenario's counts are its own."""
    import optcapture

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    optcapture.reset()


@dataclasses.dataclass(frozen=True)
class Failed:
    """A scenario that raised, with the worker's traceback."""

    error: str


def run_scenarios(scenarios: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Run each scenario on this rank from fresh compile state; an exception is returned as :class:`Failed` (the
    other scenarios still run: the ranks fail alike, before or after their collectives)."""
    results: dict[str, Any] = {}
    for name, scenario in scenarios.items():
        fresh_compile_state()
        try:
            results[name] = scenario()
        except Exception:  # noqa: BLE001 - reported to the test, which fails on it
            results[name] = Failed(traceback.format_exc())
    return results


def outcome_of(results: list[dict[str, Any]], name: str, rank: int) -> Any:
    """Scenario ``name``'s result on ``rank``, failing the test with the worker's traceback if it raised."""
    result = results[rank][name]
    if isinstance(result, Failed):
        raise AssertionError(f"scenario {name!r} raised on rank {rank}:\n{result.error}")
    return result
