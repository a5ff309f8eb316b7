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

Grads that do not come back where they were (a loop that keeps each returned norm or loss moves autograd's small
allocations at every iteration) would miss at every call. For them one more graph is recorded, against buffers of
its own for the inputs seen to move: a call at new addresses copies those inputs in, replays it, and copies back
the ones the graph writes (two copy launches instead of the graph's kernels one by one), while the inputs that never
moved (params, an EMA) are read and written where they lie.

Invariant: a recorded graph is replayed only on inputs at exactly the addresses it was recorded with (their shapes,
strides and dtypes are fixed by Dynamo's guards of the frame), or, staged, on inputs copied into the buffers it was
recorded with, the others at exactly their recorded addresses; every other call runs the compiled graph as Inductor
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
_LARGEST_STAGED = 64 * 2**20
"""Bytes of moving inputs a staged graph may hold copies of. Beyond it the copies' memory and device time (four
passes over them per call) outweigh what they save: a loop with that much grad is seldom bound by kernel launches."""
_RECORDINGS = 2 * KNOWN_ADDRESS_SETS
"""Graphs recorded per compiled graph for exact address sets at most. A loop whose grads cycle through more sets
than are kept would otherwise record one at nearly every call (a few ms each): past it, calls at sets not kept
replay the staged graph."""
_STAGED_RECORDINGS = 4
"""Staged graphs recorded per compiled graph at most (one is kept; another is recorded when more inputs move)."""

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
        self.stream: torch.cuda.Stream | None = None
        self.recordings = 0
        self.staged: _Staged | None = None
        self.staged_recordings = 0
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
            recordable = (self.warm and key in self.seen and self.recordings < _RECORDINGS
                          and not torch.cuda.is_current_stream_capturing())
            if not recordable:
                staged = self._staged_for(key, args, tensors) if self.warm else None
                if staged is not None:
                    self._remember(key)
                    return self._replay_staged(staged, args, tensors)
                COUNTERS.address_graph_misses += 1
                return self._run_and_remember(key, args, tensors)
            self.recordings += 1
            recorded = self._record(args)
            if recorded is None:
                COUNTERS.address_graph_misses += 1
                return self.compiled(*args)
            self.graphs[key] = recorded
            if len(self.graphs) > KNOWN_ADDRESS_SETS:
                self.graphs.popitem(last=False)  # the least recently replayed
        else:
            self.graphs.move_to_end(key)
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
        self._remember(key)
        return out

    def _remember(self, key: tuple[int, ...]) -> None:
        self.seen[key] = None
        self.seen.move_to_end(key)
        if len(self.seen) > _SEEN_ADDRESS_SETS:
            self.seen.popitem(last=False)

    def _staged_for(self, key: tuple[int, ...], args: Sequence[Any],
                    tensors: Sequence[torch.Tensor]) -> _Staged | None:
        """The staged graph for a call at addresses not recorded (``key``): the one kept, where the inputs that moved
        are among its staged ones, else one recorded now; None where staging does not apply."""
        if torch.cuda.is_current_stream_capturing() or not self.seen:
            return None
        staged = self.staged
        if staged is not None and staged.fits(key):
            return staged
        if self.staged_recordings >= _STAGED_RECORDINGS:
            return None
        # The inputs that moved since the address sets seen before: grads, not params or an EMA.
        moving = sorted({i for seen in self.seen for i, (a, b) in enumerate(zip(seen, key, strict=True)) if a != b}
                        | (set(staged.moving) if staged is not None else set()))
        if not moving or moving[-1] >= len(args) or not _stageable(tensors, moving):
            return None  # nothing moved, or a tensor attribute did (not an input: it cannot be swapped for a copy)
        self.staged_recordings += 1
        self.staged = self._record_staged(key, args, moving)
        return self.staged

    def _record_staged(self, key: tuple[int, ...], args: Sequence[Any], moving: list[int]) -> _Staged | None:
        buffers = [torch.empty_strided(args[i].size(), args[i].stride(), dtype=args[i].dtype, device=args[i].device)
                   for i in moving]
        staged_args = list(args)
        for i, buffer in zip(moving, buffers, strict=True):
            staged_args[i] = buffer
        recorded = self._record(staged_args)
        if recorded is None:
            return None
        log.info("%s: recorded a CUDA graph over copies of its %d moving input(s)", self.name, len(moving))
        return _Staged(recorded, key, moving, buffers, self.written)

    def _replay_staged(self, staged: _Staged, args: Sequence[Any], tensors: Sequence[torch.Tensor]) -> Any:
        movers = [args[i] for i in staged.moving]
        with torch.no_grad():
            torch._foreach_copy_(staged.buffers, movers)
            staged.recorded.graph.replay()
            if staged.written:  # bumps their versions, as Inductor's call would
                torch._foreach_copy_([movers[j] for j in staged.written], staged.written_buffers)
        if staged.written_in_place:
            torch.autograd.graph.increment_version([tensors[i] for i in staged.written_in_place])
        COUNTERS.address_graph_replays += 1
        COUNTERS.address_graph_staged += 1
        return staged.recorded.copied_outputs()

    def _record(self, args: Sequence[Any]) -> _Recorded | None:
        graph = torch.cuda.CUDAGraph()
        try:
            outputs = _captured(graph, self.compiled, args, self._side_stream())
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

    def _side_stream(self) -> torch.cuda.Stream:
        """The stream graphs are recorded on (capture is illegal on the legacy default stream)."""
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        return self.stream

    def _give_up(self, why: str) -> None:
        log.info("%s: runs without a CUDA graph: %s", self.name, why)
        self.unfit = why
        self.graphs.clear()
        self.staged = None


def _stageable(tensors: Sequence[torch.Tensor], moving: list[int]) -> bool:
    """Whether the inputs at ``moving`` may be swapped for copies: contiguous, none sharing memory with another input
    (a write through one would not reach the other), and small enough (:data:`_LARGEST_STAGED`)."""
    movers = [tensors[i] for i in moving]
    if sum(t.numel() * t.element_size() for t in movers) > _LARGEST_STAGED:
        return False
    if not all(t.is_contiguous() for t in movers):
        return False
    storages = collections.Counter(t.untyped_storage().data_ptr() for t in tensors)
    return all(storages[t.untyped_storage().data_ptr()] == 1 for t in movers)


class _Staged:
    """A graph recorded with ``buffers`` in place of its inputs at ``moving`` (positions in the inputs), the other
    inputs and the attributes at the addresses of ``key`` there; :attr:`written`: positions in ``moving`` of the
    inputs the graph writes, copied back after each replay."""

    def __init__(self, recorded: _Recorded, key: tuple[int, ...], moving: list[int], buffers: list[torch.Tensor],
                 written: list[int]) -> None:
        self.recorded = recorded
        self.moving = moving
        self.buffers = buffers
        staged = set(moving)
        self.written = [j for j, i in enumerate(moving) if i in written]
        self.written_buffers = [buffers[j] for j in self.written]
        self.written_in_place = [i for i in written if i not in staged]
        """Positions, in the inputs and attributes, of the tensors the graph writes where they lie."""
        self.kept = [(i, address) for i, address in enumerate(key) if i not in staged]

    def fits(self, key: tuple[int, ...]) -> bool:
        """Whether every input it does not stage lies where it did when it was recorded."""
        return all(key[i] == address for i, address in self.kept)


def _captured(graph: torch.cuda.CUDAGraph, compiled: Callable[..., Any], args: Sequence[Any],
              stream: torch.cuda.Stream) -> Any:
    """``compiled(*args)`` recorded into ``graph`` on ``stream``, not run; its outputs (in the graph's private pool).

    Not ``torch.cuda.graph``: its ``__enter__`` synchronizes and empties the caching allocator, which hands the next
    iteration's activations and grads new addresses, so that every recording made the one after it necessary (a
    training loop's clip graph replayed in about half its calls). Nothing here runs on the device, so ordering the
    side stream after the current one (as ``torch.cuda.graph``'s synchronize did) is all the capture needs; the
    replay that follows runs on the current stream."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode="thread_local")  # as CUDA graph trees record
        try:
            outputs = compiled(*args)
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    return outputs


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
