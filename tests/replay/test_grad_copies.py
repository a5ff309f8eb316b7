"""Grad copies into flat storage: whole segments of adjacent slots by one ``cat``, the rest by ``_foreach_copy_``."""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import pytest
import torch

from optcapture.replay.grad_copies import GradCopies
from optcapture.slots import alias


@dataclasses.dataclass
class _Flat:
    """The parts of a FlatGroup that grad copies read."""

    params: list[torch.Tensor]
    offsets: list[int]
    buffer: torch.Tensor
    grad_homes: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def grad_flat(self) -> torch.Tensor:
        return self.buffer

    @property
    def shapes(self) -> list[torch.Size]:
        return [p.shape for p in self.params]

    @property
    def strides(self) -> list[tuple[int, ...] | None]:
        return [None for _ in self.params]  # contiguous params

    @property
    def key(self) -> types.SimpleNamespace:  # a BucketKey's device: the buffer's
        return types.SimpleNamespace(device=self.buffer.device)


def _flat(shapes: list[tuple[int, ...]], align: int) -> _Flat:
    offsets, total = [], 0
    for shape in shapes:
        offsets.append(total)
        numel = torch.Size(shape).numel()
        total += -(-numel // align) * align
    buffer = torch.full((total,), -7.0)
    flat = _Flat([torch.empty(shape) for shape in shapes], offsets, buffer)
    flat.grad_homes = [alias(buffer, offset, torch.Size(shape)) for shape, offset in zip(shapes, offsets, strict=True)]
    return flat


@pytest.mark.parametrize(("shapes", "align", "segments", "singles"), [
    ([(64,)] * 5, 64, 1, 0),  # one cat
    ([(4, 16), (2, 16), (64,), (8, 8), (8, 8)], 16, 2, 1),  # (4,16)+(2,16); (64,) alone; (8,8)+(8,8)
    ([(60,)] * 3, 64, 0, 3),  # alignment gaps: one foreach copy
    ([(), (64,), (64,)], 1, 1, 1),  # a 0-dim grad is copied alone
])
def test_each_grad_lands_in_its_slot_and_padding_is_untouched(shapes: list[tuple[int, ...]], align: int,
                                                              segments: int, singles: int) -> None:
    flat = _flat(shapes, align)
    key: Any = "bucket"
    # Graph inputs in an order other than the members': the copies pick by input index.
    order = list(reversed(range(len(shapes))))
    slots = [(i, key, j) for i, j in enumerate(order)]
    copies = GradCopies(slots, {key: flat})  # type: ignore[dict-item]
    assert (len(copies.segments), len(copies.single_homes)) == (segments, singles)
    # 2-d grads non-contiguous (``p.grad = g.t()``): copied by value, as ``_foreach_copy_`` does.
    grads = [torch.randn(shapes[j][::-1]).t() if len(shapes[j]) == 2 else torch.randn(shapes[j]) for j in order]
    copies(grads)
    for i, j in enumerate(order):
        torch.testing.assert_close(flat.grad_homes[j], grads[i], rtol=0, atol=0)
    written = torch.zeros_like(flat.buffer, dtype=torch.bool)
    for j, shape in enumerate(shapes):
        written[flat.offsets[j]:flat.offsets[j] + torch.Size(shape).numel()] = True
    assert bool((flat.buffer[~written] == -7.0).all())


def test_a_grad_that_is_its_own_slot_is_copied_anyway() -> None:
    flat = _flat([(64,)] * 3, 64)
    key: Any = "bucket"
    copies = GradCopies([(i, key, i) for i in range(3)], {key: flat})  # type: ignore[dict-item]
    grads = [torch.randn(64), flat.grad_homes[1], torch.randn(64)]
    flat.grad_homes[1].fill_(5.0)
    copies(grads)
    assert torch.equal(flat.buffer, torch.cat([grads[0], torch.full((64,), 5.0), grads[2]]))


def test_grads_on_another_device_than_the_cpu_keep_one_foreach_copy() -> None:
    flat = _flat([(64,)] * 3, 64)
    flat.buffer = torch.empty(192, device="meta")  # stands for a CUDA buffer: only its device is read
    key: Any = "bucket"
    copies = GradCopies([(i, key, i) for i in range(3)], {key: flat})  # type: ignore[dict-item]
    assert (len(copies.segments), len(copies.single_homes)) == (0, 3)
