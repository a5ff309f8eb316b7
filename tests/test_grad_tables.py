"""What a grad table accepts as a grad its kernel reads in place (the tables themselves run on CUDA:
``tests/gpu/test_cuda.py``)."""

from __future__ import annotations

import torch

from optcapture import grad_tables


def test_a_grad_is_read_in_place_when_its_elements_lie_in_its_params_order() -> None:
    # A channels_last conv weight, then a 1 x 1 conv weight and a bias, which are contiguous in either format.
    weight = torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last)
    pointwise = torch.randn(8, 4, 1, 1)
    orders = [grad_tables._order_of(p) for p in (weight, pointwise, torch.randn(8))]
    assert orders == [tuple(weight.stride()), None, None]
    grads = [torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last),
             torch.randn(8, 4, 1, 1).to(memory_format=torch.channels_last),  # strides differ on dims of size 1 only
             torch.randn(8)]
    assert pointwise.is_contiguous() and grads[1].stride() != pointwise.stride()
    assert all(map(grad_tables._in_order, grads, orders))
    assert not all(map(grad_tables._in_order, [torch.randn(8, 3, 3, 3), *grads[1:]], orders))  # contiguous: other order
    assert not all(map(grad_tables._in_order, [grads[0], grads[1], torch.randn(16)[::2]], orders))
