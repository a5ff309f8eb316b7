"""Slots of flat storage: a tensor that views part of a flat buffer through a storage of exactly its own size
(:func:`alias`), and the element orders a slot keeps (:func:`own_stride`, :func:`same_order`).

Invariant: an alias's storage points into its owner's memory and holds a reference to the owner, so the flat buffer
lives as long as any tensor re-homed into it; :mod:`optcapture.preparation` makes the slots, the replay reads them.
"""

from __future__ import annotations

import ctypes
import math

import torch

__all__ = ["CudaArrayInterface", "Stride", "alias", "own_stride", "same_order"]


class CudaArrayInterface:
    """``nbytes`` of device memory at ``address``, as ``torch.as_tensor`` takes them, keeping ``owner`` alive."""

    def __init__(self, owner: torch.Tensor, address: int, nbytes: int) -> None:
        self.owner = owner  # keeps the flat buffer alive as long as any alias exists
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False),
                                         "version": 3, "strides": None}


Stride = tuple[int, ...]


def alias(owner: torch.Tensor, offset: int, shape: torch.Size, stride: Stride | None = None) -> torch.Tensor:
    """A tensor of ``shape`` at element ``offset`` of ``owner`` with a storage of its own size: contiguous, or of
    ``stride``, a dense layout of ``shape`` (channels_last), which spans the same ``prod(shape)`` elements.

    The storage points into ``owner``'s memory and holds a reference to ``owner``.
    """
    numel = math.prod(shape)
    nbytes = numel * owner.element_size()
    address = owner.data_ptr() + offset * owner.element_size()
    if owner.device.type == "cuda":
        raw = torch.as_tensor(CudaArrayInterface(owner, address, nbytes), device=owner.device)
    elif owner.device.type == "cpu":
        buffer = (ctypes.c_char * max(nbytes, 1)).from_address(address)
        buffer._optcapture_owner = owner  # type: ignore[attr-defined]
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)
    else:
        raise NotImplementedError(f"flat storage on {owner.device.type} devices")
    typed = raw.view(owner.dtype)
    return typed.view(shape) if stride is None else typed.as_strided(shape, stride)


def own_stride(tensor: torch.Tensor) -> Stride | None:
    """``tensor``'s strides where they are not the contiguous ones of its shape (channels_last; also a 1 x 1 conv's
    weight in channels_last, which is contiguous but strided otherwise on its dims of size 1); None where they are.
    A tensor moved into a slot keeps its exact strides, which Dynamo's guards of the step check. An elementwise
    update is the same in any element order as long as the param, its grad and its state share the order, so flat
    storage keeps each param's own (what autograd's grads and ``zeros_like`` state follow)."""
    stride, expected = tuple(tensor.stride()), []
    step = 1
    for size in reversed(tensor.shape):
        expected.append(step)
        step *= max(size, 1)
    return None if stride == tuple(reversed(expected)) else stride


def same_order(tensor: torch.Tensor, other: torch.Tensor) -> bool:
    """Two tensors of one shape hold their elements in the same order (strides equal on every dim of size > 1)."""
    return tensor.shape == other.shape and all(
        a == b for size, a, b in zip(tensor.shape, tensor.stride(), other.stride(), strict=True) if size != 1)
