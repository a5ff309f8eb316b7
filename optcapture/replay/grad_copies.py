"""How a step copies the user's grads into flat storage: a few C-level calls, however many grads there are.

``torch._foreach_copy_`` copies one grad at a time on the CPU (about 1 us per grad on the CI machine, most of it
per-tensor dispatch). ``torch.cat(grads, out=...)`` copies a whole list in one operator (0.25 us per grad at 64
floats): grads that lie next to each other in flat storage, with no alignment gap between them and the same shape
past their first dimension, are copied as one such segment. What is left is copied by one ``_foreach_copy_``, as
is everything on CUDA (one multi-tensor kernel there already).

Invariant: every copied grad is written to exactly its own slot, the slot :attr:`FlatGroup.grad_homes` gives it;
nothing between slots (alignment padding) is written.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch

from optcapture.discovery import BucketKey
from optcapture.preparation import FlatGroup
from optcapture.slots import alias

Picker = Callable[[Sequence[Any]], tuple[Any, ...]]


def picker(indices: Sequence[int]) -> Picker:
    """``args -> tuple(args[i] for i in indices)``, in C."""
    if len(indices) == 1:
        (index,) = indices
        return lambda args: (args[index],)
    if not indices:
        return lambda args: ()
    return operator.itemgetter(*indices)


@dataclasses.dataclass
class _Segment:
    out: torch.Tensor  # the slots of consecutive members, as one tensor: (their first dims summed, *the rest)
    pick: Picker  # their grads, in member order, from the graph inputs
    homes: list[torch.Tensor]  # each member's own slot


class GradCopies:
    """Copies each step's grads (graph inputs) into their flat slots."""

    def __init__(self, slots: Sequence[tuple[int, BucketKey, int]], flats: dict[BucketKey, FlatGroup]) -> None:
        """``slots``: (graph input index, bucket, member position) of each grad to copy."""
        self.segments: list[_Segment] = []
        singles: list[tuple[int, BucketKey, int]] = []
        order = {key: n for n, key in enumerate(flats)}
        ordered = sorted(slots, key=lambda slot: (order[slot[1]], slot[2]))
        start = 0
        while start < len(ordered):
            end = start + 1
            while end < len(ordered) and _continues(flats, ordered[end - 1], ordered[end]):
                end += 1
            if end - start >= 2:
                self.segments.append(_segment(flats, ordered[start:end]))
            else:
                singles.append(ordered[start])
            start = end
        self.pick_singles = picker([index for index, _, _ in singles])
        self.single_homes = [flats[key].grad_homes[j] for _, key, j in singles]

    def __call__(self, args: Sequence[Any]) -> None:
        with torch.no_grad():
            for segment in self.segments:
                grads = segment.pick(args)
                try:
                    torch.cat(grads, out=segment.out)
                except RuntimeError:
                    # ``cat`` refuses a grad that shares memory with its slot (``_foreach_copy_`` copies it in place).
                    torch._foreach_copy_(segment.homes, grads)
            if self.single_homes:
                torch._foreach_copy_(self.single_homes, self.pick_singles(args))


def _continues(flats: dict[BucketKey, FlatGroup], before: tuple[int, BucketKey, int],
               after: tuple[int, BucketKey, int]) -> bool:
    """``after``'s slot starts where ``before``'s ends, and their grads concatenate along their first dim."""
    (_, key, j), (_, next_key, k) = before, after
    if next_key != key or k != j + 1:
        return False
    flat = flats[key]
    if flat.key.device.type != "cpu":
        return False  # measured on the CPU only; a CUDA step keeps its one multi-tensor copy
    if flat.strides[j] is not None or flat.strides[k] is not None:
        return False  # one alias of several slots is contiguous: a channels_last slot is not part of it
    shape, next_shape = flat.shapes[j], flat.shapes[k]
    return (len(shape) >= 1 and len(next_shape) == len(shape) and next_shape[1:] == shape[1:]
            and flat.offsets[k] == flat.offsets[j] + math.prod(shape))


def _segment(flats: dict[BucketKey, FlatGroup], run: Sequence[tuple[int, BucketKey, int]]) -> _Segment:
    _, key, first = run[0]
    flat = flats[key]
    shapes = [flat.shapes[j] for _, _, j in run]
    shape = torch.Size([sum(s[0] for s in shapes), *shapes[0][1:]])
    return _Segment(alias(flat.grad_flat(), flat.offsets[first], shape), picker([index for index, _, _ in run]),
                    [flat.grad_homes[j] for _, _, j in run])
