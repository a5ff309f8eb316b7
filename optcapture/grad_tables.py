"""Stage 2, preparation's grad tables: read a run's grads where autograd allocated them, through their addresses.

A :class:`GradTable` lets a bucket kernel read the grads of one run of flat storage in place, without a grad-sized
flat buffer or a copy per step: the step is traced over a virtual tensor the length of the run, whose data pointer
is a small descriptor of the members' grad addresses (:mod:`optcapture.rewrites.indirect_grad_loads` rewrites the
kernel's loads of it). :func:`grads_fit_table` says when a run's grads can be read so (CUDA, grads of their params'
layout, contiguous or channels_last; a DTensor's local tensor like its param's local shard); otherwise the captured
step copies them into flat storage.

Invariant: a table's addresses name the grads of the step that reads them: :meth:`GradTable.bind`, the one thing
here that runs per step (called by :mod:`optcapture.replay`), rewrites them before the step whenever a grad moved,
and refuses a grad the kernel could not read as one run in its param's element order.
"""

from __future__ import annotations

import array
import contextlib
import math
import operator
from collections.abc import Iterator, Sequence

import torch

from optcapture import _compat, dtensors
from optcapture.preparation import FlatGroup
from optcapture.slots import CudaArrayInterface


class GradTable:
    """What a bucket kernel reads a run's grads through, wherever autograd allocated them.

    ``descriptor`` holds, in this order: an int32 per chunk of ``chunk`` elements naming the member that owns
    it; per member, an int64 address (its grad's ``data_ptr`` minus its offset in bytes); per member, an
    int64 end offset. ``virtual`` is the run-length tensor the step is traced with: its data pointer is the
    descriptor's, which is all the rewritten kernel uses (:mod:`optcapture.rewrites.indirect_grad_loads`).

    Invariant: ``virtual``'s elements are never read: while Dynamo traces a step over it (which may read
    its operands, as foreach SGD does on torch 2.11), :func:`backed_by_memory` gives it real memory. The
    addresses are rewritten before a step whenever a grad moved, on the step's stream, so the kernel never
    reads a grad that is gone.
    """

    def __init__(self, flat: FlatGroup, positions: tuple[int, ...], chunk: int) -> None:
        start = flat.offsets[positions[0]]
        offsets = [flat.offsets[j] - start for j in positions]
        numels = [math.prod(flat.shapes[j]) for j in positions]
        length = offsets[-1] + numels[-1]
        chunks = -(-length // chunk)
        member_of_chunk = torch.empty(chunks, dtype=torch.int32)
        for member, (offset, numel) in enumerate(zip(offsets, numels, strict=True)):
            member_of_chunk[offset // chunk:-(-(offset + numel) // chunk)] = member
        self.chunk = chunk
        self.addresses_at = -(-chunks * 4 // 8)
        self.limits_at = self.addresses_at + len(positions)
        host = torch.zeros((self.limits_at + len(positions)) * 8, dtype=torch.uint8)
        host[:chunks * 4] = member_of_chunk.view(torch.uint8)
        limits = torch.tensor([o + n for o, n in zip(offsets, numels, strict=True)], dtype=torch.int64)
        host[self.limits_at * 8:] = limits.view(torch.uint8)
        self.descriptor = host.to(flat.key.device)
        _compat.mark_static(self.descriptor)
        itemsize = flat.key.dtype.itemsize

        def claim() -> torch.Tensor:
            return torch.as_tensor(CudaArrayInterface(self.descriptor, self.descriptor.data_ptr(), length * itemsize),
                                   device=flat.key.device).view(flat.key.dtype)

        self._claim = claim()
        self.virtual = claim()
        self.addresses = self.descriptor[self.addresses_at * 8:self.limits_at * 8].view(torch.int64)
        self._offset_bytes = [o * itemsize for o in offsets]
        # The order each grad must have where a param is not contiguous (None: every member is).
        orders = [_order_of(dtensors.local(flat.params[j])) for j in positions]
        self._orders = None if all(order is None for order in orders) else orders
        self._bound: list[int] = []
        # The address lists bound lately, on the device, by the addresses: grads that come back where they were
        # (the caching allocator hands a loop the same few blocks, step after step) are bound by a copy on the
        # device, without staging the list through pinned host memory again.
        self._known: dict[tuple[int, ...], torch.Tensor] = {}
        self.staged = 0  # address lists staged from the host
        # DTensor params (a run holds only DTensors or only plain tensors: grads_fit_table): their grads' local
        # tensors hold the elements (a DTensor's own data_ptr() is 0).
        reads_local = _of_dtensors(flat, positions)
        assert reads_local is not None, "a run of DTensor and plain params reaches a grad table"
        self.reads_local = reads_local

    def bind(self, grads: Sequence[torch.Tensor]) -> bool:
        """Point the table at ``grads`` (one per member; for DTensor params, their grads' local tensors); True when
        an address changed and was written.

        Each call reads every grad's address in one C-level pass (no Python per grad). Where one moved, the
        grads are checked to have their params' layout (Dynamo guards a grad only as not None, and the kernel reads
        each one as one run of its param's size, in its param's element order): :class:`GradLayoutError`
        otherwise, before anything is written.
        """
        if self.reads_local:
            grads = list(map(_LOCAL, grads))
        pointers = list(map(_DATA_PTR, grads))
        if pointers == self._bound:
            return False
        if not (all(map(_IS_CONTIGUOUS, grads)) if self._orders is None else all(map(_in_order, grads, self._orders))):
            raise GradLayoutError("a grad does not have its param's layout (contiguous, or its param's "
                                  "channels_last strides): the step reads it through a table of addresses")
        key = tuple(pointers)
        known = self._known.pop(key, None)
        if known is None:
            # array + frombuffer: a list of ints becomes a tensor without a Python-level conversion per element.
            values = torch.frombuffer(array.array("q", map(operator.sub, pointers, self._offset_bytes)),
                                      dtype=torch.int64)
            known = values.pin_memory().to(self.addresses.device, non_blocking=True)
            self.staged += 1
            if len(self._known) >= KNOWN_TABLES:
                del self._known[next(iter(self._known))]  # the least recently bound
        self._known[key] = known
        self.addresses.copy_(known, non_blocking=True)
        self._bound = pointers
        return True


KNOWN_TABLES = 4
"""How many address lists a :class:`GradTable` keeps on the device (a few bytes per member each)."""


class GradLayoutError(RuntimeError):
    """A grad the step would read in place has a layout its kernel cannot read (not its param's)."""


_DATA_PTR = torch.Tensor.data_ptr
_LOCAL = _compat.LOCAL_TENSOR
_IS_CONTIGUOUS = torch.Tensor.is_contiguous


def _order_of(p: torch.Tensor) -> tuple[int, ...] | None:
    """The element order a kernel reading ``p``'s slot expects of its grad: None for a contiguous param (strides of
    dims of size 1 do not matter), else the param's own (dense) strides."""
    return None if p.is_contiguous() else tuple(p.stride())


def _in_order(grad: torch.Tensor, order: tuple[int, ...] | None) -> bool:
    """``grad`` (of its param's shape) holds its elements in ``order`` (:func:`_order_of`): contiguous, or with
    exactly the param's dense strides, which make it dense too."""
    return grad.is_contiguous() if order is None else tuple(grad.stride()) == order


@contextlib.contextmanager
def backed_by_memory(tables: Sequence[GradTable]) -> Iterator[None]:
    """While active, each table's virtual grad has real memory of its own length (zeros), so tracing code that
    reads its operands reads memory it owns; afterwards the virtual grads are the descriptors again.

    On CUDA that memory is pinned host memory, which CUDA's unified addressing maps into the device's address space
    at the same address: a virtual grad is as long as a whole run of grads, and device memory for it raised the
    first call's peak by a copy of the params (1158 against fused=True's 768 MB for 6 x 64 MB of AdamW, H100)."""
    for table in tables:
        virtual = table.virtual
        if virtual.device.type == "cuda":
            host = torch.zeros(virtual.numel(), dtype=virtual.dtype, pin_memory=True)
            mapped = torch.as_tensor(CudaArrayInterface(host, host.data_ptr(), host.numel() * host.element_size()),
                                     device=virtual.device)
            virtual.data = mapped.view(virtual.dtype)
        else:
            virtual.data = torch.zeros(virtual.shape, dtype=virtual.dtype, device=virtual.device)
    try:
        yield
    finally:
        for table in tables:
            table.virtual.data = table._claim


def grads_fit_table(flat: FlatGroup, positions: tuple[int, ...]) -> str | None:
    """None when every member's grad can be read in place through a :class:`GradTable`; else why not."""
    if flat.key.device.type != "cuda":
        return "grads are read in place only on CUDA"
    if _of_dtensors(flat, positions) is None:
        return "a run holds both DTensor and plain params"
    for j in positions:
        # A DTensor param's grad is a DTensor of the same placements (checked by discovery): its local tensor is
        # what the kernel reads, like its param's local shard in flat storage (FSDP2's grads are views into its
        # reduce-scatter output, a new one each step: a table rewrite of a few bytes, no copy of the grads).
        p = dtensors.local(flat.params[j])
        grad = None if flat.params[j].grad is None else dtensors.local(flat.params[j].grad)
        if grad is None or type(grad) is not torch.Tensor or grad.dtype != p.dtype or grad.device != p.device \
                or grad.layout != torch.strided or grad.shape != p.shape or not _in_order(grad, _order_of(p)):
            return f"the grad of member {j} is not a tensor of its param's shape and layout"
    return None


def _of_dtensors(flat: FlatGroup, positions: tuple[int, ...]) -> bool | None:
    """Whether the members at ``positions`` are all DTensor params (True) or all plain (False); None if mixed."""
    kinds = {dtensors.is_dtensor(flat.params[j]) for j in positions}
    return kinds.pop() if len(kinds) == 1 else None
