"""Replay, for a compiled graph that is no bucketed step: one CUDA graph per set of input addresses.

The graphs a training loop's tail compiles next to the step (``clip_grad_norm_``, an EMA of the params, GradScaler's
unscale), and a step optcapture runs per tensor, read and write grads and params in place. Inductor runs them
without CUDA graphs, launching every kernel from Python, two or more per tensor: cudagraph trees copy each input
that is not a static param into a buffer of their own and skip any graph that mutates such an input
(torch/_inductor/cudagraph_utils.py, ``check_for_mutation``). Yet the caching allocator gives autograd's grads the
same addresses iteration after iteration, and params and an EMA never move: the kernels of one call run on the
addresses of an earlier one. So a graph recorded against its inputs where they lie is replayed whenever every input
is where it was recorded, checked by one C-level pass over the inputs per call; a set of addresses is recorded the
second time it is seen (addresses that never repeat cost that pass and nothing else); the graph's outputs are copied
out of its static buffers before they are returned, and the version counters of the inputs it writes are bumped as
Inductor's own call bumps them.

Invariant: a recorded graph is replayed only on inputs at exactly the addresses it was recorded with (their shapes,
strides and dtypes are fixed by Dynamo's guards of the frame); every other call runs the compiled graph as Inductor
made it, and so does every call of a graph found unfit for recording (a random op, a host sync, an output that is
an input or a view of one).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from optcapture.replay.counters import COUNTERS

log = logging.getLogger(__name__)

KNOWN_ADDRESS_SETS = 4
"""Recorded graphs kept per compiled graph (the oldest is dropped): training with ``zero_grad(set_to_none=True)``
settles on one or two address sets of its grads."""
_SEEN_ADDRESS_SETS = 8
_LARGEST_OUTPUTS = 64 * 2**20
"""Bytes a recorded graph may return (a norm, a found-inf flag: a few bytes); a graph returning more runs unrecorded."""

_DATA_PTR = torch.Tensor.data_ptr
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_RANDOM = torch.Tag.nondeterministic_seeded
_RANDOM_NAMES = ("rand", "dropout", "bernoulli", "normal", "multinomial", "poisson", "uniform", "exponential",
                 "cauchy", "geometric", "seed")
_HOST_SYNCS = frozenset({torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default})


def unfit_for_recording(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> str | None:
    """Why ``gm``, compiled for ``example_inputs``, cannot be recorded per set of addresses; None when it can."""
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        target = node.target
        name = (target if isinstance(target, str) else getattr(target, "__name__", str(target))).lower()
        if target in _HOST_SYNCS or name in ("item", "tolist", "nonzero", "_local_scalar_dense"):
            return f"it reads a value on the host ({name})"
        if _RANDOM in getattr(target, "tags", ()) or any(word in name for word in _RANDOM_NAMES):
            return f"it draws random numbers ({name})"
    if not example_inputs:
        return "it has no inputs"
    for value in example_inputs:
        if type(value) not in _PLAIN:
            return f"an input is a {type(value).__name__}, not a plain tensor"
    if len({t.device for t in example_inputs}) != 1 or example_inputs[0].device.type != "cuda":
        return "its inputs are not all on one CUDA device"
    for value in tensor_attributes(gm):
        if type(value) not in _PLAIN or value.device.type != "cuda":
            return "it reads a tensor attribute that is not a plain CUDA tensor"
    if torch.is_grad_enabled() and any(t.requires_grad for t in example_inputs):
        return "autograd records it (an input requires grad)"
    return None


def tensor_attributes(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    """The tensors ``gm`` reads through ``get_attr`` nodes (Dynamo installs some held tensors so)."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value: Any = gm
            for part in str(node.target).split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor):
                found.append(value)
    return found


class AddressGraphs:
    """``compiled`` (Inductor's callable of a graph whose inputs are all CUDA tensors) replayed from a CUDA graph
    whenever its inputs lie at the addresses of one recorded before."""

    def __init__(self, compiled: Callable[..., Any], name: str, attributes: Sequence[torch.Tensor] = ()) -> None:
        self.compiled = compiled
        self.name = name
        self.attributes = list(attributes)
        """Tensors the graph reads as attributes, not inputs (:func:`tensor_attributes`): their addresses are part of
        the key, so that ``p.data = ...`` on one of them is never replayed over the old storage."""
        self.graphs: collections.OrderedDict[tuple[int, ...], _Recorded] = collections.OrderedDict()
        self.seen: collections.OrderedDict[tuple[int, ...], None] = collections.OrderedDict()
        self.unfit: str | None = None
        self.warm = False
        self.written: list[int] = []
        """Positions, in the inputs followed by the attributes, of the tensors the graph writes, found at its first call
        by their version counters."""

    def __call__(self, *args: Any) -> Any:
        if self.unfit is not None:
            return self.compiled(*args)
        tensors = [*args, *self.attributes] if self.attributes else args
        key = tuple(map(_DATA_PTR, tensors))
        recorded = self.graphs.get(key)
        if recorded is None:
            if not self.warm or key not in self.seen or torch.cuda.is_current_stream_capturing():
                return self._run_and_remember(key, args, tensors)
            recorded = self._record(args)
            if recorded is None:
                return self.compiled(*args)
            self.graphs[key] = recorded
            if len(self.graphs) > KNOWN_ADDRESS_SETS:
                self.graphs.popitem(last=False)
        recorded.graph.replay()
        if self.written:
            # What Inductor's own call does for the tensors it writes (AOTAutograd's runtime wrapper): a step counter
            # written here must look written to whoever checks its version (a bucketed capture of the same optimizer).
            torch.autograd.graph.increment_version([tensors[i] for i in self.written])
        COUNTERS.address_graph_replays += 1
        return recorded.copied_outputs()

    def _run_and_remember(self, key: tuple[int, ...], args: Sequence[Any], tensors: Sequence[torch.Tensor]) -> Any:
        """A call as Inductor made it (``tensors``: the inputs, then the attributes); the first one also finds which
        of them the graph writes."""
        try:
            before = None if self.warm else [t._version for t in tensors]
        except RuntimeError:  # an inference tensor has no version counter: whether the graph writes it is unknown
            self._give_up("an input is an inference tensor")
            return self.compiled(*args)
        out = self.compiled(*args)
        if before is not None:
            self.written = [i for i, t in enumerate(tensors) if t._version != before[i]]
            self.warm = True
        self.seen[key] = None
        if len(self.seen) > _SEEN_ADDRESS_SETS:
            self.seen.popitem(last=False)
        return out

    def _record(self, args: Sequence[Any]) -> _Recorded | None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # as CUDA graph trees record
                outputs = self.compiled(*args)
        except Exception as error:  # noqa: BLE001 - not recordable (a host sync, a CPU copy): run as Inductor made it
            self._give_up(f"recording failed ({type(error).__name__}: {error})")
            return None
        storages = {t.untyped_storage().data_ptr() for t in (*args, *self.attributes)}
        returned = outputs if isinstance(outputs, list | tuple) else [outputs]
        listed = [o for o in returned if isinstance(o, torch.Tensor)]
        if any(o.untyped_storage().data_ptr() in storages for o in listed):
            self._give_up("an output is an input or a view of one")
            return None
        if sum(o.numel() * o.element_size() for o in listed) > _LARGEST_OUTPUTS:
            # Each recorded graph would keep its own copy of them, and every replay copies them out again.
            self._give_up("it returns large tensors")
            return None
        COUNTERS.address_graphs_recorded += 1
        log.info("%s: recorded a CUDA graph for a new set of input addresses (%d kept)", self.name,
                 min(len(self.graphs) + 1, KNOWN_ADDRESS_SETS))
        return _Recorded(graph, outputs)

    def _give_up(self, why: str) -> None:
        log.info("%s: runs without a CUDA graph: %s", self.name, why)
        self.unfit = why
        self.graphs.clear()


class _Recorded:
    """One recorded graph and its static outputs. It holds no input: it reads and writes whatever lies at the
    addresses it was recorded with, which a replay checked are the call's own inputs."""

    def __init__(self, graph: torch.cuda.CUDAGraph, outputs: Any) -> None:
        self.graph = graph
        self.outputs = outputs

    def copied_outputs(self) -> Any:
        """The outputs of the last replay, copied: the next replay overwrites the static ones."""
        outputs = self.outputs
        if isinstance(outputs, list | tuple):
            return type(outputs)(o.clone() if isinstance(o, torch.Tensor) else o for o in outputs)
        return outputs.clone() if isinstance(outputs, torch.Tensor) else outputs
