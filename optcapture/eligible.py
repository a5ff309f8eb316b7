"""Which params flat storage can hold: a plain, dense (contiguous, channels_last), real floating tensor that owns
all of its storage and shares it with no other tensor, or a DTensor whose local shard is one
(:mod:`optcapture.dtensors`).

Invariant: a param this module calls bucketable can be re-pointed at a slot of a flat buffer (``p.data = slot``)
without cutting it from memory anything else reads; everything else is refused with the reason.
"""

from __future__ import annotations

import torch

from optcapture import _compat, dtensors

FLAT_STORAGE = "_optcapture_flat_storage"
"""Attribute set on the flat buffers preparation makes: the shadow optimizer's params are slices of them."""

HOME_STORAGE = "_optcapture_home_holders"
"""Attribute set on the storage of each slot preparation moves a tensor into (``preparation._move_into_flat``): how
many tensors of optcapture's own hold it (the slot and the buffer it views), so that a param homed there is told
shared only when a tensor beyond those and the param holds it. A storage's Python object lives as long as the
storage."""


def bucketable(p: torch.Tensor, shards: dict[int, _compat.FsdpShard] | None = None) -> bool:
    """A param whose elements can live in a flat buffer in its own element order."""
    return not_bucketable_because(p, shards) is None


def not_bucketable_because(p: torch.Tensor, shards: dict[int, _compat.FsdpShard] | None = None) -> str | None:
    """Why ``p`` cannot move into flat storage, or None. Moving re-points ``p`` at a slot of a flat buffer
    (``p.data = slot``), which is only right for a plain tensor that owns all of its storage: a view of a larger
    buffer (ZeroRedundancyOptimizer's ``parameters_as_bucket_view``, a user's flat parameter) would be cut from it,
    and a tensor subclass keeps its elements elsewhere; a DTensor's local shard moves instead
    (:mod:`optcapture.dtensors`; ``shards``: FSDP2's shards of the params asked about, see there)."""
    if not p.is_floating_point() or p.is_complex():
        return f"has dtype {p.dtype}; only real floating params are bucketed"
    if dtensors.is_dtensor(p):
        why = dtensors.not_bucketable_because(p, shards)
        if why is not None:
            return why
        fsdp = dtensors.fsdp_shards([p]) if shards is None else shards
        if id(p) not in fsdp and _shares_storage_with_another(dtensors.local(p)):
            # FSDP2's local shard shares with FSDP2's padded shard by design (dtensors moves both).
            return ("is a DTensor whose local tensor shares its storage with another tensor (moving it into flat "
                    "storage would cut that tensor from its updates; clone what you keep to have it bucketed)")
        return None
    if type(p.data) is not torch.Tensor:
        return f"is a {type(p.data).__name__}, a tensor subclass, which keeps its elements elsewhere"
    if p.layout != torch.strided:
        return f"has layout {p.layout}; only strided params are bucketed"
    if not is_dense(p):
        return (f"is not dense (strides {tuple(p.stride())} for shape {tuple(p.shape)}: a transposed or sliced "
                "view): flat storage holds each param as one block of its elements, so only dense params "
                "(contiguous, channels_last or any other order of the dims) are bucketed")
    if getattr(p._base, FLAT_STORAGE, False):
        return None  # a shadow's run: a slice of the flat storage optcapture made itself
    if p.storage_offset() != 0 or p.untyped_storage().nbytes() != p.numel() * p.element_size():
        return ("is a view of a larger buffer (moving it into flat storage would cut it from that buffer, which "
                "would no longer see its updates)")
    if _shares_storage_with_another(p):
        # E.g. the one param of a ZeroRedundancyOptimizer(parameters_as_bucket_view=True) bucket: the bucket is a
        # view of all of the param's storage, and ZeRO broadcasts the bucket after each step.
        return ("shares its storage with another tensor (a view or alias of it that something holds, such as a kept "
                "model.state_dict(), a bucket of ZeroRedundancyOptimizer(parameters_as_bucket_view=True), or an "
                "autograd graph still alive at step(): a loss computed without torch.no_grad() and never "
                "backwarded): moving it into flat storage would cut that tensor from its updates; clone what you "
                "keep, or free it before the step, to have it bucketed")
    return None


def is_dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s elements fill one block of ``numel`` elements, each once, in some order of its dims
    (contiguous, channels_last, a permutation): dims of size 1 do not count, and the others, taken by increasing
    stride, each step over exactly the block the smaller ones span."""
    if tensor.is_contiguous():
        return True
    span = 1
    for size, stride in sorted((pair for pair in zip(tensor.shape, tensor.stride(), strict=True) if pair[0] != 1),
                               key=lambda pair: pair[1]):
        if stride != span:
            return False
        span *= size
    return True


def _shares_storage_with_another(tensor: torch.Tensor) -> bool:
    # A tensor already homed in a slot optcapture made shares its storage with the slot by design: only a holder
    # beyond optcapture's own counts (an alias made after the capture would go stale when the capture is rebuilt).
    own: int = getattr(tensor.untyped_storage(), HOME_STORAGE, 0)
    return _compat.storage_holders(tensor) > 1 + own
