"""Slots of flat storage: an alias views its part of a flat buffer through a storage of its own size."""

from __future__ import annotations

import torch

from optcapture.slots import alias


def test_alias_has_its_own_storage_and_keeps_the_buffer_alive() -> None:
    flat = torch.arange(10, dtype=torch.float32)
    view = alias(flat, 3, torch.Size([2, 2]))
    assert view.untyped_storage().nbytes() == 16
    assert view.data_ptr() == flat.data_ptr() + 12
    view.fill_(-1.0)
    assert flat[3:7].tolist() == [-1.0] * 4
    del flat
    assert view.sum().item() == -4.0  # the storage still holds the buffer
