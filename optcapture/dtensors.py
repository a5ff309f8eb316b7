"""Where the elements of a DTensor live for flat storage: its local shard, and the FSDP2 storage around it.

An elementwise update of DTensors whose placements agree is the same update of each rank's local tensor
(``torch.distributed.tensor`` runs a pointwise op on the local shards), so flat storage holds local shards, one
kernel per bucket, and the DTensor objects (params, ``optimizer.state`` entries) stay what they are: only their
local tensors' storage moves. Params that FSDP2 (``fully_shard``) shards also live in FSDP2's padded 1-D shard
(``FSDPParam._sharded_param_data``), which each forward all-gathers from: it is moved into the same slot.

Invariant: a DTensor is re-homed by pointing its existing local tensor (the same object) into flat storage; for a
param FSDP2 shards, FSDP2's padded shard then views the same slot (the slot's room is the padded size, its padding
zeros), so the next all-gather reads the updated values. Anything else about a DTensor is never changed.
"""

from __future__ import annotations

import math

import torch

from optcapture import _compat

# Placements whose local shard an elementwise update steps like a whole tensor: every operand of the update has
# the param's placements (checked for grads and state), so each rank steps its own elements.
_ELEMENTWISE_PLACEMENTS = frozenset({"shard(0)", "replicate"})


def is_dtensor(tensor: torch.Tensor) -> bool:
    return _compat.local_tensor(tensor) is not None


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor that holds ``tensor``'s elements on this rank: its local shard, or ``tensor`` itself."""
    shard = _compat.local_tensor(tensor)
    return tensor if shard is None else shard


def local_shape(tensor: torch.Tensor) -> torch.Size:
    return local(tensor).shape


def fsdp_shards(params: list[torch.Tensor]) -> dict[int, _compat.FsdpShard]:
    """``id(param) -> FsdpShard`` of the DTensors of ``params`` that FSDP2 shards (empty without any DTensor)."""
    if not any(map(is_dtensor, params)):
        return {}
    managed = _compat.fsdp_sharded_params()
    shards = {}
    for p in params:
        fsdp_param = managed.get(id(p))
        shard = _compat.fsdp_shard(fsdp_param) if fsdp_param is not None else None
        if shard is not None:
            shards[id(p)] = shard
    return shards


def not_bucketable_because(p: torch.Tensor, shards: dict[int, _compat.FsdpShard] | None = None) -> str | None:
    """Why the local shard of the DTensor ``p`` cannot move into flat storage, or None. ``shards``:
    :func:`fsdp_shards` of params that include ``p``, made once for all of them (finding FSDP2's shards walks every
    FSDP2 state of the process: once per param, a capture would cost the square of the param count)."""
    shard = local(p)
    _, placements = _compat.dtensor_layout(p)
    if not set(placements) <= _ELEMENTWISE_PLACEMENTS:
        return (f"is a DTensor placed {list(placements)}: only Shard(0) and Replicate DTensors are bucketed (their "
                "local shards; fully_shard's default placement is Shard(0))")
    if type(shard) is not torch.Tensor:
        return (f"is a DTensor whose local tensor is a {type(shard).__name__} (a tensor subclass, e.g. an FSDP2 "
                "all-gather extension), which is not bucketed")
    if shard.layout != torch.strided or not shard.is_contiguous():
        return "is a DTensor whose local tensor is not a contiguous strided tensor"
    fsdp = (fsdp_shards([p]) if shards is None else shards).get(id(p))
    if fsdp is not None:
        if fsdp.pinned:
            return ("is sharded by fully_shard with CPUOffloadPolicy(pin_memory=True): FSDP2 re-pins (copies) a "
                    "shard that is not pinned memory; pin_memory=False keeps it bucketable")
        data = fsdp.padded_data
        if shard.numel() > data.numel() or (shard.numel() > 0 and shard.data_ptr() != data.data_ptr()):
            return "is sharded by fully_shard but its local tensor is not the start of FSDP2's padded shard"
        return None
    if shard.storage_offset() != 0 or shard.untyped_storage().nbytes() != shard.numel() * shard.element_size():
        return ("is a DTensor whose local tensor is a view of a larger buffer (moving it into flat storage would cut "
                "it from that buffer)")
    return None


def differs_because(p: torch.Tensor, other: torch.Tensor, what: str) -> str | None:
    """Why ``other`` (a grad or state tensor of the DTensor or plain tensor ``p``) is not stepped element for element
    with ``p``'s local shard, or None: both DTensors on one mesh with the same placements and local shape, or both
    plain."""
    if is_dtensor(p) != is_dtensor(other):
        return f"{what} is a DTensor and its param is not, or the other way round"
    if not is_dtensor(p):
        return None
    if _compat.dtensor_layout(p) != _compat.dtensor_layout(other):
        return (f"{what} is placed {list(_compat.dtensor_layout(other)[1])}, its param "
                f"{list(_compat.dtensor_layout(p)[1])} (or on another mesh)")
    if local_shape(other) != local_shape(p):
        return f"{what}'s local shape {tuple(local_shape(other))} differs from its param's {tuple(local_shape(p))}"
    return None


def footprint(p: torch.Tensor, shards: dict[int, _compat.FsdpShard]) -> int:
    """Elements of ``p``'s slot: its local elements, or FSDP2's padded shard where that is larger."""
    numel: int = math.prod(local_shape(p))
    shard = shards.get(id(p))
    return numel if shard is None else max(numel, shard.padded_numel)


def share_with_fsdp(shard: _compat.FsdpShard, padded_home: torch.Tensor) -> None:
    """Make FSDP2 all-gather from ``padded_home`` (the param's slot at its padded size, holding the shard's values
    and zeros after them)."""
    shard.all_gather_from(padded_home.view(-1))
