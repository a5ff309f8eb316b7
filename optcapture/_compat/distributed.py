"""DTensor's and FSDP2's internals (see :mod:`optcapture._compat`)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import operator
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

# DTensor and FSDP2 (``fully_shard``) internals, read by optcapture.dtensors.


def dtensor_class() -> type | None:
    """``torch.distributed.tensor.DTensor``, or None on a build without distributed support."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    cls: type = DTensor
    return cls


def local_tensor(tensor: torch.Tensor) -> torch.Tensor | None:
    """The local shard of a DTensor (its ``_local_tensor``: the one object the DTensor keeps, where ``to_local()``
    makes a new wrapper at each call), or None for any other tensor."""
    cls = dtensor_class()
    if cls is None or not isinstance(tensor, cls):
        return None
    local: torch.Tensor = tensor._local_tensor  # type: ignore[attr-defined]
    return local


def dtensor_layout(tensor: torch.Tensor) -> tuple[Any, tuple[str, ...]]:
    """(device mesh, each placement named ``shard(dim)``, ``replicate`` or ``partial``) of a DTensor."""
    names = []
    for placement in tensor.placements:  # type: ignore[attr-defined]
        if placement.is_shard():
            names.append(f"shard({placement.dim})")
        elif placement.is_replicate():
            names.append("replicate")
        else:
            names.append("partial" if placement.is_partial() else type(placement).__name__)
    return tensor.device_mesh, tuple(names)  # type: ignore[attr-defined]


def fsdp_sharded_params() -> dict[int, Any]:
    """``id(sharded param) -> FSDPParam`` of every param FSDP2's ``fully_shard`` manages in this process, found
    through the states ``torch.distributed._composable_state`` maps modules to (torch/distributed/fsdp/_fully_shard/
    _fsdp_state.py: ``_fsdp_param_groups``, a single ``_fsdp_param_group`` on older torch)."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:
        return {}
    found: dict[int, Any] = {}
    for state_ref in list(_module_state_mapping.values()):
        state = state_ref()
        if not isinstance(state, FSDPState):
            continue
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            single = state.__dict__.get("_fsdp_param_group")
            groups = [single] if single is not None else []
        for group in groups:
            for fsdp_param in group.fsdp_params:
                found[id(fsdp_param.sharded_param)] = fsdp_param
    return found


@dataclasses.dataclass(frozen=True)
class FsdpShard:
    """What FSDP2 keeps of one param's shard besides the DTensor (torch/distributed/fsdp/_fully_shard/
    _fsdp_param.py): ``_sharded_param_data``, the 1-D padded shard each forward all-gathers, whose first elements
    the DTensor's local tensor views."""

    fsdp_param: Any
    padded_numel: int
    pinned: bool  # CPU offload with pinned memory: FSDP2 re-pins (copies) a shard that is not pinned

    @property
    def padded_data(self) -> torch.Tensor:
        data: torch.Tensor = self.fsdp_param._sharded_param_data
        return data

    def all_gather_from(self, padded: torch.Tensor) -> None:
        """Make FSDP2 all-gather from ``padded`` (1-D, ``padded_numel`` elements)."""
        self.fsdp_param._sharded_param_data = padded


def fsdp_shard(fsdp_param: Any) -> FsdpShard | None:
    """The shard FSDP2 keeps of ``fsdp_param``, or None when FSDP2 keeps it in a form optcapture does not know."""
    data = getattr(fsdp_param, "_sharded_param_data", None)
    size = getattr(fsdp_param, "padded_sharded_param_size", None)
    if not isinstance(data, torch.Tensor) or type(data) is not torch.Tensor or size is None:
        return None
    return FsdpShard(fsdp_param, data.numel(), bool(getattr(fsdp_param, "pin_memory", False)))


LOCAL_TENSOR: Callable[[torch.Tensor], torch.Tensor] = operator.attrgetter("_local_tensor")
"""A DTensor's local tensor, read in C (a step maps it over every DTensor it checks)."""


@contextlib.contextmanager
def grads_shaped_like_their_params(params: Iterable[torch.Tensor]) -> Iterator[int]:
    """While Dynamo traces a step: each grad that is a view (FSDP2's local grads view its reduce-scatter output; DDP's
    ``gradient_as_bucket_view=True`` grads view its buckets) stands in for the time of the call as a tensor over the
    same memory, same size, strides and offset, whose view structure is its param's: not a view where the param is
    none, else a view of a root with as many dims as the param's base. Yields how many stood in.

    Why: when Dynamo fakes a param and its grad has another view structure, it fakes the grad with every size, stride
    and offset symbolic (torch/_subclasses/meta_utils.py, ``_grad_context_compatible``, the fix of pytorch#176667).
    The step's frame then passes each grad's storage offset as a graph input and guards each grad's base in Python at
    every call, and the trace pays sympy for all of it (an FSDP2 GPT-2 step's first call: 1.3x the same step's
    without FSDP2). Faked like its param, the grad gets static sizes; the real views that come at later calls pass the
    frame's guards, which check sizes, strides and dtype and not the view structure, and the compiled step reads them
    where they lie (grad tables, copies) exactly as it read the stand-ins. The user's grad objects are the same
    objects after the call: a DTensor grad gets its own local tensor back, a plain param its own grad.
    """
    dtensor = dtensor_class()
    restore: list[Callable[[], None]] = []
    try:
        for p in params:
            grad = p.grad
            if grad is None:
                continue
            if dtensor is not None and isinstance(p, dtensor) and isinstance(grad, dtensor):
                local = grad._local_tensor  # type: ignore[attr-defined]
                stand_in = _stand_in(p._local_tensor, local)  # type: ignore[attr-defined]
                if stand_in is not None:
                    grad._local_tensor = stand_in  # type: ignore[attr-defined]
                    restore.append(functools.partial(setattr, grad, "_local_tensor", local))
            elif type(p) in (torch.Tensor, torch.nn.Parameter) and type(grad) is torch.Tensor:
                stand_in = _stand_in(p, grad)
                if stand_in is not None:
                    p.grad = stand_in
                    restore.append(functools.partial(_give_back_grad, p, stand_in, grad))
        yield len(restore)
    finally:
        for undo in reversed(restore):
            undo()


def _give_back_grad(param: torch.Tensor, stand_in: torch.Tensor, grad: torch.Tensor) -> None:
    """``param.grad = grad`` again, unless the step itself set another grad (or None) in place of the stand-in."""
    if param.grad is stand_in:
        param.grad = grad


def _stand_in(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
    """``grad``'s memory with ``param``'s view structure (see :func:`grads_shaped_like_their_params`), or None when
    ``grad`` has it already."""
    if not grad._is_view() or grad.is_sparse or grad.layout != torch.strided:
        return None
    storage = grad.untyped_storage()
    with torch.no_grad():
        root = torch.empty(0, dtype=grad.dtype, device=grad.device)
        if not param._is_view():
            return root.set_(storage, grad.storage_offset(), grad.size(), grad.stride())
        dims = param._base.ndim
        assert grad._base is not None
        if grad._base.ndim == dims:
            return None
        root.set_(storage, 0, (storage.nbytes() // grad.element_size(),) + (1,) * (dims - 1))
        return root.as_strided(grad.size(), grad.stride(), grad.storage_offset())
