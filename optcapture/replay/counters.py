"""The process-wide counters of :func:`optcapture.stats`, and the paths a compiled graph can take.

Invariant: only the replay stage writes the counters: :func:`count_graph` and :func:`count_path` (called by the
backend and :func:`optcapture.registry.record`), and the running captures (steps, grads, rebuilds).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Literal

Path = Literal["bucketed", "per-tensor", "eager", "first-step", "uncompiled"]
"""What a compiled graph of an optimizer step runs as: ``bucketed`` (one program per bucket over flat storage),
``per-tensor`` (Inductor's graph of the step as Dynamo traced it, as stock ``torch.compile`` runs it), ``eager``
(the traced graph or the optimizer's own step, uncompiled: a fallback), ``first-step`` (the first step of an
optimizer that creates its state inside ``step()``, run as traced once; the next call is captured), ``uncompiled``
(a step stepped through :func:`optcapture.capture` that Dynamo ran without handing optcapture any graph of it, e.g.
``fused=True`` or a graph break Dynamo gives the step's frame up at: the optimizer's own step ran as plain
Python)."""


@dataclasses.dataclass
class Stats(Mapping[str, int]):
    """Process-wide counts since the last :func:`optcapture.reset`; :func:`optcapture.stats` returns a copy (also
    readable as a dict: ``stats()["steps"]``). The one live instance, ``COUNTERS``, is written only by this
    module (:func:`count_graph`, :func:`count_path` and the running captures)."""

    captures: int = 0
    """Graphs of optimizer steps handed to optcapture by Dynamo. The four counts below count reports
    (:func:`optcapture.explain`), not graphs: a capture rebuilt during a step (``rebuilds``) reports again without
    a graph, and a graph that reaches no optimizer reports to none, so they need not add up to this."""
    bucketed: int = 0
    """Reports of bucketed steps: graphs captured so, and captures rebuilt so."""
    per_tensor: int = 0
    """Reports of steps compiled as Inductor's per-tensor graph (not bucketed, said once with the reason)."""
    eager: int = 0
    """Reports of steps run uncompiled (a fallback, said once with the reason), captures that gave up later
    included."""
    first_steps: int = 0
    """Reports of first steps that create the optimizer's state, run as traced once (no fallback)."""
    uncompiled: int = 0
    """Optimizers captured with :func:`optcapture.capture` whose step Dynamo ran without handing optcapture any graph
    of it (not counted in ``captures``): their own step ran as plain Python, said once with the reason."""
    steps: int = 0
    """Steps run by bucketed captures."""
    grads_copied: int = 0
    """Grads copied into flat storage by bucketed steps (CPU, or ``grads_in_place=False``)."""
    grad_tables_written: int = 0
    """Grad address tables rewritten on the device because a grad moved (CUDA, grads read in place)."""
    rebuilds: int = 0
    """Captures rebuilt during a step, without a compile, because a tensor they hold was replaced where Dynamo's
    guards do not look (``p.data = ...``; the state of a user optimizer whose tensors Dynamo guards by shape only,
    after ``load_state_dict``), or because another capture of the same optimizer laid its flat storage out anew
    (state made for a param that had none, its grad come back). A ``torch.optim`` optimizer's ``load_state_dict``
    makes Dynamo compile the step again instead: a new capture."""
    address_graphs_recorded: int = 0
    """CUDA graphs recorded of compiled graphs that are no bucketed step (a loop tail's ``clip_grad_norm_``, an EMA; a
    step run per tensor), one per set of input addresses seen twice (at most 8 per graph), and one over copies of the
    inputs seen to move (:mod:`optcapture.replay.address_graphs`)."""
    address_graph_replays: int = 0
    """Calls of such graphs that replayed a recorded CUDA graph."""
    address_graph_staged: int = 0
    """Of those replays, calls at addresses not recorded whose moving inputs (grads) were copied into the buffers of
    a graph recorded over copies of them, and the ones it writes copied back."""
    address_graph_misses: int = 0
    """Calls of such graphs that ran their kernels one by one, their inputs at addresses no recorded graph has (the
    first calls, and every call once the grads move at each iteration)."""

    def __getitem__(self, key: str) -> int:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        value: int = getattr(self, key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)


COUNTERS = Stats()
_PATH_COUNTER = {"bucketed": "bucketed", "per-tensor": "per_tensor", "eager": "eager", "first-step": "first_steps",
                "uncompiled": "uncompiled"}


def count_graph() -> None:
    """One graph of an optimizer step handed to optcapture."""
    COUNTERS.captures += 1


def count_path(path: Path) -> None:
    """One graph that runs as ``path`` (called once per compiled graph, when its report is recorded)."""
    name = _PATH_COUNTER[path]
    setattr(COUNTERS, name, getattr(COUNTERS, name) + 1)


def reset_counters() -> None:
    for field in dataclasses.fields(Stats):
        setattr(COUNTERS, field.name, 0)
