"""Stage 4, lowering: hand programs to Inductor (Triton kernels on CUDA, C++ on CPU).

Two programs are lowered here: the bucketed shadow step (one graph over flat storage, traced by
Dynamo with ``fullgraph=True``) and, where bucketing does not apply, the per-tensor graph Dynamo
gave us. Inductor configuration is patched per compile only (``compile_fx(config_patches=...)``).

Invariant: lowering never runs a step; the callables it returns do, when called.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from optcapture import _compat
from optcapture.bucketing import ShadowStep
from optcapture.config import CaptureConfig

log = logging.getLogger(__name__)


def inductor_patches(config: CaptureConfig, device: torch.device, cudagraphs: bool) -> dict[str, Any]:
    return {"triton.cudagraphs": bool(cudagraphs and config.cudagraphs and device.type == "cuda")}


def lower_shadow(shadow: ShadowStep, config: CaptureConfig, device: torch.device) -> Callable[[], None]:
    """The shadow step compiled by Inductor; replays under CUDA graph trees on CUDA when enabled."""
    patches = inductor_patches(config, device, cudagraphs=not shadow.aliased)
    if shadow.aliased and inductor_patches(config, device, cudagraphs=True)["triton.cudagraphs"]:
        log.info("%d runs share flat buffers (grads that come and go, or diverged step counts): "
                 "this capture replays without CUDA graphs", len(shadow.runs))

    def inductor_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        if log.isEnabledFor(logging.DEBUG):
            for node, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs, strict=False):
                what = (f"{tuple(value.shape)} {value.dtype} {value.device}" if isinstance(value, torch.Tensor)
                        else type(value).__name__)
                log.debug("  shadow input %s: %s", node.name, what)
        before = _compat.generated_kernel_count()
        compiled = _compat.compile_with_inductor(gm, example_inputs, patches)
        log.info("lowered %s: %d graph nodes -> %d kernel(s), %s", gm.__class__.__name__, len(gm.graph.nodes),
                 _compat.generated_kernel_count() - before, patches)
        return compiled

    compiled: Callable[[], None] = torch.compile(shadow.call, backend=inductor_backend, fullgraph=True,
                                                 dynamic=False)
    return compiled


def lower_graph(gm: torch.fx.GraphModule, example_inputs: list[Any], config: CaptureConfig) -> Callable[..., Any]:
    """The per-tensor graph compiled by Inductor, without CUDA graphs (they would copy every grad)."""
    devices = {t.device for t in example_inputs if isinstance(t, torch.Tensor)}
    device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
    before = _compat.generated_kernel_count()
    compiled = _compat.compile_with_inductor(gm, example_inputs, inductor_patches(config, device, cudagraphs=False))
    log.info("lowered the per-tensor graph: %d graph nodes -> %d kernel(s)", len(gm.graph.nodes),
             _compat.generated_kernel_count() - before)
    return compiled  # type: ignore[no-any-return]
