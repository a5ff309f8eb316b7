"""What a grad table accepts as a grad its kernel reads in place (the tables themselves run on CUDA:
``tests/gpu/test_cuda.py``)."""

from __future__ import annotations

import torch

from optcapture import grad_tables


def test_a_grad_is_read_in_place_when_its_elements_lie_in_its_params_order() -> None:
    # A channels_last conv weight, then a 1 x 1 conv weight and a bias, which are contiguous in either format.
    weight = torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last)
    pointwise = torch.randn(8, 4, 1, 1)
    strides = [tuple(weight.stride()), None, None]
    grads = [torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last),
             torch.randn(8, 4, 1, 1).to(memory_format=torch.channels_last),  # strides differ on dims of size 1 only
             torch.randn(8)]
    assert pointwise.is_contiguous() and grads[1].stride() != pointwise.stride()
    assert grad_tables._strides_are(grads, strides)
    assert not grad_tables._strides_are([torch.randn(8, 3, 3, 3), *grads[1:]], strides)  # contiguous: other order
    assert not grad_tables._strides_are([grads[0], grads[1], torch.randn(16)[::2]], strides)
