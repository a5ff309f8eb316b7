"""The one configuration object of optcapture and the parser of ``torch.compile(options=...)``.

Invariant: every option a user can pass is a field of :class:`CaptureConfig`; an unknown key
or a value of the wrong kind is an :class:`~optcapture.OptionError` (a ``TypeError`` and a ``ValueError``),
never ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from optcapture.errors import OptionError

FallbackPolicy = Literal["eager", "raise"]

DEFAULT_FALLBACK: FallbackPolicy = "eager"
DEFAULT_BUCKETING = True
DEFAULT_CUDAGRAPHS = True
DEFAULT_GRADS_IN_PLACE = True
DEFAULT_AUTOTUNE = False
DEFAULT_ALIGN_ELEMENTS = 64  # 256 B for fp32: keeps every tensor's slot 16-byte aligned for vector loads


@dataclasses.dataclass(frozen=True)
class CaptureConfig:
    """How optcapture captures an optimizer step: ``torch.compile(opt.step, backend="optcapture", options={...})``
    or ``optcapture.capture(opt, options)`` take these fields as a dict (or a ``CaptureConfig``); an unknown key or a
    value of the wrong kind is an :class:`~optcapture.OptionError`. Each field's docstring below is its documentation
    (``docs/api.md`` is generated from them)."""

    fallback: FallbackPolicy = DEFAULT_FALLBACK
    """``"eager"``: what cannot be captured runs on the stock path (Inductor's per-tensor graph, or eagerly) and is
    warned about once per reason. ``"raise"``: every such case is an :class:`~optcapture.UnsupportedStepError`
    naming the reason. A step Dynamo hands optcapture no graph of (``fused=True``; a graph break at which Dynamo gives
    the step's frame up, Adafactor's on torch 2.13) is seen only through :func:`optcapture.capture`, which raises
    before the step where that is known ahead (a ``fused=True`` group); otherwise the first call, which has then
    stepped uncompiled, warns (an error comes before anything is applied, or not at all), and every later call
    raises before stepping. Compiled as ``torch.compile(opt.step,
    backend="optcapture")``, such a step never calls optcapture: it runs uncompiled, neither said nor raised."""
    bucketing: bool = DEFAULT_BUCKETING
    """Compile elementwise updates once per bucket (param group x device x dtype) over flat storage. ``False`` keeps
    the per-tensor Inductor graph, as stock ``torch.compile`` runs it."""
    cudagraphs: bool = DEFAULT_CUDAGRAPHS
    """Replay the step under Inductor's CUDA graph trees on CUDA devices (no effect on CPU)."""
    grads_in_place: bool = DEFAULT_GRADS_IN_PLACE
    """On CUDA, the bucket kernel reads each grad where autograd allocated it, through a table of addresses, so a
    default ``zero_grad()`` loop costs no grad copy. ``False`` copies fresh grads into flat storage before each step
    (the CPU path always does)."""
    align_elements: int = DEFAULT_ALIGN_ELEMENTS
    """Each tensor's slot in a flat bucket starts at a multiple of this many elements (a positive int)."""
    autotune: bool = DEFAULT_AUTOTUNE
    """Benchmark launch configurations of the step's kernels at their first run (Inductor's
    ``triton.autotune_pointwise``). Off by default: on one flat bucket Inductor's heuristic configuration measured
    the same step time, and autotuning cost seconds of the first call. ``mode="max-autotune"`` turns it on."""

    def __post_init__(self) -> None:
        if self.fallback not in ("eager", "raise"):
            raise OptionError(f"optcapture option 'fallback' must be 'eager' or 'raise', got {self.fallback!r}")
        for name in ("bucketing", "cudagraphs", "grads_in_place", "autotune"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"optcapture option {name!r} must be a bool, got {getattr(self, name)!r}")
        # bool is an int subclass: True would pass as an alignment of 1 element.
        if isinstance(self.align_elements, bool) or not isinstance(self.align_elements, int) or self.align_elements < 1:
            raise OptionError(f"optcapture option 'align_elements' must be a positive int, got {self.align_elements!r}")


_FIELDS = {f.name for f in dataclasses.fields(CaptureConfig)}


def parse_options(options: Mapping[str, Any] | CaptureConfig | None = None, mode: str | None = None) -> CaptureConfig:
    """Build a :class:`CaptureConfig` from ``torch.compile(..., options=..., mode=...)``; ``options`` may be a
    :class:`CaptureConfig` itself.

    ``mode`` is accepted for ``torch.compile`` compatibility: ``"reduce-overhead"`` means CUDA-graph
    replay, which is already the default; the ``"max-autotune"`` modes also autotune kernel launches.
    """
    if mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        raise OptionError(f"optcapture does not know torch.compile mode {mode!r}")
    if isinstance(options, CaptureConfig):
        options = dataclasses.asdict(options)
    if options is not None and not isinstance(options, Mapping):
        raise OptionError(f"optcapture options must be a dict or an optcapture.CaptureConfig, got "
                          f"{type(options).__name__}")
    options = dict(options or {})
    unknown = sorted(set(options) - _FIELDS)
    if unknown:
        raise OptionError(f"unknown optcapture option(s) {unknown}; known options are {sorted(_FIELDS)}")
    if mode == "max-autotune-no-cudagraphs":
        options.setdefault("cudagraphs", False)
    if mode in ("max-autotune", "max-autotune-no-cudagraphs"):
        options.setdefault("autotune", True)
    return CaptureConfig(**options)
