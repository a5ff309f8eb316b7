"""Stage 3, elementwise: which hyperparameters the shadow step can read as device tensors, found by tracing it.

A float of a param group that only flows into tensor arithmetic can be a 0-dim device tensor, so that a scheduler
changing it never changes the program. Whether it can is asked of Dynamo: the shadow step of
:mod:`optcapture.shadows` is traced (never run) with the key as a tensor, and the key is kept a tensor only where
the trace is one graph that reads every hyperparameter as a tensor. A key that steers Python control flow
(``if momentum != 0``) or needs a Python number (``alpha=lr``) fails that trace, so it stays a float, and Dynamo
keeps guarding it: changing it then recompiles, which is the correct outcome.

Invariant: probing only traces; no step runs, and the optimizer, its tensors and its groups are left as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from optcapture.preparation import BOOKKEEPING_KEYS

log = logging.getLogger(__name__)

HyperKey = tuple[int, str]  # (param group, key)
TracedGraph = tuple[torch.fx.GraphModule, list[Any]]
ShadowOf = Callable[[set[HyperKey], Sequence[int]], Callable[[], None]]
"""(keys read as tensors, indices of the runs stepped) -> the step of a shadow over those runs."""


class _Traced(Exception):
    def __init__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> None:
        self.gm = gm
        self.example_inputs = example_inputs


def trace_only(fn: Callable[[], None], failures: list[str] | None = None) -> TracedGraph | None:
    """The full Dynamo graph of ``fn`` and its inputs without running it, or None if it is not one graph. Why it is
    not is logged, or, given ``failures``, appended to it (a probe expects failures and says them once)."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        raise _Traced(gm, list(example_inputs))

    traced: TracedGraph | None = None
    try:
        torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)()
    except Exception as error:  # noqa: BLE001 - any failure means "not traceable"; the cause is logged
        cause: BaseException | None = error
        while cause is not None and traced is None:
            if isinstance(cause, _Traced):
                traced = (cause.gm, cause.example_inputs)
            cause = cause.__cause__ or cause.__context__
        if traced is None:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            if failures is None:
                log.debug("shadow does not trace as one graph: %s", reason)
            else:
                failures.append(reason)
        # NB: the traceback holds this frame and, through f_back, the backend's frames; drop it so the
        # optimizer is freed by reference counting, not only by the cycle collector.
        error.__traceback__ = None
        cause = None
    return traced


def probe_tensor_hypers(optimizer: torch.optim.Optimizer, run_groups: Sequence[int], candidates: set[HyperKey],
                        shadow_of: ShadowOf) -> set[HyperKey]:
    """The ``candidates`` the step tolerates as tensors: those that only feed tensor arithmetic.

    ``run_groups``: the param group of each run; ``shadow_of``: builds the shadow step a probe traces.
    """
    failures: list[str] = []  # failed probes are expected: said once, below

    def traces(keys: set[HyperKey], chosen: Sequence[int] = range(len(run_groups))) -> bool:
        traced = trace_only(shadow_of(keys, chosen), failures)
        return traced is not None and _keeps_tensors(*traced)

    accepted = _probe(optimizer, run_groups, candidates, traces)
    kept = sorted({name for _, name in candidates - accepted})
    if kept:
        log.debug("hyperparameters %s stay Python numbers: as tensors, %s", kept,
                  f"the shadow step does not trace as one graph ({'; '.join(dict.fromkeys(failures))})" if failures
                  else "the graph turns them back into numbers")
    return accepted


def _probe(optimizer: torch.optim.Optimizer, run_groups: Sequence[int], candidates: set[HyperKey],
           traces: Callable[..., bool]) -> set[HyperKey]:
    """:func:`probe_tensor_hypers`'s search, with ``traces(keys, chosen runs)`` its probe."""
    if not candidates:
        return candidates
    # Every probe traces a shadow, which costs time in proportion to its groups; with many groups (layer-wise
    # learning rates) probing them all took minutes. Groups that differ only in float values run the same code,
    # so the probes run on one group of each kind, and one trace of all groups confirms the answer.
    chosen = _one_group_of_each_kind(optimizer, run_groups, candidates)
    if len(chosen) < len(run_groups):
        accepted = candidates if traces(candidates, chosen) else _probe_by_name(
            candidates, lambda keys: traces(keys, chosen))
        if traces(accepted):
            return accepted
        if accepted == candidates:  # that was the trace of every candidate on all groups: not again
            return _probe_by_name(candidates, traces)
    if traces(candidates):
        return candidates
    return _probe_by_name(candidates, traces)


def _probe_by_name(candidates: set[HyperKey], traces: Callable[[set[HyperKey]], bool]) -> set[HyperKey]:
    """The largest set of whole key names (a name in every group at once) that traces, found greedily.

    By name, not by (group, name): every group runs the same code for a key, and a probe per group made the
    first call grow with the square of the number of groups."""
    by_name: dict[str, set[HyperKey]] = {}
    for key in candidates:
        by_name.setdefault(key[1], set()).add(key)

    def keys_of(names: list[str]) -> set[HyperKey]:
        return set().union(*(by_name[name] for name in names))

    names = [name for name in sorted(by_name) if traces(by_name[name])]
    while names and not traces(keys_of(names)):
        names.pop()
    return keys_of(names)


def _one_group_of_each_kind(optimizer: torch.optim.Optimizer, run_groups: Sequence[int],
                            candidates: set[HyperKey]) -> list[int]:
    """Indices of the runs of one param group per kind: groups of a kind differ only in candidate floats."""
    # Bookkeeping keys do not make a group another kind (a step that reads one anyway is caught by the
    # confirming trace of all groups).
    first_of_kind: dict[str, int] = {}
    for g in run_groups:
        group = optimizer.param_groups[g]
        kind = repr(sorted((key, repr(value)) for key, value in group.items()
                           if key not in BOOKKEEPING_KEYS and (g, key) not in candidates))
        first_of_kind.setdefault(kind, g)
    keep = set(first_of_kind.values())
    return [i for i, g in enumerate(run_groups) if g in keep]


def _keeps_tensors(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> bool:
    """True when Dynamo's graph reads every hyperparameter as a tensor: no Python-number inputs, no ``.item()``.

    A graph that turns a tensor hyperparameter back into a number could not replay under a CUDA graph
    with the value changing, so that key stays a float. NB: this sees Dynamo's graph only; stock foreach
    optimizers do the conversion later, inside AOT (torch 2.11), which is why the executed shadow of a stock
    class runs its single-tensor implementation (see :func:`optcapture.shadows.build_shadow`).
    """
    if not all(isinstance(value, torch.Tensor) for value in example_inputs):
        return False
    return not any(node.op == "call_method" and node.target == "item" for node in gm.graph.nodes)
